"""Screenshots of the MLflow UI with two tracked runs compared (for ``docs/tracking.md``).

Starts ``mlflow ui`` on 127.0.0.1 over a store, opens the runs' comparison page and one metric's chart across
both runs in headless Chromium (Selenium with the system chromedriver, as ``tests/test_browser.py``), saves
the screenshots, and stops the server.

    python tools/mlflow_screenshot.py --store sqlite:///reports/mlflow.db --runs demo demo_seed1 \\
        --metric seq2/fold0/val_wll --out docs/img/mlflow_compare.png

Needs the ``track`` extra (MLflow) and chromium + chromedriver (``.ci/install_browser.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds:.0f} s")


def _chrome(profile: Path, size: tuple[int, int]):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--hide-scrollbars", f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


#: The UI's assistant side panel hides half the page: press its close button.
_CLOSE_ASSISTANT = """
const b = document.querySelector("button[aria-label='Close']");
if (b) { b.click(); }
"""
_SCROLL_TO = """
let last = null;
for (const el of document.querySelectorAll('*')) {
  if (el.textContent.trim() === arguments[0]) { last = el; }
}
if (last) { last.scrollIntoView({block: 'start'}); }
"""


def _shot(driver, url: str, wait_text: list[str], out: Path, seconds: float = 60, scroll_to: str = "") -> None:
    """Open ``url``, wait until every text of ``wait_text`` shows, close the assistant panel, scroll to the
    heading ``scroll_to``, let charts settle, save a small PNG."""
    from PIL import Image

    driver.get(url)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        body = driver.find_element("tag name", "body").text
        if all(t in body for t in wait_text):
            break
        time.sleep(0.5)
    else:
        raise TimeoutError(f"{url}: {wait_text} did not show in {seconds:.0f} s")
    driver.execute_script(_CLOSE_ASSISTANT)
    time.sleep(1)
    if scroll_to:
        # the params that differ only (two runs share most of them), then the comparison tables in view
        driver.execute_script("const s = document.querySelector(\"button[role='switch']\"); if (s) { s.click(); }")
        time.sleep(1)
        driver.execute_script(_SCROLL_TO, scroll_to)
    time.sleep(3)  # charts draw after the data arrives
    raw = out.with_suffix(".raw.png")
    driver.save_screenshot(str(raw))
    Image.open(raw).convert("RGB").quantize(colors=96).save(out, optimize=True)
    raw.unlink()
    print(f"{out}  ({url})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="backend store URI, e.g. sqlite:///reports/mlflow.db")
    ap.add_argument("--experiment", default="ichd")
    ap.add_argument("--runs", nargs=2, required=True, help="two run names (the latest run of each name)")
    ap.add_argument("--metric", default="seq2/fold0/val_wll", help="the step metric to chart across both runs")
    ap.add_argument("--out", type=Path, default=Path("docs/img/mlflow_compare.png"))
    args = ap.parse_args(argv)

    from mlflow.tracking import MlflowClient

    c = MlflowClient(args.store)
    exp = c.get_experiment_by_name(args.experiment)
    if exp is None:
        print(f"{args.store}: no experiment {args.experiment!r}")
        return 1
    ids = []
    for name in args.runs:
        found = c.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            print(f"{args.store}: no run named {name!r}")
            return 1
        ids.append(found[0].info.run_id)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.store,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_http(base + "/health", 90)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            driver = _chrome(Path(tmp) / "profile", (1400, 1000))
            try:
                runs = urllib.parse.quote(json.dumps(ids))
                exps = urllib.parse.quote(json.dumps([exp.experiment_id]))
                _shot(driver, f"{base}/#/compare-runs?runs={runs}&experiments={exps}", args.runs, args.out,
                      scroll_to="Run details")
                metric = urllib.parse.quote(json.dumps(args.metric))
                chart = args.out.with_name(args.out.stem + "_curve.png")
                _shot(driver, f"{base}/#/metric?runs={runs}&metric={metric}&experiments={exps}"
                              f"&plot_metric_keys={urllib.parse.quote(json.dumps([args.metric]))}&x_axis=step",
                      [args.metric.split("/")[0]], chart)
            finally:
                driver.quit()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
