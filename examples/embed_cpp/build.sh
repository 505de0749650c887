#!/usr/bin/env bash
# Build sessa_embed against the TVM runtime and tvm-ffi of the installed Python wheels.
#   examples/embed_cpp/build.sh [OUTPUT]        (default: examples/embed_cpp/sessa_embed)
# Env: PYTHON (default python3), CXX (default g++), TVM_LIBS: a folder holding the libtvm_runtime.so and
# libtvm_ffi.so to link instead of the installed wheels' (a cross build: fetch_aarch64_runtime.sh writes
# one for AArch64; CXX=aarch64-linux-gnu-g++), SOURCE: another C++ file to build the same way (the tests'
# kernel caller). The headers are the installed tvm-ffi's either way.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/sessa_embed}"
python="${PYTHON:-python3}"
cxx="${CXX:-g++}"

# Paths from the wheels' own helpers (no Python needed at run time: the rpath carries them).
read -r ffi_include ffi_lib tvm_lib < <("$python" - <<'PY'
import os, tvm_ffi.libinfo as f, tvm.libinfo as t
print(f.find_include_path(), os.path.dirname(f.find_libtvm_ffi()), os.path.dirname(t.find_libtvm_runtime()))
PY
)
if [[ -n "${TVM_LIBS:-}" ]]; then
  for lib in libtvm_runtime.so libtvm_ffi.so; do
    [[ -f "$TVM_LIBS/$lib" ]] || { echo "build.sh: TVM_LIBS=$TVM_LIBS holds no $lib" >&2; exit 2; }
  done
  ffi_lib="$(cd "$TVM_LIBS" && pwd)" tvm_lib="$(cd "$TVM_LIBS" && pwd)"
fi

# --no-as-needed: nothing in main.cpp names a libtvm_runtime symbol, but loading it registers
# the Relax VM (vm_load_executable, the VMExecutable loader) and the CPU runtime the model.so needs.
# rpath: the libraries' folders, then the program's own (copy the two libraries beside it to deploy).
"$cxx" -std=c++17 -O2 -I"$ffi_include" "${SOURCE:-$here/main.cpp}" -o "$out" \
  -L"$ffi_lib" -L"$tvm_lib" -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,--as-needed \
  -Wl,-rpath,"$tvm_lib" -Wl,-rpath,"$ffi_lib" -Wl,-rpath,'$ORIGIN' -ldl -pthread
echo "built $out"
