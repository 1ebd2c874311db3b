#!/usr/bin/env bash
# The store tests against the core built with AddressSanitizer and UndefinedBehaviorSanitizer.
# Store tests only (not the whole suite): torch under ASan is slow and reports its own leaks.
#   scripts/sanitize.sh [PYTEST ARGS]   (PYTHON=... picks the interpreter; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
BUILD=$ROOT/build/sanitize
PKG=$(mktemp -d)
trap 'rm -rf "$PKG"' EXIT

# The version is pyproject.toml's (scikit-build-core hands it to CMake in a wheel build).
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')

PATH="$(dirname "$PY"):$PATH" cmake -S . -B "$BUILD" -G Ninja -DPython_EXECUTABLE="$PY" \
    -DSKBUILD_PROJECT_VERSION="$VERSION" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
    -DDISCOMFORT_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
PATH="$(dirname "$PY"):$PATH" cmake --build "$BUILD" -j 2
cp -r "$ROOT/python/discomfort" "$PKG/"
rm -f "$PKG"/discomfort/_core*.so
cp "$BUILD"/_core*.so "$PKG/discomfort/"

# libstdc++ preloaded too: the interpreter does not link it, and ASan must see its __cxa_throw.
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH=$PKG
export DISCOMFORT_REQUIRE_NATIVE=1
cd "$ROOT/tests"
"$PY" -c "import discomfort; assert discomfort.backend == 'native'; print('sanitized core:', discomfort._backend.module().__file__)"
"$PY" -m pytest -p no:cacheprovider -q -k "native" test_store.py test_store_*.py test_core_native.py test_reliability.py test_pool.py test_disk_security.py "$@"
