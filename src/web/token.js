// Access tokens in the page URL (`?token=...`): the page sends the token in
// every `join` and reads its claims for display only (the room to default
// to, the name). The server verifies it; nothing here trusts it.

// The claims of a JWT (its middle segment, base64url JSON), or null when
// `token` is not shaped like one.
export function tokenClaims(token) {
  const part = typeof token === 'string' ? token.split('.')[1] : '';
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === 'object' && !Array.isArray(claims) ? claims : null;
  } catch (_) {
    return null;
  }
}

// The room a token admits to (`video.room`), or ''.
export function tokenRoom(claims) {
  const room = claims && claims.video && claims.video.room;
  return typeof room === 'string' ? room : '';
}

// The display name a token sets (the server uses it instead of ours), or ''.
export function tokenName(claims) {
  return claims && typeof claims.name === 'string' ? claims.name : '';
}
