import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--regenerate", action="store_true", default=False,
                     help="Rewrite golden files from the current output instead of comparing.")


@pytest.fixture
def regenerate(request):
    return request.config.getoption("--regenerate") or os.environ.get("DMZCTL_REGENERATE") == "1"
