// The classic room client: one RTCPeerConnection to whoever the server says
// came in (`otherjoin`: the one already there offers), SDP and candidates in
// `message(room, data)`, `bye` ends the call. Written against the classic
// events only. `window.classic` is what the test reads (and the tone's gain
// it sets); it plays no part in the call.
'use strict';

(function () {
  const params = new URLSearchParams(location.search);
  const server = params.get('server') || location.origin;
  const room = params.get('room') || 'classic';
  const io2or4 = params.get('io') === '2' ? '2' : '4';
  const freq = Number(params.get('freq') || 440);
  const color = (params.get('color') || '200,40,40').split(',').map(Number);
  const PROBES = (params.get('probe') || '').split(',').filter(Boolean).map(Number);

  const seen = [];        // classic events received, in order: [name, args...]
  const t = { joinedAt: null, remoteTrackAt: null };
  let socket = null;
  let pc = null;
  let remoteStream = null;
  let ctx = null;
  let gain = null;
  let analyser = null;
  const status = (s) => { document.getElementById('status').textContent = s; };

  // --- the "camera": a canvas of one colour with a small moving square ---
  const local = document.getElementById('local');
  const g2d = local.getContext('2d');
  let tick = 0;
  setInterval(() => {
    g2d.fillStyle = `rgb(${color.join(',')})`;
    g2d.fillRect(0, 0, 320, 240);
    g2d.fillStyle = '#fff';
    g2d.fillRect((tick++ * 4) % 300, 220, 16, 16);
  }, 50);
  const camera = local.captureStream(20);

  // --- the "microphone": an oscillator through a gain ---
  ctx = new AudioContext({ sampleRate: 48000 });
  const osc = ctx.createOscillator();
  osc.frequency.value = freq;
  gain = ctx.createGain();
  gain.gain.value = Number(params.get('gain') || 0.5);
  const mic = ctx.createMediaStreamDestination();
  osc.connect(gain).connect(mic);
  osc.start();
  const localStream = new MediaStream([...camera.getVideoTracks(), ...mic.stream.getAudioTracks()]);

  function newPeerConnection() {
    const p = new RTCPeerConnection({ iceServers: [] });
    for (const track of localStream.getTracks()) p.addTrack(track, localStream);
    p.onicecandidate = (e) => {
      if (e.candidate) {
        send({ type: 'candidate', label: e.candidate.sdpMLineIndex, id: e.candidate.sdpMid, candidate: e.candidate.candidate });
      }
    };
    p.ontrack = (e) => {
      // As classic pages do: play the first stream.
      if (remoteStream !== e.streams[0]) {
        remoteStream = e.streams[0];
        const v = document.getElementById('remote');
        v.srcObject = remoteStream;
        v.play().catch(() => {});
      }
      if (e.track.kind === 'audio') listen(e.streams[0]);
      if (!t.remoteTrackAt) t.remoteTrackAt = Date.now();
    };
    p.onconnectionstatechange = () => status(`${room}: ${p.connectionState}`);
    return p;
  }

  function hangUp() {
    if (pc) pc.close();
    pc = null;
    remoteStream = null;
    document.getElementById('remote').srcObject = null;
    if (analyser) { analyser.source.disconnect(); analyser = null; }
  }

  function send(data) { socket.emit('message', room, data); }

  // Remote audio into an analyser (Chromium also needs it on a media element).
  function listen(stream) {
    if (analyser) analyser.source.disconnect();
    const a = new Audio();
    a.srcObject = stream;
    a.muted = true;
    a.play().catch(() => {});
    const source = ctx.createMediaStreamSource(stream);
    const node = ctx.createAnalyser();
    node.fftSize = 8192;
    node.smoothingTimeConstant = 0.5;
    source.connect(node);
    analyser = { source, node, element: a };
  }

  function connect() {
    socket = io(server); // default transports and options, as classic pages do
    socket.on('connect', () => { status('connected'); socket.emit('join', room); });
    socket.on('joined', (r, id) => { seen.push(['joined', r, id]); t.joinedAt = Date.now(); status(`joined ${r} as ${id}`); });
    socket.on('full', (r, id) => { seen.push(['full', r, id]); status(`${r} is full`); });
    socket.on('otherjoin', async (r, id) => {
      seen.push(['otherjoin', r, id]);
      // The one already in the room offers to the newcomer.
      hangUp();
      pc = newPeerConnection();
      await pc.setLocalDescription(await pc.createOffer());
      send({ type: pc.localDescription.type, sdp: pc.localDescription.sdp });
    });
    socket.on('bye', (r, id) => { seen.push(['bye', r, id]); hangUp(); });
    socket.on('leaved', (r, id) => { seen.push(['leaved', r, id]); });
    socket.on('message', async (r, data) => {
      if (!data || typeof data !== 'object') return;
      seen.push(['message', r, data.type]);
      if (data.type === 'offer') {
        hangUp();
        pc = newPeerConnection();
        await pc.setRemoteDescription({ type: 'offer', sdp: data.sdp });
        await pc.setLocalDescription(await pc.createAnswer());
        send({ type: pc.localDescription.type, sdp: pc.localDescription.sdp });
      } else if (data.type === 'answer' && pc) {
        await pc.setRemoteDescription({ type: 'answer', sdp: data.sdp });
      } else if (data.type === 'candidate' && pc) {
        await pc.addIceCandidate({ sdpMLineIndex: data.label, sdpMid: data.id, candidate: data.candidate })
          .catch((e) => console.warn('candidate', e.message));
      }
    });
  }

  // Load the chosen official client, then connect.
  const s = document.createElement('script');
  s.src = `io${io2or4}/socket.io.js`;
  s.onload = connect;
  s.onerror = () => status('could not load socket.io.js');
  document.head.appendChild(s);

  // --- for the test only: what the page sees ---
  function toneLevels() {
    if (!analyser) return null;
    const bins = new Float32Array(analyser.node.frequencyBinCount);
    analyser.node.getFloatFrequencyData(bins);
    const hz = ctx.sampleRate / analyser.node.fftSize;
    const at = (f) => {
      const i = Math.round(f / hz);
      let best = -Infinity;
      for (let k = Math.max(0, i - 2); k <= Math.min(bins.length - 1, i + 2); k++) best = Math.max(best, bins[k]);
      return best;
    };
    const sorted = [...bins].sort((x, y) => x - y);
    const out = { floor: sorted[Math.floor(sorted.length / 2)] };
    for (const f of PROBES) out[f] = at(f);
    return out;
  }

  // The mean colour of the middle of the remote picture.
  const probe = document.createElement('canvas');
  probe.width = 32; probe.height = 24;
  function remoteColor() {
    const v = document.getElementById('remote');
    if (!v.srcObject || v.videoWidth === 0) return null;
    const p2d = probe.getContext('2d', { willReadFrequently: true });
    p2d.drawImage(v, v.videoWidth * 0.25, v.videoHeight * 0.25, v.videoWidth * 0.5, v.videoHeight * 0.5, 0, 0, 32, 24);
    const px = p2d.getImageData(0, 0, 32, 24).data;
    const sum = [0, 0, 0];
    for (let i = 0; i < px.length; i += 4) { sum[0] += px[i]; sum[1] += px[i + 1]; sum[2] += px[i + 2]; }
    const n = px.length / 4;
    return sum.map((x) => Math.round(x / n));
  }

  async function inbound() {
    if (!pc) return { video: null, audio: null, pair: null };
    const stats = await pc.getStats();
    const out = { video: null, audio: null, pair: null };
    stats.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') out.video = { framesDecoded: s.framesDecoded || 0, packetsReceived: s.packetsReceived || 0 };
      if (s.type === 'inbound-rtp' && s.kind === 'audio') out.audio = { packetsReceived: s.packetsReceived || 0, totalSamplesReceived: s.totalSamplesReceived || 0 };
      if (s.type === 'transport' && s.selectedCandidatePairId) out.pairId = s.selectedCandidatePairId;
    });
    if (out.pairId) {
      const pair = stats.get(out.pairId);
      const remote = pair && stats.get(pair.remoteCandidateId);
      if (remote) out.pair = { address: remote.address || remote.ip, port: remote.port };
    }
    return out;
  }

  window.classic = {
    // The Engine.IO revision the official client speaks (3: client 2.x,
    // 4: client 3.x/4.x) and the transport it ended up on.
    transport: () => {
      const tr = socket && socket.io && socket.io.engine && socket.io.engine.transport;
      return tr ? { eio: Number(tr.query.EIO), name: tr.name } : null;
    },
    resume: () => ctx.resume(),
    setGain: (v) => { gain.gain.setTargetAtTime(v, ctx.currentTime, 0.02); },
    leave: () => { socket.emit('leave', room); hangUp(); },
    async observe() {
      return {
        seen: seen.slice(),
        joinedAt: t.joinedAt,
        connection: pc ? pc.connectionState : 'none',
        audioContext: ctx.state,
        color: remoteColor(),
        tones: toneLevels(),
        ...(await inbound()),
      };
    },
  };
})();
