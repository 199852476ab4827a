// Cluster mode with real pages: redis-server and two nodes (node-a, node-b),
// two headless Chromium pages in an SFU room, both connected to node-b while
// the room is on node-a (their signaling relayed, their media to node-a).
// node-a is killed (SIGKILL): both pages are told (`room-closed` with
// `rejoin`), join again by themselves, land on node-b, and decode each
// other's video again.
//
//   node cluster_call.mjs <baseUrl> <switchboard binary> serve --listen <addr:port>
//
// This script starts Redis and both nodes itself (node-b at the base URL).
// Prints one JSON line (`{"ok":true,...}` with the timings) and exits 0, or
// exits 1 with a reason. Env: SB_SCREENSHOT_DIR, SB_CHROMIUM.

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
const HARD_TIMEOUT_MS = 120_000;
const NAMES = ['alice', 'bob'];
const log = makeLog('cluster_call');

async function main() {
  const [base, bin, , , listen] = process.argv.slice(2);
  if (!base || !bin || !listen) fail('usage: node cluster_call.mjs <baseUrl> <switchboard binary> serve --listen <addr:port>');
  const redisPort = 16390;
  const redisUrl = `redis://127.0.0.1:${redisPort}`;
  const procs = {};
  const start = (name, cmd, args) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'inherit'], env: { ...process.env, NO_COLOR: '1' } });
    p.on('exit', (code, signal) => log(`${name} exited (${code ?? signal})`));
    procs[name] = p;
    return p;
  };
  // node-a (the lower id, so the room goes there) on its own ports; node-b
  // at the base URL, which the pages use: their signaling is relayed to
  // node-a, their media goes to node-a's port.
  const nodeA = 'http://127.0.0.1:18081';
  const node = (id, http, rtc) => ['serve', '--listen', http, '--rtc-ip', '127.0.0.1', '--rtc-port', String(rtc),
    '--redis-url', redisUrl, '--node-id', id, '--log', 'info,rtc=error'];
  const room = `cluster-${randomBytes(6).toString('hex')}`;
  const userDataDir = mkdtempSync(join(tmpdir(), 'sb-chromium-'));
  const shotDir = process.env.SB_SCREENSHOT_DIR || '';
  let context;
  const pages = {};
  try {
    start('redis', 'redis-server', ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no']);
    await sleep(300);
    start('node-a', bin, node('node-a', '127.0.0.1:18081', 17891));
    start('node-b', bin, node('node-b', listen, 17892));
    await waitForHealth(nodeA);
    await waitForHealth(base);
    // Both announced and seen by node-b (/readyz is 200 once Redis answered).
    await sleep(2000);
    context = await launchChromium(userDataDir, { width: 960, height: 600 });
    await joinSfuPages(context, base, room, NAMES, pages);
    const other = (n) => NAMES.find((x) => x !== n);
    const until = (what, ok, timeoutMs) => untilAll(pages, what, ok, timeoutMs);
    const before = await until('video through node-a both ways', (n, s) => sfuFramesFrom(s, other(n)) > 10, MEDIA_TIMEOUT_MS);
    const oldIds = Object.fromEntries(NAMES.map((n) => [n, before[n].state.id]));
    // The room is on node-a: it holds both server connections.
    const metricsA = await (await fetch(new URL('/metrics', nodeA))).text();
    const connsA = Number((metricsA.match(/^switchboard_media_connections (\d+)/m) || [])[1]);
    if (connsA !== 2) fail(`node-a holds ${connsA} media connections, not 2`);

    const killedAt = Date.now();
    procs['node-a'].kill('SIGKILL');
    // Back: told the room's node died (room-closed, rejoin), joined again by
    // themselves with new ids (on node-b, the one node left), decoding the
    // other's video again.
    const after = await until('both pages back in the room on node-b, decoding the other again',
      (n, s) => s.state.id && s.state.id !== oldIds[n] && s.state.phase === 'in-room'
        && s.state.peers.some((p) => p.name === other(n) && p.id !== oldIds[other(n)])
        && sfuFramesFrom(s, other(n)) > 10,
      BACK_TIMEOUT_MS);
    const backAt = Date.now();
    const metricsB = await (await fetch(new URL('/metrics', base))).text();
    const connsB = Number((metricsB.match(/^switchboard_media_connections (\d+)/m) || [])[1]);
    if (connsB !== 2) fail(`after the rejoin node-b holds ${connsB} media connections, not 2`);
    const result = {
      ok: true,
      room,
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
    for (const p of Object.values(procs)) if (p.exitCode === null && !p.signalCode) p.kill('SIGKILL');
    rmSync(userDataDir, { recursive: true, force: true });
  }
}

run(main, HARD_TIMEOUT_MS, log);
