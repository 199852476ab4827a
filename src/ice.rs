//! `joined.iceServers`: STUN URLs as configured, TURN URLs with short-lived
//! credentials in the TURN REST scheme that coturn's `use-auth-secret`
//! checks: username `<expiry-unix>:<participant>`, password
//! `base64(HMAC-SHA1(secret, username))`.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use switchboard_proto::{IceServer, ParticipantId};

use crate::config::IceConfig;

/// The ICE servers for `participant`, with TURN credentials valid until
/// `now_unix + ttl`.
pub fn ice_servers(cfg: &IceConfig, participant: &ParticipantId, now_unix: u64) -> Vec<IceServer> {
    let mut servers = Vec::with_capacity(2);
    if !cfg.stun_urls.is_empty() {
        servers.push(IceServer {
            urls: cfg.stun_urls.clone(),
            username: None,
            credential: None,
        });
    }
    if let (false, Some(secret)) = (cfg.turn_urls.is_empty(), cfg.turn_secret.as_deref()) {
        let (username, credential) =
            turn_credentials(secret, participant, now_unix + cfg.turn_ttl.as_secs());
        servers.push(IceServer {
            urls: cfg.turn_urls.clone(),
            username: Some(username),
            credential: Some(credential),
        });
    }
    servers
}

/// Username and password for the TURN REST scheme.
pub fn turn_credentials(
    secret: &str,
    participant: &ParticipantId,
    expiry_unix: u64,
) -> (String, String) {
    let username = format!("{expiry_unix}:{participant}");
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = <Hmac<Sha1>>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (username, password)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn turn_rest_credentials_match_a_known_vector() {
        // Computed independently:
        // printf '%s' '1700000000:alice' | openssl dgst -sha1 -hmac 'north' -binary | base64
        let (u, p) = turn_credentials(
            "north",
            &ParticipantId::parse("alice").unwrap(),
            1_700_000_000,
        );
        assert_eq!(u, "1700000000:alice");
        assert_eq!(p, "Cd/49soE35ICqcJF/bCTn8Z4OyE=");
    }

    #[test]
    fn servers_from_config() {
        let mut cfg = IceConfig {
            stun_urls: vec![],
            turn_urls: vec![],
            turn_secret: None,
            turn_ttl: Duration::from_secs(600),
        };
        let p = ParticipantId::parse("p1").unwrap();
        assert!(ice_servers(&cfg, &p, 0).is_empty());
        cfg.stun_urls = vec!["stun:127.0.0.1:3478".into()];
        cfg.turn_urls = vec!["turn:127.0.0.1:3478".into()];
        cfg.turn_secret = Some("s".into());
        let s = ice_servers(&cfg, &p, 1000);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].username, None);
        assert_eq!(s[1].username.as_deref(), Some("1600:p1"));
        assert!(s[1].credential.is_some());
    }
}
