// Test hooks (kept small on purpose): `window.sb`, and frame timings with
// `?timings=1`.

import { S, ui } from './state.js';
import { mediaStats, sfuOwner } from './stats.js';
import {
  lastPublisherLayers, pinTrackSettings, trackSettingsState, unpinTrackSettings, videoMid,
} from './layers.js';

const TIMING_SAMPLE_MS = 50; // frame sampling for window.sb timings (?timings=1)
const TIMING_MAX_FRAMES = 4000; // frame-advance timestamps kept per remote

export function newPeerTiming() {
  return {
    knownAt: Date.now(), firstP2pFrameAt: null, firstSfuFrameAt: null,
    counts: { p2p: 0, sfu: 0 }, // framesDecoded at the last sample, per path
    shown: [], // epoch ms of each sample where the frames on screen advanced
  };
}

// Every TIMING_SAMPLE_MS: which path's frames are on each tile, and whether
// they advanced. Resolution is the sampling period.
async function sampleTimings() {
  const t = S.timing;
  if (!t || S.phase !== 'in-room') return;
  const stats = await mediaStats('video').catch(() => []);
  const now = Date.now();
  for (const peer of S.peers.values()) {
    let pt = t.peers.get(peer.id);
    if (!pt) { pt = newPeerTiming(); t.peers.set(peer.id, pt); }
    const sum = (via) => stats.filter((x) => x.peer === peer.id && x.via === via).reduce((n, x) => n + x.framesDecoded, 0);
    const counts = { p2p: sum('p2p'), sfu: sum('sfu') };
    if (counts.p2p > 0 && !pt.firstP2pFrameAt) pt.firstP2pFrameAt = now;
    if (counts.sfu > 0 && !pt.firstSfuFrameAt) pt.firstSfuFrameAt = now;
    const video = peer.tile.querySelector('video');
    const via = peer.sfuStream && video.srcObject === peer.sfuStream ? 'sfu' : 'p2p';
    if (video.srcObject && counts[via] > pt.counts[via]) {
      pt.shown.push(now);
      if (pt.shown.length > TIMING_MAX_FRAMES) pt.shown.shift();
    }
    pt.counts = counts;
  }
}

export function startTimings() {
  if (S.timing) return;
  S.timing = { joinedAt: null, p2pFailedAt: null, modeAt: null, modeReason: null, peers: new Map() };
  const loop = () => sampleTimings().finally(() => setTimeout(loop, TIMING_SAMPLE_MS));
  loop();
}

// Installs `window.sb`, what the browser tests read.
export function installTestHooks() {
  window.sb = {
    // Epoch-ms timings (needs `?timings=1`): joinedAt, p2pFailedAt (we sent
    // p2p-failed, or heard `mode` p2p-failed), modeAt/modeReason (last
    // `mode`), and per remote: knownAt, firstP2pFrameAt, firstSfuFrameAt,
    // switchedBy (server-delivered | p2p-down | timeout: why make-before-break
    // closed the direct connection).
    timings() {
      const t = S.timing;
      if (!t) return null;
      return {
        joinedAt: t.joinedAt, p2pFailedAt: t.p2pFailedAt, modeAt: t.modeAt, modeReason: t.modeReason,
        standby: S.standby, serverReach: S.serverReach,
        peers: [...S.peers.values()].map((p) => {
          const pt = t.peers.get(p.id) || newPeerTiming();
          return {
            id: p.id, name: p.name, knownAt: pt.knownAt, firstP2pFrameAt: pt.firstP2pFrameAt, firstSfuFrameAt: pt.firstSfuFrameAt,
            // Why a working direct connection was closed on the switch to the server.
            switchedBy: p.switchedBy || null,
          };
        }),
      };
    },
    // Per remote: the longest time between two advances of the frames on its
    // tile from `since` (epoch ms) until now, counting the wait after the last one.
    longestFreeze(since) {
      const t = S.timing;
      if (!t) return null;
      const now = Date.now();
      return [...S.peers.values()].map((p) => {
        const shown = (t.peers.get(p.id) || { shown: [] }).shown;
        let prev = null;
        let longest = 0;
        let frames = 0;
        for (const at of shown) {
          if (at < since) { prev = at; continue; }
          frames++;
          if (prev !== null) longest = Math.max(longest, at - prev);
          prev = at;
        }
        if (prev !== null) longest = Math.max(longest, now - prev);
        return { id: p.id, name: p.name, longestFreezeMs: prev === null ? null : longest, frames };
      });
    },
    state() {
      const ws = S.ws ? ['connecting', 'open', 'closing', 'closed'][S.ws.readyState] : 'closed';
      const sfu = S.sfu;
      return {
        id: S.id, room: S.room, mode: S.mode, audio: S.audio, ws, phase: S.phase, resumes: S.resumes,
        features: S.features,
        speakers: S.speakers.map((x) => x.id), speakerEvents: S.speakerEvents,
        speaking: [...document.querySelectorAll('.tile.speaking')].map((t) => (t === ui.localTile ? S.id : t.dataset.peer)),
        peers: [...S.peers.values()].map((p) => ({
          id: p.id, name: p.name, connectionState: p.pc ? p.pc.connectionState : 'none',
          sfuTracks: p.sfuStream ? p.sfuStream.getTracks().map((t) => t.kind) : [],
        })),
        sfu: sfu ? {
          connectionState: sfu.pc.connectionState,
          iceConnectionState: sfu.pc.iceConnectionState,
          signalingState: sfu.pc.signalingState,
          iceRestarts: sfu.iceRestarts,
          pathStalls: sfu.pathStalls,
          chat: sfu.chat ? sfu.chat.readyState : 'none',
          videoMid: videoMid(sfu), // our camera's m-section (`publisher-layers` names it)
          videoLayers: sfu.video ? sfu.video.layers : 0,
          serverReach: S.serverReach,
          remote: [...sfu.remote.entries()].map(([mid, r]) => ({
            mid, owner: r.owner, kind: r.kind, muted: r.track.muted,
          })),
        } : null,
      };
    },
    // Inbound video per remote participant: { peer, via, mid, ssrc, framesDecoded, packetsReceived }.
    videoStats() { return mediaStats('video'); },
    // Inbound audio per remote participant (or "mix"): { peer, via, mid, ssrc, packetsReceived }.
    audioStats() { return mediaStats('audio'); },
    // Repair on the server connection, summed over inbound video: NACKs we
    // sent and packets that came back as retransmissions (RTX).
    async repairStats() {
      const out = { nackCount: 0, retransmittedPacketsReceived: 0, packetsLost: 0 };
      if (!S.sfu) return out;
      const stats = await S.sfu.pc.getStats();
      stats.forEach((x) => {
        if (x.type !== 'inbound-rtp' || x.kind !== 'video') return;
        out.nackCount += x.nackCount || 0;
        out.retransmittedPacketsReceived += x.retransmittedPacketsReceived || 0;
        out.packetsLost += x.packetsLost || 0;
      });
      return out;
    },
    // Simulcast (1.1). Our camera's encodings on the server connection:
    // [{ rid, active, scaleResolutionDownBy, maxBitrate }] (rid null for one
    // plain encoding; [] without a camera or server connection).
    sendEncodings() {
      const v = S.sfu && S.sfu.video;
      if (!v) return [];
      return (v.sender.getParameters().encodings || []).map((e) => ({
        rid: e.rid ?? null,
        active: e.active !== false,
        scaleResolutionDownBy: e.scaleResolutionDownBy ?? null,
        maxBitrate: e.maxBitrate ?? null,
      }));
    },
    // Per outbound video stream (one per encoding) of the server connection.
    async outboundVideo() {
      return sfuStats('outbound-rtp', 'video', (x) => ({
        rid: x.rid ?? null, mid: x.mid ?? null, active: x.active ?? null,
        frameWidth: x.frameWidth || 0, frameHeight: x.frameHeight || 0,
        framesEncoded: x.framesEncoded || 0, bytesSent: x.bytesSent || 0,
        qualityLimitationReason: x.qualityLimitationReason ?? null,
        scalabilityMode: x.scalabilityMode ?? null,
      }));
    },
    // The server connection's send-side estimate (bit/s; the selected
    // candidate pair's availableOutgoingBitrate), null before there is one.
    async availableOutgoingBitrate() {
      if (!S.sfu) return null;
      let out = null;
      (await S.sfu.pc.getStats()).forEach((x) => {
        if (x.type === 'candidate-pair' && x.nominated && x.state === 'succeeded' && x.availableOutgoingBitrate !== undefined) {
          out = x.availableOutgoingBitrate;
        }
      });
      return out;
    },
    // Per inbound video stream of the server connection; `owner`: the
    // publishing participant, null if unknown or no longer received.
    async inboundVideo() {
      return sfuStats('inbound-rtp', 'video', (x) => ({
        mid: x.mid ?? null, trackIdentifier: x.trackIdentifier ?? null, owner: sfuOwner(x),
        frameWidth: x.frameWidth || 0, frameHeight: x.frameHeight || 0, framesDecoded: x.framesDecoded || 0,
        freezeCount: x.freezeCount || 0, totalFreezesDuration: x.totalFreezesDuration || 0,
        packetsLost: x.packetsLost || 0, packetsReceived: x.packetsReceived || 0,
      }));
    },
    // Per inbound audio stream of the server connection (`owner` "mix" for the mix).
    async inboundAudio() {
      return sfuStats('inbound-rtp', 'audio', (x) => ({
        mid: x.mid ?? null, owner: sfuOwner(x),
        packetsLost: x.packetsLost || 0, packetsReceived: x.packetsReceived || 0, jitter: x.jitter || 0,
      }));
    },
    // Sends `track-settings` for the server offer's `mid` now (also without
    // the "simulcast" feature) and keeps the automatic watch off it until
    // unpinTrackSettings(mid). Returns { mid, maxHeight, paused } as sent,
    // or null if signaling is down (the pin holds and goes out on resume).
    setTrackSettings(mid, settings = {}) { return pinTrackSettings(mid, settings || {}); },
    unpinTrackSettings(mid) { unpinTrackSettings(mid); },
    // { enabled, sent: [{ mid, maxHeight, paused, at }], pinned: [...], watched: [mid] }.
    trackSettings() { return trackSettingsState(); },
    // The last `publisher-layers` received (with `receivedAt`), or null.
    lastPublisherLayers() { return lastPublisherLayers(); },
  };
}

// `pick(stat)` of each `type` stat of `kind` on the server connection.
async function sfuStats(type, kind, pick) {
  if (!S.sfu) return [];
  const out = [];
  (await S.sfu.pc.getStats()).forEach((x) => {
    if (x.type === type && x.kind === kind) out.push(pick(x));
  });
  return out;
}
