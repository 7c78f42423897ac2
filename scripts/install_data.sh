#!/usr/bin/env bash
# Installs the offline Fashion-MNIST files from Debian's dataset-fashion-mnist package.
# As root: apt-get install. Otherwise: download the .deb and unpack it into the user cache
# ($XDG_CACHE_HOME/anchorlearn/debian), where anchorlearn.data also looks.
# Users with the official IDX files elsewhere set ANCHORLEARN_DATA instead.
set -euo pipefail
PKG=dataset-fashion-mnist
SYSTEM_DIR=/usr/share/datasets/fashion-mnist
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/anchorlearn/debian"
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

have_all() {
    local dir=$1
    for f in "${files[@]}"; do
        [[ -f "$dir/$f" || -f "$dir/${f%.gz}" ]] || return 1
    done
}

if [[ -n "${ANCHORLEARN_DATA:-}" ]] && have_all "$ANCHORLEARN_DATA/fashion-mnist"; then
    echo "Fashion-MNIST: found in \$ANCHORLEARN_DATA/fashion-mnist"; exit 0
fi
if have_all "$SYSTEM_DIR"; then
    echo "Fashion-MNIST: found in $SYSTEM_DIR"; exit 0
fi
if have_all "$CACHE_ROOT$SYSTEM_DIR"; then
    echo "Fashion-MNIST: found in $CACHE_ROOT$SYSTEM_DIR"; exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "Fashion-MNIST is missing and apt-get is not available." >&2
    echo "Download the four IDX files from https://github.com/zalandoresearch/fashion-mnist" >&2
    echo "into DIR/fashion-mnist and set ANCHORLEARN_DATA=DIR." >&2
    exit 1
fi
if [[ "$(id -u)" == 0 ]]; then
    echo "Installing Debian package $PKG ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PKG" >/dev/null
else
    echo "Not root: unpacking $PKG into $CACHE_ROOT ..."
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # apt-get download needs package lists; without root, fetch them into a private directory
    if ! (cd "$tmp" && apt-get download "$PKG" 2>/dev/null); then
        mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
        apt_opts=(-o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o Debug::NoLocking=1)
        if ! (apt-get "${apt_opts[@]}" update -qq && cd "$tmp" && apt-get "${apt_opts[@]}" download "$PKG"); then
            echo "Could not download $PKG without root." >&2
            echo "Run this script as root, or download the four IDX files from" >&2
            echo "https://github.com/zalandoresearch/fashion-mnist into DIR/fashion-mnist and set" >&2
            echo "ANCHORLEARN_DATA=DIR." >&2
            exit 1
        fi
    fi
    mkdir -p "$CACHE_ROOT"
    dpkg -x "$tmp"/*.deb "$CACHE_ROOT"
fi
echo "Fashion-MNIST installed."
