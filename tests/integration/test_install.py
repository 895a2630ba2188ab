"""Installing from the checkout prints no warning: the README's and scripts' ``pip install -e
.``, and the plain ``pip install .`` the Debian package and the arm64 image build through.

pip shows what the build backend warns (setuptools' deprecations) even with ``-q``; a fresh
install that warns of builds "no longer supported" by a date is a defect a user meets first.
Needs PyPI for the isolated build environment (setuptools), as every install from source does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.gateway_process import REPO

pytestmark = pytest.mark.integration


def _pip_install(target_python: Path, *args: str) -> str:
    """pip of the test environment installing into another interpreter's environment."""
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(target_python),
                           "install", "--no-deps", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=300, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def _origin(python: Path, module: str) -> str:
    """Where ``module`` is found (--no-deps: importing it would need its dependencies)."""
    done = subprocess.run([str(python), "-c", "import importlib.util, sys; "
                           "print(importlib.util.find_spec(sys.argv[1]).origin)", module],
                          cwd="/", capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _fresh_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                   timeout=60)
    return path / "bin" / "python"


def test_the_license_is_an_spdx_string() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))


def test_an_editable_install_from_the_checkout_prints_no_warning(tmp_path: Path) -> None:
    python = _fresh_venv(tmp_path / "venv")
    output = _pip_install(python, "-e", str(REPO))
    assert "warning" not in output.lower(), output
    assert "deprecat" not in output.lower(), output
    assert _origin(python, "gateway") == str(REPO / "gateway" / "__init__.py")
    assert _origin(python, "openhqm") == str(REPO / "openhqm" / "__init__.py")


def test_a_wheel_install_prints_no_warning_and_carries_the_compat_package(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy, as packaging/build-deb.sh builds from one
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("gateway", "openhqm"):
        shutil.copytree(REPO / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    python = _fresh_venv(tmp_path / "venv")
    output = _pip_install(python, str(source))
    assert "warning" not in output.lower(), output
    assert "site-packages/gateway/" in _origin(python, "gateway")
    # the seed's import path for custom handlers travels with the package
    assert "site-packages/openhqm/queue/" in _origin(python, "openhqm.queue")
