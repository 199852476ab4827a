// Two headless Chromium pages in an SFU room reach the server's HTTP and
// WebSocket through a TCP proxy this script runs (media goes straight to
// the server's UDP port). Once both decode each other's video, the proxy
// cuts every connection it carries at once, with no WebSocket close (as a
// Wi-Fi hiccup would). Each page must reconnect through the proxy by
// itself and `resume`: same participant id, `resumes` 1, the other never
// told it left (its tile stays), and video from the other keeps advancing
// throughout (the longest freeze is printed as a figure).
//
//   node resume_call.mjs <baseUrl>
//
// Prints one JSON line; exits 0 on success, 1 with a reason.

import net from 'node:net';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { fail, launchChromium, makeLog, run, screenshots, sleep, waitForHealth } from './harness.mjs';

const HARD_TIMEOUT_MS = 90_000;
const STEP_MS = 30_000;
const NAMES = ['alice', 'bob'];
const log = makeLog('resume_call');

// A TCP proxy to `target` that can cut everything it carries.
function proxy(target) {
  const live = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(target.port, target.hostname);
    live.add(client); live.add(upstream);
    const gone = () => { live.delete(client); live.delete(upstream); client.destroy(); upstream.destroy(); };
    client.on('error', gone); upstream.on('error', gone);
    client.on('close', gone); upstream.on('close', gone);
    client.pipe(upstream); upstream.pipe(client);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({
    port: server.address().port,
    // RST both ways: no close frame reaches either side.
    cut() { const n = live.size; for (const s of live) s.resetAndDestroy(); live.clear(); return n; },
  })));
}

async function observe(page) {
  return page.evaluate(async () => ({
    state: window.sb.state(),
    video: await window.sb.videoStats(),
    tiles: [...document.querySelectorAll('.tile.remote')].map((t) => t.dataset.peer),
  }));
}

const frames = (s) => s.video.filter((v) => v.via === 'sfu').reduce((n, v) => n + v.framesDecoded, 0);

async function until(pages, what, done) {
  const deadline = Date.now() + STEP_MS;
  for (;;) {
    const snaps = {};
    let all = true;
    for (const [name, page] of Object.entries(pages)) {
      snaps[name] = await observe(page);
      if (!done(name, snaps[name])) all = false;
    }
    if (all) return snaps;
    if (Date.now() > deadline) fail(`${what} not within ${STEP_MS / 1000} s: ${JSON.stringify(snaps)}`);
    await sleep(200);
  }
}

async function main() {
  const base = process.argv[2];
  if (!base) fail('usage: node resume_call.mjs <baseUrl>');
  await waitForHealth(base);
  const p = await proxy(new URL(base));
  const via = `http://127.0.0.1:${p.port}`;
  const room = `resume-${randomBytes(5).toString('hex')}`;
  const context = await launchChromium(mkdtempSync(join(tmpdir(), 'sb-chromium-')), { width: 640, height: 480 });
  const pages = {};
  try {
    for (const name of NAMES) {
      const page = await context.newPage();
      await page.goto(`${via}/?room=${room}&name=${name}&mode=sfu&timings=1`, { timeout: 10_000 });
      await page.waitForFunction(() => window.sb && window.sb.state().id, null, { timeout: 10_000 })
        .catch(() => fail(`${name} never joined`));
      pages[name] = page;
    }
    const before = await until(pages, 'video both ways', (n, s) => frames(s) > 10);
    const ids = Object.fromEntries(NAMES.map((n) => [n, before[n].state.id]));
    await sleep(500);
    const cutAt = Date.now();
    const cut = p.cut();
    log(`cut ${cut} sockets`);
    // Both see the drop, keep their calls, and resume by themselves.
    const after = await until(pages, 'resumed', (n, s) => s.state.resumes === 1 && s.state.ws === 'open' && s.state.phase === 'in-room');
    const resumedMs = Date.now() - cutAt;
    await sleep(1500);
    const end = await until(pages, 'video advancing after the resume', (n, s) => frames(s) > frames(after[n]));
    const result = { ok: true, room, pages: {} };
    for (const name of NAMES) {
      const s = end[name];
      if (s.state.id !== ids[name]) fail(`${name}: id changed from ${ids[name]} to ${s.state.id}: it joined afresh instead of resuming`);
      const other = ids[NAMES.find((n) => n !== name)];
      if (!s.tiles.includes(other)) fail(`${name}: the other's tile is gone: ${JSON.stringify(s.tiles)}`);
      if (s.state.sfu?.connectionState !== 'connected') fail(`${name}: server connection ${s.state.sfu?.connectionState}`);
      const freeze = await pages[name].evaluate((since) => window.sb.longestFreeze(since), cutAt - 500);
      result.pages[name] = {
        framesBefore: frames(before[name]),
        framesAfter: frames(s),
        longestFreezeMsSinceCut: freeze.find((f) => f.id === other)?.longestFreezeMs ?? null,
      };
    }
    result.cutToBothResumedMs = resumedMs;
    result.socketsCut = cut;
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } catch (e) {
    const dir = process.env.SB_SCREENSHOT_DIR;
    if (dir) await screenshots(pages, dir, log).catch(() => {});
    throw e;
  } finally {
    await context.close().catch(() => {});
  }
}

run(main, HARD_TIMEOUT_MS, log);
