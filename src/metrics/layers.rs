//! `switchboard_layers_*` and `switchboard_subscriber_estimate_bits`:
//! simulcast, the per-subscriber bandwidth estimate and the allocator.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use super::register;

pub struct LayerMetrics {
    /// Each subscriber's downlink estimate, sampled every allocation round.
    pub estimate: Histogram,
    /// Subscriptions whose layer target changed (a switch began).
    pub switches: IntCounter,
    /// Video subscriptions paused because not even their lowest layer fits.
    pub paused: IntGauge,
    /// Sum over subscribers of what their wishes would take beyond what
    /// their estimates allow, bit/s.
    pub deficit: IntGauge,
    /// `publisher-layers` messages sent (dynacast).
    pub publisher_updates: IntCounter,
    /// `track-settings` naming a mid that carries nothing.
    pub unknown_mid: IntCounter,
    /// Bandwidth probes by outcome (started, succeeded, failed, inconclusive,
    /// interrupted).
    probes: IntCounterVec,
    /// Packets repeated on RTX streams as probe padding.
    pub padding_packets: IntCounter,
}

/// The outcomes `switchboard_layers_probes_total` counts.
pub const PROBE_OUTCOMES: [&str; 5] = [
    "started",
    "succeeded",
    "failed",
    "inconclusive",
    "interrupted",
];

impl LayerMetrics {
    pub(super) fn new(registry: &Registry) -> LayerMetrics {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("{e}"));
            register(registry, c.clone());
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("{e}"));
            register(registry, g.clone());
            g
        };
        let estimate = {
            // 100 kbit/s (the estimator's floor) to 50 Mbit/s (its ceiling).
            let h = Histogram::with_opts(
                HistogramOpts::new(
                    "switchboard_subscriber_estimate_bits",
                    "Downlink bandwidth estimate of each subscriber connection (from its TWCC feedback), bit/s, sampled every allocation round",
                )
                .buckets(vec![
                    100e3, 200e3, 300e3, 500e3, 750e3, 1e6, 1.5e6, 2e6, 3e6, 5e6, 10e6, 20e6, 50e6,
                ]),
            )
            .unwrap_or_else(|e| unreachable!("{e}"));
            register(registry, h.clone());
            h
        };
        let probes = IntCounterVec::new(
            Opts::new(
                "switchboard_layers_probes_total",
                "Bandwidth probes (padding sent to find out whether a subscriber's link carries more) by outcome: started, succeeded (its estimate rose), failed",
            ),
            &["outcome"],
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        register(registry, probes.clone());
        for outcome in PROBE_OUTCOMES {
            probes.with_label_values(&[outcome]);
        }
        LayerMetrics {
            probes,
            padding_packets: counter(
                "switchboard_layers_padding_packets_total",
                "Video packets repeated on a subscriber's RTX stream as bandwidth-probe padding",
            ),
            estimate,
            switches: counter(
                "switchboard_layers_switches_total",
                "Simulcast layer changes chosen for a subscriber: another encoding (the switch happens at its next keyframe) or other temporal layers of the same one",
            ),
            paused: gauge(
                "switchboard_layers_paused_tracks",
                "Video tracks not sent to a subscriber because not even their lowest layer fits its bandwidth",
            ),
            deficit: gauge(
                "switchboard_layers_deficit_bits",
                "Sum over subscribers of the bitrate their wishes would take beyond what their estimates allow, bit/s",
            ),
            publisher_updates: counter(
                "switchboard_layers_publisher_updates_total",
                "publisher-layers messages sent: a publisher told which simulcast layers someone needs (dynacast)",
            ),
            unknown_mid: counter(
                "switchboard_layers_unknown_mid_total",
                "track-settings messages naming an m-section that carries no track (ignored)",
            ),
        }
    }
}

impl LayerMetrics {
    /// One probe event (`outcome` one of [`PROBE_OUTCOMES`]).
    pub fn probes(&self, outcome: &str) {
        self.probes.with_label_values(&[outcome]).inc();
    }
}
