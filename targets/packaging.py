"""How compiled TVM modules become files: shared by the targets' `package` functions.

- `export_elf`: a shared library whose import blob (VM bytecode, weights, device code) is
  assembled in with `.incbin` (x86-64: into the large-data section .lrodata, so a blob of
  gigabytes links), cross-linked for a --host triple when asked;
- `device_source`: the one device module's source (CUDA, Metal, OpenCL), written beside;
- `replace_cuda_code`: the CUDA module's source swapped for an nvcc fatbin inside the blob.
"""

from __future__ import annotations

import platform
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from sessa_export.config import available_cores
from sessa_export.errors import SessaExportError

from . import CROSS_COMPILERS
from .kernel_cache import write_object


def device_modules(executable, kind: str) -> list:
    """Every module of `kind` ("cuda", "metal", "opencl") imported by the executable's library."""
    found, stack, seen = [], [executable.mod], set()
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if module.kind == kind:
            found.append(module)
        stack.extend(module.imports)
    return found


def device_source(executable, kind: str) -> str:
    """The source of the build's one `kind` device module."""
    devices = device_modules(executable, kind)
    if len(devices) != 1:
        raise SessaExportError(f"expected one {kind} device module in the build, found {len(devices)}")
    return devices[0].inspect_source(kind) or devices[0].inspect_source("")


def export_elf(executable, path: Path, host: str | None, workspace: Path,
               transform: Callable[[bytes], bytes] | None = None) -> None:
    """An ELF shared library at `path` for this machine or the --host triple `host`."""
    from tvm.support import cc

    fcompile = None
    if host is not None:
        compiler = CROSS_COMPILERS[host]
        if shutil.which(compiler) is None:
            raise SessaExportError(f"cross compiling for {host} needs {compiler} on PATH "
                                   f"(Debian/Ubuntu: apt-get install g++-{host})")
        fcompile = cc.cross_compiler(compiler)
    x86_64 = host is None and platform.machine() in ("x86_64", "AMD64")
    library = executable.mod
    # what export_library does for LLVM modules, with the objects written on parallel threads (LLVM emits
    # the machine code there; a CPU build holds one LLVM module per kernel, kept with its object for the
    # process: kernel_cache)
    modules = library._collect_dso_modules()
    if any(module.kind != "llvm" for module in modules):
        raise SessaExportError(f"cannot package {[m.kind for m in modules]} modules into an ELF library")
    objects = [str(Path(workspace) / f"lib{i}.o") for i in range(len(modules))]
    with ThreadPoolExecutor(max(1, min(len(modules), available_cores()))) as pool:
        list(pool.map(write_object, modules, objects))
    blob = _elf_blob_packer(x86_64, transform)(library, False, "", str(workspace)) if library.imports else None
    (fcompile or cc.create_shared)(str(path), objects + ([blob] if blob else []))


# An AArch64 (small code model) library reaches its GOT and data PC-relatively within +-4 GiB, and
# nothing but a smaller blob helps there; on x86-64 .lrodata sits past .data and .bss, out of the way
# of the +-2 GiB references, as GCC's -mcmodel=medium places large data.
NEAR_BLOB_LIMIT = 3 << 30


def _elf_blob_packer(x86_64: bool, transform: Callable[[bytes], bytes] | None = None):
    """An `fpack_imports` for ELF libraries: the import blob (VM bytecode, weights, device code)
    goes in with an assembler `.incbin` instead of an LLVM constant array, which takes LLVM minutes
    and gigabytes for a few hundred MB of weights; on x86-64 into .lrodata, else .rodata, refused
    past NEAR_BLOB_LIMIT. `transform` may rewrite the blob."""
    import numpy as np
    import tvm

    blob_name = tvm.get_global_func("runtime.ModuleImportsBlobName")()
    section = '.lrodata,"al",@progbits' if x86_64 else ".rodata"

    def pack_imports(module, is_system_lib, prefix, workdir):
        packed = tvm.get_global_func("runtime.ModulePackImportsToTensor")(module)
        blob = memoryview(np.from_dlpack(packed))  # no copy of the weights (.numpy().tobytes() made two)
        if transform is not None:
            blob = transform(bytes(blob))
        if not x86_64 and len(blob) > NEAR_BLOB_LIMIT:
            raise SessaExportError(f"the weights make a {len(blob) / 2**30:.1f} GiB library, past the "
                                   f"{NEAR_BLOB_LIMIT / 2**30:g} GiB an AArch64 shared library can address: "
                                   "compile with --quantization q8 or q4")
        blob_file = Path(workdir) / "devc.bin"
        with open(blob_file, "wb") as out:
            out.write(blob)
        symbol = f"{prefix}{blob_name}"
        asm = Path(workdir) / "devc.S"
        asm.write_text(
            f"    .section {section}\n    .globl {symbol}\n    .type {symbol}, %object\n    .p2align 4\n"
            f'{symbol}:\n    .incbin "{blob_file}"\n    .size {symbol}, . - {symbol}\n'
            '    .section .note.GNU-stack,"",%progbits\n')
        return str(asm)

    return pack_imports


def _read_u64(blob, offset: int) -> tuple[int, int]:
    return int.from_bytes(blob[offset:offset + 8], "little"), offset + 8


def replace_cuda_code(blob: bytes, source: bytes, fatbin: bytes) -> bytes:
    """Rewrite the import blob so the CUDA module's payload is [fmt "fatbin"][fmap][fatbin].

    Blob layout (tvm-ffi module serialization): u64 size, the import tree (u64-counted row_ptr
    and child_indices arrays), then per module a u64-length kind string and, except for the
    "_lib" placeholder, a u64-length payload. A CUDA payload is [fmt][fmap][code] with the code
    last; fmt is "cuda" and code is the source when TVM left it to be compiled at load time.
    """
    view = memoryview(blob)
    offset = 8
    for _ in range(2):  # row_ptr, child_indices
        count, offset = _read_u64(view, offset)
        offset += 8 * count
    pieces, start = [], 0
    while offset < len(blob):
        length, offset = _read_u64(view, offset)
        kind = bytes(view[offset:offset + length]).decode()
        offset += length
        if kind == "_lib":
            continue
        size, payload_at = _read_u64(view, offset)
        end = payload_at + size
        if kind == "cuda":
            fmt_len, at = _read_u64(view, payload_at)
            fmt = bytes(view[at:at + fmt_len]).decode()
            code_len = len(source)
            code_at = end - code_len
            if fmt != "cuda" or _read_u64(view, code_at - 8)[0] != code_len or bytes(view[code_at:end]) != source:
                raise SessaExportError(f"unexpected CUDA module layout in the library (format {fmt!r}); "
                                       "this TVM version is not supported for --target cuda")
            fmap = bytes(view[at + fmt_len:code_at - 8])
            payload = (_u64(6) + b"fatbin" + fmap + _u64(len(fatbin)) + fatbin)
            pieces += [view[start:offset], _u64(len(payload)), payload]
            start = end
        offset = end
    pieces.append(view[start:])
    body = b"".join(bytes(p) for p in pieces)[8:]
    return _u64(len(body)) + body


def _u64(value: int) -> bytes:
    return int(value).to_bytes(8, "little")
