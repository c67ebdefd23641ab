#!/bin/sh
# Build two artefacts into OUT_DIR: a wheel of ./fixture and a tar.gz of the prepared source tree.
# The build does what real builds do: copies the tree (fresh mtimes), stamps the time and a random build id,
# lets the directory order and the wheel tool's clock leak into the output. No SOURCE_DATE_EPOCH.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$HERE/fixture" "$WORK/proj"
cd "$WORK/proj"
unset SOURCE_DATE_EPOCH
{
    echo "built: $(date -u '+%Y-%m-%dT%H:%M:%S.%N')"
    echo "build id: $("$PY" -c 'import uuid; print(uuid.uuid4())')"
    echo "host: $(uname -n)"
} > src/demo/BUILD_INFO
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" . >/dev/null
rm -rf build src/*.egg-info
tar czf "$OUT/source.tar.gz" .
