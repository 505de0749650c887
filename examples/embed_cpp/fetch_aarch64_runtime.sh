#!/usr/bin/env bash
# Fetch the AArch64 TVM runtime for a cross build of sessa_embed: the manylinux aarch64 wheels of
# apache-tvm and apache-tvm-ffi at exactly the versions installed here (pip download, from the package
# registry), of which only libtvm_runtime.so and libtvm_ffi.so are kept.
#   examples/embed_cpp/fetch_aarch64_runtime.sh [DIR]   (default: examples/embed_cpp/aarch64-runtime, git-ignored)
# Env: PYTHON (default python3). Then: TVM_LIBS=DIR CXX=aarch64-linux-gnu-g++ examples/embed_cpp/build.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/aarch64-runtime}"
python="${PYTHON:-python3}"

read -r tvm_version ffi_version < <("$python" -c \
  'import importlib.metadata as m; print(m.version("apache-tvm"), m.version("apache-tvm-ffi"))')
if [[ -f "$out/VERSIONS" && "$(cat "$out/VERSIONS")" == "apache-tvm==$tvm_version apache-tvm-ffi==$ffi_version" ]]; then
  echo "$out holds the AArch64 runtime of apache-tvm $tvm_version, apache-tvm-ffi $ffi_version"
  exit 0
fi
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
py="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" -d "$wheels" \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_24_aarch64 \
  --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
  "apache-tvm==$tvm_version" "apache-tvm-ffi==$ffi_version"
mkdir -p "$out"
"$python" - "$wheels" "$out" <<'EOF'
import pathlib, sys, zipfile
wheels, out = map(pathlib.Path, sys.argv[1:])
wanted = {"tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so"}
for wheel in wheels.glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        for name in wanted & set(archive.namelist()):
            (out / pathlib.Path(name).name).write_bytes(archive.read(name))
            wanted.discard(name)
if wanted:
    sys.exit(f"the AArch64 wheels hold no {', '.join(sorted(wanted))}")
EOF
echo "apache-tvm==$tvm_version apache-tvm-ffi==$ffi_version" > "$out/VERSIONS"
echo "wrote $out (libtvm_runtime.so, libtvm_ffi.so of apache-tvm $tvm_version, apache-tvm-ffi $ffi_version)"
