//! Access tokens: LiveKit-compatible JWTs (HS256) that admit a participant
//! to a room with grants, and the keys that sign them.
//!
//! A token names its signing key in `iss`; the server holds `key → secret`
//! pairs (`--api-key`/`--api-secret` or `--keys-file`). Claims are named as
//! LiveKit's access tokens name them, so tokens minted by LiveKit's server
//! SDKs work unchanged. Verification is pure: the token and `now` in, the
//! claims or the reason for refusal out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Clock skew allowed on `nbf` and `exp`, in seconds.
pub const LEEWAY_SECS: u64 = 30;
/// Shortest secret accepted at start-up, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest token looked at, in bytes (a join frame is capped anyway).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The `video` grant of a token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VideoGrant {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub room_join: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_publish: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_subscribe: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_publish_data: Option<bool>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub room_admin: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub room_create: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub room_list: bool,
}

/// The claims of an access token. Unknown claims (LiveKit's `sip`,
/// `kind`, `sha256`...) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    #[serde(default)]
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    pub exp: u64,
    #[serde(default)]
    pub video: VideoGrant,
}

/// What a participant may do in its room, resolved from a token's grant
/// (or everything, when auth is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grants {
    pub publish: bool,
    pub subscribe: bool,
    pub publish_data: bool,
    pub hidden: bool,
}

impl Grants {
    /// Everything allowed (auth off).
    pub const ALL: Grants = Grants {
        publish: true,
        subscribe: true,
        publish_data: true,
        hidden: false,
    };

    /// The grants of `video`, with LiveKit's defaults: publish and subscribe
    /// true, publish-data as publish. A hidden participant never publishes.
    pub fn from_video(video: &VideoGrant) -> Grants {
        let publish = video.can_publish.unwrap_or(true) && !video.hidden;
        Grants {
            publish,
            subscribe: video.can_subscribe.unwrap_or(true),
            publish_data: video.can_publish_data.unwrap_or(publish) && !video.hidden,
            hidden: video.hidden,
        }
    }

    /// Whether a room holding this participant must run through the server.
    pub fn needs_sfu(&self) -> bool {
        !self.publish || self.hidden
    }
}

/// Why a token was refused; the text is the `message` of `unauthorized`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this server needs an access token: join with \"token\"")]
    Missing,
    #[error("the token is not a valid JWT: {0}")]
    Malformed(String),
    #[error("the token is signed with key {0:?}, which this server does not know")]
    UnknownKey(String),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token does not grant roomJoin")]
    NoRoomJoin,
    #[error("the token is for room {granted:?}, not {asked:?}")]
    WrongRoom { granted: String, asked: String },
    #[error("the token's identity (sub) must be 1-128 characters")]
    BadIdentity,
    #[error("the token does not grant {0}")]
    NotGranted(&'static str),
}

impl AuthError {
    /// The `reason` label of `switchboard_auth_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::UnknownKey(_) => "unknown-key",
            AuthError::BadSignature => "bad-signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not-yet-valid",
            AuthError::NoRoomJoin => "no-room-join",
            AuthError::WrongRoom { .. } => "wrong-room",
            AuthError::BadIdentity => "bad-identity",
            AuthError::NotGranted(_) => "not-granted",
        }
    }
}

/// Errors reading keys at start-up.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read keys file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("keys file {path} line {line}: expected `key: secret`")]
    Syntax { path: PathBuf, line: usize },
    #[error("the secret of key {0:?} is shorter than {MIN_SECRET_BYTES} bytes")]
    ShortSecret(String),
    #[error("--api-key and --api-secret go together")]
    Pair,
    #[error("signing a token: {0}")]
    Sign(String),
}

/// The API keys this server accepts: key → secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Keys {
    map: HashMap<String, String>,
    /// The key used to sign what the server signs itself (webhooks, `token`):
    /// `--api-key`, else the first key of the file.
    primary: Option<String>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        f.debug_struct("Keys")
            .field("keys", &self.map.keys().collect::<Vec<_>>())
            .field("primary", &self.primary)
            .finish()
    }
}

impl Keys {
    /// Keys from a `key`/`secret` pair and/or a keys file (`key: secret` per
    /// line; blank lines and `#` comments skipped).
    pub fn load(
        api_key: Option<&str>,
        api_secret: Option<&str>,
        file: Option<&Path>,
    ) -> Result<Keys, KeysError> {
        let mut keys = Keys::default();
        match (api_key, api_secret) {
            (Some(k), Some(s)) => keys.insert(k.to_owned(), s.to_owned())?,
            (None, None) => {}
            _ => return Err(KeysError::Pair),
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
                path: path.to_owned(),
                source,
            })?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let syntax = || KeysError::Syntax {
                    path: path.to_owned(),
                    line: n + 1,
                };
                let (k, s) = line.split_once(':').ok_or_else(syntax)?;
                let (k, s) = (k.trim(), s.trim());
                if k.is_empty() || s.is_empty() {
                    return Err(syntax());
                }
                keys.insert(k.to_owned(), s.to_owned())?;
            }
        }
        Ok(keys)
    }

    fn insert(&mut self, key: String, secret: String) -> Result<(), KeysError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(KeysError::ShortSecret(key));
        }
        self.primary.get_or_insert_with(|| key.clone());
        self.map.insert(key, secret);
        Ok(())
    }

    /// Whether any key is configured (auth is on).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The key the server signs with, and its secret.
    pub fn primary(&self) -> Option<(&str, &str)> {
        let key = self.primary.as_deref()?;
        self.map.get(key).map(|s| (key, s.as_str()))
    }

    /// Checks `token`'s signature and times at `now` (unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed("longer than 8 KiB".to_owned()));
        }
        // Which key signed it is a claim; read it before verifying with it.
        let unverified = jsonwebtoken::dangerous::insecure_decode::<Claims>(token)
            .map_err(|e| AuthError::Malformed(e.to_string()))?;
        let key = unverified.claims.iss;
        let secret = self
            .map
            .get(&key)
            .ok_or_else(|| AuthError::UnknownKey(key.chars().take(64).collect()))?;
        let mut validation = Validation::new(Algorithm::HS256);
        // Times are checked below against the `now` passed in.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Claims>(
            token,
            &DecodingKey::from_secret(secret.as_bytes()),
            &validation,
        )
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature
            | jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => AuthError::BadSignature,
            _ => AuthError::Malformed(e.to_string()),
        })?;
        let claims = data.claims;
        if claims.exp.saturating_add(LEEWAY_SECS) < now {
            return Err(AuthError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(LEEWAY_SECS))
        {
            return Err(AuthError::NotYetValid);
        }
        Ok(claims)
    }

    /// Verifies a token for joining `room`: valid, `roomJoin`, for this room,
    /// with an identity.
    pub fn verify_join(&self, token: &str, room: &str, now: u64) -> Result<Claims, AuthError> {
        let claims = self.verify(token, now)?;
        if !claims.video.room_join {
            return Err(AuthError::NoRoomJoin);
        }
        match claims.video.room.as_deref() {
            Some(granted) if granted == room => {}
            granted => {
                return Err(AuthError::WrongRoom {
                    granted: granted.unwrap_or("").chars().take(128).collect(),
                    asked: room.to_owned(),
                })
            }
        }
        if claims.sub.is_empty() || claims.sub.chars().count() > 128 {
            return Err(AuthError::BadIdentity);
        }
        Ok(claims)
    }

    /// Signs `claims` with the primary key (whose name goes in `iss`).
    pub fn sign(&self, mut claims: Claims) -> Result<String, KeysError> {
        let (key, secret) = self
            .primary()
            .ok_or_else(|| KeysError::Sign("no API key configured".to_owned()))?;
        claims.iss = key.to_owned();
        sign_with(secret, &claims)
    }
}

/// Signs any serializable claims with `secret`, HS256.
pub fn sign_with<T: Serialize>(secret: &str, claims: &T) -> Result<String, KeysError> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| KeysError::Sign(e.to_string()))
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn keys() -> Keys {
        Keys::load(Some("k1"), Some(SECRET), None).unwrap()
    }

    fn claims(room: &str) -> Claims {
        Claims {
            sub: "alice".into(),
            exp: 2_000,
            nbf: Some(1_000),
            video: VideoGrant {
                room: Some(room.into()),
                room_join: true,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_signed_token_verifies_and_its_grants_default_as_livekit() {
        let k = keys();
        let t = k.sign(claims("r")).unwrap();
        let c = k.verify_join(&t, "r", 1_500).unwrap();
        assert_eq!(c.iss, "k1");
        assert_eq!(c.sub, "alice");
        assert_eq!(Grants::from_video(&c.video), Grants::ALL);
    }

    #[test]
    fn each_refusal_has_its_reason() {
        let k = keys();
        let t = k.sign(claims("r")).unwrap();
        assert_eq!(k.verify_join(&t, "r", 2_031), Err(AuthError::Expired));
        assert!(k.verify_join(&t, "r", 2_030).is_ok(), "30 s of skew");
        assert_eq!(k.verify_join(&t, "r", 969), Err(AuthError::NotYetValid));
        assert!(matches!(
            k.verify_join(&t, "other", 1_500),
            Err(AuthError::WrongRoom { .. })
        ));
        let mut no_join = claims("r");
        no_join.video.room_join = false;
        let t2 = k.sign(no_join).unwrap();
        assert_eq!(k.verify_join(&t2, "r", 1_500), Err(AuthError::NoRoomJoin));
        assert!(matches!(
            k.verify("garbage", 1_500),
            Err(AuthError::Malformed(_))
        ));
        let other = Keys::load(Some("k2"), Some(SECRET), None).unwrap();
        assert_eq!(
            other.verify(&t, 1_500),
            Err(AuthError::UnknownKey("k1".into()))
        );
        let forged = Keys::load(Some("k1"), Some(&"x".repeat(32)), None)
            .unwrap()
            .sign(claims("r"))
            .unwrap();
        assert_eq!(k.verify(&forged, 1_500), Err(AuthError::BadSignature));
    }

    #[test]
    fn hidden_and_no_publish_defaults() {
        let g = Grants::from_video(&VideoGrant {
            can_publish: Some(false),
            ..Default::default()
        });
        assert!(!g.publish && !g.publish_data && g.subscribe && g.needs_sfu());
        let g = Grants::from_video(&VideoGrant {
            hidden: true,
            ..Default::default()
        });
        assert!(!g.publish && g.hidden && g.needs_sfu());
        let g = Grants::from_video(&VideoGrant {
            can_publish_data: Some(true),
            can_publish: Some(false),
            ..Default::default()
        });
        assert!(g.publish_data);
    }

    #[test]
    fn short_secrets_and_half_pairs_are_refused() {
        assert!(matches!(
            Keys::load(Some("k"), Some("short"), None),
            Err(KeysError::ShortSecret(_))
        ));
        assert!(matches!(
            Keys::load(Some("k"), None, None),
            Err(KeysError::Pair)
        ));
    }

    #[test]
    fn keys_file_holds_several_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(
            &path,
            format!("# keys\nk1: {SECRET}\n\nk2: {}\n", "y".repeat(40)),
        )
        .unwrap();
        let k = Keys::load(None, None, Some(&path)).unwrap();
        let t = sign_with(
            &"y".repeat(40),
            &Claims {
                iss: "k2".into(),
                ..claims("r")
            },
        )
        .unwrap();
        assert!(k.verify(&t, 1_500).is_ok());
        std::fs::write(&path, "no colon here\n").unwrap();
        assert!(matches!(
            Keys::load(None, None, Some(&path)),
            Err(KeysError::Syntax { line: 1, .. })
        ));
    }
}
