#!/usr/bin/env node
// Generate text from a sessa-export ONNX export with onnxruntime-node.
//
//   node generate.mjs EXPORT_DIR --prompt "def main():" --max-new-tokens 64 [--temperature 0.8 --top-k 40 --seed 1]
//
// The state loop is ../web/sessa-decode.mjs (shared with the browser page). For an in-place export
// (sessa-export export --state inplace) each cache is passed as the step's input and as its pre-allocated
// output, so ONNX Runtime writes the new rows into the same Float32Array.
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';

import ort from 'onnxruntime-node';

import { Decoder, SessaError, generate, readLayout, record, sampling, summary } from '../web/sessa-decode.mjs';

const USAGE = `usage: node generate.mjs EXPORT_DIR [--prompt TEXT] [--max-new-tokens N] [--temperature T]
                        [--top-k K] [--seed S] [--threads N] [--json]
  EXPORT_DIR         a directory written by \`sessa-export export\` (model.onnx, sessa_config.json)
  --prompt           the text to continue, read as UTF-8 bytes (default "def main():\\n")
  --max-new-tokens   bytes to generate (default 64)
  --temperature      0 decodes greedily (default); above 0 samples from softmax(logits / T)
  --top-k            sample among the K most likely bytes only (default 0: all)
  --seed             the sampler's seed (default 0)
  --threads          ONNX Runtime intra-op threads (default: ONNX Runtime's choice)
  --json             print one JSON object (tokens, text, timings, state) instead of the streamed text`;

function number(value, name) {
  const n = Number(value);
  if (value === undefined || value === '' || !Number.isFinite(n)) throw new SessaError(`--${name} must be a number, got ${value}`);
  return n;
}

async function main() {
  let args;
  try {
    args = parseArgs({
      allowPositionals: true,
      options: {
        prompt: { type: 'string', default: 'def main():\n' },
        'max-new-tokens': { type: 'string', default: '64' },
        temperature: { type: 'string', default: '0' },
        'top-k': { type: 'string', default: '0' },
        seed: { type: 'string', default: '0' },
        threads: { type: 'string', default: '0' },
        json: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (err) {
    throw new SessaError(`${err.message}\n${USAGE}`);
  }
  if (args.values.help) {
    console.log(USAGE);
    return;
  }
  if (args.positionals.length !== 1) throw new SessaError(`give one EXPORT_DIR\n${USAGE}`);
  const dir = args.positionals[0];
  const manifestPath = path.join(dir, 'sessa_config.json');
  let manifest;
  try {
    manifest = JSON.parse(fs.readFileSync(manifestPath, 'utf8'));
  } catch (err) {
    throw new SessaError(`${manifestPath}: ${err.code === 'ENOENT' ? 'not found: is this an export directory?' : err.message}`);
  }
  const layout = readLayout(manifest, manifestPath);
  const settings = sampling({
    temperature: number(args.values.temperature, 'temperature'),
    topK: number(args.values['top-k'], 'top-k'),
    seed: number(args.values.seed, 'seed'),
  });
  const threads = number(args.values.threads, 'threads');
  const options = threads > 0 ? { intraOpNumThreads: threads } : {};
  let session;
  try {
    session = await ort.InferenceSession.create(path.join(dir, layout.modelFile), options);
  } catch (err) {
    throw new SessaError(`${path.join(dir, layout.modelFile)}: ONNX Runtime cannot load it (${String(err.message).split('\n')[0]})`);
  }
  const decoder = new Decoder(ort, session, layout, { writeInPlace: true });
  const prompt = new TextEncoder().encode(args.values.prompt);
  const text = new TextDecoder('utf-8');
  const write = args.values.json ? () => {} : (token) => process.stdout.write(text.decode(Uint8Array.of(token), { stream: true }));
  if (!args.values.json) process.stdout.write(args.values.prompt);
  const result = await generate(decoder, Array.from(prompt), number(args.values['max-new-tokens'], 'max-new-tokens'), settings, write);
  if (args.values.json) {
    console.log(JSON.stringify(record(result, decoder)));
  } else {
    process.stdout.write(text.decode() + '\n');
    console.error(summary(result, decoder));
  }
}

main().catch((err) => {
  console.error(err instanceof SessaError ? `error: ${err.message}` : err);
  process.exit(err instanceof SessaError ? 2 : 1);
});
