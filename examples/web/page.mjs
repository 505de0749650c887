// The page's logic: load an export with onnxruntime-web (WebAssembly), generate, show text and tokens/s.
// The form's fields can be set from the URL (?model=model/&prompt=...&max-new-tokens=64&temperature=0
// &top-k=0&seed=0), and run=1 generates at once; the result is then also left in window.sessaResult
// (what run-headless.mjs reads).
import * as ort from './node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';

import { Decoder, SessaError, generate, readLayout, record, sampling, summary } from './sessa-decode.mjs';

const FIELDS = ['model', 'prompt', 'max-new-tokens', 'temperature', 'top-k', 'seed'];
const $ = (id) => document.getElementById(id);
// Threads need a cross-origin isolated page (COOP/COEP headers), which a plain static server does not send.
ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency) : 1;

const sessions = new Map(); // export URL -> {layout, session}

async function load(modelUrl) {
  const base = new URL(modelUrl.endsWith('/') ? modelUrl : `${modelUrl}/`, location.href);
  if (!sessions.has(base.href)) {
    const where = new URL('sessa_config.json', base).href;
    const response = await fetch(where);
    if (!response.ok) throw new SessaError(`${where}: HTTP ${response.status}; is this an export directory?`);
    const manifest = await response.json();
    const layout = readLayout(manifest, where);
    // weights too large for one protobuf file lie beside it (model.onnx.data); ORT Web fetches them by URL
    const externalData = Object.keys(manifest.files ?? {})
      .filter((name) => name.startsWith(`${layout.modelFile}.`))
      .map((name) => ({ path: name, data: new URL(name, base).href }));
    let session;
    try {
      session = await ort.InferenceSession.create(new URL(layout.modelFile, base).href, {
        executionProviders: ['wasm'],
        externalData,
      });
    } catch (err) {
      throw new SessaError(`${layout.modelFile}: ONNX Runtime cannot load it (${String(err.message ?? err).split('\n')[0]})`);
    }
    sessions.set(base.href, { layout, session });
  }
  return sessions.get(base.href);
}

async function run() {
  const output = $('output'), stats = $('stats');
  output.textContent = '';
  stats.textContent = 'loading…';
  stats.className = '';
  $('run').disabled = true;
  try {
    const { layout, session } = await load($('model').value);
    // in place in the page means: each step's returned caches replace the previous ones (see Decoder)
    const decoder = new Decoder(ort, session, layout, { writeInPlace: false });
    const settings = sampling({
      temperature: Number($('temperature').value), topK: Number($('top-k').value), seed: Number($('seed').value),
    });
    const prompt = $('prompt').value;
    const text = new TextDecoder('utf-8');
    output.textContent = prompt;
    stats.textContent = 'generating…';
    const result = await generate(decoder, Array.from(new TextEncoder().encode(prompt)),
      Number($('max-new-tokens').value), settings,
      (token) => { output.textContent += text.decode(Uint8Array.of(token), { stream: true }); });
    output.textContent += text.decode();
    stats.textContent = summary(result, decoder);
    window.sessaResult = record(result, decoder);
  } catch (err) {
    stats.textContent = `error: ${err.message ?? err}`;
    stats.className = 'error';
    window.sessaResult = { error: String(err.message ?? err) };
    if (!(err instanceof SessaError)) console.error(err);
  } finally {
    $('run').disabled = false;
  }
}

const query = new URLSearchParams(location.search);
for (const name of FIELDS) if (query.has(name)) $(name).value = query.get(name);
$('form').addEventListener('submit', (event) => { event.preventDefault(); run(); });
if (query.get('run') === '1') run();
