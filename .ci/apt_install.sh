#!/usr/bin/env bash
# Shared by the .ci/install_*.sh scripts: `apt_install NAME PACKAGE...` installs Debian packages with root or
# sudo, or explains (prefixed with NAME) why it cannot.
apt_install() {
    local name="$1"; shift
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "$name: need root (or sudo) to apt-get install $*" >&2
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$name: apt-get not found; install $* by hand" >&2
        return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "$@"
}
