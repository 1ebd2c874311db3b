#!/usr/bin/env bash
# Build discomfort._core for development and drop it next to the Python sources, so that
# `PYTHONPATH=python .venv/bin/python -c "import discomfort._core"` works.
#   scripts/dev-build.sh                 # release build in build/dev
#   SANITIZE=1 scripts/dev-build.sh      # ASan+UBSan build in build/dev-sanitize
set -euo pipefail
cd "$(dirname "$0")/.."

PY="$PWD/.venv/bin/python"
export PATH="$PWD/.venv/bin:$PATH"  # the venv's cmake and ninja
BUILD=build/dev
EXTRA=()
if [[ "${SANITIZE:-0}" == 1 ]]; then
    BUILD=build/dev-sanitize
    EXTRA+=(-DDISCOMFORT_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo)
fi

VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
cmake -S . -B "$BUILD" -G Ninja \
    -DPython_EXECUTABLE="$PY" \
    -DSKBUILD_PROJECT_VERSION="$VERSION" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
    "${EXTRA[@]}"
cmake --build "$BUILD" -j "${JOBS:-2}"

rm -f python/discomfort/_core*.so
cp "$BUILD"/_core*.so python/discomfort/
echo "built $(ls python/discomfort/_core*.so)"
