//! The live progress bar (indicatif) on stderr: participants connected,
//! packets/s received, loss so far. Hidden when stdout or stderr is not a
//! terminal (CI, pipes, files); then the phase lines are plain stderr
//! lines as before.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Counters the participant tasks bump; the bar reads them.
#[derive(Debug, Default)]
pub struct Live {
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    /// Stamped packets received (distinct or not).
    pub received: AtomicU64,
    /// Packets sent × the subscribers that should get each.
    pub expected: AtomicU64,
}

impl Live {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Progress {
    /// A bar over `total` participants, if both stdout and stderr are terminals.
    pub fn new(total: u64, started: Instant) -> Progress {
        let visible = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        let bar = visible.then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:30} {pos}/{len} connected  {msg}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Progress { bar, started }
    }

    /// A phase line: above the bar, or on stderr when there is no bar.
    pub fn say(&self, what: std::fmt::Arguments<'_>) {
        let line = format!("[{:7.2}s] {what}", self.started.elapsed().as_secs_f64());
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Redraws from `live` every 250 ms until the returned handle is aborted
    /// (or [`Progress::finish`]); nothing when hidden.
    pub fn follow(&self, live: Arc<Live>) -> Option<tokio::task::JoinHandle<()>> {
        let bar = self.bar.clone()?;
        Some(tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(250));
            let mut last = (Instant::now(), 0u64);
            loop {
                iv.tick().await;
                let now = Instant::now();
                let rx = live.received.load(Ordering::Relaxed);
                let expected = live.expected.load(Ordering::Relaxed);
                let secs = now.saturating_duration_since(last.0).as_secs_f64();
                let pps = if secs > 0.0 {
                    (rx - last.1) as f64 / secs
                } else {
                    0.0
                };
                last = (now, rx);
                // In-flight packets count as lost here; the report is exact.
                let loss = if expected > 0 {
                    100.0 * expected.saturating_sub(rx) as f64 / expected as f64
                } else {
                    0.0
                };
                bar.set_position(live.connected.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "{} failed  {pps:>8.0} pkt/s received  loss ~{loss:.2} %",
                    live.failed.load(Ordering::Relaxed)
                ));
            }
        }))
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
