"""examples/node and examples/web: the bundled model's export decoded from JavaScript like Python does.

The bundled model is exported once per module under each state contract (`--state grow` and
`--state inplace`). The Node program (onnxruntime-node) and the page (onnxruntime-web on WebAssembly,
in headless Chromium driven by puppeteer-core, served from 127.0.0.1 by an http.server thread) must
pick the same greedy bytes as Python ONNX Runtime (sessa_export.runtime.open_runner + generate) for a
short prompt and for one whose decode crosses a block of the in-place capacity rule. The Node
program must also write the in-place caches in place: the same Float32Arrays stay bound from step to
step, their rows fill as the context grows, and ONNX Runtime never reports TensorScatter copying its
cache. Each test skips with the reason when node, the npm packages (`npm ci` in the example folder) or
Chromium are missing.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from typer.testing import CliRunner

from sessa_export.cli import app
from sessa_export.data import BUNDLED_MODEL, encode
from sessa_export.generate import generate
from sessa_export.runtime import open_runner
from sessa_export.state import CAPACITY_BLOCK, capacity_for

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NODE_DIR, WEB_DIR = EXAMPLES / "node", EXAMPLES / "web"
CHROMIUM = Path("/usr/bin/chromium")
CONTRACTS = ("grow", "inplace")
CASES = {  # name: (prompt, new bytes)
    "short": ("def main():\n", 48),
    # 250 prompt bytes + 15 decode steps: the in-place caches grow at 256 positions, mid-decode
    "growth": (("import os\nimport sys\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n"
                * 4)[:250], 16),
}


def in_place_capacity(case: str) -> tuple[int, int]:
    """(last capacity, growths) that Python's rule (state.capacity_for) gives a case's decode: the empty
    caches, the prompt, then one more position a step for all but the last new byte."""
    prompt, n_new = CASES[case]
    held = [1] + [len(prompt.encode()) + i for i in range(n_new)]
    capacities = [capacity_for(n, None) for n in held]
    return capacities[-1], len(set(capacities)) - 1


MIN_MARGIN = 1e-3  # Python's top-1 / top-2 logit gap at every pick: a float-level tie could flip either way
NOT_IN_PLACE = "in-place optimization not activated"  # ORT's warning when TensorScatter copies its cache


def need_packages(folder: Path, *packages: str) -> None:
    """Skip unless node and the example folder's npm packages are installed."""
    if shutil.which("node") is None:
        pytest.skip("the JavaScript examples need Node.js: node is not on PATH")
    missing = [p for p in packages if not (folder / "node_modules" / p).is_dir()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run `ONNXRUNTIME_NODE_INSTALL_CUDA=skip npm ci` in {folder}")


@pytest.fixture(scope="module")
def node_ready() -> None:
    need_packages(NODE_DIR, "onnxruntime-node")


@pytest.fixture(scope="module")
def web_ready() -> None:
    need_packages(WEB_DIR, "onnxruntime-web", "puppeteer-core")
    if not CHROMIUM.exists():
        pytest.skip(f"the page test needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")


def node(folder: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["node", *args], cwd=folder, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("js_examples")
    for contract in CONTRACTS:
        result = CliRunner().invoke(app, ["export", str(BUNDLED_MODEL), "-o", str(root / contract),
                                          "--state", contract])
        assert result.exit_code == 0, f"export --state {contract} failed: {result.output}\n{result.exception!r}"
    return {contract: root / contract for contract in CONTRACTS}


class Margins:
    """A runner passed through, keeping the smallest top-1 / top-2 logit gap of the last positions."""

    def __init__(self, runner) -> None:
        self.runner, self.name, self.smallest = runner, runner.name, float("inf")

    def empty_state(self, batch: int):
        return self.runner.empty_state(batch)

    def step(self, input_ids: np.ndarray, state):
        logits, state = self.runner.step(input_ids, state)
        top2 = np.sort(logits[0, -1].astype(np.float64))[-2:]
        self.smallest = min(self.smallest, float(top2[1] - top2[0]))
        return logits, state


@pytest.fixture(scope="module")
def python_greedy(exports) -> dict[tuple[str, str], list[int]]:
    """Python ONNX Runtime's greedy bytes for every (contract, case)."""
    greedy = {}
    for contract, path in exports.items():
        runner = open_runner(path, threads=1)
        for case, (prompt, n_new) in CASES.items():
            recorded = Margins(runner)
            tokens = generate(recorded, np.array([encode(prompt)], dtype=np.int64), n_new).tokens[0]
            assert recorded.smallest > MIN_MARGIN, f"near-tie in Python's greedy picks ({case}): choose another prompt"
            greedy[contract, case] = tokens.tolist()
    return greedy


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("contract", CONTRACTS)
def test_node_greedy_matches_python(node_ready, exports, python_greedy, contract, case):
    prompt, n_new = CASES[case]
    result = node(NODE_DIR, "generate.mjs", str(exports[contract]), "--prompt", prompt,
                  "--max-new-tokens", str(n_new), "--threads", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert NOT_IN_PLACE not in result.stderr
    record = json.loads(result.stdout)
    assert record["tokens"] == python_greedy[contract, case]
    assert record["contract"] == contract and record["written_in_place"] == (contract == "inplace")
    if contract == "inplace":
        assert (record["capacity"], record["grown"]) == in_place_capacity(case)
    assert record["decode_tokens_per_s"] > 0


# Steps the Decoder of the shared module on an in-place export and reports after each step: whether the
# tensors it binds are the ones it bound before the step, how many rows of each hold values (1 + the last
# row with a nonzero value: ORT must have written rows P..P+S-1 into those very arrays), and, when the
# capacity grew, whether the new caches start with exactly the valid rows of the old ones.
IN_PLACE_PROBE = """
import fs from 'node:fs';
import ort from 'onnxruntime-node';
import { Decoder, readLayout } from '../web/sessa-decode.mjs';
const dir = process.argv[1];
const layout = readLayout(JSON.parse(fs.readFileSync(`${dir}/sessa_config.json`, 'utf8')));
const session = await ort.InferenceSession.create(`${dir}/${layout.modelFile}`, { intraOpNumThreads: 1 });
const decoder = new Decoder(ort, session, layout, { writeInPlace: true });
const slab = (tensor, t, o, p) => {  // row p of the o-th block of the axes before the positions axis
  const capacity = tensor.dims[t.positionAxis], inner = tensor.dims.slice(t.positionAxis + 1).reduce((a, b) => a * b, 1);
  return tensor.data.subarray((o * capacity + p) * inner, (o * capacity + p + 1) * inner);
};
const blocks = (tensor, t) => tensor.dims.slice(0, t.positionAxis).reduce((a, b) => a * b, 1);
function rows(tensor, t) {
  let used = 0;
  for (let p = 0; p < tensor.dims[t.positionAxis]; p++)
    for (let o = 0; o < blocks(tensor, t); o++) if (slab(tensor, t, o, p).some((v) => v !== 0)) used = p + 1;
  return used;
}
function copied(from, to, t, past) {
  for (let o = 0; o < blocks(from, t); o++)
    for (let p = 0; p < past; p++) if (slab(from, t, o, p).some((v, i) => v !== slab(to, t, o, p)[i])) return false;
  return true;
}
const report = [];
const long = Array.from({ length: Number(process.argv[2]) - 7 }, (_, i) => 32 + (i * 7) % 90);
for (const ids of [[72, 105, 33, 10, 32], [65], [66], long, [67]]) {
  const before = layout.tensors.map((t) => decoder.state[t.past]), past = decoder.past, capacity = decoder.capacity;
  await decoder.step(ids);
  const after = layout.tensors.map((t) => decoder.state[t.past]);
  report.push({ past: decoder.past, capacity: decoder.capacity, same: after.every((a, i) => a === before[i]),
                rows: after.map((a, i) => rows(a, layout.tensors[i])),
                copied: decoder.capacity === capacity ? null
                  : after.every((a, i) => copied(before[i], a, layout.tensors[i], past)) });
}
console.log(JSON.stringify(report));
"""


def test_node_writes_the_in_place_caches_in_place(node_ready, exports):
    result = node(NODE_DIR, "--input-type=module", "-e", IN_PLACE_PROBE, str(exports["inplace"]), str(CAPACITY_BLOCK))
    assert result.returncode == 0, result.stderr
    assert NOT_IN_PLACE not in result.stderr, "ONNX Runtime copied a cache instead of writing it in place"
    report = json.loads(result.stdout)
    n_tensors = len(json.loads((exports["inplace"] / "sessa_config.json").read_text())["state"]) * 4
    block = CAPACITY_BLOCK  # the probe fills the first block exactly, then steps once past it
    assert [(r["past"], r["capacity"]) for r in report] == [(5, block), (6, block), (7, block), (block, block),
                                                            (block + 1, 2 * block)]
    for r in report[:-1]:
        assert r["same"] and r["copied"] is None, "the Decoder replaced its bound caches without a growth"
    assert not report[-1]["same"] and report[-1]["copied"], "the grown caches lack the valid rows"
    for r in report:
        assert r["rows"] == [r["past"]] * n_tensors, "the bound arrays do not hold the rows the steps wrote"


def test_node_sampling_is_seeded_and_top_k_1_is_greedy(node_ready, exports, python_greedy):
    prompt, n_new = CASES["short"]

    def tokens(*options: str) -> list[int]:
        result = node(NODE_DIR, "generate.mjs", str(exports["grow"]), "--prompt", prompt, "--max-new-tokens",
                      str(n_new), "--threads", "1", "--json", *options)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["tokens"]

    sampled = tokens("--temperature", "1.5", "--top-k", "40", "--seed", "7")
    assert sampled == tokens("--temperature", "1.5", "--top-k", "40", "--seed", "7")
    assert sampled != python_greedy["grow", "short"]
    assert tokens("--temperature", "1.5", "--top-k", "1", "--seed", "7") == python_greedy["grow", "short"]


def test_node_bad_input_gets_one_clear_line(node_ready, tmp_path):
    result = node(NODE_DIR, "generate.mjs", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'sessa_config.json'}: not found: is this an export directory?"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


def test_web_page_greedy_matches_python(web_ready, exports, python_greedy, tmp_path):
    site = tmp_path / "site"  # the page, and each export beside it
    site.mkdir()
    (site / "web").symlink_to(WEB_DIR, target_is_directory=True)
    for contract, path in exports.items():
        (site / contract).symlink_to(path, target_is_directory=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        keys = [(contract, case) for contract in CONTRACTS for case in CASES]
        urls = [f"http://127.0.0.1:{server.server_port}/web/?model=/{contract}/&prompt={quote(CASES[case][0])}"
                f"&max-new-tokens={CASES[case][1]}&run=1" for contract, case in keys]
        result = node(WEB_DIR, "run-headless.mjs", *urls, "--chromium", str(CHROMIUM))
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(keys)
    for (contract, case), record in zip(keys, records):
        assert record["tokens"] == python_greedy[contract, case], (contract, case)
        assert record["contract"] == contract and not record["written_in_place"]
        if contract == "inplace":
            assert record["grown"] == in_place_capacity(case)[1]
