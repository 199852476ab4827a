// Inbound media statistics per remote participant (for make-before-break
// and the test hooks).

import { S } from './state.js';

export async function inbound(pc, kind, owner) {
  const out = [];
  const report = await pc.getStats();
  report.forEach((r) => {
    if (r.type !== 'inbound-rtp' || r.kind !== kind) return;
    const peer = owner(r);
    if (peer) out.push({ peer, mid: r.mid ?? null, ssrc: r.ssrc, packetsReceived: r.packetsReceived || 0, ...(kind === 'video' ? { framesDecoded: r.framesDecoded || 0 } : {}) });
  });
  return out;
}

// Inbound stats of the server connection, attributed by mid to the
// publishing participant (or "mix"); streams no longer received are left out.
export function sfuOwner(r) {
  const sfu = S.sfu;
  if (!sfu) return null;
  let entry = r.mid != null ? sfu.remote.get(String(r.mid)) : null;
  if (!entry && r.trackIdentifier) {
    entry = [...sfu.remote.values()].find((x) => x.track.id === r.trackIdentifier) || null;
  }
  // An m-section reused for a later track: stats of the earlier SSRC are not the new owner's.
  if (entry && entry.ssrcs.size && !entry.ssrcs.has(r.ssrc)) return null;
  return entry ? entry.owner : null;
}

export async function mediaStats(kind) {
  const out = [];
  for (const p of S.peers.values()) {
    if (p.pc) out.push(...(await inbound(p.pc, kind, () => p.id)).map((x) => ({ ...x, via: 'p2p' })));
  }
  if (S.sfu) out.push(...(await inbound(S.sfu.pc, kind, sfuOwner)).map((x) => ({ ...x, via: 'sfu' })));
  return out;
}
