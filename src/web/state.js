// Shared state of the page: the elements it drives (`ui`), the client's
// state (`S`) and the ids the protocol reserves. Imports nothing.

const $ = (id) => document.getElementById(id);
export const ui = {
  lobby: $('lobby'), form: $('join-form'), room: $('room-input'), name: $('name-input'),
  joinButton: $('join-button'),
  call: $('call'), tiles: $('tiles'), waiting: $('waiting'), copyLink: $('copy-link'),
  localTile: $('local-tile'), localVideo: $('local-video'), localName: $('local-name'),
  localFlags: $('local-flags'),
  mic: $('mic-button'), cam: $('cam-button'), leave: $('leave-button'),
  roomLabel: $('room-label'), modeBadge: $('mode-badge'), wsBadge: $('ws-badge'), wsText: $('ws-text'),
  notices: $('notices'), template: $('remote-tile-template'),
  chat: $('chat'), chatButton: $('chat-button'), chatUnread: $('chat-unread'), chatClose: $('chat-close'),
  chatState: $('chat-state'), chatScroll: $('chat-scroll'), chatEmpty: $('chat-empty'), chatLog: $('chat-log'),
  chatForm: $('chat-form'), chatInput: $('chat-input'), chatSend: $('chat-send'),
};

export const SFU = 'sfu'; // the server's reserved participant id
export const MIX = 'mix'; // stream id of the mixed audio in `audio: "mix"` rooms

// Everything the client knows. `phase`: lobby | joining | in-room | reconnecting | leaving.
export const S = {
  phase: 'lobby',
  ws: null, wsGen: 0, wsLabel: 'offline',
  id: null, room: null, name: '', mode: null, audio: null,
  joinMode: null, joinAudio: null, // optional `mode` / `audio` for the join that creates the room
  token: null, // access token from the page URL, sent in every join (auth on)
  iceServers: [], p2pTimeoutMs: 5000,
  features: [], // `joined.features` (1.1): what this server speaks, e.g. "simulcast"
  simulcast: true, // publish simulcast when the server takes it; `?simulcast=0` turns it off
  peers: new Map(), // id -> peer (see addPeer)
  gone: new Set(), // ids that said bye: media still arriving for them is ignored
  names: new Map(), // id -> display name of everyone seen, for chat history
  sfu: null, // the server connection (see openSfu)
  mixAudio: null, // <audio> playing the server's mix
  speakers: [], // the last `speakers`: [{ id, level }], loudest first
  speakerEvents: 0,
  chatUnread: 0, chatOpen: null,
  localStream: null,
  pingTimer: null, pingSeq: 0, lastPong: 0,
  reconnectAttempts: 0, reconnectTimer: null,
  // Resume (1.1): `joined.resumeToken`; while `resuming`, a lost socket is
  // reopened with `resume` and the calls (P2P and server) stay up.
  resumeToken: null, resumeWindowMs: 0, resuming: false, resumes: 0,
  leavedWaiter: null,
  // Warm standby: open the server connection during P2P calls too (carries
  // no media until the room goes sfu; makes the switch near-instant and
  // tells us whether the server's media port is reachable). `?standby=0` turns it off.
  standby: true,
  serverReach: 'unknown', // unknown | checking | reachable | unreachable
  reachTimer: null,
  // Timings for tests (`?timings=1`): epoch ms.
  timing: null,
};
