// Simulcast and video layers (protocol 1.1, server feature "simulcast"), on
// the server connection only (direct calls stay single-layer):
// - publishing: the camera goes out in up to three VP8 encodings, lowest
//   first, and `publisher-layers` turns them on and off;
// - receiving: each remote video's tile is watched (size on screen,
//   off-screen, page hidden) and the server told by `track-settings`.

import { S } from './state.js';
import { send } from './socket.js';

// Encodings by camera height, lowest first (rids are ours to choose).
const LAYERS_720 = [
  { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 },
  { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
];
const LAYERS_360 = [
  { rid: 'q', scaleResolutionDownBy: 2, maxBitrate: 150_000 },
  { rid: 'h', scaleResolutionDownBy: 1, maxBitrate: 500_000 },
];

const DEBOUNCE_MS = 300; // quiet time after a change before telling the server
const MAX_WAIT_MS = 1000; // a change that keeps changing is still told this soon
const MIN_GAP_MS = 250; // per track: at most ~4 messages a second

// Whether this server takes simulcast and track settings.
export function simulcastOn() {
  return Array.isArray(S.features) && S.features.includes('simulcast');
}

// The encodings for a camera track: several for 360 px and up, else null
// (one plain encoding).
export function videoEncodings(track) {
  let height = 0;
  try { height = (track.getSettings && track.getSettings().height) || 0; } catch (_) { /* none */ }
  const layers = height >= 720 ? LAYERS_720 : height >= 360 ? LAYERS_360 : null;
  return layers ? layers.map((e) => ({ ...e })) : null;
}

// Adds our local tracks to the server connection: audio (and video when
// simulcast is off or the camera is small) as `addTrack` always did; the
// camera as a transceiver with its simulcast encodings. Notes the video
// sender in `sfu.video`.
export function addSfuTracks(sfu) {
  const pc = sfu.pc;
  const stream = S.localStream;
  if (!stream) return;
  for (const track of stream.getTracks()) {
    if (track.kind !== 'video') { pc.addTrack(track, stream); continue; }
    const encodings = S.simulcast && simulcastOn() ? videoEncodings(track) : null;
    let transceiver = null;
    if (encodings) {
      try {
        transceiver = pc.addTransceiver(track, { direction: 'sendrecv', streams: [stream], sendEncodings: encodings });
        preferVp8(transceiver);
      } catch (e) {
        console.warn('simulcast refused by this browser, sending one layer:', e);
        transceiver = null;
      }
    }
    if (!transceiver) {
      const sender = pc.addTrack(track, stream);
      transceiver = pc.getTransceivers().find((t) => t.sender === sender) || null;
    }
    if (transceiver) sfu.video = { transceiver, sender: transceiver.sender, layers: encodings ? encodings.length : 1 };
  }
}

// Simulcast here is VP8: offer only VP8 (and its repair codecs) on the
// camera's section.
function preferVp8(transceiver) {
  if (!transceiver.setCodecPreferences || !window.RTCRtpReceiver || !RTCRtpReceiver.getCapabilities) return;
  const caps = RTCRtpReceiver.getCapabilities('video');
  if (!caps || !Array.isArray(caps.codecs)) return;
  const repair = ['video/rtx', 'video/red', 'video/ulpfec', 'video/flexfec-03'];
  const vp8 = caps.codecs.filter((c) => c.mimeType.toLowerCase() === 'video/vp8');
  if (!vp8.length) return;
  const rest = caps.codecs.filter((c) => repair.includes(c.mimeType.toLowerCase()));
  try {
    transceiver.setCodecPreferences([...vp8, ...rest]);
  } catch (e) {
    console.warn('could not prefer VP8 for simulcast:', e);
  }
}

// The mid of our camera's m-section on the server connection (after the
// first offer), or null.
export function videoMid(sfu = S.sfu) {
  return sfu && sfu.video ? sfu.video.transceiver.mid : null;
}

// ---------------------------------------------------------------- publisher-layers

let lastLayers = null;
export function lastPublisherLayers() {
  return lastLayers;
}

// `publisher-layers`: which of our encodings some subscriber needs now.
// Unknown mids and rids are ignored; nothing is thrown into the message loop.
export function onPublisherLayers(msg) {
  try {
    lastLayers = { ...msg, receivedAt: Date.now() };
    const sfu = S.sfu;
    if (!sfu || typeof msg.mid !== 'string' || !Array.isArray(msg.active)) return;
    const t = sfu.pc.getTransceivers().find((x) => x.mid === msg.mid && x.sender && x.sender.track);
    if (!t) { console.info(`publisher-layers for mid ${msg.mid}, which we do not send on; ignored`); return; }
    const active = msg.active.filter((x) => typeof x === 'string');
    // One setParameters at a time (each needs the previous one's parameters).
    sfu.layersChain = (sfu.layersChain || Promise.resolve())
      .then(() => (S.sfu === sfu && sfu.pc.signalingState !== 'closed' ? setActive(t.sender, active) : undefined))
      .catch((e) => console.warn('publisher-layers: could not switch encodings:', e));
  } catch (e) {
    console.warn('publisher-layers ignored:', e);
  }
}

async function setActive(sender, active) {
  const params = sender.getParameters();
  let changed = false;
  for (const enc of params.encodings || []) {
    if (!enc.rid) continue; // one plain encoding: not ours to pause
    const on = active.includes(enc.rid);
    if (enc.active !== on) { enc.active = on; changed = true; }
  }
  if (changed) await sender.setParameters(params);
}

// ---------------------------------------------------------------- track-settings

const watched = new Map(); // mid -> entry (see watch)
const sent = new Map(); // mid -> { maxHeight, paused, at } the server was last told
const pinned = new Map(); // mid -> { maxHeight, paused } set by a test: the watch keeps off

// Watches the tile of every remote video the server connection receives
// (after each sync of its tracks); stops for those gone.
export function syncTrackSettings(sfu) {
  const want = new Map();
  if (S.sfu === sfu && simulcastOn()) {
    for (const [mid, r] of sfu.remote) {
      if (r.kind !== 'video') continue;
      const peer = S.peers.get(r.owner);
      const video = peer && peer.tile ? peer.tile.querySelector('video') : null;
      if (video) want.set(mid, { track: r.track, video });
    }
  }
  for (const [mid, e] of watched) {
    const w = want.get(mid);
    if (!w || w.track !== e.track || w.video !== e.video) unwatch(mid);
  }
  for (const [mid, w] of want) if (!watched.has(mid)) watch(mid, w.track, w.video);
}

// Stops watching `video` (its tile went; the track may linger a moment).
export function forgetVideo(video) {
  for (const [mid, e] of [...watched]) if (e.video === video) unwatch(mid);
}

// Stops every watch and forgets what was sent (the server connection closed).
export function stopTrackSettings() {
  for (const mid of [...watched.keys()]) unwatch(mid);
  sent.clear();
}

function watch(mid, track, video) {
  const e = { mid, track, video, visible: true, timer: null, firstAt: 0, lastAt: 0, ro: null, io: null };
  const changed = () => schedule(e);
  e.onResize = changed;
  video.addEventListener('resize', changed); // the picture's aspect (object-fit: cover)
  if (window.ResizeObserver) {
    e.ro = new ResizeObserver(changed);
    e.ro.observe(video);
  }
  if (window.IntersectionObserver) {
    e.io = new IntersectionObserver((entries) => {
      for (const x of entries) e.visible = x.isIntersecting;
      schedule(e);
    });
    e.io.observe(video);
  }
  watched.set(mid, e);
  schedule(e);
}

function unwatch(mid) {
  const e = watched.get(mid);
  if (!e) return;
  watched.delete(mid);
  clearTimeout(e.timer);
  if (e.ro) e.ro.disconnect();
  if (e.io) e.io.disconnect();
  e.video.removeEventListener('resize', e.onResize);
  sent.delete(mid); // a later track on this mid starts afresh
}

// Tells the server DEBOUNCE_MS after the last change (MAX_WAIT_MS after the
// first at most), never sooner than MIN_GAP_MS after the last message.
function schedule(e) {
  const now = Date.now();
  if (!e.firstAt) e.firstAt = now;
  clearTimeout(e.timer);
  let delay = Math.min(DEBOUNCE_MS, Math.max(0, e.firstAt + MAX_WAIT_MS - now));
  delay = Math.max(delay, e.lastAt + MIN_GAP_MS - now);
  e.timer = setTimeout(() => {
    e.timer = null;
    e.firstAt = 0;
    flush(e);
  }, delay);
}

function flush(e) {
  if (watched.get(e.mid) !== e || pinned.has(e.mid)) return;
  if (!e.video.isConnected) { unwatch(e.mid); return; } // the tile went
  const want = measure(e);
  const last = sent.get(e.mid);
  if (last && last.maxHeight === want.maxHeight && last.paused === want.paused) return;
  if (sendSettings(e.mid, want)) e.lastAt = Date.now();
}

// What the tile needs now: its rendered height in device pixels (with
// object-fit: cover, the height the picture is drawn at, which is more when
// the tile is wider than the picture), and whether it is shown at all.
function measure(e) {
  const rect = e.video.getBoundingClientRect();
  let h = rect.height;
  const vw = e.video.videoWidth;
  const vh = e.video.videoHeight;
  if (vw > 0 && vh > 0 && rect.width > 0 && getComputedStyle(e.video).objectFit === 'cover') {
    h = Math.max(h, (rect.width * vh) / vw);
  }
  const shown = h > 0 && e.visible && document.visibilityState !== 'hidden';
  return { maxHeight: h > 0 ? Math.round(h * (window.devicePixelRatio || 1)) : null, paused: !shown };
}

function sendSettings(mid, v) {
  const msg = { type: 'track-settings', room: S.room, mid, paused: !!v.paused };
  if (Number.isInteger(v.maxHeight) && v.maxHeight >= 0) msg.maxHeight = v.maxHeight;
  if (!send(msg)) return false;
  sent.set(mid, { maxHeight: msg.maxHeight ?? null, paused: msg.paused, at: Date.now() });
  return true;
}

// Signaling came back (`resumed`): tell the server everything again.
export function resendTrackSettings() {
  for (const [mid, v] of pinned) sendSettings(mid, v);
  if (!simulcastOn()) return;
  for (const e of watched.values()) {
    if (pinned.has(e.mid)) continue;
    if (sendSettings(e.mid, measure(e))) e.lastAt = Date.now();
  }
}

document.addEventListener('visibilitychange', () => {
  for (const e of watched.values()) schedule(e);
});

// For the tests: sends `{maxHeight, paused}` for `mid` now and keeps the
// watch off that mid until unpinTrackSettings(mid). Returns what was sent,
// or null when signaling is down.
export function pinTrackSettings(mid, { maxHeight = null, paused = false } = {}) {
  mid = String(mid);
  const v = { maxHeight: Number.isFinite(maxHeight) ? Math.round(maxHeight) : null, paused: !!paused };
  pinned.set(mid, v);
  return sendSettings(mid, v) ? { mid, ...v } : null;
}

export function unpinTrackSettings(mid) {
  mid = String(mid);
  pinned.delete(mid);
  sent.delete(mid); // what the watch measures goes out even if it matches the pin
  const e = watched.get(mid);
  if (e) { e.lastAt = 0; schedule(e); }
}

// What the server was last told per mid, what is pinned, and what is watched.
export function trackSettingsState() {
  return {
    enabled: simulcastOn(),
    sent: [...sent.entries()].map(([mid, v]) => ({ mid, ...v })),
    pinned: [...pinned.entries()].map(([mid, v]) => ({ mid, ...v })),
    watched: [...watched.keys()],
  };
}
