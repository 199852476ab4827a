// Two headless Chromium pages join the same room on a running Switchboard and
// must receive each other's video over a direct (P2P) connection.
//
//   node p2p_call.mjs <baseUrl>        e.g. node p2p_call.mjs http://127.0.0.1:8080
//
// Uses Debian's /usr/bin/chromium (no browser download). Prints one JSON line
// and exits 0 on success; exits 1 with a reason on failure. Env:
//   SB_SCREENSHOT_DIR  save alice.png / bob.png there (mid-call, or at failure)
//   SB_CHROMIUM        browser executable (default /usr/bin/chromium)

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import {
  fail, launchChromium, makeLog, run, screenshots, sleep, waitForHealth,
} from './harness.mjs';

const FRAMES_TIMEOUT_MS = 30_000;
const HARD_TIMEOUT_MS = 60_000;


const log = makeLog('p2p_call');



// Everything a page shows that the test checks.
function observe(page) {
  return page.evaluate(async () => {
    const tiles = [...document.querySelectorAll('.tile.remote')].map((t) => ({
      peer: t.dataset.peer,
      name: t.querySelector('.name')?.textContent ?? '',
      state: t.querySelector('.pc-state')?.textContent ?? '',
    }));
    const badge = document.getElementById('mode-badge');
    return {
      state: window.sb ? window.sb.state() : null,
      stats: window.sb ? await window.sb.videoStats() : [],
      tiles,
      modeBadge: badge && !badge.hidden ? badge.textContent.trim() : '',
      notices: [...document.querySelectorAll('#notices .notice span')].map((n) => n.textContent),
    };
  });
}

async function main() {
  const base = process.argv[2];
  if (!base || !/^https?:\/\//.test(base)) fail('usage: node p2p_call.mjs <baseUrl> (http://host:port)');
  await waitForHealth(base);

  const room = `p2p-${randomBytes(6).toString('hex')}`;
  const userDataDir = mkdtempSync(join(tmpdir(), 'sb-chromium-'));
  const shotDir = process.env.SB_SCREENSHOT_DIR || '';
  let context;
  const pages = {};
  const consoleLines = { alice: [], bob: [] };
  try {
    context = await launchChromium(userDataDir, { width: 960, height: 600 });
    log(`chromium ${context.browser()?.version() ?? '(persistent)'} up, room ${room}`);

    const started = Date.now();
    for (const name of ['alice', 'bob']) {
      const page = await context.newPage();
      page.on('console', (m) => consoleLines[name].push(`${m.type()}: ${m.text()}`));
      page.on('pageerror', (e) => consoleLines[name].push(`pageerror: ${e.message}`));
      await page.goto(`${base}/?room=${room}&name=${name}`, { timeout: 10_000 });
      pages[name] = page;
      // Alice is in the room before Bob arrives, so she is the one who offers.
      if (name === 'alice') {
        await page.waitForFunction(() => window.sb && window.sb.state().id, null, { timeout: 10_000 })
          .catch(() => fail('alice never got joined (no participant id within 10 s)'));
      }
    }

    const other = { alice: 'bob', bob: 'alice' };
    const firstFrameMs = {};
    const deadline = Date.now() + FRAMES_TIMEOUT_MS;
    let snap = {};
    for (;;) {
      for (const name of ['alice', 'bob']) {
        snap[name] = await observe(pages[name]);
        const s = snap[name];
        const fromOther = s.stats.filter((x) => s.state?.peers.some((p) => p.id === x.peer && p.name === other[name]));
        if (firstFrameMs[name] === undefined && fromOther.some((x) => x.framesDecoded > 0)) {
          firstFrameMs[name] = Date.now() - started;
        }
      }
      if (firstFrameMs.alice !== undefined && firstFrameMs.bob !== undefined) break;
      if (Date.now() > deadline) {
        fail(`no decoded video from the other peer within ${FRAMES_TIMEOUT_MS / 1000} s: ${JSON.stringify(snap)}`);
      }
      await sleep(250);
    }
    // Let a few more frames through so the screenshot shows live video, then re-read.
    await sleep(1500);

    const result = { ok: true, room, pages: {} };
    for (const name of ['alice', 'bob']) {
      const s = await observe(pages[name]);
      const peer = s.state.peers.find((p) => p.name === other[name]);
      const frames = s.stats.filter((x) => x.peer === peer?.id).reduce((n, x) => n + x.framesDecoded, 0);
      const packets = s.stats.filter((x) => x.peer === peer?.id).reduce((n, x) => n + x.packetsReceived, 0);
      if (!peer) fail(`${name}: no peer named ${other[name]} in sb.state(): ${JSON.stringify(s.state)}`);
      if (s.state.mode !== 'p2p') fail(`${name}: room mode is ${s.state.mode}, expected p2p`);
      if (s.modeBadge !== 'P2P') fail(`${name}: mode badge says "${s.modeBadge}", expected "P2P"`);
      if (s.state.ws !== 'open') fail(`${name}: WebSocket is ${s.state.ws}`);
      if (peer.connectionState !== 'connected') fail(`${name}: connection to ${other[name]} is ${peer.connectionState}`);
      const tile = s.tiles.find((t) => t.peer === peer.id);
      if (!tile) fail(`${name}: no remote tile for ${other[name]}`);
      if (tile.name !== other[name]) fail(`${name}: remote tile labelled "${tile.name}", expected "${other[name]}"`);
      if (s.tiles.length !== 1) fail(`${name}: ${s.tiles.length} remote tiles, expected 1`);
      result.pages[name] = {
        id: s.state.id, from: other[name], framesDecoded: frames, packetsReceived: packets,
        firstFrameMs: firstFrameMs[name], badge: s.modeBadge, tile: tile.name,
      };
    }
    if (shotDir) await screenshots(pages, shotDir, log);
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } catch (e) {
    if (shotDir && Object.keys(pages).length) await screenshots(pages, shotDir, log).catch(() => {});
    for (const [name, lines] of Object.entries(consoleLines)) {
      if (lines.length) log(`${name} console:\n  ${lines.slice(-30).join('\n  ')}`);
    }
    throw e;
  } finally {
    await context?.close().catch((e) => log('closing chromium:', e.message));
    rmSync(userDataDir, { recursive: true, force: true });
  }
}

run(main, HARD_TIMEOUT_MS, log);
