//! Reading the server's Prometheus text (`/metrics`) over plain HTTP/1.0, and
//! the figures we derive from two scrapes: counter deltas and histogram
//! quantiles estimated from bucket deltas.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest `/metrics` body we accept.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Every sample of one scrape: series (name plus labels, exactly as the server
/// printed them, e.g. `x_total{reason="a"}`) → value.
pub type Samples = BTreeMap<String, f64>;

/// `GET path` from `host:port` over HTTP/1.0 (so the body is neither chunked
/// nor kept alive), within `limit`. Returns the body of a 200 response.
pub async fn get(host: &str, port: u16, path: &str, limit: Duration) -> Result<String, String> {
    let fetch = async {
        let mut stream = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: text/plain\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        (&mut stream)
            .take(MAX_BODY as u64 + 64 * 1024)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        parse_response(&raw)
    };
    tokio::time::timeout(limit, fetch)
        .await
        .map_err(|_| format!("GET http://{host}:{port}{path}: no answer within {limit:?}"))?
}

/// Splits an HTTP response into status and body; a non-200 status is an error.
fn parse_response(raw: &[u8]) -> Result<String, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("response has no header end")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "header is not UTF-8")?;
    let status = head.lines().next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        return Err(format!("HTTP status {status:?}"));
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[split + 4..];
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    String::from_utf8(body).map_err(|_| "body is not UTF-8".to_owned())
}

/// Decodes a `Transfer-Encoding: chunked` body (a server may use it even
/// for HTTP/1.0, though it should not).
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line has no end")?;
        let line = std::str::from_utf8(&body[..eol]).map_err(|_| "bad chunk size")?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| "bad chunk size")?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            return Err("chunk overruns the body".into());
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// Parses Prometheus text exposition format: one `series value [timestamp]`
/// per line; comments and unparsable lines are skipped.
pub fn parse_text(text: &str) -> Samples {
    let mut out = Samples::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.rfind('}') {
            Some(close) if line.contains('{') => (&line[..=close], &line[close + 1..]),
            _ => match line.split_once(char::is_whitespace) {
                Some((s, r)) => (s, r),
                None => continue,
            },
        };
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        out.insert(series.to_owned(), value);
    }
    out
}

/// `later − earlier` of one series; `None` if either scrape lacks it. A
/// series that first appears in `later` (labelled counters are only printed
/// once used) counts from zero.
pub fn delta(earlier: &Samples, later: &Samples, series: &str) -> Option<f64> {
    let b = later.get(series)?;
    Some(b - earlier.get(series).copied().unwrap_or(0.0))
}

/// The sum of every series of metric `name` (any labels); `None` if the
/// scrape has none.
pub fn sum(samples: &Samples, name: &str) -> Option<f64> {
    let mut found = false;
    let total = samples
        .iter()
        .filter(|(k, _)| k.split('{').next() == Some(name))
        .map(|(_, v)| {
            found = true;
            *v
        })
        .sum();
    found.then_some(total)
}

/// Deltas of every series starting with `prefix` and ending in `_total`
/// that changed between the scrapes.
pub fn counter_deltas(earlier: &Samples, later: &Samples, prefix: &str) -> BTreeMap<String, f64> {
    later
        .keys()
        .filter(|k| k.starts_with(prefix))
        .filter(|k| k.split('{').next().is_some_and(|n| n.ends_with("_total")))
        .filter_map(|k| Some((k.clone(), delta(earlier, later, k)?)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

/// A Prometheus histogram (cumulative buckets).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// `(le, cumulative count)`, ascending by `le`; the last `le` is `+Inf`.
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

/// A quantile estimated from histogram buckets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    /// Linear interpolation inside the bucket (Prometheus' `histogram_quantile`);
    /// the bucket's lower bound when the rank falls in the `+Inf` bucket.
    pub seconds: f64,
    /// The bucket it fell in: `(lower, upper]`; `upper` is `None` for `+Inf`.
    pub bucket_lower: f64,
    pub bucket_upper: Option<f64>,
}

impl Histogram {
    /// The histogram `name` (without the `_bucket` suffix) of a scrape.
    pub fn from_samples(samples: &Samples, name: &str) -> Option<Histogram> {
        let prefix = format!("{name}_bucket{{");
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, v)| Some((label(k, "le")?, *v)))
            .filter_map(|(le, v)| {
                let le = match le.as_str() {
                    "+Inf" => f64::INFINITY,
                    s => s.parse().ok()?,
                };
                Some((le, v))
            })
            .collect();
        if buckets.is_empty() {
            return None;
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(Histogram {
            buckets,
            sum: samples.get(&format!("{name}_sum")).copied().unwrap_or(0.0),
            count: samples
                .get(&format!("{name}_count"))
                .copied()
                .unwrap_or(0.0),
        })
    }

    /// `self − earlier`, bucket by bucket (same bucket layout assumed; a
    /// bucket missing from `earlier` counts from zero).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let before = |le: f64| {
            earlier
                .buckets
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0.0, |(_, c)| *c)
        };
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(le, c)| (*le, c - before(*le)))
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// Observations in the histogram (the `+Inf` bucket).
    pub fn total(&self) -> f64 {
        self.buckets.last().map_or(0.0, |(_, c)| *c)
    }

    /// Mean observation (`sum / count`), if any.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// The `q`-quantile (0–1), like Prometheus' `histogram_quantile`: find
    /// the bucket holding rank `q × total` and interpolate linearly in it
    /// (the first bucket's lower bound is 0). `None` if empty.
    pub fn quantile(&self, q: f64) -> Option<Estimate> {
        let total = self.total();
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let mut lower = 0.0;
        let mut below = 0.0;
        for &(le, cum) in &self.buckets {
            if cum >= rank && cum > below {
                if le.is_infinite() {
                    return Some(Estimate {
                        seconds: lower,
                        bucket_lower: lower,
                        bucket_upper: None,
                    });
                }
                let frac = (rank - below) / (cum - below);
                return Some(Estimate {
                    seconds: lower + (le - lower) * frac,
                    bucket_lower: lower,
                    bucket_upper: Some(le),
                });
            }
            if !le.is_infinite() {
                lower = le;
            }
            below = cum;
        }
        None
    }
}

/// The value of label `key` in a series like `name{a="x",le="0.5"}`.
fn label(series: &str, key: &str) -> Option<String> {
    let inner = series.split_once('{')?.1.strip_suffix('}')?;
    inner.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x_total things\n# TYPE x_total counter\nx_total 5\n\
        y_dropped_total{reason=\"too-old\"} 2\n\
        h_bucket{le=\"0.001\"} 10\nh_bucket{le=\"0.002\"} 30\nh_bucket{le=\"0.005\"} 40\n\
        h_bucket{le=\"+Inf\"} 40\nh_sum 0.05\nh_count 40\nbad line here\ngauge 1.5e3\n";

    #[test]
    fn parses_text_format() {
        let s = parse_text(TEXT);
        assert_eq!(s.get("x_total"), Some(&5.0));
        assert_eq!(s.get("y_dropped_total{reason=\"too-old\"}"), Some(&2.0));
        assert_eq!(s.get("h_bucket{le=\"+Inf\"}"), Some(&40.0));
        assert_eq!(s.get("gauge"), Some(&1500.0));
        assert!(!s.contains_key("bad"));
    }

    #[test]
    fn deltas_count_new_series_from_zero() {
        let a = parse_text("x_total 5\n");
        let b = parse_text("x_total 9\ny_total{r=\"a\"} 3\nz_total 0\ng 4\n");
        assert_eq!(delta(&a, &b, "x_total"), Some(4.0));
        assert_eq!(delta(&a, &b, "y_total{r=\"a\"}"), Some(3.0));
        assert_eq!(delta(&a, &b, "nope"), None);
        let d = counter_deltas(&a, &b, "");
        assert_eq!(d.len(), 2, "{d:?}");
    }

    #[test]
    fn histogram_quantiles_interpolate() {
        let h = Histogram::from_samples(&parse_text(TEXT), "h").expect("histogram");
        assert_eq!(h.buckets.len(), 4);
        assert_eq!(h.total(), 40.0);
        // Rank 20 of 40 lies in (0.001, 0.002], 10 of its 20 observations in.
        let p50 = h.quantile(0.5).expect("p50");
        assert!((p50.seconds - 0.0015).abs() < 1e-12, "{p50:?}");
        assert_eq!(p50.bucket_upper, Some(0.002));
        // Rank 39.6 lies in (0.002, 0.005].
        let p99 = h.quantile(0.99).expect("p99");
        assert!((p99.seconds - (0.002 + 0.003 * 9.6 / 10.0)).abs() < 1e-12);
        assert!((h.mean().expect("mean") - 0.05 / 40.0).abs() < 1e-12);
    }

    #[test]
    fn histogram_delta_and_overflow() {
        let a = Histogram::from_samples(&parse_text(TEXT), "h").expect("a");
        let later = "h_bucket{le=\"0.001\"} 10\nh_bucket{le=\"0.002\"} 30\n\
                     h_bucket{le=\"0.005\"} 40\nh_bucket{le=\"+Inf\"} 50\nh_sum 1.05\nh_count 50\n";
        let b = Histogram::from_samples(&parse_text(later), "h").expect("b");
        let d = b.since(&a);
        assert_eq!(d.total(), 10.0);
        // All ten new observations are above the last finite bound.
        let p50 = d.quantile(0.5).expect("p50");
        assert_eq!(p50.seconds, 0.005);
        assert_eq!(p50.bucket_upper, None);
        assert!(Histogram::from_samples(&Samples::new(), "h").is_none());
        let empty = a.since(&a);
        assert!(empty.quantile(0.5).is_none());
    }

    #[test]
    fn http_responses() {
        let ok = b"HTTP/1.0 200 OK\r\ncontent-length: 4\r\n\r\nx 1\n";
        assert_eq!(parse_response(ok).as_deref(), Ok("x 1\n"));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nx 1\r\n2\r\n\n\n\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).as_deref(), Ok("x 1\n\n"));
        assert!(parse_response(b"HTTP/1.0 404 Not Found\r\n\r\n").is_err());
        assert!(parse_response(b"garbage").is_err());
    }
}
