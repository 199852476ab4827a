// Two headless Chromium pages in an SFU room; the server process is killed
// (SIGKILL, no goodbye) and started again at the same address. Both pages
// must notice, fail to resume (the new server never knew them), join again
// by themselves, and decode the other's video again: the room comes back
// with its members.
//
//   node restart_call.mjs <baseUrl> <switchboard binary> [serve args...]
//
// This script starts and restarts the server itself (the same command both
// times). Prints one JSON line (`{"ok":true,...}` with the timings) and
// exits 0, or exits 1 with a reason. Env: SB_SCREENSHOT_DIR, SB_CHROMIUM.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import {
  joinSfuPages, launchChromium, makeLog, run, screenshots, sfuFramesFrom, sleep, untilAll, waitForHealth,
  fail,
} from './harness.mjs';

const MEDIA_TIMEOUT_MS = 30_000;
const BACK_TIMEOUT_MS = 40_000;
const DOWN_MS = 1000;
const HARD_TIMEOUT_MS = 120_000;
const NAMES = ['alice', 'bob'];
const log = makeLog('restart_call');

async function main() {
  const [base, bin, ...serveArgs] = process.argv.slice(2);
  if (!base || !bin) fail('usage: node restart_call.mjs <baseUrl> <switchboard binary> [serve args...]');
  let server = null;
  const startServer = () => {
    server = spawn(bin, serveArgs, { stdio: ['ignore', 'ignore', 'inherit'], env: { ...process.env, NO_COLOR: '1' } });
    server.on('exit', (code, signal) => log(`server exited (${code ?? signal})`));
  };
  const room = `restart-${randomBytes(6).toString('hex')}`;
  const userDataDir = mkdtempSync(join(tmpdir(), 'sb-chromium-'));
  const shotDir = process.env.SB_SCREENSHOT_DIR || '';
  let context;
  const pages = {};
  try {
    startServer();
    await waitForHealth(base);
    context = await launchChromium(userDataDir, { width: 960, height: 600 });
    await joinSfuPages(context, base, room, NAMES, pages);
    const other = (n) => NAMES.find((x) => x !== n);
    const until = (what, ok, timeoutMs) => untilAll(pages, what, ok, timeoutMs);
    const before = await until('video through the server both ways', (n, s) => sfuFramesFrom(s, other(n)) > 10, MEDIA_TIMEOUT_MS);
    const oldIds = Object.fromEntries(NAMES.map((n) => [n, before[n].state.id]));

    const killedAt = Date.now();
    server.kill('SIGKILL');
    await new Promise((r) => { if (server.exitCode !== null || server.signalCode) r(); else server.once('exit', r); });
    await sleep(DOWN_MS);
    startServer();
    await waitForHealth(base);
    const restartedAt = Date.now();
    // Back: a new id, in the room with the other (by name, new id), and
    // new frames from the other's new server connection.
    const after = await until('both pages back in the room, decoding the other again',
      (n, s) => s.state.id && s.state.id !== oldIds[n] && s.state.phase === 'in-room'
        && s.state.peers.some((p) => p.name === other(n) && p.id !== oldIds[other(n)])
        && sfuFramesFrom(s, other(n)) > 10,
      BACK_TIMEOUT_MS);
    const backAt = Date.now();
    const result = {
      ok: true,
      room,
      downMs: restartedAt - killedAt,
      killToBothDecodingMs: backAt - killedAt,
      pages: Object.fromEntries(NAMES.map((n) => [n, {
        oldId: oldIds[n], newId: after[n].state.id, framesFromOther: sfuFramesFrom(after[n], other(n)),
      }])),
    };
    if (shotDir) await screenshots(pages, shotDir, log);
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } catch (e) {
    if (shotDir && Object.keys(pages).length) await screenshots(pages, shotDir, log).catch(() => {});
    throw e;
  } finally {
    await context?.close().catch((e) => log('closing chromium:', e.message));
    if (server && server.exitCode === null) server.kill('SIGKILL');
    rmSync(userDataDir, { recursive: true, force: true });
  }
}

run(main, HARD_TIMEOUT_MS, log);
