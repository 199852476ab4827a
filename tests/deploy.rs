//! The deployment files in `deploy/` against the real server: every metric
//! the Grafana dashboard and the Prometheus alerts (and their unit tests)
//! name is one the server exposes, the shipped TOML configs load with the
//! server's own config loader, the probed HTTP paths answer, the stop
//! timeouts outlast the drain, metrics are scraped from the
//! `--metrics-listen` port (not the public one), and API keys come from the
//! environment or a Secret. (`.ci/run` runs the external validators:
//! promtool, hadolint, docker compose config, kubernetes-validate,
//! systemd-analyze.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use switchboard::config::{Config, ServeOptions};

fn deploy_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

fn read(rel: &str) -> String {
    let path = deploy_file(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every `switchboard_[a-z0-9_]+` token in a PromQL expression (or a Grafana
/// `label_values(...)` query).
fn metric_names(expr: &str) -> Vec<String> {
    const PREFIX: &str = "switchboard_";
    let bytes = expr.as_bytes();
    let mut names = Vec::new();
    let mut i = 0;
    while let Some(off) = expr[i..].find(PREFIX) {
        let start = i + off;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_' || c == b':')
        };
        let mut end = start + PREFIX.len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if boundary && end > start + PREFIX.len() {
            names.push(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// The PromQL of a Grafana dashboard: every `expr` (panel queries, also in
/// collapsed rows) and every variable's `definition`/`query`.
fn dashboard_queries(v: &Value, key: Option<&str>, out: &mut Vec<String>) {
    match v {
        Value::String(s) if matches!(key, Some("expr" | "definition" | "query")) => {
            out.push(s.clone())
        }
        Value::Array(items) => items
            .iter()
            .for_each(|item| dashboard_queries(item, key, out)),
        Value::Object(map) => map
            .iter()
            .for_each(|(k, item)| dashboard_queries(item, Some(k), out)),
        _ => {}
    }
}

/// The values of `key:` in a YAML file, inline or as a `|`/`>` block scalar
/// (enough YAML for Prometheus rule files: `expr:` and `series:`).
fn yaml_values(text: &str, key: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start().trim_start_matches("- ");
        let indent = line.len() - line.trim_start().len();
        i += 1;
        let Some(rest) = trimmed.strip_prefix(key).and_then(|r| r.strip_prefix(':')) else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let mut block = String::new();
            while i < lines.len()
                && (lines[i].trim().is_empty()
                    || lines[i].len() - lines[i].trim_start().len() > indent)
            {
                block.push_str(lines[i].trim());
                block.push('\n');
                i += 1;
            }
            out.push(block);
        } else {
            out.push(rest.trim_matches(|c| c == '\'' || c == '"').to_owned());
        }
    }
    out
}

/// Metric families in a Prometheus text exposition, by name, with their type.
fn exposed_families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

/// Whether `name` is a series of an exposed family: the family itself, or
/// `_bucket`/`_sum`/`_count` of a histogram (`_sum`/`_count` of a summary).
fn is_exposed(name: &str, families: &BTreeMap<String, String>) -> bool {
    if families.contains_key(name) {
        return true;
    }
    [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ]
    .iter()
    .any(|(suffix, kinds)| {
        name.strip_suffix(suffix)
            .and_then(|base| families.get(base))
            .is_some_and(|kind| kinds.contains(&kind.as_str()))
    })
}

/// `file: name` for every name `exprs` use that the exposition lacks.
fn unknown_names(
    file: &str,
    exprs: &[String],
    families: &BTreeMap<String, String>,
    used: &mut BTreeSet<String>,
) -> Vec<String> {
    let mut unknown = Vec::new();
    for expr in exprs {
        for name in metric_names(expr) {
            if !is_exposed(&name, families) {
                unknown.push(format!("{file}: {name}   (in: {})", expr.trim()));
            }
            used.insert(name);
        }
    }
    unknown
}

/// The `/metrics` text once every family exists. `switchboard_media_dropped_total`
/// has no series until the first drop, so one stray datagram to the media
/// port makes one (reason `unclassified`), as on any server in the wild.
async fn full_exposition(server: &switchboard::server::RunningServer) -> String {
    let media = server.media_addr().expect("the media plane runs");
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind a UDP socket");
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        socket
            .send_to(b"not a media packet", media)
            .await
            .expect("send a datagram to the media port");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let text = common::metrics(server).await;
        if text.contains("\nswitchboard_media_dropped_total{") {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "switchboard_media_dropped_total never appeared after datagrams to {media}"
        );
    }
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_exposed_metrics() {
    let server = common::server(ServeOptions::default()).await;
    let families = exposed_families(&full_exposition(&server).await);
    assert!(
        families.len() >= 20,
        "suspiciously few metric families exposed: {families:?}"
    );

    let mut unknown = Vec::new();

    let dashboard: Value =
        serde_json::from_str(&read("grafana/switchboard.json")).expect("dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, None, &mut queries);
    let mut in_dashboard = BTreeSet::new();
    unknown.extend(unknown_names(
        "deploy/grafana/switchboard.json",
        &queries,
        &families,
        &mut in_dashboard,
    ));

    let alerts = yaml_values(&read("prometheus/alerts.yml"), "expr");
    let mut in_alerts = BTreeSet::new();
    unknown.extend(unknown_names(
        "deploy/prometheus/alerts.yml",
        &alerts,
        &families,
        &mut in_alerts,
    ));

    let series = yaml_values(&read("prometheus/alerts_test.yml"), "series");
    let mut in_alert_tests = BTreeSet::new();
    unknown.extend(unknown_names(
        "deploy/prometheus/alerts_test.yml",
        &series,
        &families,
        &mut in_alert_tests,
    ));

    assert!(
        unknown.is_empty(),
        "metric names the server does not expose:\n  {}\nexposed: {:?}",
        unknown.join("\n  "),
        families.keys().collect::<Vec<_>>()
    );
    // The extractors found what the files are about (a parser that finds
    // nothing would pass the check above).
    assert!(
        in_dashboard.len() >= 25,
        "only {} names found in the dashboard: {in_dashboard:?}",
        in_dashboard.len()
    );
    assert!(
        alerts.len() >= 8 && in_alerts.len() >= 8,
        "only {} alert expressions / {} names found: {in_alerts:?}",
        alerts.len(),
        in_alerts.len()
    );
    assert!(!in_alert_tests.is_empty(), "no series in alerts_test.yml");
}

#[test]
fn the_metric_check_catches_typos() {
    let families = exposed_families(
        "# TYPE switchboard_rooms gauge\nswitchboard_rooms 0\n\
         # TYPE switchboard_media_forward_latency_seconds histogram\n",
    );
    let exprs = [
        "sum(switchboard_rooms{instance=~\"$instance\"}) / switchboard_roomz".to_owned(),
        "histogram_quantile(0.99, rate(switchboard_media_forward_latency_seconds_bucket[5m]))"
            .to_owned(),
        "rate(switchboard_media_forward_latency_seconds_count[5m]) + switchboard_rooms_bucket"
            .to_owned(),
    ];
    let mut used = BTreeSet::new();
    let unknown = unknown_names("test", &exprs, &families, &mut used);
    let names: Vec<&str> = unknown
        .iter()
        .map(|u| u.split_whitespace().nth(1).expect("name"))
        .collect();
    assert_eq!(names, ["switchboard_roomz", "switchboard_rooms_bucket"]);
    assert_eq!(
        metric_names("up{job=\"switchboard\"} and my_switchboard_x and switchboard_a_b1"),
        ["switchboard_a_b1"]
    );

    let yaml = "groups:\n  - rules:\n      - alert: A\n        expr: up == 0\n      - alert: B\n        expr: |\n          sum(switchboard_x)\n\n          > 1\n        for: 1m\n      - series: 'switchboard_y{a=\"b\"}'\n";
    assert_eq!(
        yaml_values(yaml, "expr"),
        ["up == 0", "sum(switchboard_x)\n\n> 1\n"]
    );
    assert_eq!(yaml_values(yaml, "series"), ["switchboard_y{a=\"b\"}"]);
}

/// The TOML under `switchboard.toml: |` in the ConfigMap.
fn configmap_toml(yaml: &str) -> String {
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != "switchboard.toml: |");
    let key = lines.next().expect("the ConfigMap has switchboard.toml");
    let key_indent = key.len() - key.trim_start().len();
    let mut toml = String::new();
    for line in lines {
        if !line.trim().is_empty() && line.len() - line.trim_start().len() <= key_indent {
            break;
        }
        toml.push_str(line.trim_start());
        toml.push('\n');
    }
    toml
}

/// Loads a TOML config the way `switchboard serve --config` does, with an
/// API key in the environment (`SWITCHBOARD_API_KEY`/`_SECRET`, which beat
/// the file) as every shipped setup provides.
fn load_config(toml: &str) -> Config {
    let keys = ServeOptions {
        api_key: Some("switchboard".into()),
        api_secret: Some("0123456789abcdef0123456789abcdef".into()),
        ..ServeOptions::default()
    };
    Config::resolve(keys.or(file_options(toml)))
        .unwrap_or_else(|e| panic!("config does not resolve: {e}"))
}

/// The options of a TOML config file, as `--config` reads them.
fn file_options(toml: &str) -> ServeOptions {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("switchboard.toml");
    std::fs::write(&path, toml).expect("write the config");
    ServeOptions::from_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// The `value:` of the container env var `name` in a Deployment.
fn k8s_env(yaml: &str, name: &str) -> String {
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != format!("- name: {name}"));
    assert!(lines.next().is_some(), "no env {name}");
    let value = lines.next().map(str::trim).unwrap_or_default();
    value
        .strip_prefix("value: ")
        .unwrap_or_else(|| panic!("env {name}: {value:?} is not a plain value"))
        .to_owned()
}

/// The port of an `ADDR:PORT`.
fn port_of(addr: &str) -> u16 {
    addr.trim_matches('"')
        .parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{addr:?}: {e}"))
        .port()
}

/// The number in `key: N`, `key: "N"` or `Key=Ns` of a text file.
fn number_after(text: &str, key: &str) -> u64 {
    let rest = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} line"));
    rest.trim()
        .trim_matches('"')
        .trim_end_matches('s')
        .parse()
        .unwrap_or_else(|e| panic!("{key} {rest:?}: {e}"))
}

#[test]
fn shipped_configs_load_and_stop_timeouts_outlast_the_drain() {
    // Kubernetes: the ConfigMap's TOML, and the pod's grace period.
    let k8s = load_config(&configmap_toml(&read("k8s/configmap.yaml")));
    assert_eq!(
        k8s.limits.max_rooms, 10_000,
        "alerts.yml assumes max_rooms 10000"
    );
    let grace = Duration::from_secs(number_after(
        &read("k8s/deployment.yaml"),
        "terminationGracePeriodSeconds:",
    ));
    assert!(
        grace > k8s.drain_timeout + k8s.shutdown_grace,
        "terminationGracePeriodSeconds {grace:?} must outlast drain {:?} + grace {:?}",
        k8s.drain_timeout,
        k8s.shutdown_grace
    );

    // systemd: the example /etc/switchboard/switchboard.toml, and TimeoutStopSec.
    // It holds no secret: alone (without switchboard.env) it listens on
    // 0.0.0.0 with no key, which the server refuses.
    let systemd_toml = read("systemd/switchboard.toml");
    assert!(
        Config::resolve(file_options(&systemd_toml)).is_err(),
        "systemd/switchboard.toml without a key must be refused (the key is in switchboard.env)"
    );
    let systemd = load_config(&systemd_toml);
    assert_eq!(
        systemd.limits.max_rooms, 10_000,
        "alerts.yml assumes max_rooms 10000"
    );
    let stop = Duration::from_secs(number_after(
        &read("systemd/switchboard.service"),
        "TimeoutStopSec=",
    ));
    assert!(
        stop > systemd.drain_timeout + systemd.shutdown_grace,
        "TimeoutStopSec {stop:?} must outlast drain {:?} + grace {:?}",
        systemd.drain_timeout,
        systemd.shutdown_grace
    );

    // compose: stop_grace_period against the drain timeout it sets.
    let compose = read("compose.yaml");
    let drain_ms = number_after(&compose, "SWITCHBOARD_DRAIN_TIMEOUT_MS:") as u128;
    let stop = number_after(&compose, "stop_grace_period:") as u128 * 1000;
    assert!(
        stop > drain_ms + 5_000,
        "compose stop_grace_period {stop} ms must outlast the drain ({drain_ms} ms) + 5 s grace"
    );
}

#[tokio::test]
async fn probed_paths_answer() {
    // As deployed: metrics on their own listener.
    let server = common::server(ServeOptions {
        metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
        ..ServeOptions::default()
    })
    .await;
    let deployment = read("k8s/deployment.yaml");
    let paths: Vec<String> = yaml_values(&deployment, "path");
    assert_eq!(paths, ["/healthz", "/readyz"], "liveness, readiness");
    for path in &paths {
        assert_eq!(common::http_get(&server, path).await.0, 200, "{path}");
    }
    assert!(read("Dockerfile").contains("GET /healthz HTTP/1.0"));
    let monitor = yaml_values(&read("k8s/servicemonitor.yaml"), "path");
    assert_eq!(monitor, ["/metrics"]);
    assert_eq!(common::http_get(&server, "/metrics").await.0, 404, "public");
    let ops = server.metrics_addr().expect("a metrics listener");
    assert!(
        raw_get(ops, "/metrics")
            .await
            .contains("switchboard_rooms 0"),
        "/metrics on the metrics listener"
    );
    // /readyz turning 503 on a drain while /healthz holds: tests/drain.rs.
}

/// `GET path` on `addr`; the whole response.
async fn raw_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("read");
    text
}

/// Every setup serves /metrics on a separate listener, port 9091, and
/// scrapes that port; the public Service has no metrics port.
#[test]
fn metrics_are_scraped_from_the_metrics_listener() {
    // compose: Switchboard and Prometheus on the host network.
    let compose = read("compose.yaml");
    let listen = yaml_values(&compose, "SWITCHBOARD_METRICS_LISTEN");
    assert_eq!(listen, ["127.0.0.1:9091"], "compose, local to the host");
    let prometheus = read("prometheus/prometheus.yml");
    let job = prometheus
        .split("- job_name: ")
        .find(|j| j.starts_with("switchboard\n"))
        .expect("a switchboard job");
    assert!(
        job.contains(r#"targets: ["127.0.0.1:9091"]"#),
        "prometheus scrapes the metrics listener:\n{job}"
    );

    // The image's default.
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("SWITCHBOARD_METRICS_LISTEN=0.0.0.0:9091"));
    assert!(dockerfile.contains("EXPOSE 8080/tcp 7882/udp 7882/tcp 9091/tcp"));

    // Kubernetes: the env, the container port named `metrics`, the metrics
    // Service, and the ServiceMonitor on that port only.
    let deployment = read("k8s/deployment.yaml");
    let port = port_of(&k8s_env(&deployment, "SWITCHBOARD_METRICS_LISTEN"));
    assert_eq!(port, 9091);
    assert!(
        deployment.contains(&format!(
            "- name: metrics\n              containerPort: {port}\n"
        )),
        "the container port `metrics` is {port}"
    );
    let services = read("k8s/service.yaml");
    let (public, metrics) = services.split_once("\n---\n").expect("two Services");
    assert!(public.contains("name: switchboard\n") && !public.contains("9091"));
    assert!(!public.contains("component: metrics"));
    assert!(metrics.contains("name: switchboard-metrics\n"));
    assert!(metrics.contains("app.kubernetes.io/component: metrics"));
    assert!(metrics.contains("targetPort: metrics"));
    let monitor = read("k8s/servicemonitor.yaml");
    assert_eq!(yaml_values(&monitor, "port"), ["metrics"]);
    assert_eq!(
        yaml_values(&monitor, "app.kubernetes.io/component"),
        ["metrics"]
    );
    // The job label stays "switchboard" (alerts.yml): from the Service's name label.
    assert_eq!(
        yaml_values(&monitor, "jobLabel"),
        ["app.kubernetes.io/name"]
    );

    // systemd: the shipped TOML.
    let systemd = load_config(&read("systemd/switchboard.toml"));
    assert_eq!(
        systemd.metrics_listen,
        Some("127.0.0.1:9091".parse().expect("addr"))
    );
}

/// API keys come from the environment: compose from .env (whose example
/// holds a placeholder the server refuses), Kubernetes from a Secret, systemd
/// from switchboard.env; none is written into a shipped file.
#[test]
fn api_keys_come_from_secrets() {
    let compose = read("compose.yaml");
    for var in ["SWITCHBOARD_API_KEY", "SWITCHBOARD_API_SECRET"] {
        assert_eq!(
            yaml_values(&compose, var),
            [format!("${{{var}:?set {var} in deploy/.env}}")],
            "compose takes {var} from deploy/.env"
        );
    }
    let env = read(".env.example");
    let secret = env
        .lines()
        .find_map(|l| l.strip_prefix("SWITCHBOARD_API_SECRET="))
        .expect("SWITCHBOARD_API_SECRET in .env.example");
    assert!(
        secret.len() < switchboard::auth::MIN_SECRET_BYTES,
        "the example secret {secret:?} must be a placeholder the server refuses"
    );
    assert!(env.lines().any(|l| l.starts_with("SWITCHBOARD_API_KEY=")));

    let deployment = read("k8s/deployment.yaml");
    for (var, key) in [
        ("SWITCHBOARD_API_KEY", "api-key"),
        ("SWITCHBOARD_API_SECRET", "api-secret"),
    ] {
        let from = deployment
            .split(&format!("- name: {var}\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no env {var} in the Deployment"));
        let from: String = from.lines().take(4).collect::<Vec<_>>().join("\n");
        assert!(
            from.contains("secretKeyRef:")
                && from.contains("name: switchboard-keys")
                && from.contains(&format!("key: {key}")),
            "{var} from the switchboard-keys Secret:\n{from}"
        );
    }

    for file in ["systemd/switchboard.toml", "k8s/configmap.yaml"] {
        let text = read(file);
        assert!(
            !text
                .lines()
                .any(|l| l.trim_start().starts_with("api_secret")),
            "{file} must not hold api_secret"
        );
    }
}
