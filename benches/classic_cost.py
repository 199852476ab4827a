#!/usr/bin/env python3
"""Server CPU per relayed classic Socket.IO participant vs per WebSocket-
protocol participant, measured in one run, alternating (issue 12's figure).

Starts `switchboard serve` (the debug or release binary given) on 127.0.0.1
with `--socketio-relay always`, then, in turns, a room of N aiortc
participants of one kind for T seconds:

  * `ws`: tests/aiortc/peer.py (our protocol, one connection to "sfu",
    receives every other's video and the mix);
  * `classic`: a classic Socket.IO client (python-socketio + aiortc) that
    joins, gets otherjoin(room, "sfu"), offers, and receives the mix and the
    active speaker's video on its one connection.

Both publish the same Opus tone and 320x240 VP8. The server's CPU time is
read from /proc/<pid>/stat over the middle of each turn (after every client
is connected). Prints one line per turn and a JSON summary.

  python3 benches/classic_cost.py --binary target/release/switchboard \
      --participants 3 --seconds 20 --rounds 2
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "aiortc"))

import peer  # noqa: E402  (pins aioice to 127.0.0.1; the tone and bar tracks)
import socketio  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.sdp import candidate_from_sdp  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def classic(url: str, room: str, seconds: float, connected: asyncio.Event):
    """One classic client; runs until `seconds` after its answer."""
    sio = socketio.AsyncClient()
    pc = RTCPeerConnection()
    frames = {"audio": 0, "video": 0}
    q: asyncio.Queue = asyncio.Queue()
    for ev in ("joined", "otherjoin", "message", "bye", "full"):
        sio.on(ev, (lambda e: (lambda *a: q.put_nowait((e, a))))(ev))

    @pc.on("track")
    def on_track(track):
        async def consume():
            while True:
                try:
                    await track.recv()
                except Exception:
                    return
                frames[track.kind] += 1

        asyncio.ensure_future(consume())

    @pc.on("connectionstatechange")
    def on_state():
        if pc.connectionState == "connected":
            connected.set()

    await sio.connect(url, transports=["websocket"])
    await sio.emit("join", room)
    end = None
    while end is None or time.monotonic() < end:
        try:
            ev, a = await asyncio.wait_for(q.get(), 0.5)
        except asyncio.TimeoutError:
            continue
        if ev == "otherjoin" and a[1] == "sfu":
            pc.addTrack(peer.SineTrack(440))
            pc.addTrack(peer.BarTrack())
            await pc.setLocalDescription(await pc.createOffer())
            await sio.emit("message", (room, {"type": "offer", "sdp": pc.localDescription.sdp}))
        elif ev == "message" and a[1].get("type") == "answer":
            await pc.setRemoteDescription(RTCSessionDescription(a[1]["sdp"], "answer"))
            end = time.monotonic() + seconds
        elif ev == "message" and a[1].get("type") == "candidate" and a[1].get("candidate"):
            c = candidate_from_sdp(a[1]["candidate"].split(":", 1)[1])
            c.sdpMid, c.sdpMLineIndex = a[1].get("id"), a[1].get("label")
            await pc.addIceCandidate(c)
    await pc.close()
    await sio.disconnect()
    return frames


async def turn_classic(base: str, n: int, seconds: float, pid: int, tag: str):
    room = f"cost-classic-{tag}"
    events = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(classic(base, room, seconds + 10, e)) for e in events]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 30)
    await asyncio.sleep(3)  # every track flowing
    c0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    frames = await asyncio.gather(*tasks)
    return (c1 - c0) / (t1 - t0), frames


async def turn_ws(ws_url: str, n: int, seconds: float, pid: int, tag: str):
    room = f"cost-ws-{tag}"
    script = os.path.join(HERE, "..", "tests", "aiortc", "peer.py")
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, script, "--url", ws_url, "--room", room, "--name", f"p{i}",
            "--audio", "mix", "--duration", str(seconds + 10), "--timeout", str(seconds + 60),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        for i in range(n)
    ]
    # peer.py connects within a few seconds; give every one the same lead as
    # the classic turn (connect + 3 s).
    await asyncio.sleep(8)
    c0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    outs = [json.loads((await p.communicate())[0].decode().strip().splitlines()[-1]) for p in procs]
    return (c1 - c0) / (t1 - t0), [o.get("connection") for o in outs]


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--participants", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=18181)
    args = ap.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(
        [args.binary, "serve", "--listen", f"127.0.0.1:{args.port}", "--rtc-port", str(args.port + 1),
         "--socketio-relay", "always", "--log", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        runs = []
        for r in range(args.rounds):
            for kind in ("classic", "ws"):
                if kind == "classic":
                    cpu, detail = await turn_classic(base, args.participants, args.seconds, server.pid, f"{r}")
                else:
                    cpu, detail = await turn_ws(f"ws://127.0.0.1:{args.port}/ws", args.participants, args.seconds, server.pid, f"{r}")
                per = cpu / args.participants * 1000
                print(f"round {r} {kind:7}: server {cpu * 100:.1f} % CPU, {per:.1f} ms CPU/s per participant; {detail}", flush=True)
                runs.append({"round": r, "kind": kind, "server_cpu": cpu, "ms_per_participant_s": per})
        summary = {k: [x["ms_per_participant_s"] for x in runs if x["kind"] == k] for k in ("classic", "ws")}
        print(json.dumps({"participants": args.participants, "seconds": args.seconds, "runs": runs, "by_kind": summary}))
    finally:
        server.terminate()
        server.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
