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


def test_fiona_serve_log_never_quotes_a_received_invalid_uid(
    tmp_path: Path, storescu: str, empty_projects: Path
) -> None:
    """A received instance whose Series Instance UID embeds a birth date and an MRN (invalid:
    a component with a leading zero) goes through routing and the anonymize step of a running
    ``fiona serve``; its log never shows the UID."""
    import os
    import time

    import yaml

    from tests import synth
    from tests.peers import FionaServer, nodelay_env

    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"scan_interval_seconds": 0.5}))
    key = empty_projects / "p.key"
    key.write_bytes(os.urandom(40))
    os.chmod(key, 0o600)
    out = tmp_path / "out"
    project = {
        "name": "p",
        "routing": {"calling_ae": ["MR1"]},
        "completeness": {"study_quiet_seconds": 1},
        "pipeline": [
            {"step": "anonymize", "secret_file": "p.key"},
            {"step": "copy", "to": str(out)},
        ],
    }
    (empty_projects / "p.yaml").write_text(yaml.safe_dump(project))
    spec = synth.make_study_spec(7)
    [ds] = synth.make_study(spec, [synth.MR_SERIES["localizer"]], size=8)[:1]
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.7.19610203.00123456"
    [path] = synth.write_study([ds], tmp_path / "send")
    server = FionaServer(tmp_path / "data", empty_projects, config=site).start()
    try:
        sent = subprocess.run(
            [storescu, "-aet", "MR1", "-aec", "FIONA", "127.0.0.1", str(server.port), str(path)],
            capture_output=True, text=True, timeout=120, env=nodelay_env(),
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(out.rglob("*.dcm")):
            time.sleep(0.3)
    finally:
        server.stop()
    log = server.log_text()
    assert any(out.rglob("*.dcm")), log
    assert "19610203" not in log and "00123456" not in log
