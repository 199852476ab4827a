// P2P first, fallback to the server, upgrade on a third join: headless
// Chromium pages, each in its own network namespace (tests/fallback.rs
// builds them), load the page from the server's namespace address and call.
//
//   node fallback.mjs <scenario> <baseUrl>
//
// Scenarios:
//   lan          alice and bob reach each other: they stay P2P and decode
//                each other's video; the server forwards no media.
//   isolated     alice and bob reach the server but not each other: P2P
//                fails, both decode each other's video through the server.
//   third        a P2P call, then carol joins: all three decode two videos.
//   unreachable  alice and bob reach each other but not the server's media
//                port: the P2P call works and both pages warn.
//   return       as `third`, then carol leaves; the server (--p2p-return-ms)
//                returns the room to p2p and alice and bob call directly again.
//   lossy        alice and bob in a room made `mode=sfu`; once both decode,
//                the router drops SB_LOSS_PERCENT % of alice's UDP datagrams
//                (SB_LOSS_NET) at random, each direction (nftables in the
//                SB_LOSS_ROUTER namespace): both pages keep decoding the other's
//                video through the server, slice after slice of
//                SB_LOSSY_SLICES × 2 s; prints frames/s, the longest freeze,
//                the NACK counters and the retransmissions received.
//   addrchange   alice and bob in a room made `mode=sfu`; alice's address
//                changes (this script runs in her namespace: 10.77.1.2 is
//                replaced by 10.77.1.3): her page restarts ICE (and resumes
//                signaling if it died) and both decode each other again.
//
// Env: SB_BROWSER_<name> (browser executable per participant, e.g. a wrapper
// running Chromium in that participant's namespace), SB_STANDBY (1 or 0:
// the warm standby server connection), SB_SCREENSHOT_DIR. Prints one JSON
// line (`{"ok":true,...}` with the measured timings) and exits 0, or exits 1
// with a reason.

import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import {
  fail, launchChromium, makeLog, run, screenshots, sleep, waitForHealth,
} from './harness.mjs';

const STEP_TIMEOUT_MS = 40_000;
const HARD_TIMEOUT_MS = 150_000;
const log = makeLog('fallback');

const scenario = process.argv[2];
const base = process.argv[3];
const standby = process.env.SB_STANDBY !== '0';

// Everything a page shows that the test checks.
function observe(page) {
  return page.evaluate(async () => ({
    state: window.sb.state(),
    stats: await window.sb.videoStats(),
    timings: window.sb.timings(),
    tiles: [...document.querySelectorAll('.tile.remote')].map((t) => ({
      peer: t.dataset.peer, name: t.querySelector('.name')?.textContent ?? '',
    })),
    notices: [...document.querySelectorAll('#notices .notice')].map((n) => ({
      kind: n.classList.contains('notice-error') ? 'error' : 'info',
      text: n.querySelector('span')?.textContent ?? '',
    })),
  }));
}

// Frames decoded on `page` from the participant called `from`, by path.
function framesFrom(snap, from) {
  const ids = new Set(snap.state.peers.filter((p) => p.name === from).map((p) => p.id));
  const out = { p2p: 0, sfu: 0 };
  for (const x of snap.stats) if (ids.has(x.peer)) out[x.via] += x.framesDecoded;
  return out;
}

// Polls every page until `done(name, snap)` holds for all, or fails.
async function until(pages, what, done, timeoutMs = STEP_TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  const snaps = {};
  for (;;) {
    let all = true;
    for (const [name, page] of Object.entries(pages)) {
      snaps[name] = await observe(page);
      if (!done(name, snaps[name])) all = false;
    }
    if (all) return snaps;
    if (Date.now() > deadline) {
      const brief = Object.fromEntries(Object.entries(snaps).map(([n, s]) => [n, {
        mode: s.state.mode, peers: s.state.peers, sfu: s.state.sfu && s.state.sfu.connectionState,
        stats: s.stats, notices: s.notices,
      }]));
      fail(`${what} not within ${timeoutMs / 1000} s: ${JSON.stringify(brief)}`);
    }
    await sleep(200);
  }
}

async function metric(name) {
  const res = await fetch(new URL('/metrics', base), { signal: AbortSignal.timeout(5000) });
  const text = await res.text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  if (!line) fail(`/metrics has no ${name}`);
  return Number(line.split(' ')[1]);
}

const ms = (a, b) => (a != null && b != null ? b - a : null);

async function main() {
  if (!['lan', 'isolated', 'third', 'unreachable', 'return', 'lossy', 'addrchange'].includes(scenario) || !/^https?:\/\//.test(base || '')) {
    fail('usage: node fallback.mjs lan|isolated|third|unreachable|return|lossy|addrchange <baseUrl>');
  }
  await waitForHealth(base);
  const room = `fb-${randomBytes(6).toString('hex')}`;
  const shotDir = process.env.SB_SCREENSHOT_DIR || '';
  const contexts = [];
  const opened = {};
  const dirs = [];
  const pages = {};
  const consoleLines = {};
  const open = async (name) => {
    const dir = mkdtempSync(join(tmpdir(), `sb-${name}-`));
    dirs.push(dir);
    const exe = process.env[`SB_BROWSER_${name}`];
    if (!exe) fail(`SB_BROWSER_${name} is not set`);
    const context = await launchChromium(dir, { width: 800, height: 500 }, exe);
    contexts.push(context);
    opened[name] = context;
    const page = await context.newPage();
    consoleLines[name] = [];
    page.on('console', (m) => consoleLines[name].push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => consoleLines[name].push(`pageerror: ${e.message}`));
    const sfu = ['lossy', 'addrchange'].includes(scenario) ? '&mode=sfu' : '';
    const url = `${base}/?room=${room}&name=${name}&timings=1&standby=${standby ? 1 : 0}${sfu}`;
    await page.goto(url, { timeout: 15_000 });
    // In the room before the next one arrives, so join order is fixed.
    await page.waitForFunction(() => window.sb && window.sb.state().id, null, { timeout: 15_000 })
      .catch(() => fail(`${name} never got joined`));
    pages[name] = page;
    return page;
  };
  const others = (name, among) => among.filter((n) => n !== name);
  try {
    await open('alice');
    await open('bob');
    const two = { alice: pages.alice, bob: pages.bob };
    const result = { ok: true, scenario, standby, room, pages: {} };

    if (['lan', 'third', 'unreachable', 'return'].includes(scenario)) {
      // Direct call: both decode the other's video over P2P.
      await until(two, 'P2P video both ways', (n, s) => framesFrom(s, others(n, ['alice', 'bob'])[0]).p2p > 0);
    }

    if (scenario === 'lan' || scenario === 'unreachable') {
      // Let the call run; it must stay P2P.
      await sleep(4000);
      // With the standby, reachability settles (connected, or not within the deadline).
      const settled = (s) => !standby || !['unknown', 'checking'].includes(s.timings.serverReach);
      const snaps = await until(two, 'a P2P call still running, server reachability known',
        (n, s) => framesFrom(s, others(n, ['alice', 'bob'])[0]).p2p > 30 && settled(s));
      for (const [name, s] of Object.entries(snaps)) {
        const peer = s.state.peers[0];
        if (s.state.mode !== 'p2p') fail(`${name}: room mode is ${s.state.mode}, expected p2p`);
        if (peer.connectionState !== 'connected') fail(`${name}: P2P connection is ${peer.connectionState}`);
        const f = framesFrom(s, others(name, ['alice', 'bob'])[0]);
        if (f.sfu !== 0) fail(`${name}: ${f.sfu} frames came through the server in a P2P call`);
        const warning = s.notices.find((x) => x.kind === 'error' && /media port cannot be reached/.test(x.text));
        const t = s.timings;
        const pt = t.peers[0];
        result.pages[name] = {
          framesP2p: f.p2p,
          serverReach: t.serverReach,
          warning: warning ? warning.text : null,
          joinToFirstFrameMs: ms(t.joinedAt, pt.firstP2pFrameAt),
          peerKnownToFirstFrameMs: ms(pt.knownAt, pt.firstP2pFrameAt),
        };
      }
      if (scenario === 'unreachable') {
        // The standby connection cannot connect: every page says so, visibly.
        for (const [name, p] of Object.entries(result.pages)) {
          if (!standby) break;
          if (p.serverReach !== 'unreachable') fail(`${name}: server reachability is ${p.serverReach}, expected unreachable`);
          if (!p.warning) fail(`${name}: no visible warning that the server is unreachable`);
        }
      } else if (standby) {
        for (const [name, p] of Object.entries(result.pages)) {
          if (p.serverReach !== 'reachable') fail(`${name}: server reachability is ${p.serverReach}, expected reachable`);
          if (p.warning) fail(`${name}: warns "${p.warning}" though the server is reachable`);
        }
      }
      result.serverForwardedPackets = await metric('switchboard_media_rtp_forwarded_total');
    }

    if (scenario === 'isolated') {
      // P2P cannot work; the deadline reports it and both end up on the server.
      const snaps = await until(two, 'video through the server both ways',
        (n, s) => s.state.mode === 'sfu' && framesFrom(s, others(n, ['alice', 'bob'])[0]).sfu > 0);
      await sleep(1500);
      const later = await until(two, 'server video advancing',
        (n, s) => framesFrom(s, others(n, ['alice', 'bob'])[0]).sfu > framesFrom(snaps[n], others(n, ['alice', 'bob'])[0]).sfu);
      for (const name of Object.keys(snaps)) {
        const s = later[name];
        const f = framesFrom(s, others(name, ['alice', 'bob'])[0]);
        const t = s.timings;
        const pt = t.peers[0];
        if (t.modeReason !== 'p2p-failed') fail(`${name}: last mode reason ${t.modeReason}, expected p2p-failed`);
        if (f.p2p !== 0) fail(`${name}: ${f.p2p} frames over P2P between isolated subnets`);
        const tile = s.tiles.find((x) => x.peer === pt.id);
        if (!tile || tile.name !== others(name, ['alice', 'bob'])[0]) fail(`${name}: tiles ${JSON.stringify(s.tiles)}`);
        result.pages[name] = {
          framesSfu: f.sfu,
          joinToFirstFrameMs: ms(t.joinedAt, pt.firstSfuFrameAt),
          p2pFailedToFirstServerFrameMs: ms(t.p2pFailedAt, pt.firstSfuFrameAt),
        };
      }
      result.serverForwardedPackets = await metric('switchboard_media_rtp_forwarded_total');
    }

    if (scenario === 'third' || scenario === 'return') {
      const before = await until(two, 'P2P still up', () => true);
      for (const [name, s] of Object.entries(before)) {
        const pt = s.timings.peers[0];
        result.pages[name] = { joinToFirstFrameMs: ms(s.timings.joinedAt, pt.firstP2pFrameAt) };
      }
      const thirdAt = Date.now();
      await open('carol');
      const all = ['alice', 'bob', 'carol'];
      await until(pages, 'every page decoding both others through the server',
        (n, s) => s.state.mode === 'sfu' && others(n, all).every((o) => framesFrom(s, o).sfu > 0)
          && s.state.peers.every((p) => p.connectionState === 'none'));
      // Let the switch settle, then check the videos still advance: new
      // frames from every other page arrive after the settled mark (an order
      // of events, bounded by the step timeout, not a timed window: a loaded
      // machine may freeze a page for a second or two, and the freeze is
      // reported as a figure below).
      const mid = await until(pages, 'settled', () => true);
      await sleep(2000);
      const end = await until(pages, 'every video advancing after the switch',
        (n, s) => others(n, all).every((o) => framesFrom(s, o).sfu > framesFrom(mid[n], o).sfu));
      for (const name of all) {
        const s = end[name];
        if (s.tiles.length !== 2) fail(`${name}: ${s.tiles.length} remote tiles, expected 2`);
        if (name !== 'carol') {
          // Make before break: the direct connection closed because the
          // server had delivered the other's video, not on a timer.
          const o = others(name, ['alice', 'bob'])[0];
          const p = s.timings.peers.find((x) => x.name === o);
          if (p?.switchedBy !== 'server-delivered') fail(`${name}: direct connection to ${o} closed by ${p?.switchedBy}`);
        }
        const freezes = await pages[name].evaluate((since) => window.sb.longestFreeze(since), thirdAt);
        result.pages[name] = {
          ...result.pages[name],
          longestFreezeMsSinceThirdJoined: Object.fromEntries(freezes.map((f) => [f.name, f.longestFreezeMs])),
          framesSfu: Object.fromEntries(others(name, all).map((o) => [o, framesFrom(s, o).sfu])),
        };
        if (name === 'carol') {
          const t = s.timings;
          result.pages.carol.joinToFirstFrameMs = Object.fromEntries(
            t.peers.map((p) => [p.name, ms(t.joinedAt, p.firstSfuFrameAt)]),
          );
        }
      }
    }

    if (scenario === 'lossy') {
      // Both decode the other's video through the server; then, slice after
      // slice, new frames arrive on both pages (an order of events: each
      // slice's check waits, bounded, for frames newer than its start).
      const pair = ['alice', 'bob'];
      await until(two, 'video through the server both ways', (n, s) => framesFrom(s, others(n, pair)[0]).sfu > 0);
      const loss = Number(process.env.SB_LOSS_PERCENT || 0);
      if (loss > 0) {
        // At the router, so that a dropped datagram is lost silently on the
        // wire (dropped at the sender's own output, the browser would see
        // its send fail).
        const router = process.env.SB_LOSS_ROUTER;
        const net = process.env.SB_LOSS_NET;
        if (!router || !net) fail('SB_LOSS_PERCENT needs SB_LOSS_ROUTER and SB_LOSS_NET');
        const nft = (rule) => execFileSync('ip', ['netns', 'exec', router, 'nft', rule], { stdio: ['ignore', 'ignore', 'pipe'] });
        nft('add table inet lossy');
        nft('add chain inet lossy drops { type filter hook forward priority 0; }');
        for (const dir of ['saddr', 'daddr']) nft(`add rule inet lossy drops ip ${dir} ${net} meta l4proto udp numgen random mod 100 < ${loss} drop`);
      }
      result.lossPercent = loss;
      const slices = Number(process.env.SB_LOSSY_SLICES || 5);
      const startAt = Date.now();
      const start = await until(two, 'start', () => true);
      let prev = start;
      for (let i = 0; i < slices; i++) {
        await sleep(2000);
        const p = prev;
        prev = await until(two, `video still advancing in slice ${i + 1}`,
          (n, s) => framesFrom(s, others(n, pair)[0]).sfu > framesFrom(p[n], others(n, pair)[0]).sfu);
      }
      const seconds = (Date.now() - startAt) / 1000;
      for (const name of pair) {
        const o = others(name, pair)[0];
        const freezes = await pages[name].evaluate((since) => window.sb.longestFreeze(since), startAt);
        const frames = framesFrom(prev[name], o).sfu - framesFrom(start[name], o).sfu;
        result.pages[name] = {
          framesPerSecond: Math.round((frames / seconds) * 10) / 10,
          frames,
          longestFreezeMs: freezes.find((f) => f.name === o)?.longestFreezeMs ?? null,
          repair: await pages[name].evaluate(() => window.sb.repairStats()),
        };
      }
      result.seconds = seconds;
      result.nackedPacketsReceived = await metric('switchboard_media_nacked_packets_received_total');
      result.nackedPacketsSent = await metric('switchboard_media_nacked_packets_sent_total');
      result.plisSent = await metric('switchboard_media_plis_sent_total');
    }

    if (scenario === 'addrchange') {
      const pair = ['alice', 'bob'];
      const mark = await until(two, 'video through the server both ways', (n, s) => framesFrom(s, others(n, pair)[0]).sfu > 10);
      // Wi-Fi to LTE, as far as a namespace can: a new address, the old one gone.
      const ip = (...a) => execFileSync('ip', a, { stdio: ['ignore', 'ignore', 'pipe'] });
      execFileSync('sysctl', ['-qw', 'net.ipv4.conf.all.promote_secondaries=1', 'net.ipv4.conf.eth0.promote_secondaries=1']);
      const changedAt = Date.now();
      ip('addr', 'add', '10.77.1.3/24', 'dev', 'eth0');
      ip('addr', 'del', '10.77.1.2/24', 'dev', 'eth0');
      ip('route', 'replace', 'default', 'via', '10.77.1.1');
      const back = {};
      const iceStates = [];
      await until(two, 'both decoding the other again after the address change', (n, s) => {
        const ok = framesFrom(s, others(n, pair)[0]).sfu > framesFrom(mark[n], others(n, pair)[0]).sfu + 10;
        if (ok && !back[n]) back[n] = Date.now();
        const ice = s.state.sfu?.iceConnectionState;
        if (n === 'alice' && iceStates[iceStates.length - 1]?.state !== ice) iceStates.push({ atMs: Date.now() - changedAt, state: ice });
        return ok;
      }, 60_000);
      result.aliceIceStates = iceStates;
      const after = await until(two, 'state', () => true);
      for (const name of pair) {
        result.pages[name] = {
          decodingAgainMs: back[name] - changedAt,
          iceRestarts: after[name].state.sfu?.iceRestarts ?? null,
          pathStalls: after[name].state.sfu?.pathStalls ?? null,
          resumes: after[name].state.resumes,
          id: after[name].state.id,
        };
      }
      log(`alice's ICE states after the change: ${JSON.stringify(iceStates)}`);
      if (result.pages.alice.id !== mark.alice.state.id) fail('alice rejoined instead of keeping her place');
    }

    if (scenario === 'return') {
      // Carol goes; the room returns to p2p and the two call directly again.
      const leftAt = Date.now();
      await opened.carol.close();
      delete pages.carol;
      const before = await until(two, 'carol gone', (n, s) => s.state.peers.length === 1);
      await until(two, 'back to P2P video both ways',
        (n, s) => s.state.mode === 'p2p' && s.state.peers[0].connectionState === 'connected'
          && framesFrom(s, others(n, ['alice', 'bob'])[0]).p2p > 0);
      await sleep(2000);
      const end = await until(two, 'direct video advancing',
        (n, s) => framesFrom(s, others(n, ['alice', 'bob'])[0]).p2p > framesFrom(before[n], others(n, ['alice', 'bob'])[0]).p2p + 10);
      for (const name of ['alice', 'bob']) {
        const o = others(name, ['alice', 'bob'])[0];
        const s = end[name];
        if (s.timings.modeReason !== 'two-participants') fail(`${name}: last mode reason ${s.timings.modeReason}`);
        if (s.tiles.length !== 1) fail(`${name}: ${s.tiles.length} remote tiles, expected 1`);
        const freezes = await pages[name].evaluate((since) => window.sb.longestFreeze(since), leftAt);
        result.pages[name].backToP2p = {
          leftToP2pModeMs: ms(leftAt, s.timings.modeAt),
          longestFreezeMs: freezes[0].longestFreezeMs,
          framesP2p: framesFrom(s, o).p2p,
        };
      }

      // Carol comes back: everyone to the server again, over the same server
      // connections (their old tracks resume), make-before-break again.
      const all = ['alice', 'bob', 'carol'];
      const mark = await until(two, 'mark', () => true);
      const againAt = Date.now();
      await open('carol');
      await until(pages, 'every page decoding both others through the server again',
        (n, s) => s.state.mode === 'sfu' && s.state.peers.every((p) => p.connectionState === 'none')
          && others(n, all).every((o) => framesFrom(s, o).sfu > (mark[n] && o !== 'carol' ? framesFrom(mark[n], o).sfu + 10 : 0)));
      for (const name of ['alice', 'bob']) {
        const o = others(name, ['alice', 'bob'])[0];
        const s = await observe(pages[name]);
        const p = s.timings.peers.find((x) => x.name === o);
        if (p?.switchedBy !== 'server-delivered') fail(`${name}: second switch closed the direct connection to ${o} by ${p?.switchedBy}`);
        const freezes = await pages[name].evaluate((since) => window.sb.longestFreeze(since), againAt);
        result.pages[name].secondSwitch = {
          longestFreezeMs: freezes.find((f) => f.name === o)?.longestFreezeMs ?? null,
        };
      }
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
    for (const c of contexts) await c.close().catch((e) => log('closing chromium:', e.message));
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  }
}

run(main, HARD_TIMEOUT_MS, log);
