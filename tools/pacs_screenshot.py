"""Reproduce docs/img/orthanc_study.png: a throwaway Orthanc + DICOMweb on 127.0.0.1 holding a --valid-uids phantom
study, ``ichd predict --dicomweb ... --cam --store`` with an untrained bundle (smoke architecture), and a headless
Chromium screenshot of Orthanc's web UI (Orthanc Explorer) on that study: the CT series, the SR and the Grad-CAM
series side by side (and ``<out>_cam_preview.png``: Orthanc's rendering of one Grad-CAM instance).

    python tools/pacs_screenshot.py --out docs/img/orthanc_study.png [--keep]

Needs Orthanc + orthanc-dicomweb (``.ci/install_pacs.sh``) and chromium (``.ci/install_browser.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "orthanc_study.png")
    ap.add_argument("--keep", action="store_true", help="leave Orthanc running (prints its URL) until Enter")
    args = ap.parse_args()
    import pydicom

    from ichdlib.cli import main as ichd
    from ichdlib.config import load_params
    from ichdlib.phantom.synth import generate_phantom
    from ichdlib.serve.bundle import Bundle

    plugin = next(iter(sorted(Path("/usr/share/orthanc/plugins").glob("libOrthancDicomWeb.so*"))), None)
    if shutil.which("Orthanc") is None or plugin is None or shutil.which("chromium") is None:
        print("needs Orthanc, its DICOMweb plugin and chromium (.ci/install_pacs.sh, .ci/install_browser.sh)")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="ichd-pacs-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {"Name": "ichd-demo", "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
           "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
           "DicomServerEnabled": False, "Plugins": [str(plugin)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (tmp / "orthanc.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen(["Orthanc", str(tmp / "orthanc.json")], stdout=open(tmp / "orthanc.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                requests.get(f"{url}/system", timeout=1).raise_for_status()
                break
            except requests.RequestException:
                time.sleep(0.1)
        generate_phantom(tmp / "phantom", studies=4, seed=2, size=128, workers=1, progress=False, valid_uids=True)
        man = json.loads((tmp / "phantom" / "phantom_manifest.json").read_text())
        study = next(s for s in man["studies"] if any(les["slices"] for les in s["lesions"]))["study_uid"]
        for f in sorted((tmp / "phantom").glob("stage_2_*/*.dcm")):
            if str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) == study:
                requests.post(f"{url}/instances", data=f.read_bytes(), timeout=30).raise_for_status()
        P = load_params(REPO / "params" / "smoke.yaml", {"root": str(tmp / "root")})
        bundle = Bundle.untrained(P, folds=1).save(tmp / "bundle")
        rc = ichd(["predict", "--dicomweb", f"{url}/dicom-web/studies/{study}", "--bundle", str(bundle),
                   "--out", str(tmp / "out"), "--cam", "--pmap", "--threshold", "0.5", "--store", "--device", "cpu"])
        if rc != 0:
            return rc
        orthanc_id = requests.post(f"{url}/tools/lookup", data=study, timeout=10).json()[0]["ID"]
        page = f"{url}/app/explorer.html#study?uuid={orthanc_id}"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        raw = tmp / "shot.png"
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-extensions", "--hide-scrollbars", "--window-size=1100,700",
                        "--virtual-time-budget=8000", f"--screenshot={raw}", page],
                       check=True, capture_output=True, timeout=120)
        from PIL import Image

        Image.open(raw).convert("RGB").quantize(colors=64).save(args.out, optimize=True)  # small PNG for docs/
        print(f"screenshot of {page}: {args.out}")
        # Orthanc's own rendering of one Grad-CAM Secondary Capture instance (what its 'Preview' button shows)
        series = requests.get(f"{url}/studies/{orthanc_id}/series", timeout=10).json()
        cam = next(s for s in series if "Grad-CAM -" in s["MainDicomTags"].get("SeriesDescription", ""))
        instance = cam["Instances"][len(cam["Instances"]) // 2]
        preview = args.out.with_name(args.out.stem + "_cam_preview.png")
        preview.write_bytes(requests.get(f"{url}/instances/{instance}/preview", timeout=30).content)
        print(f"Orthanc preview of a Grad-CAM instance: {preview}")
        if args.keep:
            input(f"Orthanc at {url}/app/explorer.html; Enter stops it ")
        return 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
