// Access tokens in the page: Switchboard runs with an API key, so every join
// needs a token. Pages opened with `?token=` and nothing else must join the
// token's room and make a call; a forged token and a string that is no token
// must be refused with an "access denied" message, leave the page in the
// lobby and never try again; a second page with alice's token must push the
// first out ("another tab or device"), and an administrator's removal must
// put bob out ("removed") — neither of them rejoining by itself. The room's
// members are checked with the admin API (GET /api/v1/rooms/{room}).
//
//   node token_call.mjs <baseUrl> <room> <aliceToken> <bobToken> <forgedToken> <adminToken>
//
// alice's and bob's tokens are for <room> with the names Alice and Bob; the
// forged one names <room> too but is signed with another secret; the admin
// token has roomAdmin over every room. Prints one JSON line and exits 0 on
// success; exits 1 with a reason on failure. Env: SB_SCREENSHOT_DIR, SB_CHROMIUM
// (see harness.mjs).

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  fail, launchChromium, makeLog, run, screenshots, sleep, waitForHealth,
} from './harness.mjs';

const JOIN_TIMEOUT_MS = 10_000;
const MEDIA_TIMEOUT_MS = 30_000;
const NOTICE_TIMEOUT_MS = 10_000;
// How long a refused page is watched for a second join: the page's own
// reconnect backoff starts at 1 s, so a loop would show well within this.
const NO_REJOIN_MS = 3_000;
const HARD_TIMEOUT_MS = 120_000;

const log = makeLog('token_call');

// What a page shows that the test checks.
function observe(page) {
  return page.evaluate(async () => {
    const shown = (id) => { const el = document.getElementById(id); return !!el && !el.hidden; };
    return {
      state: window.sb ? window.sb.state() : null,
      stats: window.sb ? await window.sb.videoStats() : [],
      tiles: [...document.querySelectorAll('.tile.remote')].map((t) => ({
        peer: t.dataset.peer, name: t.querySelector('.name')?.textContent ?? '',
      })),
      lobby: shown('lobby'),
      call: shown('call'),
      roomLabel: shown('room-label') ? document.getElementById('room-label').textContent : '',
      roomInput: document.getElementById('room-input').value,
      errors: [...document.querySelectorAll('#notices .notice-error span')].map((n) => n.textContent),
      url: location.href,
    };
  });
}

async function main() {
  const [base, room, aliceToken, bobToken, forgedToken, adminToken] = process.argv.slice(2);
  if (!base || !/^https?:\/\//.test(base) || !adminToken) {
    fail('usage: node token_call.mjs <baseUrl> <room> <aliceToken> <bobToken> <forgedToken> <adminToken>');
  }
  await waitForHealth(base);

  // The room as the admin API sees it: { status, body }.
  const roomInfo = async () => {
    const res = await fetch(new URL(`/api/v1/rooms/${room}`, base), {
      headers: { authorization: `Bearer ${adminToken}` }, signal: AbortSignal.timeout(5000),
    });
    return { status: res.status, body: await res.json().catch(() => null) };
  };
  const members = async () => {
    const r = await roomInfo();
    if (r.status !== 200) fail(`GET /api/v1/rooms/${room}: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body.participants.map((p) => ({ id: p.id, identity: p.identity })).sort((a, b) => a.identity.localeCompare(b.identity));
  };

  const userDataDir = mkdtempSync(join(tmpdir(), 'sb-chromium-'));
  const shotDir = process.env.SB_SCREENSHOT_DIR || '';
  let context;
  const pages = {};
  const consoleLines = {};
  const joins = {}; // name -> every `join` the page sent
  const open = async (name, query) => {
    const page = await context.newPage();
    consoleLines[name] = [];
    joins[name] = [];
    page.on('console', (m) => consoleLines[name].push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => consoleLines[name].push(`pageerror: ${e.message}`));
    page.on('websocket', (ws) => ws.on('framesent', ({ payload }) => {
      try {
        const msg = JSON.parse(String(payload));
        if (msg && msg.type === 'join') joins[name].push(msg);
      } catch (_) { /* not ours */ }
    }));
    await page.goto(`${base}/${query}`, { timeout: 10_000 });
    pages[name] = page;
    return page;
  };
  const joined = (name) => pages[name].waitForFunction(() => window.sb && window.sb.state().id, null, { timeout: JOIN_TIMEOUT_MS })
    .catch(() => fail(`${name} never got joined (no participant id within ${JOIN_TIMEOUT_MS / 1000} s)`));
  // Waits for an error notice on `name` matching `re`; returns its text.
  const errorShown = async (name, re) => {
    const deadline = Date.now() + NOTICE_TIMEOUT_MS;
    for (;;) {
      const s = await observe(pages[name]);
      const hit = s.errors.find((t) => re.test(t));
      if (hit) return hit;
      if (Date.now() > deadline) fail(`${name}: no error notice matching ${re} within ${NOTICE_TIMEOUT_MS / 1000} s: ${JSON.stringify(s)}`);
      await sleep(200);
    }
  };
  // After an error that ends the membership: the page is back in the lobby,
  // with no id, and sent exactly one join (checked again after a while).
  const outForGood = async (name, what) => {
    await sleep(NO_REJOIN_MS);
    const s = await observe(pages[name]);
    if (!s.lobby || s.call) fail(`${name} (${what}): the lobby is not shown: ${JSON.stringify(s)}`);
    if (s.state.id !== null) fail(`${name} (${what}): still has participant id ${s.state.id}`);
    if (joins[name].length !== 1) fail(`${name} (${what}): sent ${joins[name].length} joins, expected exactly 1: ${JSON.stringify(joins[name])}`);
    return s;
  };
  // Waits until `name` decodes video from the participant with id `peerId`.
  const decodes = async (name, peerId) => {
    const deadline = Date.now() + MEDIA_TIMEOUT_MS;
    for (;;) {
      const s = await observe(pages[name]);
      if (s.stats.some((x) => x.peer === peerId && x.framesDecoded > 0)) return s;
      if (Date.now() > deadline) fail(`${name}: no decoded video from ${peerId} within ${MEDIA_TIMEOUT_MS / 1000} s: ${JSON.stringify(s)}`);
      await sleep(250);
    }
  };

  try {
    context = await launchChromium(userDataDir, { width: 960, height: 600 });
    log(`chromium up, room ${room}`);
    const result = { ok: true, room };

    // 1. A token and nothing else: the page joins the token's room, under the token's name.
    const tokens = { alice: aliceToken, bob: bobToken };
    const names = { alice: 'Alice', bob: 'Bob' };
    for (const name of ['alice', 'bob']) {
      await open(name, `?token=${encodeURIComponent(tokens[name])}`);
      await joined(name);
    }
    const ids = {};
    for (const name of ['alice', 'bob']) ids[name] = (await observe(pages[name])).state.id;
    const other = { alice: 'bob', bob: 'alice' };
    for (const name of ['alice', 'bob']) {
      const s = await decodes(name, ids[other[name]]);
      if (s.state.room !== room) fail(`${name}: joined room ${s.state.room}, expected the token's ${room}`);
      if (s.roomLabel !== room) fail(`${name}: the room label says "${s.roomLabel}", expected "${room}"`);
      if (!s.call || s.lobby) fail(`${name}: the call is not shown`);
      if (s.tiles.length !== 1 || s.tiles[0].name !== names[other[name]]) {
        fail(`${name}: remote tiles ${JSON.stringify(s.tiles)}, expected one named ${names[other[name]]}`);
      }
      if (s.errors.length) fail(`${name}: error notices ${JSON.stringify(s.errors)}`);
      const sent = joins[name];
      if (sent.length !== 1 || sent[0].token !== tokens[name] || sent[0].room !== room) {
        fail(`${name}: joins sent ${JSON.stringify(sent)}, expected one for ${room} with its token`);
      }
      const url = new URL(s.url);
      if (url.searchParams.get('room') !== room || url.searchParams.get('token') !== tokens[name]) {
        fail(`${name}: the page URL ${s.url} lost the room or the token (a reload would not rejoin)`);
      }
    }
    const two = await members();
    if (JSON.stringify(two) !== JSON.stringify([{ id: ids.alice, identity: 'alice' }, { id: ids.bob, identity: 'bob' }])) {
      fail(`admin API lists ${JSON.stringify(two)}, expected alice ${ids.alice} and bob ${ids.bob}`);
    }
    result.call = { ids, members: two };

    // 2. Refused: a forged token (the page still reads the room from it), and no token at all.
    await open('mallory', `?token=${encodeURIComponent(forgedToken)}`);
    await open('eve', `?room=${room}&name=eve&token=not-a-token`);
    result.refused = {};
    for (const name of ['mallory', 'eve']) {
      const text = await errorShown(name, /^Access denied: the server did not accept your access token/);
      const s = await outForGood(name, 'unauthorized');
      if (s.roomInput !== room) fail(`${name}: the room field says "${s.roomInput}", expected ${room}`);
      if (joins[name][0].room !== room || typeof joins[name][0].token !== 'string') {
        fail(`${name}: sent ${JSON.stringify(joins[name])}, expected a join of ${room} with a token`);
      }
      result.refused[name] = text;
    }
    const after = await members();
    if (JSON.stringify(after) !== JSON.stringify(two)) fail(`after the refused joins the admin API lists ${JSON.stringify(after)}`);
    for (const name of ['alice', 'bob']) {
      const s = await observe(pages[name]);
      if (s.tiles.length !== 1) fail(`${name}: ${s.tiles.length} remote tiles after the refused joins: ${JSON.stringify(s.tiles)}`);
    }

    // 3. alice's token in a second page: the first is replaced and stays out.
    await open('alice2', `?token=${encodeURIComponent(aliceToken)}`);
    await joined('alice2');
    ids.alice2 = (await observe(pages.alice2)).state.id;
    result.replaced = await errorShown('alice', /another tab or device/);
    await outForGood('alice', 'replaced');
    const bobSees = await decodes('bob', ids.alice2);
    if (bobSees.tiles.length !== 1 || bobSees.tiles[0].peer !== ids.alice2) {
      fail(`bob: remote tiles ${JSON.stringify(bobSees.tiles)}, expected only the new alice ${ids.alice2}`);
    }
    const replaced = await members();
    if (JSON.stringify(replaced) !== JSON.stringify([{ id: ids.alice2, identity: 'alice' }, { id: ids.bob, identity: 'bob' }])) {
      fail(`after the replacement the admin API lists ${JSON.stringify(replaced)}`);
    }

    // 4. An administrator removes bob: his page says so and stays out.
    const del = await fetch(new URL(`/api/v1/rooms/${room}/participants/${ids.bob}`, base), {
      method: 'DELETE', headers: { authorization: `Bearer ${adminToken}` }, signal: AbortSignal.timeout(5000),
    });
    if (del.status !== 204) fail(`DELETE participant ${ids.bob}: ${del.status} ${await del.text()}`);
    result.removed = await errorShown('bob', /removed you/);
    await outForGood('bob', 'removed');
    const last = await members();
    if (JSON.stringify(last) !== JSON.stringify([{ id: ids.alice2, identity: 'alice' }])) {
      fail(`after the removal the admin API lists ${JSON.stringify(last)}`);
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
