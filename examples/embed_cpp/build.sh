#!/usr/bin/env bash
# Build sessa_embed against the TVM runtime and tvm-ffi of the installed Python wheels.
#   examples/embed_cpp/build.sh [OUTPUT]        (default: examples/embed_cpp/sessa_embed)
# Env: PYTHON (default python3), CXX (default g++).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/sessa_embed}"
python="${PYTHON:-python3}"
cxx="${CXX:-g++}"

# Paths from the wheels' own helpers (no Python needed at run time: the rpath carries them).
read -r ffi_include ffi_lib tvm_lib < <("$python" - <<'EOF'
import os, tvm_ffi.libinfo as f, tvm.libinfo as t
print(f.find_include_path(), os.path.dirname(f.find_libtvm_ffi()), os.path.dirname(t.find_libtvm_runtime()))
EOF
)

# --no-as-needed: nothing in main.cpp names a libtvm_runtime symbol, but loading it registers
# the Relax VM (vm_load_executable, the VMExecutable loader) and the CPU runtime the model.so needs.
"$cxx" -std=c++17 -O2 -I"$ffi_include" "$here/main.cpp" -o "$out" \
  -L"$ffi_lib" -L"$tvm_lib" -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,--as-needed \
  -Wl,-rpath,"$tvm_lib" -Wl,-rpath,"$ffi_lib" -ldl -pthread
echo "built $out"
