"""Reproduce the PACS screenshots of docs/pacs.md: a throwaway Orthanc on 127.0.0.1 with HTTP authentication, its
DICOMweb plugin and its Web Viewer plugin (Debian ``orthanc-webviewer``), holding a --valid-uids phantom study;
``ichd predict --dicomweb ... --cam --pmap --store`` with an untrained bundle (smoke architecture) and the
credentials in the environment; then, in headless Chromium (Selenium + /usr/bin/chromedriver):

- ``<img>/orthanc_study.png``: Orthanc Explorer's study page (the CT, the SR and the Grad-CAM series);
- ``<img>/orthanc_webviewer_cam.png``: Orthanc's Web Viewer on the CT series at one slice, next to the Grad-CAM
  series at the overlay that references that slice (found by SOP Instance UID; the two must show the same slice);
- ``<img>/sr_dsr2html.png``: the stored SR, retrieved back over WADO-RS, rendered as text by DCMTK's dsr2html.

    python tools/pacs_screenshot.py [--img docs/img] [--keep]

Needs Orthanc + orthanc-dicomweb (``.ci/install_pacs.sh``), orthanc-webviewer, dcmtk (dsr2html), chromium and
chromedriver (``.ci/install_browser.sh``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test servers (tests/pacs_servers.py)


def _chrome(profile: Path, size: tuple[int, int], auth: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                "--disable-sync", "--hide-scrollbars", f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=opts)
    driver.execute_cdp_cmd("Network.enable", {})  # the Orthanc user's credentials on every request of the page
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": auth}})
    return driver


def _viewer_at(driver, url: str, series: str, index: int, out: Path) -> None:
    """Orthanc's Web Viewer on ``series`` at its ``index``-th image (0-based; moved with the slider's keys)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(f"{url}/web-viewer/app/viewer.html?series={series}")
    time.sleep(3)
    handle = driver.find_element(By.CSS_SELECTOR, "#slider .ui-slider-handle")
    handle.click()
    handle.send_keys(Keys.HOME)
    for _ in range(index):
        handle.send_keys(Keys.ARROW_RIGHT)
    time.sleep(2)
    driver.save_screenshot(str(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--keep", action="store_true", help="leave Orthanc running (prints its URL) until Enter")
    args = ap.parse_args()
    import pacs_servers as ps
    import pydicom
    from PIL import Image, ImageDraw

    from ichdlib.cli import main as ichd
    from ichdlib.config import load_params
    from ichdlib.phantom.synth import generate_phantom
    from ichdlib.serve.bundle import Bundle
    from ichdlib.serve.dicomweb import Server

    need = [ps.missing(), None if ps.plugin("libOrthancWebViewer") else "orthanc-webviewer is not installed",
            None if shutil.which("dsr2html") else "dsr2html (dcmtk) is not installed",
            None if Path("/usr/bin/chromedriver").exists() else "chromedriver is not installed"]
    if any(need):
        print("; ".join(n for n in need if n))
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="ichd-pacs-"))
    user, password = "radiologist", secrets.token_hex(12)
    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        with ps.orthanc(tmp / "orthanc", users={user: password}, plugins=("libOrthancWebViewer",)) as url:
            generate_phantom(tmp / "phantom", studies=4, seed=2, size=128, workers=1, progress=False, valid_uids=True)
            man = json.loads((tmp / "phantom" / "phantom_manifest.json").read_text())
            study = next(s for s in man["studies"] if any(les["slices"] for les in s["lesions"]))["study_uid"]
            for f in sorted((tmp / "phantom").glob("stage_2_*/*.dcm")):
                if str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) == study:
                    requests.post(f"{url}/instances", data=f.read_bytes(), auth=(user, password),
                                  timeout=30).raise_for_status()
            P = load_params(REPO / "params" / "smoke.yaml", {"root": str(tmp / "root")})
            bundle = Bundle.untrained(P, folds=1).save(tmp / "bundle")
            os.environ.update({"ICHD_DICOMWEB_USER": user, "ICHD_DICOMWEB_PASSWORD": password})
            rc = ichd(["predict", "--dicomweb", f"{url}/dicom-web/studies/{study}", "--bundle", str(bundle),
                       "--out", str(tmp / "out"), "--cam", "--pmap", "--threshold", "0.52", "--store",
                       "--device", "cpu"])
            if rc != 0:
                return rc
            get = lambda path: requests.get(f"{url}{path}", auth=(user, password), timeout=30).json()  # noqa: E731
            orthanc_id = requests.post(f"{url}/tools/lookup", data=study, auth=(user, password), timeout=10).json()[0]["ID"]
            series = {s["MainDicomTags"].get("SeriesDescription", s["MainDicomTags"]["Modality"]): s
                      for s in get(f"/studies/{orthanc_id}/series")}
            ct = next(s for s in series.values() if s["MainDicomTags"]["Modality"] == "CT")
            cam = next(s for d, s in series.items() if "Grad-CAM -" in d)
            sr = next(s for s in series.values() if s["MainDicomTags"]["Modality"] == "SR")
            args.img.mkdir(parents=True, exist_ok=True)
            driver = _chrome(tmp / "profile", (1100, 700), auth)
            try:
                driver.get(f"{url}/app/explorer.html#study?uuid={orthanc_id}")
                time.sleep(3)
                driver.save_screenshot(str(tmp / "study.png"))
                # a Grad-CAM overlay in the middle of its series, and the CT slice it references
                cam_order = [p.split("/")[2] for p in get(f"/series/{cam['ID']}/ordered-slices")["Dicom"]]
                ct_order = [get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
                            for i in (p.split("/")[2] for p in get(f"/series/{ct['ID']}/ordered-slices")["Dicom"])]
                k = len(cam_order) // 2
                tags = get(f"/instances/{cam_order[k]}/simplified-tags")
                ref = tags["SourceImageSequence"][0]["ReferencedSOPInstanceUID"]
                j = ct_order.index(ref)
                driver.set_window_size(560, 600)
                _viewer_at(driver, url, ct["ID"], j, tmp / "ct.png")
                _viewer_at(driver, url, cam["ID"], k, tmp / "cam.png")
            finally:
                driver.quit()
            # the stored SR, as the PACS gives it back, rendered as text by dsr2html
            server = Server(f"{url}/dicom-web")
            ds = server.client.retrieve_instance(study_instance_uid=study,
                                                 series_instance_uid=get(f"/series/{sr['ID']}")["MainDicomTags"]["SeriesInstanceUID"],
                                                 sop_instance_uid=get(f"/instances/{sr['Instances'][0]}")["MainDicomTags"]["SOPInstanceUID"])
            ds.save_as(tmp / "sr.dcm", enforce_file_format=True)
            subprocess.run(["dsr2html", "+Cm", str(tmp / "sr.dcm"), str(tmp / "sr.html")], check=True)
            subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--hide-scrollbars", "--window-size=900,1000", f"--screenshot={tmp / 'sr.png'}",
                            f"file://{tmp / 'sr.html'}"], check=True, capture_output=True, timeout=60)

            def small(src: Path, dst: Path) -> None:  # small PNGs for docs/
                Image.open(src).convert("RGB").quantize(colors=64).save(dst, optimize=True)

            small(tmp / "study.png", args.img / "orthanc_study.png")
            small(tmp / "sr.png", args.img / "sr_dsr2html.png")
            a, b = Image.open(tmp / "ct.png").convert("RGB"), Image.open(tmp / "cam.png").convert("RGB")
            both = Image.new("RGB", (a.width + b.width + 10, max(a.height, b.height) + 28), "white")
            both.paste(a, (0, 28))
            both.paste(b, (a.width + 10, 28))
            draw = ImageDraw.Draw(both)
            draw.text((8, 8), f"CT series, image {j + 1} of {len(ct_order)}", fill="black")
            draw.text((a.width + 18, 8), f"Grad-CAM series, image {k + 1} of {len(cam_order)} "
                      f"({tags.get('ImageComments', '')[:40]}): references that CT slice", fill="black")
            both.save(tmp / "both.png")
            small(tmp / "both.png", args.img / "orthanc_webviewer_cam.png")
            print(f"screenshots in {args.img}: orthanc_study.png, orthanc_webviewer_cam.png (CT image {j + 1}, "
                  f"Grad-CAM image {k + 1}), sr_dsr2html.png")
            if args.keep:
                input(f"Orthanc at {url}/app/explorer.html (user {user}, password {password}); Enter stops it ")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
