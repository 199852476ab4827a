//! The deployment files in `deploy/` against the real server: every metric
//! the Grafana dashboard and the Prometheus alerts (and their unit tests)
//! name is one the server exposes, every series the dashboard and the
//! alerts select has a sample on a fresh server's first scrape (no "No
//! data" panel), the shipped TOML configs load with the
//! server's own config loader, the probed HTTP paths answer, the stop
//! timeouts outlast the drain, metrics are scraped from the
//! `--metrics-listen` port (not the public one), and API keys come from the
//! environment or a Secret; the cluster setups (compose.cluster.yaml,
//! Kubernetes) give each node its own id and ports and one Redis. (`.ci/run`
//! runs the external validators:
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
    selectors(expr).into_iter().map(|s| s.name).collect()
}

/// A series selector: `name` or `name{label op "value", ...}`.
#[derive(Debug)]
struct Selector {
    name: String,
    /// `(label, op, value)`, the value unquoted and unescaped.
    matchers: Vec<(String, String, String)>,
    /// As written in the expression.
    text: String,
}

/// Every selector of a `switchboard_*` metric in a PromQL expression.
fn selectors(expr: &str) -> Vec<Selector> {
    const PREFIX: &str = "switchboard_";
    let bytes = expr.as_bytes();
    let mut found = Vec::new();
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
        let name_end = end;
        let mut matchers = Vec::new();
        if bytes.get(end) == Some(&b'{') {
            let close = closing_brace(expr, end)
                .unwrap_or_else(|| panic!("unclosed {{ after {} in {expr}", &expr[start..end]));
            matchers = label_matchers(&expr[end + 1..close]);
            end = close + 1;
        }
        if boundary && name_end > start + PREFIX.len() {
            found.push(Selector {
                name: expr[start..name_end].to_owned(),
                matchers,
                text: expr[start..end].to_owned(),
            });
        }
        i = end;
    }
    found
}

/// The index of the `}` closing the `{` at `open`, past quoted strings.
fn closing_brace(text: &str, open: usize) -> Option<usize> {
    let mut quote = None;
    let mut escaped = false;
    for (i, c) in text[open..].char_indices() {
        match (quote, c) {
            (Some(_), _) if escaped => escaped = false,
            (Some(_), '\\') => escaped = true,
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '}') => return Some(open + i),
            (None, _) => {}
        }
    }
    None
}

/// The `label op "value"` items between a selector's braces (also the
/// labels of an exposition sample, all `=`), values unquoted and unescaped.
fn label_matchers(body: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut rest = body.trim_start();
    while !rest.is_empty() {
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = rest[..name_len].to_owned();
        rest = rest[name_len..].trim_start();
        let op = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| rest.starts_with(op))
            .unwrap_or_else(|| panic!("no matcher operator after {name:?} in {{{body}}}"));
        rest = rest[op.len()..].trim_start();
        let quote = rest
            .chars()
            .next()
            .filter(|c| *c == '"' || *c == '\'')
            .unwrap_or_else(|| panic!("unquoted value of {name:?} in {{{body}}}"));
        let mut value = String::new();
        let mut end = None;
        let mut chars = rest.char_indices().skip(1);
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, e)) => value.push(e),
                    None => {}
                },
                c if c == quote => {
                    end = Some(i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.unwrap_or_else(|| panic!("unterminated value of {name:?} in {{{body}}}"));
        out.push((name, op.to_owned(), value));
        rest = rest[end..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    out
}

/// Whether `value` matches a PromQL regex (anchored at both ends) made of
/// literal alternatives, e.g. `51-100|101\+`. Any other regex syntax
/// panics: extend this rather than let a selector pass unchecked.
fn regex_matches(pattern: &str, value: &str) -> bool {
    let mut alternatives = vec![String::new()];
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let e = chars
                    .next()
                    .unwrap_or_else(|| panic!("regex {pattern:?} ends in a backslash"));
                assert!(
                    !e.is_ascii_alphanumeric(),
                    "regex {pattern:?}: \\{e} is a class, not a literal; extend regex_matches"
                );
                alternatives.last_mut().expect("one").push(e);
            }
            '|' => alternatives.push(String::new()),
            '.' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '^' | '$' => {
                panic!("regex {pattern:?} is more than literal alternatives; extend regex_matches")
            }
            c => alternatives.last_mut().expect("one").push(c),
        }
    }
    alternatives.iter().any(|a| a == value)
}

/// The samples of a Prometheus text exposition: name and labels.
fn exposed_samples(text: &str) -> Vec<(String, BTreeMap<String, String>)> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let series = match line.rfind('}') {
                Some(close) => &line[..=close],
                None => line.split_whitespace().next().unwrap_or_default(),
            };
            match series.split_once('{') {
                None => (series.to_owned(), BTreeMap::new()),
                Some((name, labels)) => {
                    let labels = label_matchers(labels.strip_suffix('}').unwrap_or(labels))
                        .into_iter()
                        .map(|(label, op, value)| {
                            assert_eq!(op, "=", "exposition label {label} in {line}");
                            (label, value)
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
            }
        })
        .collect()
}

/// Labels Prometheus adds to every series of a target (the dashboard's
/// `$job` and `$instance` variables select on them): not in the exposition.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

/// Whether one sample has `selector`'s name and satisfies its matchers
/// (`=`/`!=` on the value, absent labels being "", `=~`/`!~` anchored).
fn selects(selector: &Selector, name: &str, labels: &BTreeMap<String, String>) -> bool {
    selector.name == name
        && selector.matchers.iter().all(|(label, op, want)| {
            if TARGET_LABELS.contains(&label.as_str()) {
                return true;
            }
            let have = labels.get(label).map(String::as_str).unwrap_or("");
            match op.as_str() {
                "=" => have == want,
                "!=" => have != want,
                "=~" => regex_matches(want, have),
                "!~" => !regex_matches(want, have),
                other => unreachable!("operator {other}"),
            }
        })
}

/// `(selector, expression)` for every selector in `exprs` that no sample
/// satisfies; `checked` counts the selectors looked at.
fn unselected(
    exprs: &[String],
    samples: &[(String, BTreeMap<String, String>)],
    checked: &mut usize,
) -> Vec<(String, String)> {
    let mut missing = Vec::new();
    for expr in exprs {
        for selector in selectors(expr) {
            *checked += 1;
            if !samples
                .iter()
                .any(|(name, labels)| selects(&selector, name, labels))
            {
                missing.push((selector.text, expr.trim().to_owned()));
            }
        }
    }
    missing
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

/// The PromQL of the dashboard (panel queries and variables) and of the
/// alerts.
fn dashboard_and_alert_exprs() -> (Vec<String>, Vec<String>) {
    let dashboard: Value =
        serde_json::from_str(&read("grafana/switchboard.json")).expect("dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, None, &mut queries);
    (queries, yaml_values(&read("prometheus/alerts.yml"), "expr"))
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_exposed_metrics() {
    let server = common::server(ServeOptions::default()).await;
    // The first scrape: every family exists from the start (see
    // a_fresh_server_has_a_sample_for_every_selector below).
    let families = exposed_families(&common::metrics(&server).await);
    assert!(
        families.len() >= 20,
        "suspiciously few metric families exposed: {families:?}"
    );

    let mut unknown = Vec::new();

    let (queries, alerts) = dashboard_and_alert_exprs();
    let mut in_dashboard = BTreeSet::new();
    unknown.extend(unknown_names(
        "deploy/grafana/switchboard.json",
        &queries,
        &families,
        &mut in_dashboard,
    ));

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

/// A fresh server, on its first scrape before any client or packet, has a
/// sample for every series the dashboard and the alerts select: labelled
/// families start with every known label value, so no panel says "No data"
/// and no alert expression is empty until something happens.
#[tokio::test]
async fn a_fresh_server_has_a_sample_for_every_selector() {
    let server = common::server(ServeOptions::default()).await;
    let text = common::metrics(&server).await;
    let samples = exposed_samples(&text);
    let (queries, alerts) = dashboard_and_alert_exprs();
    let mut checked = 0;
    let mut missing = Vec::new();
    for (file, exprs) in [
        ("deploy/grafana/switchboard.json", &queries),
        ("deploy/prometheus/alerts.yml", &alerts),
    ] {
        for (selector, expr) in unselected(exprs, &samples, &mut checked) {
            missing.push(format!("{file}: {selector}   (in: {expr})"));
        }
    }
    assert!(
        missing.is_empty(),
        "series with no sample on a fresh server (\"No data\"):\n  {}",
        missing.join("\n  ")
    );
    assert!(
        checked >= 60,
        "only {checked} selectors found in the dashboard and the alerts"
    );
    // Labelled counters nothing has touched yet, and cluster mode's
    // families on a single-node server.
    for sample in [
        "switchboard_media_dropped_total{reason=\"unknown-peer\"} 0",
        "switchboard_media_dropped_total{reason=\"unclassified\"} 0",
        "switchboard_rooms_by_participants{participants=\"101+\"} 0",
        "switchboard_resumes_total{result=\"expired\"} 0",
        "switchboard_media_connection_transitions_total{to=\"failed\"} 0",
        "switchboard_cluster_redis_up 0",
        "switchboard_cluster_nodes_live 0",
        "switchboard_cluster_placements_total{outcome=\"unavailable\"} 0",
        "switchboard_cluster_redis_seconds_count{op=\"keepalive\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == sample),
            "no `{sample}` on the first scrape"
        );
    }
}

#[test]
fn the_series_check_catches_missing_label_values() {
    let samples = exposed_samples(
        "# TYPE switchboard_a counter\n\
         switchboard_a{reason=\"x\",kind=\"k, \\\"1\\\"\"} 0\n\
         switchboard_b 3\n\
         switchboard_h_bucket{op=\"place\",le=\"+Inf\"} 0\n",
    );
    assert_eq!(samples.len(), 3);
    assert_eq!(samples[0].1["kind"], "k, \"1\"");
    let exprs: Vec<String> = [
        // Present: target labels are not checked, the rest are.
        "sum(rate(switchboard_a{instance=~\"$instance\", reason=\"x\"}[5m]))",
        "switchboard_a{reason=~\"y|x\"} + switchboard_b + switchboard_a{reason!=\"y\"}",
        "histogram_quantile(0.99, sum by (le) (rate(switchboard_h_bucket{op=\"place\"}[1m])))",
        "switchboard_a{kind=\"k, \\\"1\\\"\"}",
        // Missing.
        "switchboard_a{reason=\"y\"}",
        "switchboard_c",
        "switchboard_a{reason=~\"z|x\\\\+\"}",
        "switchboard_a{reason!=\"x\"}",
        "switchboard_h_bucket{op=\"claim\"}",
        "switchboard_h_count",
    ]
    .map(str::to_owned)
    .into();
    let mut checked = 0;
    let missing: Vec<String> = unselected(&exprs, &samples, &mut checked)
        .into_iter()
        .map(|(selector, _)| selector)
        .collect();
    assert_eq!(checked, 12);
    assert_eq!(
        missing,
        [
            "switchboard_a{reason=\"y\"}",
            "switchboard_c",
            "switchboard_a{reason=~\"z|x\\\\+\"}",
            "switchboard_a{reason!=\"x\"}",
            "switchboard_h_bucket{op=\"claim\"}",
            "switchboard_h_count",
        ]
    );
    assert!(regex_matches("51-100|101\\+", "101+"));
    assert!(!regex_matches("51-100|101\\+", "101"));
    assert!(!regex_matches("51-100|101\\+", "51-1000"));
    // A regex it cannot evaluate fails the check instead of passing it.
    assert!(std::panic::catch_unwind(|| regex_matches("1.*", "10")).is_err());
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

/// The `value:` of the container env var `name` in a pod template.
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

/// The next 4 lines after the env var `name` of a pod template (where its
/// `valueFrom` is).
fn k8s_env_from(yaml: &str, name: &str) -> String {
    let from = yaml
        .split(&format!("- name: {name}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("no env {name}"));
    from.lines().take(4).collect::<Vec<_>>().join("\n")
}

/// The object of `kind` named `name` in a multi-document manifest.
fn k8s_object<'a>(yaml: &'a str, kind: &str, name: &str) -> &'a str {
    yaml.split("\n---\n")
        .find(|doc| {
            doc.contains(&format!("\nkind: {kind}\n"))
                && doc.contains(&format!("\nmetadata:\n  name: {name}\n"))
        })
        .unwrap_or_else(|| panic!("no {kind} named {name}"))
}

/// The lines of service `name` in a compose file (up to the next service).
fn compose_service(yaml: &str, name: &str) -> String {
    let mut lines = yaml
        .lines()
        .skip_while(|l| *l != format!("  {name}:"))
        .skip(1)
        .peekable();
    assert!(lines.peek().is_some(), "no service {name}");
    lines
        .take_while(|l| l.trim().is_empty() || l.starts_with("    "))
        .map(|l| format!("{l}\n"))
        .collect()
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
        &read("k8s/statefulset.yaml"),
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

    // compose, one node and the cluster: stop_grace_period against the
    // drain timeout it sets (each once: the cluster's nodes share both).
    for file in ["compose.yaml", "compose.cluster.yaml"] {
        let compose = read(file);
        for key in ["SWITCHBOARD_DRAIN_TIMEOUT_MS:", "stop_grace_period:"] {
            let n = compose
                .lines()
                .filter(|l| l.trim().starts_with(key))
                .count();
            assert_eq!(n, 1, "{file}: {key} once");
        }
        let drain_ms = number_after(&compose, "SWITCHBOARD_DRAIN_TIMEOUT_MS:") as u128;
        let stop = number_after(&compose, "stop_grace_period:") as u128 * 1000;
        assert!(
            stop > drain_ms + 5_000,
            "{file} stop_grace_period {stop} ms must outlast the drain ({drain_ms} ms) + 5 s grace"
        );
    }
}

#[tokio::test]
async fn probed_paths_answer() {
    // As deployed: metrics on their own listener.
    let server = common::server(ServeOptions {
        metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
        ..ServeOptions::default()
    })
    .await;
    let statefulset = read("k8s/statefulset.yaml");
    let paths: Vec<String> = yaml_values(&statefulset, "path");
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

    // compose, the cluster on one host: each node its own local metrics
    // port, every one scraped by prometheus.cluster.yml.
    let cluster = read("compose.cluster.yaml");
    assert!(cluster
        .contains("- ./prometheus/prometheus.cluster.yml:/etc/prometheus/prometheus.yml:ro\n"));
    let prometheus = read("prometheus/prometheus.cluster.yml");
    let job = prometheus
        .split("- job_name: ")
        .find(|j| j.starts_with("switchboard\n"))
        .expect("a switchboard job in prometheus.cluster.yml");
    for (node, want) in [("switchboard-a", 9091), ("switchboard-b", 9092)] {
        let listen = yaml_values(
            &compose_service(&cluster, node),
            "SWITCHBOARD_METRICS_LISTEN",
        );
        assert_eq!(
            listen,
            [format!("127.0.0.1:{want}")],
            "{node}, local to the host"
        );
        assert!(
            job.contains(&format!("\"127.0.0.1:{want}\"")),
            "prometheus.cluster.yml scrapes {node} at 127.0.0.1:{want}:\n{job}"
        );
    }

    // The image's default.
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("SWITCHBOARD_METRICS_LISTEN=0.0.0.0:9091"));
    assert!(dockerfile.contains("EXPOSE 8080/tcp 7882/udp 7882/tcp 9091/tcp"));

    // Kubernetes: the env, the container port named `metrics`, the metrics
    // Service, and the ServiceMonitor on that port only.
    let statefulset = read("k8s/statefulset.yaml");
    let port = port_of(&k8s_env(&statefulset, "SWITCHBOARD_METRICS_LISTEN"));
    assert_eq!(port, 9091);
    assert!(
        statefulset.contains(&format!(
            "- name: metrics\n              containerPort: {port}\n"
        )),
        "the container port `metrics` is {port}"
    );
    let services = read("k8s/service.yaml");
    let public = k8s_object(&services, "Service", "switchboard");
    assert!(!public.contains("9091"));
    assert!(!public.contains("component: metrics"));
    let nodes = k8s_object(&services, "Service", "switchboard-nodes");
    assert!(!nodes.contains("9091") && !nodes.contains("component: metrics"));
    let metrics = k8s_object(&services, "Service", "switchboard-metrics");
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
    for file in ["compose.yaml", "compose.cluster.yaml"] {
        let compose = read(file);
        for var in ["SWITCHBOARD_API_KEY", "SWITCHBOARD_API_SECRET"] {
            assert_eq!(
                yaml_values(&compose, var),
                [format!("${{{var}:?set {var} in deploy/.env}}")],
                "{file} takes {var} from deploy/.env"
            );
        }
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

    let statefulset = read("k8s/statefulset.yaml");
    for (var, key) in [
        ("SWITCHBOARD_API_KEY", "api-key"),
        ("SWITCHBOARD_API_SECRET", "api-secret"),
    ] {
        let from = statefulset
            .split(&format!("- name: {var}\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no env {var} in the StatefulSet"));
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

/// Cluster mode with `redis_url` and `node_id`, through the server's own
/// config loader (with an API key, as every shipped setup has).
fn cluster_config(redis_url: &str, node_id: &str) {
    let options = ServeOptions {
        redis_url: Some(redis_url.into()),
        node_id: Some(node_id.into()),
        api_key: Some("switchboard".into()),
        api_secret: Some("0123456789abcdef0123456789abcdef".into()),
        ..ServeOptions::default()
    };
    let config = Config::resolve(options)
        .unwrap_or_else(|e| panic!("{redis_url} and node id {node_id:?} refused: {e}"));
    let cluster = config.cluster.expect("cluster mode");
    assert_eq!(
        (cluster.redis_url.as_str(), cluster.node_id.as_str()),
        (redis_url, node_id)
    );
}

/// Cluster mode as shipped: compose runs two nodes on one host with their
/// own id and ports and one local Redis; Kubernetes runs a StatefulSet whose
/// pods take their id from their name and find Redis at the Service
/// redis.yaml defines.
#[test]
fn cluster_setups_give_each_node_its_own_id_and_ports_and_one_redis() {
    let compose = read("compose.cluster.yaml");
    let redis = compose_service(&compose, "redis");
    assert!(redis.contains("image: redis:7\n") && redis.contains("network_mode: host\n"));
    assert!(
        redis.contains("- --bind\n      - 127.0.0.1\n"),
        "Redis on loopback only:\n{redis}"
    );
    // Shared by both nodes (merged into each one's environment).
    assert_eq!(
        yaml_values(&compose, "SWITCHBOARD_REDIS_URL"),
        ["redis://127.0.0.1:6379"]
    );
    let mut seen = BTreeSet::new();
    for (node, listen, rtc, metrics) in [
        ("switchboard-a", 8080, 7882, 9091),
        ("switchboard-b", 8081, 7883, 9092),
    ] {
        let service = compose_service(&compose, node);
        assert!(
            service.contains("  <<: *switchboard\n") && service.contains("<<: *switchboard-env\n"),
            "{node} takes the shared settings:\n{service}"
        );
        let id = yaml_values(&service, "SWITCHBOARD_NODE_ID");
        assert_eq!(id.len(), 1, "{node} has a node id");
        assert!(seen.insert(id[0].clone()), "{node}: node id {id:?} reused");
        cluster_config("redis://127.0.0.1:6379", &id[0]);
        let listen_at = yaml_values(&service, "SWITCHBOARD_LISTEN");
        assert_eq!(listen_at, [format!("0.0.0.0:{listen}")], "{node}");
        let rtc_port = yaml_values(&service, "SWITCHBOARD_RTC_PORT");
        assert_eq!(rtc_port, [rtc.to_string()], "{node}");
        let metrics_at = yaml_values(&service, "SWITCHBOARD_METRICS_LISTEN");
        assert_eq!(metrics_at, [format!("127.0.0.1:{metrics}")], "{node}");
    }

    // Kubernetes.
    let kustomization = read("k8s/kustomization.yaml");
    let resources: Vec<&str> = kustomization
        .lines()
        .skip_while(|l| *l != "resources:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.trim().strip_prefix("- "))
        .collect();
    for file in ["redis.yaml", "statefulset.yaml", "service.yaml"] {
        assert!(resources.contains(&file), "{file} in {resources:?}");
    }
    for file in &resources {
        assert!(
            deploy_file(&format!("k8s/{file}")).exists(),
            "kustomization.yaml lists k8s/{file}, which does not exist"
        );
    }
    let statefulset = read("k8s/statefulset.yaml");
    assert!(statefulset.contains("\nkind: StatefulSet\n"));
    assert!(statefulset.contains("\n      hostNetwork: true\n"));
    assert!(statefulset.contains("\n  serviceName: switchboard-nodes\n"));
    let services = read("k8s/service.yaml");
    let headless = k8s_object(&services, "Service", "switchboard-nodes");
    assert!(headless.contains("\n  clusterIP: None\n"), "{headless}");
    for (var, field) in [
        ("SWITCHBOARD_NODE_ID", "metadata.name"),
        ("SWITCHBOARD_PUBLIC_IP", "status.hostIP"),
    ] {
        let from = k8s_env_from(&statefulset, var);
        assert!(
            from.contains("fieldRef:") && from.contains(&format!("fieldPath: {field}")),
            "{var} from {field}:\n{from}"
        );
    }
    let url = k8s_env(&statefulset, "SWITCHBOARD_REDIS_URL");
    // Pods are named <StatefulSet>-<ordinal>.
    cluster_config(&url, "switchboard-0");
    let (host, port) = url
        .strip_prefix("redis://")
        .and_then(|a| a.split_once(':'))
        .unwrap_or_else(|| panic!("SWITCHBOARD_REDIS_URL {url:?} is not redis://HOST:PORT"));
    let redis = read("k8s/redis.yaml");
    let service = k8s_object(&redis, "Service", host);
    assert!(
        service.contains(&format!("\n      port: {port}\n")),
        "Service {host} listens on {port}:\n{service}"
    );
    let deployment = k8s_object(&redis, "Deployment", host);
    assert!(deployment.contains(&format!("containerPort: {port}\n")));
}
