#!/usr/bin/env bash
# Run HERE (a machine with network access to PyPI), once, before the device call: fills the
# git-ignored folder .gpu-carry/ with what benchmarks/gpu/run.sh needs on the GPU machine,
# whose image has torch, timm, numpy and PyYAML but not pydantic (msam.config needs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=.gpu-carry
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF "/$CARRY/" "$EXCLUDE" 2>/dev/null || echo "/$CARRY/" >>"$EXCLUDE"
mkdir -p "$CARRY/fashion-mnist" "$CARRY/wheels"

# Fashion-MNIST's IDX files (Debian package dataset-fashion-mnist), read by msam.data as they are.
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
cp "$FMNIST"/*-ubyte.gz "$CARRY/fashion-mnist/"

# Wheels for the GPU image's Python 3.12, in the versions this checkout is tested with.
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PKGS=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
  PKGS+=("$name==$(version "$name")")
done
rm -f "$CARRY"/wheels/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$CARRY/wheels" "${PKGS[@]}"
ls "$CARRY/wheels"
du -sh "$CARRY"
