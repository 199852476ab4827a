// What the browser test scripts share: Chromium with exactly our flags, the
// server health wait, screenshots, and a runner that prints one JSON line
// and exits 0 or 1 within a hard timeout.

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const HEALTH_TIMEOUT_MS = 20_000;
const CHROMIUM = process.env.SB_CHROMIUM || '/usr/bin/chromium';
const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
  '--allow-loopback-in-peer-connection',
];

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/// A failure the test means (as opposed to a crash of the script).
export class Failure extends Error {}
export const fail = (reason) => { throw new Failure(reason); };

export const makeLog = (tag) => (...a) => console.error(`[${tag}]`, ...a);

export async function waitForHealth(base) {
  const deadline = Date.now() + HEALTH_TIMEOUT_MS;
  let last = 'no answer';
  while (Date.now() < deadline) {
    try {
      const res = await fetch(new URL('/healthz', base), { signal: AbortSignal.timeout(2000) });
      if (res.status === 200) return;
      last = `HTTP ${res.status}`;
    } catch (e) {
      last = e.cause?.code || e.message;
    }
    await sleep(250);
  }
  fail(`server at ${base} not healthy within ${HEALTH_TIMEOUT_MS / 1000} s (/healthz: ${last})`);
}

/// Debian's Chromium with exactly our flags: Playwright's own defaults are
/// ignored; it only needs its debugging pipe and the profile directory.
/// `executable` replaces the browser binary (e.g. a wrapper that runs it in
/// another network namespace).
export function launchChromium(userDataDir, viewport, executable = CHROMIUM) {
  return chromium.launchPersistentContext(userDataDir, {
    executablePath: executable,
    headless: true,
    ignoreDefaultArgs: true,
    args: [...FLAGS, `--user-data-dir=${userDataDir}`, '--remote-debugging-pipe', 'about:blank'],
    viewport,
    timeout: 20_000,
  });
}

export async function screenshots(pages, dir, log) {
  mkdirSync(dir, { recursive: true });
  for (const [name, page] of Object.entries(pages)) {
    await page.screenshot({ path: join(dir, `${name}.png`), timeout: 5000 });
  }
  log(`screenshots in ${dir}`);
}

/// Runs `main`; prints `{ok:false, reason}` and exits 1 on failure or after
/// `hardTimeoutMs`, exits 0 on success.
export function run(main, hardTimeoutMs, log) {
  const hard = setTimeout(() => {
    process.stdout.write(`${JSON.stringify({ ok: false, reason: `hard timeout after ${hardTimeoutMs / 1000} s` })}\n`);
    log(`FAIL: hard timeout after ${hardTimeoutMs / 1000} s`);
    process.exit(1); // Playwright kills the browser it launched when node exits
  }, hardTimeoutMs);
  main().then(() => {
    clearTimeout(hard);
    process.exit(0);
  }, (e) => {
    clearTimeout(hard);
    const reason = e instanceof Failure ? e.message : `unexpected error: ${e.stack || e}`;
    process.stdout.write(`${JSON.stringify({ ok: false, reason })}\n`);
    log(`FAIL: ${reason}`);
    process.exit(1);
  });
}

// What a page of our own client shows a test: its state and video stats.
export function observeCall(page) {
  return page.evaluate(async () => ({
    state: window.sb ? window.sb.state() : null,
    video: window.sb ? await window.sb.videoStats() : [],
  }));
}

// Frames an `observeCall` snapshot's page decoded through the server from
// the participant named `other` (by its id now).
export function sfuFramesFrom(s, other) {
  const peer = s.state?.peers.find((p) => p.name === other);
  return peer ? s.video.filter((x) => x.peer === peer.id && x.via === 'sfu').reduce((n, x) => n + x.framesDecoded, 0) : 0;
}

// Polls every page in `pages` (name -> page) until `ok(name, snapshot)`
// holds for all; returns the snapshots, or fails after `timeoutMs`.
export async function untilAll(pages, what, ok, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const snap = {};
    for (const n of Object.keys(pages)) snap[n] = await observeCall(pages[n]);
    if (Object.keys(pages).every((n) => ok(n, snap[n]))) return snap;
    if (Date.now() > deadline) fail(`${what} not within ${timeoutMs / 1000} s: ${JSON.stringify(snap)}`);
    await sleep(250);
  }
}

// Opens one page of our own client per name in `context`, each joining
// `room` in `sfu` mode, one after the other (join order fixed); fills `pages`.
export async function joinSfuPages(context, base, room, names, pages) {
  for (const name of names) {
    const page = await context.newPage();
    await page.goto(`${base}/?room=${room}&name=${name}&mode=sfu`, { timeout: 10_000 });
    await page.waitForFunction(() => window.sb && window.sb.state().id, null, { timeout: 10_000 })
      .catch(() => fail(`${name} never got joined`));
    pages[name] = page;
  }
}
