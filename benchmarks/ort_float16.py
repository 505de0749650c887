"""What a float16 state costs ONNX Runtime's CPU kernels: the reads of one decode step, float16 against float32.

A float16 state halves the bytes a decode step reads, but only if the kernels read float16. Three
ways of computing one layer's forward attention over a [1, 12, C, 64] key/value cache (C = 1280)
are timed here in turns, each its own one-node (or three-node) model run with IOBinding:
- float32 caches into `Attention` (opset 24): the float32 state;
- float16 caches cast to float32, then `Attention`: what an export with `--state-dtype float16`
  runs (every read casts the cache, spec §3's float32 accumulation);
- float16 caches into a float16 `Attention` (query cast to float16): ONNX Runtime's float16 kernel;
and one [1, 768] x [768, C] `MatMul` (the feedback read) in float32 and float16. Each line also gives the
largest error of the float16 forms against a float64 computation of the same attention.

Run: python benchmarks/ort_float16.py [--threads 2] [--capacity 1280] [--turns 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, median_ms_in_turns, print_table  # noqa: E402

HEADS, HEAD_DIM, WIDTH = 12, 64, 768


def session(nodes, inputs, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def bound(sess, feeds: dict):
    import onnxruntime as ort

    binding = sess.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    binding.bind_output("y")
    return sess, binding


def cases(capacity: int, threads: int, rng) -> dict:
    from onnx import TensorProto as TP
    from onnx import helper

    F, H = TP.FLOAT, TP.FLOAT16
    cache = [1, HEADS, capacity, HEAD_DIM]
    q = rng.standard_normal((1, HEADS, 1, HEAD_DIM)).astype(np.float32)
    k, v = (rng.standard_normal(cache).astype(np.float16) for _ in range(2))
    valid = np.array([capacity - capacity // 5], np.int64)  # the rows a decode step reads
    attention = ["q", "k", "v", "", "", "", "n"]
    node = helper.make_node
    inputs = lambda kv_type: [("q", F, [1, HEADS, 1, HEAD_DIM]), ("k", kv_type, cache), ("v", kv_type, cache),  # noqa: E731
                              ("n", TP.INT64, [1])]
    x = rng.standard_normal((1, 1, WIDTH)).astype(np.float32)
    keys = rng.standard_normal((1, WIDTH, capacity)).astype(np.float16)
    matmul = [("x", F, [1, 1, WIDTH]), ("k", F, [1, WIDTH, capacity])]
    return {
        "Attention, float32 caches": bound(session([node("Attention", attention, ["y"])], inputs(F), threads),
                                           {"q": q, "k": k.astype(np.float32), "v": v.astype(np.float32), "n": valid}),
        "Cast float16 caches, Attention in float32": bound(session(
            [node("Cast", ["k"], ["kf"], to=F), node("Cast", ["v"], ["vf"], to=F),
             node("Attention", ["q", "kf", "vf", "", "", "", "n"], ["y"])], inputs(H), threads),
            {"q": q, "k": k, "v": v, "n": valid}),
        "Attention in float16": bound(session(
            [node("Cast", ["q"], ["qh"], to=H), node("Attention", ["qh", "k", "v", "", "", "", "n"], ["yh"]),
             node("Cast", ["yh"], ["y"], to=F)], inputs(H), threads), {"q": q, "k": k, "v": v, "n": valid}),
        "MatMul, float32": bound(session([node("MatMul", ["x", "k"], ["y"])], matmul, threads),
                                 {"x": x, "k": keys.astype(np.float32)}),
        "MatMul, float16": bound(session([node("Cast", ["x"], ["xh"], to=H), node("MatMul", ["xh", "k"], ["yh"]),
                                          node("Cast", ["yh"], ["y"], to=F)],
                                         [("x", F, [1, 1, WIDTH]), ("k", H, [1, WIDTH, capacity])], threads),
                                 {"x": x, "k": keys}),
    }, (q, k, v, int(valid[0]))


def attention_reference(q, k, v, valid: int) -> np.ndarray:
    """The attention of the timed cases in float64, over the `valid` rows."""
    q, k, v = (np.asarray(a, np.float64)[0] for a in (q, k[:, :, :valid], v[:, :, :valid]))
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(HEAD_DIM)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)) @ v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=1280, help="cache rows (a decode at context 1024 under "
                        "the old 256-position capacity rule)")
    parser.add_argument("--turns", type=int, default=7, help="turns, each 100 runs of every case")
    args = parser.parse_args(argv)
    print(machine_description(), flush=True)
    timed, (q, k, v, valid) = cases(args.capacity, args.threads, np.random.default_rng(0))
    reference = attention_reference(q, k, v, valid)
    runs = 100  # back to back in each turn: a case's steady state, not a cold call
    times = median_ms_in_turns({name: lambda s=sess, b=binding: [s.run_with_iobinding(b) for _ in range(runs)]
                                for name, (sess, binding) in timed.items()}, args.turns)
    times = {name: ms / runs for name, ms in times.items()}
    rows = []
    for name, (sess, binding) in timed.items():
        ms, matmul = times[name], name.startswith("MatMul")
        baseline = times["MatMul, float32" if matmul else "Attention, float32 caches"]
        error = "-"
        if not matmul:
            out = binding.copy_outputs_to_cpu()[0][0]
            error = f"{np.abs(out - reference).max() / np.abs(reference).max():.1e}"
        rows.append((name, f"{ms:.3f}", f"{ms / baseline:.2f}", error))
    print_table(("case", "ms (median of the turns)", "vs float32", "max error / max |ref|"), rows,
                title=f"ONNX Runtime CPU, {args.threads} threads, one layer's caches of {args.capacity} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
