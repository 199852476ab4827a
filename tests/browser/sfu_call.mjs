// Three headless Chromium pages join one room created in SFU mode on a running
// Switchboard. Each page must decode the video of both others and receive
// both others' audio through its one connection to the server, with a tile
// per participant labelled with the right name; a chat message from alice
// must show up at bob and carol (and once at alice).
//
//   node sfu_call.mjs <baseUrl> [forward|mix]    e.g. node sfu_call.mjs http://127.0.0.1:8080 mix
//
// `forward` (default): each page gets one audio stream per other participant.
// `mix`: the room mixes audio, so each page gets exactly ONE inbound audio
// stream (stream id "mix") with packets flowing, and none per participant.
// Both: tiles highlighted as speaking match the server's last `speakers`.
//
// Uses Debian's /usr/bin/chromium (no browser download). Prints one JSON line
// and exits 0 on success; exits 1 with a reason on failure. Env:
//   SB_SCREENSHOT_DIR  save alice.png / bob.png / carol.png there (mid-call, or at failure)
//   SB_CHROMIUM        browser executable (default /usr/bin/chromium)

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import {
  fail, launchChromium, makeLog, run, screenshots, sleep, waitForHealth,
} from './harness.mjs';

const JOIN_TIMEOUT_MS = 10_000;
const MEDIA_TIMEOUT_MS = 40_000;
const CHAT_TIMEOUT_MS = 10_000;
const HARD_TIMEOUT_MS = 90_000;

const NAMES = ['alice', 'bob', 'carol'];
const AUDIO = process.argv[3] || 'forward';
if (!['forward', 'mix'].includes(AUDIO)) fail(`audio mode must be forward or mix, not ${AUDIO}`);
const CHAT_TEXT = `hello from alice <b>${randomBytes(3).toString('hex')}</b>`;

const log = makeLog('sfu_call');



// Everything a page shows that the test checks.
function observe(page) {
  return page.evaluate(async () => {
    const tiles = [...document.querySelectorAll('.tile.remote')].map((t) => ({
      peer: t.dataset.peer,
      name: t.querySelector('.name')?.textContent ?? '',
      state: t.querySelector('.pc-state')?.textContent ?? '',
      showsVideo: !t.classList.contains('no-video'),
    }));
    const badge = document.getElementById('mode-badge');
    const chat = document.getElementById('chat');
    return {
      state: window.sb ? window.sb.state() : null,
      video: window.sb ? await window.sb.videoStats() : [],
      audio: window.sb && window.sb.audioStats ? await window.sb.audioStats() : [],
      tiles,
      badge: badge && !badge.hidden ? {
        mode: badge.dataset.mode,
        text: badge.querySelector('.mode-text')?.textContent ?? badge.textContent.trim(),
        state: badge.querySelector('.mode-state')?.textContent ?? '',
      } : null,
      chatVisible: !!chat && !chat.hidden,
      chat: [...document.querySelectorAll('#chat-log .chat-msg')].map((m) => ({
        from: m.dataset.from,
        name: m.querySelector('.chat-from')?.textContent ?? '',
        text: m.querySelector('.chat-text')?.textContent ?? '',
        mine: m.classList.contains('mine'),
      })),
      notices: [...document.querySelectorAll('#notices .notice span')].map((n) => n.textContent),
    };
  });
}

// For page `name`: what it receives from each other participant, by name.
function received(name, s) {
  const out = {};
  for (const other of NAMES.filter((n) => n !== name)) {
    const peer = s.state?.peers.find((p) => p.name === other);
    const video = s.video.filter((x) => peer && x.peer === peer.id && x.via === 'sfu');
    const audio = s.audio.filter((x) => peer && x.peer === peer.id && x.via === 'sfu');
    out[other] = {
      id: peer?.id ?? null,
      videoStreams: video.length,
      framesDecoded: video.reduce((n, x) => n + x.framesDecoded, 0),
      videoPackets: video.reduce((n, x) => n + x.packetsReceived, 0),
      audioStreams: audio.length,
      audioPackets: audio.reduce((n, x) => n + x.packetsReceived, 0),
      tile: s.tiles.find((t) => peer && t.peer === peer.id) ?? null,
    };
  }
  return out;
}

// The mixed audio a page receives: { streams, packets }.
function mixed(s) {
  const mix = s.audio.filter((x) => x.peer === 'mix' && x.via === 'sfu');
  return { streams: mix.length, packets: mix.reduce((n, x) => n + x.packetsReceived, 0) };
}

function mediaOk(r, s) {
  const videoOk = Object.values(r).every((x) => x.id && x.framesDecoded > 0 && x.videoStreams === 1);
  if (AUDIO === 'mix') {
    const m = mixed(s);
    return videoOk && m.streams === 1 && m.packets > 0 && s.audio.length === 1;
  }
  return videoOk && Object.values(r).every((x) => x.audioPackets > 0 && x.audioStreams === 1);
}

async function main() {
  const base = process.argv[2];
  if (!base || !/^https?:\/\//.test(base)) fail('usage: node sfu_call.mjs <baseUrl> (http://host:port)');
  await waitForHealth(base);

  const room = `${AUDIO === 'mix' ? 'mix' : 'sfu'}-${randomBytes(6).toString('hex')}`;
  const userDataDir = mkdtempSync(join(tmpdir(), 'sb-chromium-'));
  const shotDir = process.env.SB_SCREENSHOT_DIR || '';
  let context;
  const pages = {};
  const consoleLines = Object.fromEntries(NAMES.map((n) => [n, []]));
  try {
    context = await launchChromium(userDataDir, { width: 1280, height: 720 });
    log(`chromium ${context.browser()?.version() ?? '(persistent)'} up, room ${room}`);

    const started = Date.now();
    for (const name of NAMES) {
      const page = await context.newPage();
      page.on('console', (m) => consoleLines[name].push(`${m.type()}: ${m.text()}`));
      page.on('pageerror', (e) => consoleLines[name].push(`pageerror: ${e.message}`));
      // Alice creates the room, in SFU mode, with audio forwarded per
      // participant or mixed.
      await page.goto(`${base}/?room=${room}&name=${name}&mode=sfu&audio=${AUDIO}`, { timeout: 10_000 });
      pages[name] = page;
      // One at a time, so the room exists (and is SFU) before the next arrives.
      await page.waitForFunction(() => window.sb && window.sb.state().id, null, { timeout: JOIN_TIMEOUT_MS })
        .catch(() => fail(`${name} never got joined (no participant id within ${JOIN_TIMEOUT_MS / 1000} s)`));
    }

    const readyMs = {};
    const deadline = Date.now() + MEDIA_TIMEOUT_MS;
    const snap = {};
    for (;;) {
      for (const name of NAMES) {
        snap[name] = await observe(pages[name]);
        if (readyMs[name] === undefined && mediaOk(received(name, snap[name]), snap[name])) readyMs[name] = Date.now() - started;
      }
      if (NAMES.every((n) => readyMs[n] !== undefined)) break;
      if (Date.now() > deadline) {
        const what = Object.fromEntries(NAMES.map((n) => [n, { received: received(n, snap[n]), ...snap[n] }]));
        // What each page sends (simulcast layers) and was told to send.
        for (const n of NAMES) {
          what[n].sending = await pages[n].evaluate(async () => ({
            encodings: window.sb.sendEncodings(),
            outbound: await window.sb.outboundVideo(),
            told: window.sb.lastPublisherLayers(),
          })).catch((e) => String(e));
        }
        fail(`not every page decoded video and got audio from both others within ${MEDIA_TIMEOUT_MS / 1000} s: ${JSON.stringify(what)}`);
      }
      await sleep(250);
    }

    // Chat: alice types a message and presses Enter; bob and carol show it
    // under alice's name, alice shows it once as her own.
    const input = pages.alice.locator('#chat-input');
    await input.waitFor({ state: 'visible', timeout: 5000 })
      .catch(() => fail('alice: the chat input is not visible in an SFU room'));
    await pages.alice.waitForFunction(() => !document.getElementById('chat-input').disabled, null, { timeout: CHAT_TIMEOUT_MS })
      .catch(() => fail(`alice: the chat input never became usable (chat channel: ${snap.alice.state?.sfu?.chat})`));
    await input.fill(CHAT_TEXT);
    await input.press('Enter');
    const chatDeadline = Date.now() + CHAT_TIMEOUT_MS;
    const aliceId = snap.alice.state.id;
    for (;;) {
      for (const name of NAMES) snap[name] = await observe(pages[name]);
      const got = ['bob', 'carol'].every((n) => snap[n].chat.some((m) => m.text === CHAT_TEXT));
      if (got) break;
      if (Date.now() > chatDeadline) {
        fail(`chat message not shown within ${CHAT_TIMEOUT_MS / 1000} s: ${JSON.stringify(Object.fromEntries(NAMES.map((n) => [n, snap[n].chat])))}`);
      }
      await sleep(200);
    }
    // Let more frames through (and any echo arrive) before the final look.
    await sleep(1500);

    const result = { ok: true, room, pages: {} };
    for (const name of NAMES) {
      const s = await observe(pages[name]);
      const r = received(name, s);
      if (s.state.mode !== 'sfu') fail(`${name}: room mode is ${s.state.mode}, expected sfu`);
      if (s.state.ws !== 'open') fail(`${name}: WebSocket is ${s.state.ws}`);
      if (s.state.sfu?.connectionState !== 'connected') fail(`${name}: server connection is ${s.state.sfu?.connectionState}`);
      if (s.badge?.text !== 'via server') fail(`${name}: mode badge says ${JSON.stringify(s.badge)}, expected "via server"`);
      if (s.badge?.state !== 'connected') fail(`${name}: mode badge shows server connection ${JSON.stringify(s.badge)}, expected connected`);
      if (!s.chatVisible) fail(`${name}: the chat is not visible in an SFU room`);
      if (s.tiles.length !== 2) fail(`${name}: ${s.tiles.length} remote tiles, expected 2: ${JSON.stringify(s.tiles)}`);
      if (s.state.peers.some((p) => p.connectionState !== 'none')) fail(`${name}: a P2P connection is open in an SFU room: ${JSON.stringify(s.state.peers)}`);
      for (const [other, x] of Object.entries(r)) {
        if (!x.id) fail(`${name}: no participant named ${other} in sb.state(): ${JSON.stringify(s.state)}`);
        if (!x.tile) fail(`${name}: no tile for ${other} (${x.id})`);
        if (x.tile.name !== other) fail(`${name}: the tile of ${x.id} is labelled "${x.tile.name}", expected "${other}"`);
        if (!x.tile.showsVideo) fail(`${name}: the tile of ${other} shows no video`);
        if (x.videoStreams !== 1 || x.framesDecoded <= 0) fail(`${name}: video from ${other}: ${JSON.stringify(x)}`);
        if (AUDIO === 'forward' && (x.audioStreams !== 1 || x.audioPackets <= 0)) fail(`${name}: audio from ${other}: ${JSON.stringify(x)}`);
        if (AUDIO === 'mix' && x.audioStreams !== 0) fail(`${name}: audio forwarded from ${other} in a mix room: ${JSON.stringify(x)}`);
      }
      if (AUDIO === 'mix') {
        const m = mixed(s);
        if (m.streams !== 1 || m.packets <= 0 || s.audio.length !== 1) {
          fail(`${name}: expected exactly one inbound audio stream, the mix, with packets: ${JSON.stringify(s.audio)}`);
        }
        if (s.state.audio !== 'mix') fail(`${name}: room audio is ${s.state.audio}, expected mix`);
      }
      // Chromium's fake microphone beeps, so the server names speakers (from
      // the mixer's levels, or the audio-level header extension when
      // forwarding) and the page highlights exactly those tiles.
      if (s.state.speakerEvents === 0) fail(`${name}: no speakers event in a room of beeping microphones`);
      const said = [...s.state.speakers].sort();
      const shown = [...s.state.speaking].sort();
      if (JSON.stringify(said) !== JSON.stringify(shown)) {
        fail(`${name}: tiles highlighted ${JSON.stringify(shown)} but the last speakers event named ${JSON.stringify(said)}`);
      }
      const chatHere = s.chat.filter((m) => m.text === CHAT_TEXT);
      if (chatHere.length !== 1) fail(`${name}: shows the chat message ${chatHere.length} times: ${JSON.stringify(s.chat)}`);
      if (name === 'alice') {
        if (!chatHere[0].mine) fail(`alice: her own message is not marked as hers: ${JSON.stringify(chatHere)}`);
      } else if (chatHere[0].from !== aliceId || chatHere[0].name !== 'alice' || chatHere[0].mine) {
        fail(`${name}: chat message attributed wrongly: ${JSON.stringify(chatHere[0])} (alice is ${aliceId})`);
      }
      result.pages[name] = {
        id: s.state.id,
        readyMs: readyMs[name],
        from: Object.fromEntries(Object.entries(r).map(([other, x]) => [other, {
          framesDecoded: x.framesDecoded, videoPackets: x.videoPackets, audioPackets: x.audioPackets, tile: x.tile.name,
        }])),
        chat: chatHere[0].name,
        mixPackets: AUDIO === 'mix' ? mixed(s).packets : undefined,
        speakerEvents: s.state.speakerEvents,
        speakers: s.state.speakers,
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
