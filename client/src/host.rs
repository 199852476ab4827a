//! Building a PeerConnection that offers one host candidate: the client's
//! direct connection and the load tester's Janus peers are built the same
//! way (the server's connection, in the `switchboard` crate, has its own).

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::shared::error::Error;

/// The UDP host candidate `address:port`, as `add_local_candidate` takes it.
pub fn udp_host_candidate(address: IpAddr, port: u16) -> Result<RTCIceCandidateInit, Error> {
    let candidate = CandidateHostConfig {
        base_config: CandidateConfig {
            network: "udp".to_owned(),
            address: address.to_string(),
            port,
            component: 1,
            ..Default::default()
        },
        ..Default::default()
    }
    .new_candidate_host()?;
    RTCIceCandidate::from(&candidate).to_json()
}

/// A PeerConnection with `rtc`'s default codecs and interceptors whose
/// only local candidate is `local` (a UDP socket the caller reads and
/// writes).
pub fn host_peer_connection(local: SocketAddr) -> Result<RTCPeerConnection, Error> {
    let mut media_engine = MediaEngine::default();
    media_engine.register_default_codecs()?;
    let registry =
        register_default_interceptors(rtc::interceptor::Registry::new(), &mut media_engine)?;
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_setting_engine(SettingEngineBuilder::new().build())
        .with_media_engine(media_engine)
        .with_interceptor_registry(registry)
        .build(Instant::now())?;
    pc.add_local_candidate(udp_host_candidate(local.ip(), local.port())?)?;
    Ok(pc)
}
