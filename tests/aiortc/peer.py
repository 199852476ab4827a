#!/usr/bin/env python3
"""A Switchboard SFU participant built on aiortc: a WebRTC stack that is not ours.

It joins a room over the signaling WebSocket, opens ONE RTCPeerConnection to
the server's "sfu" peer (offering first, as the protocol says) that publishes
a sine tone (Opus) and a moving bar (VP8) plus a `chat` data channel, answers
every server offer, and for --duration seconds after the connection is up
counts what the server forwards:

  * per remote stream id (= publishing participant id) and kind: RTP packets
    received (aiortc's inbound-rtp stats), frames aiortc decoded, and payloads
    that are byte-for-byte the synthetic packets Switchboard's Rust test
    client sends (`A<name:8><seq:4><filler>` audio, `<vp8 desc:2>V<name:8>...`
    video);
  * chat messages received.

It sends one chat line every 0.5 s once the channel is open. At the end it
prints ONE JSON line on stdout:

  {"id": ..., "connection": ..., "streams": {sid: {"audio": {...}, "video": {...}}},
   "intact": {sender: {"audio": n, "video": n}}, "chat": [...], "chat_sent": n,
   "sent": {"audio": packets, "video": packets}, "errors": [...]}

Exit status: 0 on success, 1 on an exception or timeout, 2 if the server
answered with a signaling `error`. Everything stays on 127.0.0.1: aioice's
host candidate gathering is pinned to it and no STUN/TURN server is used.
"""

import argparse
import asyncio
import fractions
import json
import logging
import math
import signal
import sys
import time
from array import array

try:
    import aioice.ice
    import av
    import websockets
    from aiortc import (
        MediaStreamTrack,
        RTCConfiguration,
        RTCPeerConnection,
        RTCSessionDescription,
        VideoStreamTrack,
    )
    from aiortc.mediastreams import MediaStreamError
    from aiortc.rtcrtpreceiver import RTCRtpReceiver
    from aiortc.rtcrtpsender import RTCRtpSender
    from aiortc.sdp import candidate_from_sdp
    from websockets.asyncio.client import connect
except ImportError as e:  # pragma: no cover - reported to the Rust test
    print(
        f"missing Python dependency ({e}); run "
        "`pip install -r tests/aiortc/requirements.txt`",
        file=sys.stderr,
    )
    sys.exit(3)

log = logging.getLogger("peer")

# -- 127.0.0.1 only ----------------------------------------------------------

# aioice gathers host candidates on every interface (and skips 127.0.0.1):
# pin it to loopback so nothing leaves the machine.
aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]

# -- media we publish --------------------------------------------------------

SAMPLE_RATE = 48000
SAMPLES = 960  # 20 ms


class SineTrack(MediaStreamTrack):
    """A 440 Hz tone as 20 ms mono s16 frames, paced in real time."""

    kind = "audio"

    def __init__(self, freq: float = 440.0) -> None:
        super().__init__()
        self._freq = freq
        self._pts = 0
        self._start = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += SAMPLES
            wait = self._start + self._pts / SAMPLE_RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        step = 2 * math.pi * self._freq / SAMPLE_RATE
        samples = array(
            "h",
            (int(8000 * math.sin(step * (self._pts + i))) for i in range(SAMPLES)),
        )
        frame = av.AudioFrame(format="s16", layout="mono", samples=SAMPLES)
        frame.planes[0].update(samples.tobytes())
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        return frame


class BarTrack(VideoStreamTrack):
    """320x240 at 30 fps: a white bar moving across a dark frame."""

    WIDTH, HEIGHT = 320, 240

    def __init__(self) -> None:
        super().__init__()
        self._n = 0
        self._chroma = bytes([128]) * (self.WIDTH // 2 * self.HEIGHT // 2)

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame(self.WIDTH, self.HEIGHT, "yuv420p")
        x = (self._n * 4) % self.WIDTH
        self._n += 1
        row = bytearray([16]) * frame.planes[0].line_size
        row[x : x + 32] = bytes([235]) * len(row[x : x + 32])
        frame.planes[0].update(bytes(row) * self.HEIGHT)
        frame.planes[1].update(self._chroma)
        frame.planes[2].update(self._chroma)
        frame.pts = pts
        frame.time_base = time_base
        return frame


# -- what we receive ---------------------------------------------------------


def parse_synthetic(kind: str, payload: bytes):
    """(sender name, seq) if `payload` is one of the Rust test client's
    synthetic packets with every byte as sent, else None."""
    if kind == "video":
        if payload[:1] != b"\x10" or payload[2:3] != b"V":
            return None
        body = payload[3:]
        filler_len = 900
    else:
        if payload[:1] != b"A":
            return None
        body = payload[1:]
        filler_len = 100
    if len(body) != 12 + filler_len:
        return None
    seq = int.from_bytes(body[8:12], "big")
    for i, b in enumerate(body[12:]):
        if b != (i & 0xFF) ^ (seq & 0xFF):
            return None
    try:
        name = body[:8].decode("ascii").rstrip("_")
    except UnicodeDecodeError:
        return None
    return name, seq


# Receiver -> {sender name: set(seq)}: filled by a thin wrapper around
# aiortc's RTP entry point (it sees the SRTP-decrypted packet).
INTACT: dict = {}
_original_handle_rtp = RTCRtpReceiver._handle_rtp_packet


async def _counting_handle_rtp(self, packet, arrival_time_ms):
    try:
        parsed = parse_synthetic(getattr(self, "_RTCRtpReceiver__kind", ""), packet.payload)
        if parsed is not None:
            INTACT.setdefault(self, {}).setdefault(parsed[0], set()).add(parsed[1])
    except Exception:  # never let accounting break the receive path
        pass
    return await _original_handle_rtp(self, packet, arrival_time_ms)


RTCRtpReceiver._handle_rtp_packet = _counting_handle_rtp


def msid_by_mid(sdp: str) -> dict:
    """mid -> MediaStream id from an SDP's a=msid (or a=ssrc ... msid:) lines."""
    out, mid, stream = {}, None, None

    def flush():
        if mid is not None and stream is not None:
            out[mid] = stream

    for line in sdp.splitlines():
        line = line.strip()
        if line.startswith("m="):
            flush()
            mid, stream = None, None
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:") :]
        elif line.startswith("a=msid:"):
            stream = line[len("a=msid:") :].split()[0]
        elif line.startswith("a=ssrc:") and " msid:" in line and stream is None:
            stream = line.split(" msid:", 1)[1].split()[0]
    flush()
    return out


class Peer:
    def __init__(self, args) -> None:
        self.args = args
        self.id = None
        self.room = args.room
        self.ws = None
        self.pc = None
        self.chat = None
        self.chat_open = asyncio.Event()
        self.connected = asyncio.Event()
        self.failed = asyncio.Event()
        self.stream_of_mid: dict = {}
        self.frames: dict = {}  # mid -> decoded frames
        self.kind_of_mid: dict = {}
        self.consumers = []
        self.chat_in = []
        self.chat_sent = 0
        self.errors = []
        self.signals = {"offers_in": 0, "answers_in": 0, "candidates_in": 0}

    async def send(self, msg: dict) -> None:
        await self.ws.send(json.dumps(msg))

    async def to_sfu(self, data: dict) -> None:
        await self.send({"type": "message", "room": self.room, "to": "sfu", "data": data})

    async def run(self) -> dict:
        args = self.args
        async with connect(args.url, open_timeout=10, close_timeout=2, max_size=None) as ws:
            self.ws = ws
            await self.send(
                {"type": "join", "room": args.room, "name": args.name, "mode": "sfu", "audio": args.audio}
            )
            joined = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if joined.get("type") != "joined":
                raise RuntimeError(f"not admitted: {joined}")
            self.id = joined["id"]
            log.info("joined %s as %s (mode %s, audio %s)", args.room, self.id, joined.get("mode"), joined.get("audio"))

            # aiortc's default bundle policy (balanced). With max-bundle,
            # aiortc 1.16 takes a shared transport's remote candidates from the
            # LAST bundled m-section of an answer, and Switchboard (legitimately,
            # RFC 8843) lists them only in the first: ICE would never start.
            self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            self.pc.on("track", self.on_track)
            self.pc.on("connectionstatechange", self.on_state)
            self.pc.addTrack(SineTrack(args.freq))
            if not args.no_video:
                self.pc.addTrack(BarTrack())
            if args.audio_codec != "opus":
                # Publish with that codec only (a legacy or misconfigured peer).
                want = f"audio/{args.audio_codec}".lower()
                codecs = [
                    c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == want
                ]
                if not codecs:
                    raise RuntimeError(f"aiortc has no {args.audio_codec} codec")
                for t in self.pc.getTransceivers():
                    if t.kind == "audio":
                        t.setCodecPreferences(codecs)
            self.chat = self.pc.createDataChannel("chat")
            self.chat.on("open", self.chat_open.set)
            self.chat.on("message", self.on_chat)

            offer = await self.pc.createOffer()
            await self.pc.setLocalDescription(offer)  # gathers (127.0.0.1 only)
            await self.to_sfu({"type": "offer", "sdp": self.pc.localDescription.sdp})
            log.info("offer sent")

            reader = asyncio.create_task(self.read_loop())
            try:
                done, _ = await asyncio.wait(
                    [asyncio.create_task(self.connected.wait()), reader],
                    timeout=args.connect_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if reader in done:
                    reader.result()
                    raise RuntimeError("signaling ended before the connection was up")
                if not self.connected.is_set():
                    raise RuntimeError(
                        f"not connected within {args.connect_timeout}s "
                        f"(state {self.pc.connectionState}, ice {self.pc.iceConnectionState})"
                    )
                log.info("connected; running %ss", args.duration)
                end = time.monotonic() + args.duration
                n = 0
                while time.monotonic() < end:
                    if reader.done():
                        reader.result()
                        raise RuntimeError("signaling ended early")
                    if self.failed.is_set():
                        raise RuntimeError(f"connection {self.pc.connectionState}")
                    if self.chat_open.is_set() and self.chat.readyState == "open":
                        n += 1
                        self.chat.send(f"{args.chat} #{n}")
                        self.chat_sent += 1
                    await asyncio.sleep(0.5)
                return await self.report()
            finally:
                reader.cancel()
                await self.pc.close()

    async def read_loop(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            ty = msg.get("type")
            if ty == "message" and msg.get("from") == "sfu":
                await self.on_sfu(msg.get("data") or {})
            elif ty == "error":
                log.error("server error: %s", msg)
                self.errors.append(msg)
            else:
                log.info("signal: %s", ty)

    async def on_sfu(self, data: dict) -> None:
        ty = data.get("type")
        if ty == "answer":
            self.signals["answers_in"] += 1
            self.stream_of_mid.update(msid_by_mid(data["sdp"]))
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=data["sdp"], type="answer"))
            log.info("answer applied (signaling %s)", self.pc.signalingState)
        elif ty == "offer":
            self.signals["offers_in"] += 1
            # Learn the stream ids before aiortc fires "track".
            self.stream_of_mid.update(msid_by_mid(data["sdp"]))
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=data["sdp"], type="offer"))
            answer = await self.pc.createAnswer()
            await self.pc.setLocalDescription(answer)
            await self.to_sfu({"type": "answer", "sdp": self.pc.localDescription.sdp})
            log.info("server offer #%d answered", self.signals["offers_in"])
        elif ty == "candidate":
            self.signals["candidates_in"] += 1
            text = data.get("candidate") or ""
            if not text:
                return  # end of candidates
            cand = candidate_from_sdp(text.split(":", 1)[1] if text.startswith("candidate:") else text)
            cand.sdpMid = data.get("id")
            cand.sdpMLineIndex = data.get("label")
            await self.pc.addIceCandidate(cand)
        else:
            log.warning("unexpected data from sfu: %s", data)

    def on_state(self) -> None:
        state = self.pc.connectionState
        log.info("connection %s", state)
        if state == "connected":
            self.connected.set()
        elif state in ("failed", "closed"):
            self.failed.set()

    def on_chat(self, message) -> None:
        if isinstance(message, str):
            log.info("chat: %s", message)
            try:
                self.chat_in.append(json.loads(message))
            except ValueError:
                self.chat_in.append({"raw": message})

    def mid_of(self, track):
        for t in self.pc.getTransceivers():
            if t.receiver.track is track:
                return t.mid, t
        return None, None

    def on_track(self, track) -> None:
        mid, _ = self.mid_of(track)
        log.info("track %s (mid %s, stream %s)", track.kind, mid, self.stream_of_mid.get(mid))
        self.kind_of_mid[mid] = track.kind
        self.frames.setdefault(mid, 0)

        async def consume():
            try:
                while True:
                    await track.recv()
                    self.frames[mid] += 1
            except MediaStreamError:
                pass

        self.consumers.append(asyncio.ensure_future(consume()))

    async def report(self) -> dict:
        streams: dict = {}
        intact: dict = {}
        sent = {}
        for t in self.pc.getTransceivers():
            if t.kind not in ("audio", "video"):
                continue
            if t.mid in self.kind_of_mid:
                stream = self.stream_of_mid.get(t.mid, "")
                stats = await t.receiver.getStats()
                packets = sum(
                    s.packetsReceived for s in stats.values() if getattr(s, "type", "") == "inbound-rtp"
                )
                entry = streams.setdefault(stream, {}).setdefault(
                    t.kind, {"packets": 0, "frames": 0, "mids": []}
                )
                entry["packets"] += packets
                entry["frames"] += self.frames.get(t.mid, 0)
                entry["mids"].append(t.mid)
                for name, seqs in INTACT.get(t.receiver, {}).items():
                    per = intact.setdefault(name, {})
                    per[t.kind] = per.get(t.kind, 0) + len(seqs)
            if t.sender.track is not None:
                stats = await t.sender.getStats()
                sent[t.kind] = sum(
                    s.packetsSent for s in stats.values() if getattr(s, "type", "") == "outbound-rtp"
                )
        return {
            "id": self.id,
            "connection": self.pc.connectionState,
            "streams": streams,
            "intact": intact,
            "chat": self.chat_in,
            "chat_sent": self.chat_sent,
            "sent": sent,
            "signals": self.signals,
            "errors": self.errors,
        }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="ws://127.0.0.1:PORT/ws")
    ap.add_argument("--room", required=True)
    ap.add_argument("--name", default="aiortc")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds to run once connected")
    ap.add_argument("--connect-timeout", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="hard limit for the whole run")
    ap.add_argument("--chat", default="hello from aiortc")
    ap.add_argument("--audio", choices=["forward", "mix"], default="forward", help="the room's audio, if this join creates it")
    ap.add_argument("--audio-codec", choices=["opus", "PCMU", "PCMA"], default="opus", help="publish audio with only this codec")
    ap.add_argument("--freq", type=float, default=440.0, help="frequency of the published tone, Hz")
    ap.add_argument("--no-video", action="store_true", help="publish audio only")
    ap.add_argument("--verbose", action="store_true", help="aiortc/aioice debug logs")
    args = ap.parse_args()

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="peer.py %(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not args.verbose:
        # Undecodable synthetic payloads make aiortc's decoders complain per frame.
        for noisy in ("aiortc", "aioice", "websockets"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    # Last resort if the event loop itself wedges: SIGALRM kills the process.
    signal.alarm(int(args.timeout) + 15)

    peer = Peer(args)
    try:
        result = await asyncio.wait_for(peer.run(), args.timeout)
    except asyncio.TimeoutError:
        log.error("timed out after %ss", args.timeout)
        return 1
    except Exception as e:
        log.exception("failed: %s", e)
        return 1
    print(json.dumps(result), flush=True)
    return 2 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
