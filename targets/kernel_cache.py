"""CPU kernels built once a process: one LLVM module per kernel, and its object file once written.

Models that share a width share most kernels (matmuls, norms, the attentions), and one process often
builds several libraries (a test session, a benchmark, a compile per --cpu): a kernel already built for
the same TVM target is taken from here, not lowered and code-generated again. A kernel is found by its
name, the target's text and its structural hash, and taken only when it is structurally equal to the
one built; at most `MAX_KERNELS` stay, the least recently used leaving first.

A kept module is never imported into: `build_kernels` hands back a fresh empty module that imports them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MAX_KERNELS = 2048  # an LLVM module of one kernel holds about 0.3 MB here


@dataclass
class BuiltKernel:
    func: object  # the tirx.PrimFunc it was built from (checked on every hit)
    module: object  # its LLVM runtime module
    object_file: bytes | None = None  # module.write_to_file's ".o", once written


_built: OrderedDict[tuple, BuiltKernel] = OrderedDict()
_by_handle: dict[int, BuiltKernel] = {}  # module.__chandle__() -> its entry, for write_object
_lock = threading.Lock()


def build_kernels(kernels: list, tvm_target, threads: int):
    """One module importing a module per kernel of `kernels` ((GlobalVar, PrimFunc) pairs), those not
    built before for `tvm_target` built on `threads` threads (TVM releases the GIL in its passes and
    in LLVM)."""
    import tvm
    import tvm_ffi

    target_text = str(tvm_target)
    keys = [(gv.name_hint, target_text, tvm_ffi.structural_hash(func)) for gv, func in kernels]
    with _lock:
        found = {key: _built[key] for key in keys if key in _built}
    hits = {key for (_, func), key in zip(kernels, keys)
            if key in found and tvm_ffi.structural_equal(found[key].func, func)}
    missing = [(key, gv, func) for (gv, func), key in zip(kernels, keys) if key not in hits]
    with ThreadPoolExecutor(max(1, min(threads, len(missing)))) as pool:
        built = list(pool.map(lambda kernel: tvm.tirx.build(tvm.IRModule({kernel[1]: kernel[2]}), target=tvm_target),
                              missing))
    with _lock:
        for (key, _, func), module in zip(missing, built):
            _forget(key)
            _built[key] = found[key] = entry = BuiltKernel(func, module)
            _by_handle[module.__chandle__()] = entry
        for key in hits:
            _built.move_to_end(key)
        while len(_built) > MAX_KERNELS:
            _forget(next(iter(_built)))
    library = tvm.tirx.build(tvm.IRModule({}), target=tvm_target)
    for key in keys:
        library.import_module(found[key].module)
    return library


def clear() -> None:
    """Forget every kept kernel (the next build of each lowers and generates its code again)."""
    with _lock:
        _built.clear()
        _by_handle.clear()


def _forget(key: tuple) -> None:
    entry = _built.pop(key, None)
    if entry is not None:
        _by_handle.pop(entry.module.__chandle__(), None)


def write_object(module, path: str | Path) -> None:
    """`module.write_to_file(path)` for an object file, from the bytes written before when `module` is a
    kept kernel's (LLVM emits the machine code in write_to_file: the longest step of packaging)."""
    with _lock:
        entry = _by_handle.get(module.__chandle__())
    if entry is not None and entry.object_file is not None:
        Path(path).write_bytes(entry.object_file)
        return
    module.write_to_file(str(path))
    if entry is not None:
        entry.object_file = Path(path).read_bytes()
