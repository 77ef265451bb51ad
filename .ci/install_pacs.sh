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

source "$(dirname "$0")/apt_install.sh"
# The orthanc package's postinst tries to start its service; in containers policy-rc.d may refuse, which is fine.
apt_install install_pacs orthanc orthanc-dicomweb dicom3tools
Orthanc --version | head -1
plugin_present && echo "install_pacs: DICOMweb plugin at $(ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so*)"
command -v dciodvfy
