#!/usr/bin/env python3
"""A classic Socket.IO room client (python-socketio + aiortc) that knows only
the classic events: emit `join(room)`; on `otherjoin(room, id)` offer to
`id`; answer offers; `message(room, {type, sdp})` and classic candidates
`{type: "candidate", label, id, candidate}`; `bye` closes the connection.
With a server whose `--socketio-relay` is `always`, the peer it is given
is the server ("sfu"): it receives the mix of everyone else's audio and the
active speaker's video on its one connection.

It sends a sine tone (--freq) and a moving bar video, runs --seconds after
its connection is up, then prints one JSON line: events seen, frames
received per kind, and the received audio's level (dB) at each --probe
frequency over the last 2 s.

  classic_peer.py --url http://10.91.0.1:8080 --room r --ip 10.91.0.2 \\
      --freq 440 --probe 440,660 --seconds 6
"""

import argparse
import asyncio
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "aiortc"))

import aioice.ice  # noqa: E402
import peer  # noqa: E402  (SineTrack, BarTrack)
import socketio  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.sdp import candidate_from_sdp  # noqa: E402

RATE = 48000


def goertzel_db(samples, freq):
    """Power of `freq` in `samples` (mono int16 values), in dB."""
    if not samples:
        return -200.0
    w = 2 * math.pi * freq / RATE
    coeff = 2 * math.cos(w)
    s1 = s2 = 0.0
    for x in samples:
        s0 = x + coeff * s1 - s2
        s2, s1 = s1, s0
    power = s1 * s1 + s2 * s2 - coeff * s1 * s2
    return 10 * math.log10(max(power / len(samples), 1e-20))


async def run(args) -> dict:
    # Gather host candidates on the given address only (this namespace's).
    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: [args.ip]
    sio = socketio.AsyncClient(reconnection=False)
    q: asyncio.Queue = asyncio.Queue(maxsize=1000)
    events = []
    for name in ("joined", "otherjoin", "message", "bye", "full", "leaved", "created"):
        sio.on(name, (lambda n: (lambda *a: q.put_nowait((n, a))))(name))

    pc = None
    frames = {"audio": 0, "video": 0}
    pcm = []  # (arrival time, samples)
    connected_at = None

    def new_pc():
        nonlocal connected_at
        pc = RTCPeerConnection()

        @pc.on("track")
        def on_track(track):
            async def consume():
                while True:
                    try:
                        frame = await track.recv()
                    except Exception:
                        return
                    frames[track.kind] += 1
                    if track.kind == "audio":
                        # s16, interleaved: take the first channel.
                        raw = bytes(frame.planes[0])
                        ch = len(frame.layout.channels)
                        vals = memoryview(raw).cast("h")[: frame.samples * ch]
                        pcm.append((time.monotonic(), list(vals[::ch])))

            asyncio.ensure_future(consume())

        @pc.on("connectionstatechange")
        def on_state():
            nonlocal connected_at
            events.append(f"pc:{pc.connectionState}")
            if pc.connectionState == "connected" and connected_at is None:
                connected_at = time.monotonic()

        pc.addTrack(peer.SineTrack(args.freq))
        pc.addTrack(peer.BarTrack())
        return pc

    await sio.connect(args.url, transports=["websocket"])
    await sio.emit("join", args.room)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if connected_at is not None and time.monotonic() >= connected_at + args.seconds:
            break
        try:
            ev, a = await asyncio.wait_for(q.get(), 0.2)
        except asyncio.TimeoutError:
            continue
        events.append(f"{ev}:{a[1] if len(a) > 1 and not isinstance(a[1], dict) else ''}")
        if ev == "otherjoin":
            if pc is not None:
                await pc.close()
            pc = new_pc()
            await pc.setLocalDescription(await pc.createOffer())
            await sio.emit("message", (args.room, {"type": "offer", "sdp": pc.localDescription.sdp}))
        elif ev == "message" and isinstance(a[1], dict):
            data = a[1]
            if data.get("type") == "offer":
                if pc is not None:
                    await pc.close()
                pc = new_pc()
                await pc.setRemoteDescription(RTCSessionDescription(data["sdp"], "offer"))
                await pc.setLocalDescription(await pc.createAnswer())
                await sio.emit("message", (args.room, {"type": "answer", "sdp": pc.localDescription.sdp}))
            elif data.get("type") == "answer" and pc is not None:
                await pc.setRemoteDescription(RTCSessionDescription(data["sdp"], "answer"))
            elif data.get("type") == "candidate" and pc is not None and data.get("candidate"):
                c = candidate_from_sdp(data["candidate"].split(":", 1)[1])
                c.sdpMid, c.sdpMLineIndex = data.get("id"), data.get("label")
                await pc.addIceCandidate(c)
        elif ev in ("bye", "full") and pc is not None:
            await pc.close()
            pc = None
    end = time.monotonic()
    recent = [s for (t, chunk) in pcm if t >= end - 2.0 for s in chunk]
    levels = {f"{f:g}": round(goertzel_db(recent, f), 1) for f in args.probe}
    if pc is not None:
        await pc.close()
    await sio.disconnect()
    return {
        "events": events,
        "connected": connected_at is not None,
        "audio_frames": frames["audio"],
        "video_frames": frames["video"],
        "levels": levels,
        "samples": len(recent),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="http://HOST:PORT (the /socket.io/ endpoint's origin)")
    ap.add_argument("--room", required=True)
    ap.add_argument("--ip", required=True, help="the one address to gather host candidates on")
    ap.add_argument("--freq", type=float, default=440.0)
    ap.add_argument("--probe", type=lambda s: [float(x) for x in s.split(",")], default=[440.0])
    ap.add_argument("--seconds", type=float, default=6.0, help="run this long once connected")
    ap.add_argument("--timeout", type=float, default=40.0, help="give up after this long")
    args = ap.parse_args()
    out = asyncio.run(run(args))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
