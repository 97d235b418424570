#!/usr/bin/env bash
# ONNX Runtime C/C++ API headers (API 21) for the native custom-op library, from Debian trixie's
# libonnxruntime-dev: the .deb is fetched with a private apt list derived from this machine's own
# Debian sources (nothing is installed). Prints the include folder, or nothing when not possible
# (no apt, offline): the build then skips libsn_ort_op.so and says so.
#   scripts/ort_headers.sh build/ort-headers
set -u
dest=${1:-build/ort-headers}
inc="$dest/include/onnxruntime"
if [ -f "$inc/onnxruntime_c_api.h" ]; then echo "$(cd "$inc" && pwd)"; exit 0; fi
command -v apt-get >/dev/null && command -v dpkg >/dev/null || exit 0
uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
[ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$uri" ] || exit 0
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" > "$work/sources.list"
o=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
   -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::archives=$work/archives" -o APT::Sandbox::User=root)
apt-get "${o[@]}" -qq update >/dev/null 2>&1 || exit 0
(cd "$work" && apt-get "${o[@]}" -qq download libonnxruntime-dev >/dev/null 2>&1) || exit 0
deb=$(ls "$work"/libonnxruntime-dev_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || exit 0
dpkg -x "$deb" "$work/x" && mkdir -p "$dest/include" && cp -r "$work/x/usr/include/onnxruntime" "$dest/include/"
echo "$(cd "$inc" && pwd)"
