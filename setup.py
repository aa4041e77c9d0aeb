"""Only what pyproject.toml cannot say: an installed (non-editable) dmzctl carries the shipped data
that lives beside the package in the source tree, xml/ (base documents, the nwfilter) and systemd/
(the unit templates), as dmzctl/_data/{xml,systemd}. An editable install reads them in the tree."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("xml", "systemd")


class BuildWithData(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        root = Path(__file__).resolve().parent
        for name in SHIPPED:
            target = Path(self.build_lib) / "dmzctl" / "_data" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(root / name, target, ignore=shutil.ignore_patterns(".*", "__pycache__"))


setup(cmdclass={"build_py": BuildWithData})
