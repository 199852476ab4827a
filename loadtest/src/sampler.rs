//! Sampling a server (and the generator itself) once a period over a run:
//! CPU time (`utime + stime` of `/proc/<pid>/stat`), RSS, and a counter
//! scraped from the server's Prometheus `/metrics` (e.g. packets
//! forwarded). Usable against any server: the counter name and the scrape
//! address are parameters, and a server without `/metrics` just yields
//! `None` counters.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::proc::{self, Pid};
use crate::scrape;

/// Where and what to sample.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server process; `None`: only the generator and `/metrics`.
    pub pid: Option<u32>,
    /// `/metrics` host and port; `None`: no scraping.
    pub metrics: Option<(String, u16)>,
    /// The counter to follow (summed over its series), e.g.
    /// `switchboard_media_rtp_forwarded_total`.
    pub counter: String,
}

/// One sample.
#[derive(Debug, Clone)]
pub struct Tick {
    pub at: Instant,
    pub server_cpu: Option<Duration>,
    pub server_rss: Option<u64>,
    pub counter: Option<f64>,
    pub own_cpu: Option<Duration>,
}

/// Timeout of one scrape inside a tick.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);

impl Tick {
    pub async fn take(target: &Target) -> Tick {
        let at = Instant::now();
        let pid = target.pid.map(Pid::Other);
        let server_cpu = pid.and_then(|p| proc::cpu_time(p).ok());
        let server_rss = pid.and_then(|p| proc::rss_bytes(p).ok());
        let own_cpu = proc::cpu_time(Pid::Own).ok();
        let counter = match &target.metrics {
            Some((host, port)) => scrape::get(host, *port, "/metrics", SCRAPE_TIMEOUT)
                .await
                .ok()
                .map(|t| scrape::parse_text(&t))
                .and_then(|s| scrape::sum(&s, &target.counter)),
            None => None,
        };
        Tick {
            at,
            server_cpu,
            server_rss,
            counter,
            own_cpu,
        }
    }
}

/// Samples `target` every `period` until `stop` turns true (or its sender
/// is gone), then once more. The first sample is taken at once.
pub async fn sample_until(
    target: Target,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) -> Vec<Tick> {
    let mut out = vec![Tick::take(&target).await];
    let mut iv = tokio::time::interval(period);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    iv.tick().await;
    loop {
        tokio::select! {
            _ = iv.tick() => out.push(Tick::take(&target).await),
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    out.push(Tick::take(&target).await);
                    return out;
                }
            }
        }
    }
}

/// What happened between two consecutive ticks.
#[derive(Debug, Clone, Serialize)]
pub struct Interval {
    /// End of the interval, seconds since `origin` of [`intervals`].
    pub t_s: f64,
    pub seconds: f64,
    /// Server CPU as a percentage of one core.
    pub server_cpu_percent: Option<f64>,
    pub server_rss_bytes: Option<u64>,
    /// Counter increase per second (e.g. packets forwarded/s).
    pub counter_per_s: Option<f64>,
    /// Server CPU time per counter increment, µs (e.g. per forwarded packet).
    pub server_cpu_per_count_us: Option<f64>,
    pub generator_cpu_percent: Option<f64>,
}

/// Deltas between consecutive ticks, timed from `origin`.
pub fn intervals(ticks: &[Tick], origin: Instant) -> Vec<Interval> {
    ticks
        .windows(2)
        .filter_map(|w| {
            let (a, b) = (&w[0], &w[1]);
            let secs = b.at.saturating_duration_since(a.at).as_secs_f64();
            if secs <= 0.0 {
                return None;
            }
            let d = |x: Option<Duration>, y: Option<Duration>| {
                Some(y?.saturating_sub(x?).as_secs_f64())
            };
            let server_cpu = d(a.server_cpu, b.server_cpu);
            let count = a.counter.zip(b.counter).map(|(x, y)| (y - x).max(0.0));
            Some(Interval {
                t_s: b.at.saturating_duration_since(origin).as_secs_f64(),
                seconds: secs,
                server_cpu_percent: server_cpu.map(|c| 100.0 * c / secs),
                server_rss_bytes: b.server_rss,
                counter_per_s: count.map(|c| c / secs),
                server_cpu_per_count_us: server_cpu
                    .zip(count.filter(|c| *c > 0.0))
                    .map(|(c, n)| c * 1e6 / n),
                generator_cpu_percent: d(a.own_cpu, b.own_cpu).map(|c| 100.0 * c / secs),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_deltas_per_second() {
        let t = Instant::now();
        let tick = |s: u64, cpu_ms: u64, n: f64| Tick {
            at: t + Duration::from_secs(s),
            server_cpu: Some(Duration::from_millis(cpu_ms)),
            server_rss: Some(1000 + s),
            counter: Some(n),
            own_cpu: Some(Duration::from_millis(cpu_ms / 2)),
        };
        let iv = intervals(
            &[tick(0, 0, 0.0), tick(1, 250, 1000.0), tick(3, 450, 1000.0)],
            t,
        );
        assert_eq!(iv.len(), 2);
        assert_eq!(iv[0].t_s, 1.0);
        assert!((iv[0].server_cpu_percent.expect("cpu") - 25.0).abs() < 1e-9);
        assert!((iv[0].server_cpu_per_count_us.expect("per") - 250.0).abs() < 1e-9);
        assert_eq!(iv[0].counter_per_s, Some(1000.0));
        assert!((iv[0].generator_cpu_percent.expect("own") - 12.5).abs() < 1e-9);
        assert_eq!(iv[1].server_rss_bytes, Some(1003));
        assert!((iv[1].server_cpu_percent.expect("cpu") - 10.0).abs() < 1e-9);
        assert_eq!(iv[1].server_cpu_per_count_us, None, "nothing forwarded");
    }

    #[tokio::test]
    async fn samples_itself_until_stopped() {
        let (tx, rx) = watch::channel(false);
        let target = Target {
            pid: Some(std::process::id()),
            metrics: None,
            counter: "x".into(),
        };
        let h = tokio::spawn(sample_until(target, Duration::from_millis(50), rx));
        tokio::time::sleep(Duration::from_millis(180)).await;
        tx.send(true).expect("sampler alive");
        let ticks = h.await.expect("joins");
        assert!(ticks.len() >= 3, "{}", ticks.len());
        assert!(ticks
            .iter()
            .all(|t| t.server_rss.is_some() && t.own_cpu.is_some()));
    }
}
