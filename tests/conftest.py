import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--regenerate", action="store_true", default=False,
                     help="Rewrite golden files from the current output instead of comparing.")


@pytest.fixture
def regenerate(request):
    return request.config.getoption("--regenerate") or os.environ.get("DMZCTL_REGENERATE") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under scripts/test.sh (DMZCTL_NO_SKIP=1) the set-up provides every tool and privilege the
    host tests ask for: a skip there means something is missing, and must not pass for a success."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("DMZCTL_NO_SKIP") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped under scripts/test.sh, which must provide everything: {reason}"


@pytest.fixture(scope="session", autouse=True)
def private_hooks_dir(tmp_path_factory):
    """`dmzctl up` installs libvirt's hooks by default. The suite keeps them in a directory of its
    own, so that libvirtd on this machine is neither changed nor signalled by every test; the tests
    about the hooks themselves point DMZCTL_HOOKS_DIR at /etc/libvirt/hooks and clean up after."""
    if "DMZCTL_HOOKS_DIR" not in os.environ:
        os.environ["DMZCTL_HOOKS_DIR"] = str(tmp_path_factory.mktemp("libvirt-hooks"))
    yield os.environ["DMZCTL_HOOKS_DIR"]


@pytest.fixture(scope="session", autouse=True)
def private_state_dir(tmp_path_factory):
    """`dmzctl verify` keeps its last results under the state directory (/var/lib/dmzctl by default):
    the suite's runs keep theirs in a directory of its own."""
    if "DMZCTL_STATE_DIR" not in os.environ:
        os.environ["DMZCTL_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    yield os.environ["DMZCTL_STATE_DIR"]
