#!/usr/bin/env bash
# Install the PACS test tools (Debian packages) for tests/test_dicomweb.py and tests/test_dicom_out.py:
# Orthanc with its DICOMweb plugin (the tests start their own server on 127.0.0.1 with a temporary
# configuration; the system service is not used) and dicom3tools (dciodvfy, the DICOM validator).
# Idempotent: does nothing when all are present. Needs root (or sudo) and the Debian package mirror.
set -euo pipefail

plugin_present() { ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1; }
if command -v Orthanc >/dev/null 2>&1 && command -v dciodvfy >/dev/null 2>&1 && plugin_present; then
    echo "install_pacs: Orthanc, its DICOMweb plugin and dciodvfy already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_pacs: need root (or sudo) to apt-get install orthanc orthanc-dicomweb dicom3tools" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_pacs: apt-get not found; install Orthanc (+ DICOMweb plugin) and dicom3tools by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# The orthanc package's postinst tries to start its service; in containers policy-rc.d may refuse, which is fine.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb dicom3tools
Orthanc --version | head -1
plugin_present && echo "install_pacs: DICOMweb plugin at $(ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so*)"
command -v dciodvfy
