// The decode loop of a sessa-export ONNX export, written once for examples/node (onnxruntime-node)
// and examples/web (onnxruntime-web): the caller passes its `ort` module in.
//
// Everything about the state comes from the export's sessa_config.json (the manifest): the input
// name, the logits output, per layer the past (input) and present (output) names and axes of the
// four state tensors, and `state_contract`:
//   - "grow": the state holds exactly P positions (axis "past"); each step returns the grown state
//     as new tensors, which become the next step's past.
//   - "inplace": the state tensors are caches of a capacity C (axis "capacity"), of which the first P
//     rows are valid; the length input (`past_length_input`) gives P. The step writes rows
//     P..P+S-1 and returns the caches as its present outputs. C grows by the manifest's capacity rule
//     (whole blocks of state_contract.capacity_block positions, at most max_len), the valid rows copied once when it grows.
// Tokens are bytes (the bundled model's vocabulary is 256).

const STORAGE = { float32: Float32Array, float16: Uint16Array }; // what holds a state tensor's values

/** A problem with the export or the request, told in one line. */
export class SessaError extends Error {}

/** The state layout and names of an export, read from its manifest (sessa_config.json). */
export function readLayout(manifest, where = 'sessa_config.json') {
  if (manifest?.format !== 'onnx') {
    throw new SessaError(`${where}: "format" is ${JSON.stringify(manifest?.format)}; these examples run ` +
      'ONNX exports (sessa-export export CKPT -o OUT)');
  }
  const input = manifest.input ?? {};
  if (typeof input.name !== 'string' || !Array.isArray(manifest.outputs) || typeof manifest.outputs[0] !== 'string') {
    throw new SessaError(`${where}: "input" needs a "name" and "outputs" the logits' name; re-run the export`);
  }
  if (input.kind !== 'tokens' || input.vocab_size !== 256) {
    throw new SessaError(`${where}: the model takes ${input.kind} with vocab_size ${input.vocab_size}; ` +
      'this example reads the prompt as bytes and needs a byte-level model (tokens, vocab_size 256)');
  }
  const contract = manifest.state_contract ?? { kind: 'grow' };
  if (contract.kind !== 'grow' && contract.kind !== 'inplace') {
    throw new SessaError(`${where}: unknown "state_contract" kind ${JSON.stringify(contract.kind)}; re-run the export`);
  }
  const dtype = contract.dtype ?? (manifest.dtype === 'float16' ? 'float16' : 'float32');
  if (!(dtype in STORAGE)) {
    throw new SessaError(`${where}: the state is stored in ${dtype}, which onnxruntime's JavaScript API has no ` +
      'tensor type for; export with --state-dtype float32 or float16');
  }
  let block = null;
  if (contract.kind === 'inplace') {
    if (!Number.isInteger(contract.capacity_block) || contract.capacity_block < 1 || !contract.past_length_input) {
      throw new SessaError(`${where}: "state_contract" lacks its length input or capacity block ` +
        `(${JSON.stringify(contract.capacity_block)}); re-run the export`);
    }
    block = contract.capacity_block;
  }
  const positions = contract.kind === 'inplace' ? contract.capacity_axis : 'past';
  const tensors = [];
  for (const [i, layer] of (manifest.state ?? []).entries()) {
    for (const field of layer.fields ?? []) {
      const axes = layer.shapes?.[field];
      const positionAxis = Array.isArray(axes) ? axes.indexOf(positions) : -1;
      if (positionAxis < 0 || axes.indexOf('batch') !== 0 || !layer.past?.[field] || !layer.present?.[field]) {
        throw new SessaError(`${where}: "state" entry ${i} field ${field} needs past and present names and axes ` +
          `with "batch" and "${positions}"; re-run the export`);
      }
      tensors.push({ past: layer.past[field], present: layer.present[field], axes, positionAxis });
    }
  }
  if (tensors.length === 0) throw new SessaError(`${where}: "state" lists no state tensors; re-run the export`);
  const maxLen = manifest.max_len ?? null;
  return {
    input: input.name, logits: manifest.outputs[0], contract: contract.kind, pastLength: contract.past_length_input,
    block, maxLen, dtype, tensors, modelFile: manifest.model_file ?? 'model.onnx',
  };
}

/** The in-place capacity that holds `positions`: whole blocks of the rule's size, at most max_len. */
export function capacityFor(positions, layout) {
  checkContext(positions, layout);
  const capacity = Math.ceil(positions / layout.block) * layout.block;
  return layout.maxLen === null ? capacity : Math.min(capacity, layout.maxLen);
}

function checkContext(positions, layout) {
  if (layout.maxLen !== null && positions > layout.maxLen) {
    throw new SessaError(`context of ${positions} positions exceeds the model's max_len=${layout.maxLen}`);
  }
}

/**
 * One sequence's state and its steps over an ONNX Runtime session.
 *
 * `writeInPlace` (in-place exports): pass each cache as the step's input and also as its pre-allocated
 * output, so ONNX Runtime writes the new rows into the caches themselves (onnxruntime-node honours
 * pre-allocated CPU outputs). Without it the step's present outputs are taken as the next caches:
 * onnxruntime-web 1.30 on WebAssembly copies a pre-allocated CPU output into its own heap and never copies
 * it back, so there the caches must be the returned tensors.
 */
export class Decoder {
  constructor(ort, session, layout, { writeInPlace }) {
    this.ort = ort;
    this.session = session;
    this.layout = layout;
    this.writeInPlace = writeInPlace && layout.contract === 'inplace';
    // in-place caches taken from the returned copies: ORT would warn at every TensorScatter node and step
    this.runOptions = layout.contract === 'inplace' && !this.writeInPlace ? { logSeverityLevel: 3 } : {};
    this.reset();
  }

  /** An empty state: no positions (in place: caches of the first capacity). */
  reset() {
    this.past = 0;
    this.grown = 0; // capacity growths since reset
    this.capacity = this.layout.contract === 'inplace' ? capacityFor(1, this.layout) : 0;
    this.state = this.#caches(this.capacity, null);
  }

  /** State tensors of `positions` positions; the valid rows of `old` copied in when given. */
  #caches(positions, old) {
    const state = {};
    for (const t of this.layout.tensors) {
      const dims = t.axes.map((a, i) => (i === 0 ? 1 : i === t.positionAxis ? positions : a));
      const data = new STORAGE[this.layout.dtype](dims.reduce((n, d) => n * d, 1));
      if (old) { // rows 0..P-1 along the positions axis, for every index of the axes before it
        const inner = dims.slice(t.positionAxis + 1).reduce((n, d) => n * d, 1);
        const from = old[t.past].dims[t.positionAxis];
        const outer = data.length / (positions * inner);
        for (let o = 0; o < outer; o++) {
          data.set(old[t.past].data.subarray(o * from * inner, (o * from + this.past) * inner), o * positions * inner);
        }
      }
      state[t.past] = new this.ort.Tensor(this.layout.dtype, data, dims);
    }
    return state;
  }

  /** Run `ids` (byte tokens) after the state; returns the logits of the last position as a Float32Array. */
  async step(ids) {
    const { layout, ort } = this;
    const total = this.past + ids.length;
    checkContext(total, layout);
    const feeds = { [layout.input]: new ort.Tensor('int64', BigInt64Array.from(ids, BigInt), [1, ids.length]) };
    const fetches = { [layout.logits]: null };
    if (layout.contract === 'inplace') {
      if (total > this.capacity) { // larger caches holding the valid rows: the one copy of a growth
        const capacity = capacityFor(total, layout);
        this.state = this.#caches(capacity, this.state);
        this.capacity = capacity;
        this.grown += 1;
      }
      feeds[layout.pastLength] = new ort.Tensor('int64', BigInt64Array.of(BigInt(this.past)), []);
    }
    for (const t of layout.tensors) {
      feeds[t.past] = this.state[t.past];
      fetches[t.present] = this.writeInPlace ? this.state[t.past] : null;
    }
    let results;
    try {
      results = await this.session.run(feeds, fetches, this.runOptions);
    } catch (err) {
      throw new SessaError(`ONNX Runtime rejected the step: ${String(err.message ?? err).split('\n')[0]}`);
    }
    if (!this.writeInPlace) {
      for (const t of layout.tensors) this.state[t.past] = results[t.present];
    }
    this.past = total;
    const logits = results[layout.logits];
    const vocab = logits.dims[logits.dims.length - 1];
    return toFloat32(logits.data.subarray((ids.length - 1) * vocab, ids.length * vocab));
  }
}

/** float32 values of logits (float16 ones arrive as Uint16Array bits). */
function toFloat32(data) {
  if (data instanceof Float32Array) return data;
  if (!(data instanceof Uint16Array)) return Float32Array.from(data);
  return Float32Array.from(data, (h) => {
    const exp = (h >> 10) & 0x1f, frac = h & 0x3ff, sign = h & 0x8000 ? -1 : 1;
    if (exp === 0) return sign * frac * 2 ** -24;
    if (exp === 31) return frac ? NaN : sign * Infinity;
    return sign * (1 + frac / 1024) * 2 ** (exp - 15);
  });
}

/** A seeded generator of uniform numbers in [0, 1) (mulberry32). */
export function seededRandom(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The sampling settings, checked: temperature 0 is greedy; topK 0 keeps every token. */
export function sampling({ temperature = 0, topK = 0, seed = 0 } = {}) {
  if (!(Number.isFinite(temperature) && temperature >= 0)) {
    throw new SessaError(`temperature must be a finite number >= 0, got ${temperature}`);
  }
  if (!(Number.isInteger(topK) && topK >= 0)) throw new SessaError(`top-k must be an integer >= 0, got ${topK}`);
  if (!(Number.isInteger(seed) && seed >= 0)) throw new SessaError(`seed must be an integer >= 0, got ${seed}`);
  return { temperature, topK, seed };
}

/** The next token: the first largest logit when greedy, else a draw from softmax(logits / T) over the top k. */
export function pickToken(logits, { temperature, topK }, random) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  if (temperature === 0) return best;
  const scaled = Array.from(logits, (l) => l / temperature);
  const kth = topK ? [...scaled].sort((a, b) => b - a)[Math.min(topK, scaled.length) - 1] : -Infinity;
  const top = scaled[best];
  const weights = scaled.map((s) => (s < kth ? 0 : Math.exp(s - top)));
  let u = random() * weights.reduce((a, b) => a + b, 0);
  for (let i = 0; i < weights.length; i++) {
    u -= weights[i];
    if (u < 0 && weights[i] > 0) return i;
  }
  return best;
}

/**
 * Prefill `promptIds` in one step, then decode `maxNewTokens` tokens one at a time, calling onToken(token)
 * as each is picked. Returns the tokens and the time spent in prefill and decode.
 */
export async function generate(decoder, promptIds, maxNewTokens, settings, onToken = () => {}) {
  if (promptIds.length === 0) throw new SessaError('the prompt is empty');
  if (!(Number.isInteger(maxNewTokens) && maxNewTokens >= 1)) {
    throw new SessaError(`max-new-tokens must be an integer >= 1, got ${maxNewTokens}`);
  }
  const { maxLen } = decoder.layout;
  if (maxLen !== null && promptIds.length + maxNewTokens - 1 > maxLen) {
    throw new SessaError(`the prompt (${promptIds.length} tokens) and ${maxNewTokens} new tokens need ` +
      `${promptIds.length + maxNewTokens - 1} positions; the model's max_len is ${maxLen}`);
  }
  const random = seededRandom(settings.seed);
  decoder.reset();
  let start = performance.now();
  let logits = await decoder.step(promptIds);
  const prefillMs = performance.now() - start;
  start = performance.now();
  const tokens = [];
  for (let i = 0; i < maxNewTokens; i++) {
    tokens.push(pickToken(logits, settings, random));
    onToken(tokens[i]);
    if (i + 1 < maxNewTokens) logits = await decoder.step([tokens[i]]);
  }
  const decodeMs = performance.now() - start;
  return {
    tokens, promptTokens: promptIds.length, prefillMs, decodeMs,
    prefillTokensPerS: promptIds.length / (prefillMs / 1000),
    decodeTokensPerS: maxNewTokens > 1 ? (maxNewTokens - 1) / (decodeMs / 1000) : NaN,
  };
}

/** The result as plain data (what `--json` and window.sessaResult give). */
export function record(result, decoder) {
  return {
    tokens: result.tokens, text: new TextDecoder('utf-8').decode(Uint8Array.from(result.tokens)),
    prompt_tokens: result.promptTokens, prefill_ms: result.prefillMs, decode_ms: result.decodeMs,
    prefill_tokens_per_s: result.prefillTokensPerS, decode_tokens_per_s: result.decodeTokensPerS,
    contract: decoder.layout.contract, capacity: decoder.capacity, grown: decoder.grown,
    written_in_place: decoder.writeInPlace,
  };
}

/** One line on speed and the state, for people. */
export function summary(result, decoder) {
  const state = decoder.layout.contract === 'inplace'
    ? `in-place caches of capacity ${decoder.capacity} (grown ${decoder.grown}x), ` +
      (decoder.writeInPlace ? 'written in place by ONNX Runtime' : 'replaced by each step\'s returned copies')
    : `growing state of ${decoder.past} positions`;
  return `prefill ${result.promptTokens} tokens in ${result.prefillMs.toFixed(1)} ms ` +
    `(${result.prefillTokensPerS.toFixed(0)} tokens/s), decode ${result.tokens.length} tokens at ` +
    `${result.decodeTokensPerS.toFixed(1)} tokens/s; ${state}`;
}
