"""The viewers and the reports in a real browser: JupyterLab + headless Debian Chromium driven by Selenium,
at a 1366x768 window.

A small notebook is written to a temporary root and run through JupyterLab's UI ("Run All Cells"): notebook 06's
slice viewer on fabricated studies (``builders.fabricated_studies``) and notebook 01's study browser on a
fabricated catalog and cache. The slice slider is moved with the keyboard and the test checks that the image's
pixels, the strip's slice marker and the caption follow; then, for both viewers, that image, slider and caption
are visible together on the 1366x768 screen, numbered the same way. A second test opens an executed HTML report
of the smoke run and finds its figures. Skips with the reason when Chromium, chromedriver, Selenium or JupyterLab
are missing (``.ci/install_browser.sh`` installs the first two). Nothing is downloaded at run time; the server is
always killed; total runtime is bounded. With ``ICHD_SCREENSHOTS=<folder>`` the screenshots are kept there.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TESTS_DIR = Path(__file__).resolve().parent
#: The whole test (server start, page, kernel, run, interaction) must end within this many seconds.
BUDGET_S = 120.0
#: The screen the viewers must fit (controls, image and caption visible together).
SCREEN = (1366, 768)

NOTEBOOK_CODE = f"""\
import sys
sys.path.insert(0, {str(TESTS_DIR)!r})
from builders import fabricated_studies
from ichdlib.review.viewer import SliceViewer, ViewerState, show

studies, cams = fabricated_studies(n_studies=2, n=10, size=96)
viewer = show(ViewerState.from_studies(studies, cams))  # a live kernel: the widgets, not a static figure
assert isinstance(viewer, SliceViewer), type(viewer)
"""

#: Notebook 01's study browser over a fabricated catalog (one labelled and one unlabelled test study, 96 px).
BROWSER_CODE = """\
import numpy as np
import pandas as pd
from IPython.display import display
from ichdlib.review.explore import study_browser

rows = []
for s, split in enumerate(["train", "test"]):
    for i in range(12):
        lab = float(split == "train" and 4 <= i < 8)
        rows.append({"study_uid": f"1.2.826.0.1.3680043.8.498.{s}0000000001", "sop_uid": f"ID_{s:02d}{i:08x}",
                     "slice_index": i, "z": 5.0 * i, "row": len(rows), "split": split,
                     **{c: (lab if split == "train" else np.nan) for c in
                        ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]}})
cat = pd.DataFrame(rows)
rr, cc = np.mgrid[:96, :96]
def head(i):  # skull ring, brain, a bright lesion that moves along z
    d = np.hypot(rr - 48, cc - 48)
    img = np.where(d < 34, 35.0, -1000.0)
    img[(d >= 30) & (d < 34)] = 1200.0
    img[np.hypot(rr - 36 - i, cc - 56) < 7] = 75.0
    return img

cache = np.stack([head(i % 12) for i in range(len(cat))]).astype(np.int16)
browser = study_browser(cat, cache)
display(browser)
"""

# JS run in the page: a summary of the pixels an <img> shows (drawn to a canvas), and where the red
# slice marker sits on the strip.
PIXELS_JS = """
const img = document.querySelector(arguments[0]);
if (!img || !img.complete || !img.naturalWidth) { return null; }
const c = document.createElement('canvas');
c.width = img.naturalWidth; c.height = img.naturalHeight;
const ctx = c.getContext('2d');
ctx.drawImage(img, 0, 0);
const d = ctx.getImageData(0, 0, c.width, c.height).data;
let h = 0, redX = 0, redN = 0;
for (let i = 0; i < d.length; i += 4) {
  h = (h * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) % 2147483647;
  if (d[i] > 190 && d[i + 1] < 60 && d[i + 2] < 60) { redX += (i / 4) % c.width; redN += 1; }
}
return {hash: h, redX: redN ? redX / redN : null, w: c.width, src: img.src};
"""

#: The training loops' progress in a live front end: widget bars and a curve updated in place.
PROGRESS_CODE = """\
import time
from ichdlib.progress import TrainingProgress

with TrainingProgress("demo_cnn") as p:
    assert p.live, "JupyterLab is a live front end"
    for fold in (0, 1):
        p.fold(fold, 3)
        for e in range(3):
            for _ in p.batches(range(4)):
                time.sleep(0.02)
            p.epoch(e, 0.3 - 0.05 * e, 0.25 - 0.02 * e - 0.01 * fold, 100.0, 0.1)
"""


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} not installed (run .ci/install_browser.sh: apt-get install chromium chromium-driver)"
    for mod in ("selenium", "jupyterlab", "ipywidgets"):
        try:
            __import__(mod)
        except ImportError:
            return f"python package {mod!r} not installed in this environment"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_notebook(path: Path) -> None:
    nb = {
        "cells": [{"cell_type": "code", "execution_count": None, "id": "viewer", "metadata": {},
                   "outputs": [], "source": NOTEBOOK_CODE},
                  {"cell_type": "code", "execution_count": None, "id": "browser", "metadata": {},
                   "outputs": [], "source": BROWSER_CODE},
                  {"cell_type": "code", "execution_count": None, "id": "progress", "metadata": {},
                   "outputs": [], "source": PROGRESS_CODE}],
        "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                    "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb))


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        left = max(0.5, self.end - time.monotonic())
        return min(left, cap) if cap else left


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a free 127.0.0.1 port with a random token and a temporary root."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path / "root"
    root.mkdir()
    _write_notebook(root / "viewer.ipynb")
    token, port = secrets.token_hex(16), _free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in {"MPLBACKEND", "ICHD_HEADLESS", "PAPERMILL_EXECUTION", "JUPYTER_TOKEN"}}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jconfig"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jruntime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
        "IPYTHONDIR": str(tmp_path / "ipython"), "HF_HUB_OFFLINE": "1",
    })
    # no "would you like news?" toast, no update check (no network anyway)
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    log_path = tmp_path / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = Deadline(BUDGET_S)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline.end - 45:
                pytest.fail(f"JupyterLab did not answer within its share of the time budget:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": f"{base}/lab/tree/viewer.ipynb?token={token}", "api": f"{base}/api/kernels?token={token}",
               "tmp": tmp_path, "log": log_path,
               "deadline": deadline}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)


def _chrome(profile: Path, monkeypatch):
    """Headless Chromium at 1366x768 through /usr/bin/chromedriver (Selenium Manager never consulted)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager, if ever reached, must not download
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--hide-scrollbars", f"--window-size={SCREEN[0]},{SCREEN[1]}", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)


@pytest.fixture
def browser(lab, monkeypatch):
    driver = _chrome(lab["tmp"] / "chrome-profile", monkeypatch)
    driver.set_page_load_timeout(lab["deadline"].left(30))
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver, tmp: Path, name: str) -> Path:
    """Save a screenshot in the test's folder, and in $ICHD_SCREENSHOTS when set."""
    out = tmp / f"{name}.png"
    driver.save_screenshot(str(out))
    keep = os.environ.get("ICHD_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(keep) / out.name)
    return out


# JS: where an element sits relative to the viewport (after the caller scrolled its widget into view).
RECT_JS = """
const el = document.querySelector(arguments[0]);
if (!el) { return null; }
const r = el.getBoundingClientRect();
return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, width: r.width, height: r.height,
        vw: window.innerWidth, vh: window.innerHeight, text: el.innerText || ''};
"""


def _fits_screen(driver, container: str, parts: list[str]) -> dict:
    """Scroll ``container`` to the top of its scroll area, then measure ``parts``; all must be on screen."""
    driver.execute_script("document.querySelector(arguments[0]).scrollIntoView({block: 'start'});", container)
    time.sleep(0.3)
    rects = {p: driver.execute_script(RECT_JS, p) for p in parts}
    for part, r in rects.items():
        assert r is not None, f"{part} not found"
        assert r["width"] > 0 and r["height"] > 0, (part, r)
        assert r["top"] >= -1 and r["bottom"] <= r["vh"] + 1 and r["right"] <= r["vw"] + 1, \
            f"{part} is not fully visible on a {SCREEN[0]}x{SCREEN[1]} screen: {r}"
    return rects


def _kernel_ready(api: str) -> bool:
    """The server's view: the notebook's kernel is idle and the page holds a connection to it."""
    try:
        with urllib.request.urlopen(api, timeout=2) as r:
            kernels = json.loads(r.read())
    except (OSError, ValueError):
        return False
    return any(k.get("execution_state") == "idle" and k.get("connections", 0) >= 1 for k in kernels)


def _status(driver) -> tuple[int, int] | None:
    from selenium.webdriver.common.by import By

    els = driver.find_elements(By.CSS_SELECTOR, ".ichd-status")
    m = re.search(r"slice (\d+)/(\d+)", els[0].text) if els else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def test_viewer_in_jupyterlab(lab, browser):
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver, deadline = browser, lab["deadline"]

    def wait(cond, what: str, cap: float = 40.0):
        try:
            return WebDriverWait(driver, deadline.left(cap), poll_frequency=0.25).until(cond)
        except WebDriverException as exc:
            shot = lab["tmp"] / "failure.png"
            driver.save_screenshot(str(shot))
            shutil.copy(lab["log"], lab["tmp"] / "jupyterlab-at-failure.log")
            pytest.fail(f"browser: timed out waiting for {what} ({type(exc).__name__}); screenshot {shot};\n"
                        f"server log tail:\n{lab['log'].read_text()[-2000:]}")

    driver.get(lab["url"])
    wait(EC.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")), "the notebook")
    wait(lambda d: _kernel_ready(lab["api"]) and d.find_elements(
        By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']"), "a connected, idle kernel")
    # Run > Run All Cells, through the UI
    wait(EC.element_to_be_clickable((By.XPATH, "//div[contains(@class,'lm-MenuBar-itemLabel')][.='Run']")),
         "the Run menu").click()
    wait(EC.element_to_be_clickable((By.XPATH, "//li[contains(@class,'lm-Menu-item')]"
                                               "[.//div[contains(@class,'lm-Menu-itemLabel')][.='Run All Cells']]")),
         "Run All Cells").click()
    slider = ".ichd-slice-slider .noUi-handle"

    def slider_or_dialog(d):
        # JupyterLab may ask which kernel to use (a "Select Kernel" dialog): accept its default
        for button in d.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-Dialog-button.jp-mod-accept"):
            if button.is_displayed():
                button.click()
        return any(e.is_displayed() for e in d.find_elements(By.CSS_SELECTOR, slider))

    wait(slider_or_dialog, "the viewer's slice slider", cap=60)
    before = wait(lambda d: d.execute_script(PIXELS_JS, "img.ichd-image"), "the slice image")
    strip0 = wait(lambda d: d.execute_script(PIXELS_JS, "img.ichd-strip"), "the probability strip")
    pos0 = wait(lambda d: _status(d), "the caption")
    assert strip0["redX"] is not None, "no slice marker on the strip"

    # move the slider one step with the keyboard (towards the middle of the study)
    step = 1 if pos0[0] < pos0[1] else -1
    handle = driver.find_element(By.CSS_SELECTOR, slider)
    driver.execute_script("arguments[0].focus();", handle)
    handle.send_keys(Keys.ARROW_RIGHT if step > 0 else Keys.ARROW_LEFT)

    pos1 = wait(lambda d: (s := _status(d)) and s != pos0 and s, "the caption to follow the slider", cap=20)
    assert pos1 == (pos0[0] + step, pos0[1])
    after = wait(lambda d: (p := d.execute_script(PIXELS_JS, "img.ichd-image")) and p["hash"] != before["hash"]
                 and p, "the slice image to change", cap=20)
    strip1 = wait(lambda d: (p := d.execute_script(PIXELS_JS, "img.ichd-strip")) and p["redX"] != strip0["redX"]
                  and p, "the slice marker to move", cap=20)
    assert after["src"] != before["src"]
    # the marker moved in the slider's direction by about one slice's width of the strip
    assert (strip1["redX"] - strip0["redX"]) * step > 0, (strip0["redX"], strip1["redX"])
    # the slider's readout and the caption number the slice the same way (1..n)
    readout = driver.find_element(By.CSS_SELECTOR, ".ichd-slice-slider .widget-readout").text.strip()
    assert readout == str(pos1[0]), (readout, pos1)

    # 06's viewer: image, slider and caption on one 1366x768 screen; the 96 px image is not blown up
    rects = _fits_screen(driver, ".ichd-viewer", [".ichd-image", ".ichd-slice-slider", ".ichd-status"])
    assert rects[".ichd-image"]["width"] <= 4 * 96 + 2, rects[".ichd-image"]
    assert "1.2.3." in driver.find_element(By.CSS_SELECTOR, ".ichd-study-picker select").get_attribute(
        "innerText"), "full study names in the picker"
    _screenshot(driver, lab["tmp"], "viewer_06")

    # 01's study browser: the same checks, and its caption names the slice as the slider does
    wait(lambda d: any(e.is_displayed() for e in d.find_elements(By.CSS_SELECTOR, ".ichd-browser-image")),
         "notebook 01's study browser", cap=40)
    rects = _fits_screen(driver, ".ichd-browser",
                         [".ichd-browser-image", ".ichd-browser-slider", ".ichd-browser-caption"])
    assert rects[".ichd-browser-image"]["width"] <= 4 * 96 + 2, rects[".ichd-browser-image"]
    readout = driver.find_element(By.CSS_SELECTOR, ".ichd-browser-slider .widget-readout").text.strip()
    caption = rects[".ichd-browser-caption"]["text"]
    assert f"slice {readout}/12" in caption, (readout, caption)
    assert "1.2.826.0.1.3680043.8.498.00000000001" in driver.find_element(
        By.CSS_SELECTOR, ".ichd-browser-study select").get_attribute("innerText"), "full study names"
    _screenshot(driver, lab["tmp"], "browser_01")

    # live progress: one epoch bar (reset per fold, not one per fold) and the curve as an image output
    def progress_done(d):
        cells = d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")
        if len(cells) < 3:
            return False
        d.execute_script("arguments[0].scrollIntoView({block: 'start'});", cells[2])
        text = " ".join(cells[2].get_attribute("textContent").replace("\xa0", " ").split())  # tqdm uses &nbsp;
        return "demo_cnn fold 1" in text and "3/3" in text and cells[2]

    cell = wait(progress_done, "the live progress of the third cell", cap=30)
    text = " ".join(cell.get_attribute("textContent").replace("\xa0", " ").split())
    assert text.count("demo_cnn fold") == 1, text
    assert cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img"), "no live training curve"
    assert "train loss 0." not in text  # the headless per-epoch lines are not printed in a live front end
    assert deadline.left() > 0.5, "browser test exceeded its time budget"


def test_html_report_shows_its_figures(smoke_run, tmp_path, monkeypatch):
    """The executed 02 report as a user opens it: a file in the browser, figures rendered, no repr clutter."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from selenium.webdriver.common.by import By

    html = smoke_run.P.reports_dir / "02_cnn_training.html"
    driver = _chrome(tmp_path / "chrome-profile", monkeypatch)
    try:
        driver.set_page_load_timeout(30)
        driver.get(html.as_uri())
        imgs = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")
        loaded = [i for i in imgs if driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 100;", i)]
        assert len(loaded) >= 2, f"{html.name}: {len(loaded)} rendered figures"
        text = driver.find_element(By.TAG_NAME, "body").text
        assert "PosixPath(" not in text and "<Figure size" not in text
        assert "epoch 1/1" in text and "val wLL" in text  # the compact per-epoch log
        driver.execute_script("document.getElementById('Training').scrollIntoView({block: 'start'});")
        _screenshot(driver, tmp_path, "report_02")
    finally:
        driver.quit()


def test_missing_browser_gives_a_clear_skip_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    reason = _missing()
    assert reason and "no-chromium not installed" in reason and "install_browser.sh" in reason
