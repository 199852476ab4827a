// Simulcast and per-subscriber layers, on a real network of namespaces
// (tests/simulcast.rs builds it and drives this script): two publishers
// (pub1, pub2: a 1280x720 camera from a file, sent in simulcast) and two
// viewers (subA unshaped; subB whose downlink the router can cap to
// 600 kbit/s), four headless Chromium pages, each in its own namespace, in one
// room created `mode=sfu`.
//
//   node simulcast_call.mjs <baseUrl>
//
// Timeline (every wait bounded; a failure names the first unmet expectation):
//   1. All four join; both viewers decode both publishers. The viewers pin
//      their tracks to "no limit" (as a big tile would ask); the publishers
//      pause each other's video (only the viewers' wishes count below, and two
//      fewer decoders on a small machine). 12 s later: every width is noted.
//   2. `PHASE cap` (see Control): subB's downlink is capped.
//   3. 10 s to settle, then for 20 s, every 500 ms: subB decodes both
//      publishers at frameWidth <= 640 and subA at >= 1000; every 2 s both
//      viewers' frames of both publishers advanced; at subB no freeze longer
//      than 1 s (freezeCount/totalFreezesDuration of inbound-rtp: the freeze
//      time that ended between two samples bounds the longest; when n
//      freezes ended there, each of the others lasted at least
//      MIN_FREEZE_S, so the longest lasted at most the time less (n - 1) x
//      MIN_FREEZE_S); subB's audio
//      loss over the 20 s (lost / (received + lost), over all its inbound
//      audio: the room's mix by default) < 5 %.
//   4. `PHASE uncap`: within 20 s subB decodes both publishers at >= 1000.
//   5. subA sets pub1's track to maxHeight 180: within 10 s it decodes pub1 at
//      frameHeight <= 180. Then both viewers pause pub2's track and subB sets
//      pub1's to maxHeight 180 too: within 10 s pub2's and pub1's pages keep
//      only their lowest encoding active (dynacast) and subA's pub2 frames
//      stop (no advance for 2 s). Then both unpause pub2: within 10 s both
//      viewers decode pub2 again and pub2's top encoding is active again.
//
// Control: the Rust test owns the network. At each `PHASE <name>` line this
// script prints on stdout it applies the change, then writes `ACK <name>`
// (done) or `NAK <name> <why>` on this script's stdin; the script waits at
// most CONTROL_TIMEOUT_MS for it. Phases: `cap`, `uncap`. (By hand: type the
// ACK lines yourself after doing the `tc` commands.)
//
// Env: SB_BROWSER_<name> (pub1, pub2, subA, subB: the browser executable,
// a wrapper running Chromium in that participant's namespace; the
// publishers' wrappers add the file camera), SB_SCREENSHOT_DIR, SB_PAGE_QUERY
// (more page URL parameters, e.g. `simulcast=0` for a baseline run). Prints
// `{"ok":true,...}` with every figure on stdout and exits 0, or
// `{"ok":false,"reason":...}` and exits 1. Widths are asserted; times are
// printed, not asserted (beyond the bounded waits named above).

import { createInterface } from 'node:readline';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import {
  fail, launchChromium, makeLog, run, screenshots, sleep, waitForHealth,
} from './harness.mjs';

const HARD_TIMEOUT_MS = 210_000;
const JOIN_TIMEOUT_MS = 20_000;
const FIRST_MEDIA_TIMEOUT_MS = 40_000;
const CONTROL_TIMEOUT_MS = 15_000;
const POLL_MS = 500;
const WARMUP_MS = 12_000;
const SETTLE_MS = 10_000;
const WINDOW_MS = 20_000;
const ADVANCE_EVERY_MS = 2_000;
const RECOVER_MS = 20_000;
const SETTINGS_MS = 10_000;
const STOPPED_FOR_MS = 2_000;

const LOW_MAX_WIDTH = 640;
const HIGH_MIN_WIDTH = 1000;
const MAX_FREEZE_S = 1.0;
// The shortest freeze there is: webrtc-stats counts a frame as frozen when
// it lasted at least max(3 x, 150 ms +) the average frame duration.
const MIN_FREEZE_S = 0.15;
const MAX_AUDIO_LOSS = 0.05;
const THUMB_HEIGHT = 180;

const PUBS = ['pub1', 'pub2'];
const SUBS = ['subA', 'subB'];
const HOOKS = ['inboundVideo', 'inboundAudio', 'sendEncodings', 'outboundVideo', 'availableOutgoingBitrate', 'setTrackSettings', 'lastPublisherLayers'];

const log = makeLog('simulcast');
const base = process.argv[2];

// SB_SIMULCAST_ALL=1: keep going after an unmet expectation (each kind
// noted once in the result's `unmet`), to see every figure in one run;
// the script still exits 1, naming the first. Default: fail at the first.
const KEEP_GOING = process.env.SB_SIMULCAST_ALL === '1';
// The issue's adaptive-quality goals under a capped downlink (the low
// layer within 10 s, no freeze over 1 s, frames every 2 s, the unshaped
// viewer at >= 1000 px, climbing back within 20 s) fail the test like
// everything else (decoding through the SFU, video advancing and audio
// intact under the cap, maxHeight, pause, dynacast). With
// SB_SIMULCAST_GOALS=0 they are only measured and reported in
// `goalsUnmet` (to see the other checks on a machine too slow for them).
// On this 2-vCPU machine 32 runs in a row met them all
// (docs/benchmarks.md "Probes that fill the media's gap" and the next
// section).
const STRICT_GOALS = process.env.SB_SIMULCAST_GOALS !== '0';
const GOALS = new Set(['late', 'recover']);
const isGoal = (key) => GOALS.has(key) || /^(low|high|freeze|advance)-/.test(key);
const unmetSeen = new Set();
function unmet(result, key, msg) {
  if (isGoal(key) && !STRICT_GOALS) {
    if (unmetSeen.has(key)) return;
    unmetSeen.add(key);
    (result.goalsUnmet ||= []).push(msg);
    log(`GOAL NOT MET: ${msg}`);
    return;
  }
  if (!KEEP_GOING) fail(msg);
  if (unmetSeen.has(key)) return;
  unmetSeen.add(key);
  (result.unmet ||= []).push(msg);
  log(`UNMET: ${msg}`);
}

// ------------------------------------------------------------------ control

const stdinLines = [];
let stdinWaiter = null;
let stdinClosed = false;
createInterface({ input: process.stdin }).on('line', (line) => {
  stdinLines.push(line.trim());
  if (stdinWaiter) stdinWaiter();
}).on('close', () => {
  stdinClosed = true;
  if (stdinWaiter) stdinWaiter();
});

// Asks the test for a network change and waits (bounded) until it is done.
async function phase(name) {
  process.stdout.write(`PHASE ${name}\n`);
  const deadline = Date.now() + CONTROL_TIMEOUT_MS;
  for (;;) {
    const i = stdinLines.findIndex((l) => l.split(' ')[1] === name);
    if (i >= 0) {
      const [line] = stdinLines.splice(i, 1);
      if (line.startsWith('ACK ')) return Date.now();
      fail(`the test could not apply "${name}": ${line}`);
    }
    if (stdinClosed) fail(`stdin closed while waiting for ACK ${name}`);
    const left = deadline - Date.now();
    if (left <= 0) fail(`no ACK ${name} on stdin within ${CONTROL_TIMEOUT_MS / 1000} s`);
    await new Promise((resolve) => {
      const t = setTimeout(resolve, left);
      stdinWaiter = () => { clearTimeout(t); resolve(); };
    });
    stdinWaiter = null;
  }
}

// ------------------------------------------------------------------ reading pages

// A viewer: state and inbound stats of the server connection.
function observeViewer(page) {
  return page.evaluate(async () => ({
    at: Date.now(),
    state: window.sb.state(),
    video: await window.sb.inboundVideo(),
    audio: await window.sb.inboundAudio(),
  }));
}

// A publisher: its camera's encodings and what it sends.
function observePublisher(page) {
  return page.evaluate(async () => ({
    at: Date.now(),
    state: window.sb.state(),
    encodings: window.sb.sendEncodings(),
    outbound: await window.sb.outboundVideo(),
    uplinkEstimate: await window.sb.availableOutgoingBitrate(),
    layers: window.sb.lastPublisherLayers(),
  }));
}

// What viewer snapshot `s` receives from publisher `pub` (by its id `id`).
function from(s, id) {
  const video = s.video.filter((x) => x.owner === id).sort((a, b) => b.framesDecoded - a.framesDecoded)[0];
  const remote = s.state.sfu?.remote.find((r) => r.owner === id && r.kind === 'video');
  return {
    mid: remote?.mid ?? video?.mid ?? null,
    w: video?.frameWidth ?? 0,
    h: video?.frameHeight ?? 0,
    frames: video?.framesDecoded ?? 0,
    freezes: video?.freezeCount ?? 0,
    freezeS: video?.totalFreezesDuration ?? 0,
  };
}

// All the audio viewer snapshot `s` receives (the room's mix, or one stream
// per participant when the room forwards): packets lost and received.
function audioOf(s) {
  return {
    lost: s.audio.reduce((n, x) => n + x.packetsLost, 0),
    received: s.audio.reduce((n, x) => n + x.packetsReceived, 0),
    streams: s.audio.map((x) => x.owner),
  };
}

const brief = (x) => `${x.w}x${x.h}, ${x.frames} frames`;
const round = (x, d = 3) => Math.round(x * 10 ** d) / 10 ** d;

// The lowest encoding of a publisher's camera: the most scaled down (rid
// order as a tie-break, lowest first as the page adds them).
function lowest(encodings) {
  let best = 0;
  encodings.forEach((e, i) => {
    if ((e.scaleResolutionDownBy ?? 1) > (encodings[best].scaleResolutionDownBy ?? 1)) best = i;
  });
  return best;
}
function highest(encodings) {
  let best = 0;
  encodings.forEach((e, i) => {
    if ((e.scaleResolutionDownBy ?? 1) < (encodings[best].scaleResolutionDownBy ?? 1)) best = i;
  });
  return best;
}
const encText = (encs) => JSON.stringify(encs.map((e) => `${e.rid}:${e.active ? 'on' : 'off'}`));

// ------------------------------------------------------------------ main

async function main() {
  if (!base || !/^https?:\/\//.test(base)) fail('usage: node simulcast_call.mjs <baseUrl>');
  await waitForHealth(base);
  const room = `sc-${randomBytes(6).toString('hex')}`;
  const shotDir = process.env.SB_SCREENSHOT_DIR || '';
  const contexts = [];
  const dirs = [];
  const pages = {};
  const consoleLines = {};
  const result = { ok: true, room };

  const open = async (name) => {
    const exe = process.env[`SB_BROWSER_${name}`];
    if (!exe) fail(`SB_BROWSER_${name} is not set`);
    const dir = mkdtempSync(join(tmpdir(), `sb-${name}-`));
    dirs.push(dir);
    const context = await launchChromium(dir, { width: 1280, height: 720 }, exe);
    contexts.push(context);
    if (SUBS.includes(name)) {
      // Viewers have a microphone and no camera: they publish audio only,
      // so that subB's capped downlink carries the publishers' media alone.
      await context.addInitScript(() => {
        const md = navigator.mediaDevices;
        if (!md || !md.getUserMedia) return;
        const real = md.getUserMedia.bind(md);
        md.getUserMedia = (c) => (c && c.audio
          ? real({ audio: c.audio })
          : Promise.reject(new DOMException('no camera here', 'NotFoundError')));
      });
    }
    const page = await context.newPage();
    if (!result.chromium) result.chromium = await page.evaluate(() => navigator.userAgent.match(/Chrome\/[\d.]+/)?.[0] ?? null);
    consoleLines[name] = [];
    page.on('console', (m) => consoleLines[name].push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => consoleLines[name].push(`pageerror: ${e.message}`));
    const extra = process.env.SB_PAGE_QUERY ? `&${process.env.SB_PAGE_QUERY}` : '';
    await page.goto(`${base}/?room=${room}&name=${name}&mode=sfu&timings=1${extra}`, { timeout: 15_000 });
    // In the room before the next one arrives (pub1 creates it, in SFU mode).
    await page.waitForFunction(() => window.sb && window.sb.state().id, null, { timeout: JOIN_TIMEOUT_MS })
      .catch(() => fail(`${name} never got joined (no participant id within ${JOIN_TIMEOUT_MS / 1000} s)`));
    const missing = await page.evaluate((hooks) => hooks.filter((h) => typeof window.sb[h] !== 'function'), HOOKS);
    if (missing.length) fail(`${name}: the page lacks the test hooks ${missing.join(', ')} (src/web/testhooks.js)`);
    pages[name] = page;
  };

  const viewers = async () => Object.fromEntries(await Promise.all(SUBS.map(async (n) => [n, await observeViewer(pages[n])])));
  const publishers = async () => Object.fromEntries(await Promise.all(PUBS.map(async (n) => [n, await observePublisher(pages[n])])));

  try {
    const startedAt = Date.now();
    for (const name of [...PUBS, ...SUBS]) await open(name);
    result.joinMs = Date.now() - startedAt;
    const ids = {};
    {
      const s = await observeViewer(pages.subA);
      for (const p of PUBS) {
        const peer = s.state.peers.find((x) => x.name === p);
        if (!peer) fail(`subA does not see ${p} in the room: ${JSON.stringify(s.state.peers)}`);
        ids[p] = peer.id;
      }
      result.features = s.state.features ?? null;
      if (s.state.mode !== 'sfu') fail(`room mode is ${s.state.mode}, expected sfu`);
    }

    // 1. Both viewers decode both publishers.
    let v;
    {
      const deadline = Date.now() + FIRST_MEDIA_TIMEOUT_MS;
      for (;;) {
        v = await viewers();
        if (SUBS.every((n) => PUBS.every((p) => from(v[n], ids[p]).frames > 0 && from(v[n], ids[p]).mid))) break;
        if (Date.now() > deadline) {
          const what = Object.fromEntries(SUBS.map((n) => [n, Object.fromEntries(PUBS.map((p) => [p, from(v[n], ids[p])]))]));
          fail(`not both viewers decoded both publishers within ${FIRST_MEDIA_TIMEOUT_MS / 1000} s: ${JSON.stringify(what)} `
            + `(remote tracks: ${JSON.stringify(Object.fromEntries(SUBS.map((n) => [n, v[n].state.sfu?.remote])))})`);
        }
        await sleep(POLL_MS);
      }
    }
    const decodingAt = Date.now();
    result.joinToDecodingMs = decodingAt - startedAt;
    // Viewers: no limit on either publisher (a big tile); publishers: the
    // other's video paused.
    const mids = Object.fromEntries(SUBS.map((n) => [n, Object.fromEntries(PUBS.map((p) => [p, from(v[n], ids[p]).mid]))]));
    const settings = async (name, mid, s) => {
      const sent = await pages[name].evaluate(([m, x]) => window.sb.setTrackSettings(m, x), [mid, s]);
      if (!sent) fail(`${name}: setTrackSettings(${mid}, ${JSON.stringify(s)}) sent nothing (signaling down?)`);
    };
    for (const n of SUBS) for (const p of PUBS) await settings(n, mids[n][p], {});
    for (const p of PUBS) {
      const other = PUBS.find((x) => x !== p);
      const deadline = Date.now() + FIRST_MEDIA_TIMEOUT_MS;
      let mid = null;
      while (!mid) {
        const s = await pages[p].evaluate(() => window.sb.state());
        mid = s.sfu?.remote.find((r) => r.owner === ids[other] && r.kind === 'video')?.mid ?? null;
        if (!mid && Date.now() > deadline) fail(`${p} never received ${other}'s video track: ${JSON.stringify(s.sfu?.remote)}`);
        if (!mid) await sleep(POLL_MS);
      }
      await settings(p, mid, { paused: true });
    }

    await sleep(Math.max(0, decodingAt + WARMUP_MS - Date.now()));
    v = await viewers();
    const pubSnap = await publishers();
    result.before = {
      ...Object.fromEntries(SUBS.map((n) => [n, Object.fromEntries(PUBS.map((p) => {
        const x = from(v[n], ids[p]);
        return [p, { frameWidth: x.w, frameHeight: x.h }];
      }))])),
      encodings: Object.fromEntries(PUBS.map((p) => [p, pubSnap[p].encodings])),
      outbound: Object.fromEntries(PUBS.map((p) => [p, pubSnap[p].outbound.map((o) => ({
        rid: o.rid, frameWidth: o.frameWidth, frameHeight: o.frameHeight, qualityLimitationReason: o.qualityLimitationReason, scalabilityMode: o.scalabilityMode,
      }))])),
      // Each publisher's own send-side estimate towards the server: the
      // 720p layer needs about 2.2 Mbit/s for all three.
      uplinkEstimate: Object.fromEntries(PUBS.map((p) => [p, pubSnap[p].uplinkEstimate])),
    };
    log(`before the cap: ${JSON.stringify(result.before)}`);

    // 2-3. Cap subB's downlink; after SETTLE_MS, WINDOW_MS of checks.
    const capAt = await phase('cap');
    const samples = []; // { at, v }
    let firstLowAt = null;
    let windowStart = null;
    let longestFreezeS = 0;
    let lastAdvanceCheck = null;
    const windowEnd = capAt + SETTLE_MS + WINDOW_MS;
    while (Date.now() < windowEnd) {
      await sleep(POLL_MS);
      v = await viewers();
      const now = v.subB.at;
      const prev = samples.length ? samples[samples.length - 1].v : null;
      samples.push({ at: now, v });
      const b = Object.fromEntries(PUBS.map((p) => [p, from(v.subB, ids[p])]));
      if (firstLowAt === null && PUBS.every((p) => b[p].w > 0 && b[p].w <= LOW_MAX_WIDTH
        && (!prev || b[p].frames > from(prev.subB, ids[p]).frames))) firstLowAt = now;
      if (now < capAt + SETTLE_MS) continue;
      if (windowStart === null) {
        windowStart = { at: now, v };
        lastAdvanceCheck = { ...windowStart, pubs: await publishers() };
        const late = PUBS.filter((p) => !(b[p].w > 0 && b[p].w <= LOW_MAX_WIDTH));
        if (late.length) {
          unmet(result, 'late', `subB still decodes ${late.map((p) => `${p} at ${brief(b[p])}`).join(' and ')} ${SETTLE_MS / 1000} s after its downlink `
            + `was capped (expected frameWidth <= ${LOW_MAX_WIDTH}; first such frame of both: ${firstLowAt ? `${firstLowAt - capAt} ms after the cap` : 'never'})`);
        }
        continue;
      }
      for (const p of PUBS) {
        if (!(b[p].w > 0 && b[p].w <= LOW_MAX_WIDTH)) unmet(result, `low-${p}`, `under the cap, ${now - capAt} ms after it: subB decodes ${p} at ${brief(b[p])} (expected frameWidth <= ${LOW_MAX_WIDTH})`);
        const a = from(v.subA, ids[p]);
        if (a.w < HIGH_MIN_WIDTH) unmet(result, `high-${p}`, `under subB's cap, ${now - capAt} ms after it: subA (unshaped) decodes ${p} at ${brief(a)} (expected frameWidth >= ${HIGH_MIN_WIDTH})`);
        const was = from(prev.subB, ids[p]);
        const freezeS = b[p].freezeS - was.freezeS;
        const ended = b[p].freezes - was.freezes;
        // The longest of the freezes that ended since the last sample.
        const longest = freezeS - Math.max(0, ended - 1) * MIN_FREEZE_S;
        if (ended > 0) longestFreezeS = Math.max(longestFreezeS, longest);
        if (longest > MAX_FREEZE_S) unmet(result, `freeze-${p}`, `under the cap: subB's video of ${p} froze for up to ${round(longest)} s (${ended} freeze(s), ${round(freezeS)} s in all, ended between two samples ${now - samples[samples.length - 2].at} ms apart; at most ${MAX_FREEZE_S} s expected)`);
      }
      if (now - lastAdvanceCheck.at >= ADVANCE_EVERY_MS) {
        // The publishers' encoders over the same span: a stall every
        // viewer sees at once starts there, not in anyone's downlink.
        const pubs = await publishers();
        const encoded = (p) => {
          const was = lastAdvanceCheck.pubs?.[p]?.outbound ?? [];
          return pubs[p].outbound.map((o) => `${o.rid}+${o.framesEncoded - (was.find((w) => w.rid === o.rid)?.framesEncoded ?? 0)}`).join(' ');
        };
        for (const n of SUBS) {
          for (const p of PUBS) {
            const x = from(v[n], ids[p]);
            const was = from(lastAdvanceCheck.v[n], ids[p]);
            if (x.frames <= was.frames) unmet(result, `advance-${n}-${p}`, `under subB's cap: ${n}'s video of ${p} did not advance in ${now - lastAdvanceCheck.at} ms (${was.frames} -> ${x.frames} frames decoded; ${p} encoded ${encoded(p)}, ${now - capAt} ms after the cap)`);
          }
        }
        lastAdvanceCheck = { at: now, v, pubs };
      }
    }
    {
      const end = samples[samples.length - 1];
      // Acceptance: over the capped window, subB's video of each publisher
      // kept coming (whatever the layer).
      for (const p of PUBS) {
        const before = from(windowStart.v.subB, ids[p]).frames;
        const after = from(end.v.subB, ids[p]).frames;
        if (!(after > before)) unmet(result, `stalled-${p}`, `under the cap, subB decoded no frame of ${p} in ${end.at - windowStart.at} ms (${before} -> ${after})`);
      }
      const lost = audioOf(end.v.subB).lost - audioOf(windowStart.v.subB).lost;
      const received = audioOf(end.v.subB).received - audioOf(windowStart.v.subB).received;
      const loss = received + lost > 0 ? Math.max(0, lost) / (received + lost) : 1;
      result.capped = {
        firstLowFrameMs: firstLowAt === null ? null : firstLowAt - capAt,
        windowMs: end.at - windowStart.at,
        longestFreezeS: round(longestFreezeS),
        subBAudioStreams: audioOf(end.v.subB).streams,
        subBAudioPacketsLost: lost,
        subBAudioPacketsReceived: received,
        subBAudioLoss: round(loss, 4),
        subB: Object.fromEntries(PUBS.map((p) => [p, {
          frameWidth: from(end.v.subB, ids[p]).w,
          framesPerSecond: round((from(end.v.subB, ids[p]).frames - from(windowStart.v.subB, ids[p]).frames) / ((end.at - windowStart.at) / 1000), 1),
        }])),
        subA: Object.fromEntries(PUBS.map((p) => [p, { frameWidth: from(end.v.subA, ids[p]).w }])),
        tileLongestFreezeMs: await pages.subB.evaluate((since) => window.sb.longestFreeze(since)
          .map((f) => ({ name: f.name, ms: f.longestFreezeMs })), windowStart.at),
      };
      log(`under the cap: ${JSON.stringify(result.capped)}`);
      if (received === 0) unmet(result, 'audio', 'under the cap: subB received no audio packets at all in the window');
      else if (loss >= MAX_AUDIO_LOSS) unmet(result, 'audio', `under the cap: subB lost ${round(loss * 100, 1)} % of its audio packets (${lost} of ${received + lost}; expected < ${MAX_AUDIO_LOSS * 100} %)`);
    }

    // 4. Lift the cap: subB climbs back.
    const uncapAt = await phase('uncap');
    {
      const deadline = uncapAt + RECOVER_MS;
      let b;
      let recovered = false;
      for (;;) {
        v = await viewers();
        b = Object.fromEntries(PUBS.map((p) => [p, from(v.subB, ids[p])]));
        if (PUBS.every((p) => b[p].w >= HIGH_MIN_WIDTH)) { recovered = true; break; }
        if (Date.now() > deadline) {
          unmet(result, 'recover', `subB did not climb back within ${RECOVER_MS / 1000} s of the cap lifting: ${PUBS.map((p) => `${p} at ${brief(b[p])}`).join(', ')} (expected frameWidth >= ${HIGH_MIN_WIDTH})`);
          break;
        }
        await sleep(POLL_MS);
      }
      result.recoverMs = recovered ? v.subB.at - uncapAt : null;
      result.recovered = Object.fromEntries(PUBS.map((p) => [p, { frameWidth: b[p].w }]));
    }

    // 5. track-settings. subA wants pub1 at 180 px at most.
    {
      const at = Date.now();
      const was = from(v.subA, ids.pub1);
      await settings('subA', mids.subA.pub1, { maxHeight: THUMB_HEIGHT });
      let a;
      let reached = false;
      for (;;) {
        await sleep(POLL_MS);
        v = await viewers();
        a = from(v.subA, ids.pub1);
        if (a.h > 0 && a.h <= THUMB_HEIGHT && a.frames > was.frames) { reached = true; break; }
        if (Date.now() > at + SETTINGS_MS) {
          unmet(result, 'maxHeight', `subA asked for pub1 at maxHeight ${THUMB_HEIGHT}, but after ${SETTINGS_MS / 1000} s decodes it at ${brief(a)}`);
          break;
        }
      }
      result.maxHeight = { ms: reached ? v.subA.at - at : null, frameWidth: a.w, frameHeight: a.h };
    }

    // Dynacast: nobody wants pub2's video, nobody more than 180 px of pub1's.
    {
      const at = Date.now();
      for (const n of SUBS) await settings(n, mids[n].pub2, { paused: true });
      await settings('subB', mids.subB.pub1, { maxHeight: THUMB_HEIGHT });
      let stoppedSince = null;
      let lastFrames = from(v.subA, ids.pub2).frames;
      let done = null;
      let pubs;
      for (;;) {
        await sleep(POLL_MS);
        [v, pubs] = await Promise.all([viewers(), publishers()]);
        const frames = from(v.subA, ids.pub2).frames;
        if (frames !== lastFrames) { stoppedSince = null; lastFrames = frames; } else if (stoppedSince === null) stoppedSince = v.subA.at;
        const onlyLowest = (p) => {
          const e = pubs[p].encodings;
          return e.length > 1 && e.every((x, i) => i === lowest(e) || !x.active);
        };
        if (done === null && onlyLowest('pub1') && onlyLowest('pub2')) done = Date.now();
        if (done !== null && stoppedSince !== null && v.subA.at - stoppedSince >= STOPPED_FOR_MS) break;
        if (Date.now() > at + SETTINGS_MS) {
          const why = [];
          for (const p of PUBS) {
            const e = pubs[p].encodings;
            if (e.length <= 1) why.push(`${p} does not send simulcast (encodings ${JSON.stringify(e)})`);
            else if (!onlyLowest(p)) why.push(`${p}'s encodings are ${encText(e)} (expected only the lowest, ${e[lowest(e)].rid}, active; last publisher-layers: ${JSON.stringify(pubs[p].layers)})`);
          }
          if (stoppedSince === null || v.subA.at - stoppedSince < STOPPED_FOR_MS) why.push(`subA still decodes pub2 though it paused it (${brief(from(v.subA, ids.pub2))})`);
          unmet(result, 'dynacast', `${SETTINGS_MS / 1000} s after the viewers paused pub2 and limited pub1 to ${THUMB_HEIGHT} px: ${why.join('; ')}`);
          break;
        }
      }
      result.dynacast = {
        encodingsOffMs: done === null ? null : done - at,
        pub1: encText(pubs.pub1.encodings),
        pub2: encText(pubs.pub2.encodings),
        subAPub2StoppedMs: stoppedSince === null ? null : stoppedSince - at,
        layers: Object.fromEntries(PUBS.map((p) => [p, pubs[p].layers?.active ?? null])),
      };
    }

    // Unpause pub2: decoded again, its top encoding on again.
    {
      const at = Date.now();
      const was = Object.fromEntries(SUBS.map((n) => [n, from(v[n], ids.pub2).frames]));
      for (const n of SUBS) await settings(n, mids[n].pub2, { paused: false });
      let pubs;
      let back = false;
      for (;;) {
        await sleep(POLL_MS);
        [v, pubs] = await Promise.all([viewers(), publishers()]);
        const e = pubs.pub2.encodings;
        const topOn = e.length > 1 && e[highest(e)].active;
        const decoding = SUBS.every((n) => from(v[n], ids.pub2).frames > was[n] + 10);
        if (topOn && decoding) { back = true; break; }
        if (Date.now() > at + SETTINGS_MS) {
          unmet(result, 'unpause', `${SETTINGS_MS / 1000} s after the viewers unpaused pub2: ${topOn ? '' : `pub2's encodings are ${encText(e)} (expected the top one on); `}`
            + `${SUBS.map((n) => `${n} decodes pub2 at ${brief(from(v[n], ids.pub2))} (${was[n]} at the unpause)`).join(', ')}`);
          break;
        }
      }
      result.unpause = {
        ms: back ? v.subA.at - at : null,
        pub2: encText(pubs.pub2.encodings),
        frameWidth: Object.fromEntries(SUBS.map((n) => [n, from(v[n], ids.pub2).w])),
      };
    }

    if (result.unmet) {
      // (every figure is logged on the way out, below)
      fail(`${result.unmet.length} unmet expectation(s); the first: ${result.unmet[0]}`);
    }
    if (shotDir) await screenshots(pages, shotDir, log);
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } catch (e) {
    // What was measured (every figure so far), and what every page shows
    // now, for the report.
    log(`measured before the failure: ${JSON.stringify(result)}`);
    const now = async (name, observe) => {
      if (!pages[name]) return;
      const s = await Promise.race([observe(pages[name]), sleep(5000).then(() => 'no answer within 5 s')]).catch((x) => `${x}`);
      log(`${name} at the failure: ${JSON.stringify(s)}`);
    };
    for (const n of PUBS) await now(n, observePublisher);
    for (const n of SUBS) await now(n, observeViewer);
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
