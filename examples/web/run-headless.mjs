#!/usr/bin/env node
// Open the page in headless Chromium (puppeteer-core, no browser download) and print what it generated.
//
//   node run-headless.mjs "http://127.0.0.1:8000/?model=model/&prompt=def%20main()&run=1" [URL ...] [--chromium PATH]
//
// Each URL must carry run=1 (the page then generates at once); for each, in order, this prints
// window.sessaResult as one JSON line, or stops at the first page error (on stderr, exit code 2). One
// browser serves them all, with a fresh profile directory that is removed afterwards.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';

import puppeteer from 'puppeteer-core';

const FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'];

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      chromium: { type: 'string', default: process.env.CHROMIUM ?? '/usr/bin/chromium' },
      timeout: { type: 'string', default: '60000' },
    },
  });
  if (positionals.length === 0) {
    console.error('usage: node run-headless.mjs PAGE_URL [PAGE_URL ...] [--chromium PATH] [--timeout MS]');
    return 2;
  }
  if (!fs.existsSync(values.chromium)) {
    console.error(`error: no Chromium at ${values.chromium}: install it (apt-get install chromium) or pass --chromium PATH`);
    return 2;
  }
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'sessa-chromium-'));
  const browser = await puppeteer.launch({
    executablePath: values.chromium, headless: true, userDataDir: profile, args: ['--headless', ...FLAGS],
  });
  try {
    const page = await browser.newPage();
    page.on('console', (message) => console.error(`[page ${message.type()}] ${message.text()}`));
    page.on('pageerror', (error) => console.error(`[page error] ${error.message}`));
    for (const url of positionals) {
      await page.goto(url);
      await page.waitForFunction(() => window.sessaResult !== undefined, { timeout: Number(values.timeout) });
      const result = await page.evaluate(() => window.sessaResult);
      if (result.error) {
        console.error(`error: ${url}: ${result.error}`);
        return 2;
      }
      console.log(JSON.stringify(result));
    }
    return 0;
  } finally {
    await browser.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

process.exitCode = await main();
