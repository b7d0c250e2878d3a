"""Screenshots of the web portal for the README: the dashboard and a study page.

Builds a throw-away site in a temporary folder (two projects; synthetic studies from
``tests/synth.py``, imported with ``fiona ingest``; one delivery held so the dashboard shows
something to do), starts ``fiona serve`` with the portal, logs in headless Chromium (Debian's
``chromium`` and ``chromium-driver``, through Selenium) as a user *without* the PHI grant and
saves ``dashboard.png`` and ``study.png``. The data is synthetic and the pages are checked for
the synthetic patients' names before anything is saved.

    .venv/bin/python scripts/screenshots.py            # writes docs/img/*.png
    .venv/bin/python scripts/screenshots.py --out /tmp/shots
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import synth  # noqa: E402  (the repository's synthetic DICOM)

PASSWORD = "screenshots only, thrown away"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fiona(root: Path, *argv: str) -> None:
    where = ["--config", str(root / "site.yaml"), "--data", str(root / "data"),
             "--projects", str(root / "projects")]  # fmt: skip
    subprocess.run([sys.executable, "-m", "engine.cli", *argv, *where], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def _site(root: Path, web_port: int) -> None:
    """Two projects: ``lung-ct`` (from CT1, delivered to a folder) and ``brain-mr`` (from MR1,
    delivered to a folder that is missing, so its study is held as ``transfer_failed``)."""
    projects = root / "projects"
    projects.mkdir()
    key = projects / "p.key"
    key.write_bytes(os.urandom(40))
    key.chmod(0o600)
    for name, aet, share in (("lung-ct", "CT1", root / "out"), ("brain-mr", "MR1", root / "no")):
        doc = {
            "name": name,
            "routing": {"calling_ae": [aet]},
            "completeness": {"study_quiet_seconds": 1},
            "pipeline": [{"step": "classify"}, {"step": "anonymize", "secret_file": "p.key"},
                         {"step": "send", "to": "share"}],
            "destinations": {"share": {"type": "folder", "path": str(share),
                                       "retry": {"max_attempts": 1}}},
        }  # fmt: skip
        (projects / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (root / "out").mkdir()
    site = {"scan_interval_seconds": 0.5, "web": {"enabled": True, "port": web_port}}
    (root / "site.yaml").write_text(yaml.safe_dump(site))


def _studies(root: Path) -> list[str]:
    """Import synthetic studies (three CT, one MR); the patients' names, to check for."""
    names = []
    for seed, aet in ((61, "CT1"), (62, "CT1"), (63, "CT1"), (64, "MR1")):
        spec = synth.make_study_spec(seed)
        series = list(synth.CT_SERIES.values())[:2] if aet == "CT1" else [
            synth.MR_SERIES["t1_mprage"]]  # fmt: skip
        files = synth.write_study(synth.make_study(spec, series, size=16), root / f"in-{seed}")
        _fiona(root, "ingest", "--no-progress", "--calling-ae", aet, str(files[0].parent))
        names += [spec.patient_name, spec.patient_id]
    return names


def _wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"fiona serve did not open port {port}")


def _browser() -> object:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                 "--disable-dev-shm-usage", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _shoot(driver: object, url: str, out: Path, phi: list[str]) -> None:
    driver.get(url)  # type: ignore[attr-defined]
    html = driver.page_source  # type: ignore[attr-defined]
    leaked = [v for v in phi if v and v in html]
    if leaked or "Not done" in html:
        raise SystemExit(f"{url}: not saved (PHI on the page, or an error page)")
    height = driver.execute_script("return document.body.scrollHeight")  # type: ignore[attr-defined]
    driver.set_window_size(1280, min(max(int(height) + 20, 600), 2000))  # type: ignore[attr-defined]
    driver.save_screenshot(str(out))  # type: ignore[attr-defined]
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory(prefix="fiona-shots-") as tmp:
        root, port = Path(tmp), _free_port()
        _site(root, port)
        phi = _studies(root)
        (root / "pw").write_text(PASSWORD + "\n")
        _fiona(root, "user", "add", "demo", "--role", "viewer",
               "--password-file", str(root / "pw"))  # fmt: skip
        log = (root / "serve.log").open("wb")
        serve = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--port", str(_free_port()),
             "--config", str(root / "site.yaml"), "--data", str(root / "data"),
             "--projects", str(root / "projects")],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        driver = _browser()
        try:
            _wait_port(port)
            time.sleep(5)  # the first scans: studies complete, deliveries run or fail
            base = f"http://127.0.0.1:{port}"
            driver.get(f"{base}/login")  # type: ignore[attr-defined]
            driver.find_element(By.ID, "name").send_keys("demo")  # type: ignore[attr-defined]
            driver.find_element(By.ID, "password").send_keys(PASSWORD)  # type: ignore[attr-defined]
            driver.find_element(By.CSS_SELECTOR, "#login button").click()  # type: ignore[attr-defined]
            _shoot(driver, f"{base}/", args.out / "dashboard.png", phi)
            driver.get(f"{base}/studies?project=lung-ct")  # type: ignore[attr-defined]
            link = driver.find_element(By.CSS_SELECTOR, "tr.study a")  # type: ignore[attr-defined]
            _shoot(driver, str(link.get_attribute("href")), args.out / "study.png", phi)
        finally:
            driver.quit()  # type: ignore[attr-defined]
            serve.terminate()
            serve.wait(timeout=30)
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
