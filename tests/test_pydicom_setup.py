"""pydicom never writes a header value to fiona's log or stderr (engine.dicom.pydicom_setup)."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import grimp
import pytest
from pydicom import config
from pydicom.dataelem import DataElement

from engine.dicom import pydicom_setup

ROOT = Path(__file__).resolve().parents[1]
SETUP = "engine.dicom.pydicom_setup"


def test_every_module_that_uses_pydicom_imports_the_settings() -> None:
    """A module that imports pydicom or pynetdicom imports the setup module too, itself or
    through the modules it imports or the packages it is in (imported first at run time)."""
    graph = grimp.build_graph("engine", include_external_packages=True)
    users = set()
    for package in ("pydicom", "pynetdicom"):
        users |= graph.find_modules_that_directly_import(package)
    users.discard(SETUP)
    missing = []
    for module in sorted(users):
        parts = module.split(".")
        chain = {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
        reached = set(chain)
        for name in chain:
            reached |= graph.find_upstream_modules(name)
        if SETUP not in reached:
            missing.append(module)
    assert missing == []


def test_validation_is_off_and_pydicom_logs_stay_with_pydicom() -> None:
    pydicom_setup.configure()
    assert config.settings.reading_validation_mode == config.IGNORE
    assert config.settings.writing_validation_mode == config.IGNORE
    assert logging.getLogger("pydicom").propagate is False


def test_an_invalid_value_is_not_quoted(caplog: pytest.LogCaptureFixture) -> None:
    """What the red-team found (an invalid UI quoted by pydicom's validation) read and
    written in this process: no warning, no log record."""
    pydicom_setup.configure()
    uid = "1.2.826.0.1.3680043.8.498.7.19610203.00123456"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        DataElement(0x0020000E, "UI", uid)
        DataElement(0x00100020, "LO", "X" * 80)
    assert [str(w.message) for w in caught] == []
    assert "19610203" not in caplog.text


@pytest.mark.parametrize(
    "module", ["engine.deid.export", "engine.manage.explain_file", "engine.net.scp"]
)
def test_entry_points_set_pydicom_up(module: str) -> None:
    """In a fresh interpreter, importing an entry point and reading an invalid UI prints
    nothing."""
    code = (
        f"import {module}, io, logging, pydicom\n"
        "logging.basicConfig(level=logging.DEBUG)\n"
        "from pydicom.dataelem import DataElement\n"
        "DataElement(0x0020000E, 'UI', '1.2.3.4.19610203.00123456')\n"
        "print(pydicom.config.settings.reading_validation_mode)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == str(config.IGNORE)
    assert "19610203" not in run.stderr
