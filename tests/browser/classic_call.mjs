// Classic Socket.IO room pages (tests/browser/classic/, the official
// socket.io-client 2.x and 4.x from npm, classic events only) in headless
// Chromium against a running Switchboard.
//
//   node classic_call.mjs <baseUrl> p2p|third|never|mixed-p2p|mixed-sfu
//
//   p2p    (server --socketio-relay auto) alice (client 2.x) and bob (4.x)
//          make a P2P call: each decodes the other's picture (its colour) and
//          hears the other's tone, and the server's media port receives
//          nothing.
//   third  (auto) as p2p, then carol (4.x) joins: alice and bob get `bye`
//          for each other and `otherjoin(room, "sfu")`, all three end up on
//          the server, each hears the two others' tones (the mix) and not its
//          own, and sees the loudest other; when carol becomes the loudest,
//          the pictures follow. Prints third_join_to_media_ms.
//   never  (never) as p2p, then carol gets `full` and the call goes on.
//   mixed-p2p (auto), mixed-sfu (always): a classic page and a page of
//          Switchboard's own client in one room see and hear each other, P2P
//          or through the server (forwarded picture, mixed audio).
//
// The pages come from a little static server of this script's own on
// 127.0.0.1 (the switchboard serves only its own client), so, as for many
// classic deployments, the Socket.IO server is another origin. Prints one
// JSON line and exits 0 on success; exits 1 with a reason on failure. Env:
//   SB_SCREENSHOT_DIR  save <name>.png there (at the end, or at failure)
//   SB_CHROMIUM        browser executable (default /usr/bin/chromium)

import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import {
  fail, launchChromium, makeLog, run, screenshots, sleep, waitForHealth,
} from './harness.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const MEDIA_TIMEOUT_MS = 30_000;
const HARD_TIMEOUT_MS = 120_000;
// A tone is "heard" above this level (dBFS in the page's analyser: a tone of
// gain 0.1 reads about -35, silence and leakage under -90), and a page's own
// tone counts as absent this far under the quieter of the others'.
const HEARD_DBFS = -60;
const OWN_BELOW_DB = 15;
const MIN_FRAMES = 10;

const log = makeLog('classic_call');

// Who is who: colour of their canvas "camera", frequency of their tone.
const PEOPLE = {
  alice: { io: '2', color: [210, 40, 40], freq: 500 },
  bob: { io: '4', color: [40, 190, 40], freq: 800 },
  carol: { io: '4', color: [40, 60, 220], freq: 1250 },
};
const PROBES = Object.values(PEOPLE).map((p) => p.freq).join(',');

const FILES = {
  '/index.html': ['classic/index.html', 'text/html'],
  '/classic.js': ['classic/classic.js', 'text/javascript'],
  '/io2/socket.io.js': ['node_modules/socket.io-client2/dist/socket.io.js', 'text/javascript'],
  '/io4/socket.io.js': ['node_modules/socket.io-client4/dist/socket.io.js', 'text/javascript'],
};

/// Serves FILES on 127.0.0.1 (an ephemeral port); resolves to its origin.
function servePages() {
  const server = createServer((req, res) => {
    const f = FILES[new URL(req.url, 'http://x').pathname];
    if (!f) {
      res.writeHead(404).end('not here');
      return;
    }
    res.writeHead(200, { 'content-type': f[1] }).end(readFileSync(join(HERE, f[0])));
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve({ server, origin: `http://127.0.0.1:${server.address().port}` }));
  });
}

/// Whose picture a colour is (nearest canvas colour), or null.
function whose(color) {
  if (!color) return null;
  let best = null;
  let bestD = Infinity;
  for (const [name, p] of Object.entries(PEOPLE)) {
    const d = p.color.reduce((n, c, i) => n + (c - color[i]) ** 2, 0);
    if (d < bestD) { bestD = d; best = name; }
  }
  // Far from every canvas (black, grey): nobody's.
  return Math.sqrt(bestD) < 90 ? best : null;
}

/// The names whose tones a page hears, given its tone levels (dBFS).
function heard(tones) {
  if (!tones) return [];
  return Object.entries(PEOPLE).filter(([, p]) => tones[p.freq] > HEARD_DBFS).map(([n]) => n);
}

class Call {
  constructor(context, base, pagesOrigin, room) {
    this.context = context;
    this.base = base;
    this.pagesOrigin = pagesOrigin;
    this.room = room;
    this.pages = {};
    this.console = {};
  }

  async open(name, gain = 0.5) {
    const p = PEOPLE[name];
    const page = await this.context.newPage();
    this.console[name] = [];
    page.on('console', (m) => this.console[name].push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => this.console[name].push(`pageerror: ${e.message}`));
    const q = new URLSearchParams({
      server: this.base, room: this.room, io: p.io, color: p.color.join(','), freq: String(p.freq), gain: String(gain), probe: PROBES,
    });
    await page.goto(`${this.pagesOrigin}/index.html?${q}`, { timeout: 10_000 });
    // A click is the user gesture that lets the AudioContext run.
    await page.mouse.click(5, 5);
    await page.evaluate(() => window.classic.resume());
    this.pages[name] = page;
    return page;
  }

  async observe(name) {
    const o = await this.pages[name].evaluate(() => window.classic.observe());
    o.sees = whose(o.color);
    o.hears = heard(o.tones);
    return o;
  }

  async all(names) {
    const out = {};
    for (const n of names) out[n] = await this.observe(n);
    return out;
  }

  setGain(name, v) { return this.pages[name].evaluate((g) => window.classic.setGain(g), v); }

  /// Polls until `ok(snapshot)` holds for every page in `names`; returns the
  /// snapshot, or fails with `what` and the last snapshot.
  async until(names, ok, what, timeoutMs = MEDIA_TIMEOUT_MS) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const snap = await this.all(names);
      if (names.every((n) => ok(n, snap[n]))) return snap;
      if (Date.now() > deadline) fail(`${what} not within ${timeoutMs / 1000} s: ${brief(snap)}`);
      await sleep(200);
    }
  }
}

function brief(snap) {
  const out = {};
  for (const [n, o] of Object.entries(snap)) {
    out[n] = {
      seen: o.seen.map((e) => e.join(' ')), connection: o.connection, audioContext: o.audioContext,
      color: o.color, sees: o.sees, hears: o.hears, tones: o.tones && Object.fromEntries(Object.entries(o.tones).map(([k, v]) => [k, Math.round(v)])),
      video: o.video, audio: o.audio, pair: o.pair,
    };
  }
  return JSON.stringify(out);
}

/// A value of the server's /metrics (sum over label sets); fails when the
/// server does not export it (a missing series would read as 0).
async function metric(base, name) {
  const text = await (await fetch(new URL('/metrics', base))).text();
  let sum = null;
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) sum = (sum ?? 0) + Number(line.split(' ').pop());
  }
  if (sum === null) fail(`the server's /metrics has no ${name}`);
  return sum;
}

const others = (name, names) => names.filter((n) => n !== name);

/// `name` decodes `from`'s picture and hears exactly the tones of `from`.
const callsWith = (name, o, hearsNames, seesName) => o.connection === 'connected'
  && (o.video?.framesDecoded ?? 0) >= MIN_FRAMES
  && o.sees === seesName
  && hearsNames.every((n) => o.hears.includes(n))
  && !o.hears.includes(name);

async function p2pPair(call) {
  await call.open('alice');
  await call.pages.alice.waitForFunction(() => window.classic.observe().then((o) => o.joinedAt), null, { timeout: 10_000 })
    .catch(() => fail('alice got no `joined` within 10 s'));
  await call.open('bob');
  const snap = await call.until(['alice', 'bob'], (n, o) => callsWith(n, o, [others(n, ['alice', 'bob'])[0]], others(n, ['alice', 'bob'])[0]),
    'a P2P call between alice (socket.io-client 2.x) and bob (4.x)');
  const ids = {};
  for (const n of ['alice', 'bob']) ids[n] = snap[n].seen.find((e) => e[0] === 'joined')?.[2];
  // alice was there first: she got otherjoin(room, bob's id) and offered.
  const oj = snap.alice.seen.find((e) => e[0] === 'otherjoin');
  if (!oj || oj[1] !== call.room || oj[2] !== ids.bob) fail(`alice: expected otherjoin(${call.room}, ${ids.bob}), saw ${JSON.stringify(snap.alice.seen)}`);
  if (snap.bob.seen.some((e) => e[0] === 'otherjoin')) fail(`bob got otherjoin: ${JSON.stringify(snap.bob.seen)}`);
  return { snap, ids };
}

async function scenarioP2p(call, base) {
  const { snap, ids } = await p2pPair(call);
  const versions = {};
  for (const n of ['alice', 'bob']) versions[n] = await call.pages[n].evaluate(() => window.classic.transport());
  if (versions.alice?.eio !== 3 || versions.bob?.eio !== 4 || versions.alice?.name !== 'websocket' || versions.bob?.name !== 'websocket') {
    fail(`Engine.IO transports ${JSON.stringify(versions)}, expected EIO 3 (client 2.x) and 4 (4.x), both upgraded to websocket`);
  }
  await sleep(1000);
  const datagrams = await metric(base, 'switchboard_media_datagrams_received_total');
  const forwarded = await metric(base, 'switchboard_media_rtp_forwarded_total');
  if (datagrams !== 0 || forwarded !== 0) fail(`the server's media port got ${datagrams} datagrams and forwarded ${forwarded} packets in a P2P call`);
  return {
    ids, versions, server_datagrams: datagrams,
    pages: Object.fromEntries(['alice', 'bob'].map((n) => [n, { sees: snap[n].sees, hears: snap[n].hears, frames: snap[n].video.framesDecoded, pair: snap[n].pair }])),
  };
}

async function scenarioThird(call) {
  const { ids } = await p2pPair(call);
  const all = ['alice', 'bob', 'carol'];
  // Loudness decides the picture: alice loudest, then bob, carol quietest.
  await call.setGain('alice', 0.6);
  await call.setGain('bob', 0.25);
  const joinStarted = Date.now();
  await call.open('carol', 0.1);
  const first = await call.until(all, (n, o) => {
    const want = n === 'alice' ? 'bob' : 'alice';
    return callsWith(n, o, others(n, all), want);
  }, 'all three on the server, hearing the two others and seeing the loudest other');
  const mediaAt = Date.now();
  const carolJoinedAt = first.carol.joinedAt;
  ids.carol = first.carol.seen.find((e) => e[0] === 'joined')?.[2];
  // The two P2P callers were told: bye for the other, then otherjoin(room, "sfu").
  for (const [n, other] of [['alice', 'bob'], ['bob', 'alice']]) {
    const seen = first[n].seen;
    const bye = seen.findIndex((e) => e[0] === 'bye' && e[2] === ids[other]);
    const sfu = seen.findIndex((e) => e[0] === 'otherjoin' && e[2] === 'sfu');
    if (bye < 0 || sfu < bye) fail(`${n}: expected bye(${ids[other]}) then otherjoin(sfu): ${JSON.stringify(seen)}`);
  }
  if (!first.carol.seen.some((e) => e[0] === 'otherjoin' && e[2] === 'sfu')) fail(`carol: no otherjoin(sfu): ${JSON.stringify(first.carol.seen)}`);
  const levels = (o) => Object.fromEntries(all.map((n) => [n, Math.round(o.tones[PEOPLE[n].freq])]));
  for (const n of all) {
    const l = levels(first[n]);
    const quieter = Math.min(...others(n, all).map((x) => l[x]));
    if (l[n] > quieter - OWN_BELOW_DB) fail(`${n} hears its own tone (${l[n]} dBFS; all ${JSON.stringify(l)})`);
  }
  // carol becomes the loudest and alice the quietest: alice and bob now see
  // carol, carol sees bob (the loudest other).
  const switchStarted = Date.now();
  await call.setGain('carol', 0.6);
  await call.setGain('alice', 0.1);
  const second = await call.until(all, (n, o) => o.sees === (n === 'carol' ? 'bob' : 'carol'),
    'the pictures following carol as the loudest');
  const switchedAt = Date.now();
  // What the server received and forwarded (0 while the call was P2P).
  const datagrams = await metric(call.base, 'switchboard_media_datagrams_received_total');
  if (datagrams === 0) fail('the server got no media datagrams, yet the call is on it');
  return {
    server_datagrams: datagrams,
    ids,
    third_join_to_media_ms: mediaAt - (carolJoinedAt || joinStarted),
    speaker_switch_ms: switchedAt - switchStarted,
    first: Object.fromEntries(all.map((n) => [n, { sees: first[n].sees, hears: first[n].hears, levels_db: levels(first[n]) }])),
    after_switch: Object.fromEntries(all.map((n) => [n, { sees: second[n].sees }])),
  };
}

async function scenarioNever(call) {
  const { snap, ids } = await p2pPair(call);
  await call.open('carol');
  await call.pages.carol.waitForFunction(() => window.classic.observe().then((o) => o.seen.some((e) => e[0] === 'full')), null, { timeout: 10_000 })
    .catch(() => fail('carol got no `full` within 10 s'));
  const carol = await call.observe('carol');
  if (carol.seen.some((e) => e[0] === 'joined' || e[0] === 'otherjoin')) fail(`carol was admitted: ${JSON.stringify(carol.seen)}`);
  if (carol.seen[0][1] !== call.room) fail(`full names room ${carol.seen[0][1]}`);
  // The call goes on: both decode more frames and nobody got bye.
  await sleep(1500);
  const after = await call.until(['alice', 'bob'], (n, o) => o.video.framesDecoded > snap[n].video.framesDecoded + MIN_FRAMES
    && o.connection === 'connected', 'the P2P call going on after carol was refused');
  for (const n of ['alice', 'bob']) {
    if (after[n].seen.some((e) => e[0] === 'bye' || (e[0] === 'otherjoin' && e[2] !== ids.bob))) fail(`${n} saw ${JSON.stringify(after[n].seen)}`);
  }
  return { ids, carol: carol.seen, frames: Object.fromEntries(['alice', 'bob'].map((n) => [n, after[n].video.framesDecoded])) };
}

async function scenarioMixed(call, via) {
  await call.open('alice');
  await call.pages.alice.waitForFunction(() => window.classic.observe().then((o) => o.joinedAt), null, { timeout: 10_000 })
    .catch(() => fail('alice got no `joined` within 10 s'));
  // Switchboard's own client (fake camera and microphone).
  const own = await call.context.newPage();
  call.console.owen = [];
  own.on('console', (m) => call.console.owen.push(`${m.type()}: ${m.text()}`));
  await own.goto(`${call.base}/?room=${call.room}&name=owen`, { timeout: 10_000 });
  call.pages.owen = own;
  const deadline = Date.now() + MEDIA_TIMEOUT_MS;
  for (;;) {
    const a = await call.observe('alice');
    const o = await own.evaluate(async () => {
      const peers = window.sb ? window.sb.state().peers : [];
      const video = window.sb ? await window.sb.videoStats() : [];
      const audio = window.sb ? await window.sb.audioStats() : [];
      // The mean colour of the middle of the remote tile's picture.
      const v = document.querySelector('.tile.remote video');
      let color = null;
      if (v && v.videoWidth) {
        const c = document.createElement('canvas');
        c.width = 32; c.height = 24;
        const g = c.getContext('2d');
        g.drawImage(v, v.videoWidth * 0.25, v.videoHeight * 0.25, v.videoWidth * 0.5, v.videoHeight * 0.5, 0, 0, 32, 24);
        const px = g.getImageData(0, 0, 32, 24).data;
        const sum = [0, 0, 0];
        for (let i = 0; i < px.length; i += 4) { sum[0] += px[i]; sum[1] += px[i + 1]; sum[2] += px[i + 2]; }
        color = sum.map((x) => Math.round(x / (px.length / 4)));
      }
      return { peers, video, audio, color };
    });
    const alicePeer = o.peers.find((p) => p.id === a.seen.find((e) => e[0] === 'joined')?.[2]);
    const ownFrames = o.video.filter((x) => alicePeer && x.peer === alicePeer.id).reduce((n, x) => n + x.framesDecoded, 0);
    // Alice's own audio stream, or (in a room the server mixes, as it does
    // once it relays a classic client) the mix that carries her voice.
    const ownAudio = o.audio.filter((x) => alicePeer && (x.peer === alicePeer.id || x.peer === 'mix')).reduce((n, x) => n + x.packetsReceived, 0);
    const ok = a.connection === 'connected' && (a.video?.framesDecoded ?? 0) >= MIN_FRAMES && (a.audio?.packetsReceived ?? 0) > 50
      && ownFrames >= MIN_FRAMES && ownAudio > 50 && whose(o.color) === 'alice';
    if (ok) {
      const vias = [...new Set(o.video.filter((x) => x.peer === alicePeer.id).map((x) => x.via))];
      if (vias.length !== 1 || vias[0] !== via) fail(`owen gets alice's video via ${vias}, expected ${via}`);
      return {
        classic: { frames: a.video.framesDecoded, audioPackets: a.audio.packetsReceived, seen: a.seen },
        own: {
          peer: alicePeer, frames: ownFrames, audioPackets: ownAudio, sees: whose(o.color),
          via: vias,
        },
      };
    }
    if (Date.now() > deadline) fail(`classic and own page not in a call within ${MEDIA_TIMEOUT_MS / 1000} s: alice ${brief({ alice: a })} owen ${JSON.stringify({ ...o, ownFrames, ownAudio })}`);
    await sleep(250);
  }
}

const SCENARIOS = {
  p2p: scenarioP2p,
  third: scenarioThird,
  never: scenarioNever,
  'mixed-p2p': (call) => scenarioMixed(call, 'p2p'),
  'mixed-sfu': (call) => scenarioMixed(call, 'sfu'),
};

async function main() {
  const base = process.argv[2];
  const scenario = process.argv[3];
  if (!base || !/^https?:\/\//.test(base) || !SCENARIOS[scenario]) {
    fail(`usage: node classic_call.mjs <baseUrl> ${Object.keys(SCENARIOS).join('|')}`);
  }
  await waitForHealth(base);
  const room = `classic-${randomBytes(5).toString('hex')}`;
  const userDataDir = mkdtempSync(join(tmpdir(), 'sb-chromium-'));
  const shotDir = process.env.SB_SCREENSHOT_DIR || '';
  let context;
  let call;
  let pages;
  try {
    context = await launchChromium(userDataDir, { width: 720, height: 320 });
    pages = await servePages();
    log(`chromium up, pages at ${pages.origin}, room ${room}, scenario ${scenario}`);
    call = new Call(context, base, pages.origin, room);
    const result = await SCENARIOS[scenario](call, base);
    if (shotDir) await screenshots(call.pages, shotDir, log);
    process.stdout.write(`${JSON.stringify({ ok: true, scenario, room, ...result })}\n`);
  } catch (e) {
    if (call && shotDir) await screenshots(call.pages, shotDir, log).catch(() => {});
    for (const [name, lines] of Object.entries(call?.console ?? {})) {
      if (lines.length) log(`${name} console:\n  ${lines.slice(-30).join('\n  ')}`);
    }
    throw e;
  } finally {
    await context?.close().catch((e) => log('closing chromium:', e.message));
    pages?.server.close();
    rmSync(userDataDir, { recursive: true, force: true });
  }
}

run(main, HARD_TIMEOUT_MS, log);
