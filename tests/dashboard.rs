//! The Grafana dashboard (deploy/grafana/keybroker.json) against the real exposition: every
//! metric, label and label value its PromQL names must exist in a /metrics scrape of a real
//! server after a small workload; its structure must be importable (unique panel ids, data source
//! variable, grid positions); and every query must run on a real Prometheus (the Debian
//! `prometheus` package that scripts/test-setup installs for promtool) scraping a real server,
//! and return data.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use keybroker::proto::{
    DecryptRequest, EncryptRequest, GenerateDataKeyRequest, ListKeysRequest, ReEncryptRequest,
};
use serde_json::Value;

use crate::support::{TestServer, http_get};

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/keybroker.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Every panel, rows' nested panels included.
fn all_panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// One PromQL query of the dashboard: where it is, and the text.
struct Query {
    at: String,
    expr: String,
}

/// Every `expr` of every panel target, and every query variable's query.
fn queries(d: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for p in all_panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                at: format!(
                    "panel {} {:?} target {}",
                    p["id"],
                    p["title"].as_str().unwrap_or(""),
                    t["refId"].as_str().unwrap_or("?")
                ),
                expr: t["expr"].as_str().unwrap_or("").to_owned(),
            });
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or_else(|| v["query"].as_str())
                .unwrap_or("");
            out.push(Query {
                at: format!("variable {}", v["name"]),
                expr: q.to_owned(),
            });
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A small PromQL lexer: enough to find metric names, label matchers, grouping labels and
// Grafana variables. String literals are skipped as units, so `"$caller"` is a value, not a
// variable reference outside a string.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Var(String),
    Num,
    Op(String),
}

fn lex(expr: &str) -> Vec<Tok> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '\'' || c == '`' {
            let mut s = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                if let Some(&ch) = chars.get(i) {
                    s.push(ch);
                }
                i += 1;
            }
            i += 1;
            out.push(Tok::Str(s));
        } else if c == '$' {
            i += 1;
            let braced = chars.get(i) == Some(&'{');
            if braced {
                i += 1;
            }
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Tok::Var(chars[start..i].iter().collect()));
            if braced {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || c == '.' {
            // Numbers and durations (5m, 0.99).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            out.push(Tok::Num);
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            if ["=~", "!~", "!=", "==", ">=", "<="].contains(&two.as_str()) {
                out.push(Tok::Op(two));
                i += 2;
            } else {
                out.push(Tok::Op(c.to_string()));
                i += 1;
            }
        }
    }
    out
}

/// What one query references.
#[derive(Debug, Default)]
struct Refs {
    metrics: BTreeSet<String>,
    /// (metric, label, operator, value)
    matchers: Vec<(String, String, String, String)>,
    /// Labels in by/without/on/ignoring/group_left/group_right clauses.
    grouping: BTreeSet<String>,
    /// label_values(metric, label)
    label_values: Vec<(String, String)>,
    variables: BTreeSet<String>,
}

fn is_metric(name: &str) -> bool {
    name.starts_with("keybroker_") || name.starts_with("process_")
}

fn refs(expr: &str) -> Refs {
    let toks = lex(expr);
    let mut r = Refs::default();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Var(v) => {
                r.variables.insert(v.clone());
            }
            Tok::Str(s) => {
                // Variables inside strings ("$caller") are interpolated by Grafana too.
                for part in s.split('$').skip(1) {
                    let name: String = part
                        .trim_start_matches('{')
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    r.variables.insert(name);
                }
            }
            Tok::Ident(name) if is_metric(name) => {
                r.metrics.insert(name.clone());
                if toks.get(i + 1) == Some(&Tok::Op("{".into())) {
                    let mut j = i + 2;
                    while j < toks.len() && toks[j] != Tok::Op("}".into()) {
                        if let (Tok::Ident(label), Some(Tok::Op(op)), Some(Tok::Str(value))) =
                            (&toks[j], toks.get(j + 1), toks.get(j + 2))
                        {
                            r.matchers.push((
                                name.clone(),
                                label.clone(),
                                op.clone(),
                                value.clone(),
                            ));
                            for part in value.split('$').skip(1) {
                                r.variables.insert(
                                    part.chars()
                                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                                        .collect(),
                                );
                            }
                            j += 3;
                        } else {
                            j += 1;
                        }
                    }
                    i = j;
                }
            }
            Tok::Ident(kw)
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&kw.as_str())
                    && toks.get(i + 1) == Some(&Tok::Op("(".into())) =>
            {
                let mut j = i + 2;
                while let Some(Tok::Ident(l)) | Some(Tok::Op(l)) = toks.get(j) {
                    if l == ")" {
                        break;
                    }
                    if l != "," {
                        r.grouping.insert(l.clone());
                    }
                    j += 1;
                }
                i = j;
            }
            Tok::Ident(f) if f == "label_values" => {
                // label_values(metric{...}, label) or label_values(label)
                let args: Vec<&String> = toks[i + 1..]
                    .iter()
                    .take_while(|t| **t != Tok::Op(")".into()))
                    .filter_map(|t| match t {
                        Tok::Ident(s) => Some(s),
                        _ => None,
                    })
                    .collect();
                if let (Some(m), Some(l)) = (args.first(), args.last())
                    && is_metric(m)
                {
                    r.label_values.push(((*m).clone(), (*l).clone()));
                }
            }
            _ => {}
        }
        i += 1;
    }
    r
}

// ---------------------------------------------------------------------------------------------
// The exposition: sample name -> label -> values.

type Exposition = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn parse_exposition(text: &str) -> Exposition {
    let mut out: Exposition = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let entry = out.entry(line[..name_end].to_owned()).or_default();
        if line[name_end..].starts_with('{') {
            let mut rest = &line[name_end + 1..];
            while let Some((label, after)) = rest.split_once("=\"") {
                let label = label.trim_start_matches(',').trim();
                let mut value = String::new();
                let mut chars = after.char_indices();
                let mut end = after.len();
                while let Some((k, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => {
                            end = k + 1;
                            break;
                        }
                        _ => value.push(c),
                    }
                }
                entry.entry(label.to_owned()).or_default().insert(value);
                rest = &after[end..];
                if rest.starts_with('}') {
                    break;
                }
            }
        }
    }
    out
}

/// A server with one local key after a workload touching every operation, a cache miss and
/// hits on both sides, a backend call and a failed request. Returns the server and its admin
/// address.
async fn server_with_workload() -> (TestServer, String) {
    let s = TestServer::local("").await;
    workload(&s).await;
    let admin = s.running.as_ref().unwrap().admin_addr.unwrap().to_string();
    (s, admin)
}

async fn workload(s: &TestServer) {
    let mut c = s.client().await;
    let mut ct = None;
    for i in 0..5 {
        let out = c
            .encrypt(EncryptRequest {
                key: "default".into(),
                plaintext: vec![b'x'; 10 * (i + 1)].into(),
                context: BTreeMap::new(),
            })
            .await
            .unwrap()
            .into_inner();
        ct = Some(out.ciphertext);
    }
    let ct = ct.unwrap();
    for _ in 0..3 {
        c.decrypt(DecryptRequest {
            ciphertext: ct.clone(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap();
    }
    for _ in 0..2 {
        c.generate_data_key(GenerateDataKeyRequest {
            key: "default".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    c.re_encrypt(ReEncryptRequest {
        ciphertext: ct,
        destination_key: "default".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.list_keys(ListKeysRequest {}).await.unwrap();
    let bad = c
        .decrypt(DecryptRequest {
            ciphertext: b"not a ciphertext".to_vec().into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}

/// Labels Prometheus attaches to every scraped series (not in the exposition).
const TARGET_LABELS: [&str; 2] = ["job", "instance"];
/// Grafana's built-in variables the dashboard may use.
const GRAFANA_VARIABLES: [&str; 3] = ["__rate_interval", "__range", "__interval"];

#[tokio::test]
async fn dashboard_queries_name_only_what_the_server_exports() {
    let (s, admin) = server_with_workload().await;
    let (status, body) = http_get(&admin, "/metrics").await;
    assert_eq!(status, 200);
    let exposition = parse_exposition(&body);
    assert!(
        exposition.contains_key("keybroker_requests_total"),
        "{body}"
    );
    let d = dashboard();
    let defined: BTreeSet<String> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .chain(GRAFANA_VARIABLES.iter().map(|v| v.to_string()))
        .collect();

    let mut problems = Vec::new();
    let mut seen_metrics = BTreeSet::new();
    let qs = queries(&d);
    assert!(qs.len() >= 30, "{} queries", qs.len());
    for q in &qs {
        let r = refs(&q.expr);
        if r.metrics.is_empty() {
            problems.push(format!("{}: no keybroker metric in {:?}", q.at, q.expr));
        }
        let labels_of = |m: &str| exposition.get(m);
        let mut available: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
        for m in &r.metrics {
            seen_metrics.insert(m.clone());
            match labels_of(m) {
                Some(labels) => available.extend(labels.keys().map(String::as_str)),
                None => problems.push(format!("{}: {m} is not in the exposition", q.at)),
            }
        }
        for (m, label, op, value) in &r.matchers {
            let Some(labels) = labels_of(m) else { continue };
            match labels.get(label) {
                None => problems.push(format!("{}: {m} has no label {label:?}", q.at)),
                Some(values) => {
                    let literal = (op == "=" || op == "!=") && !value.contains('$');
                    if literal && !values.contains(value) {
                        problems.push(format!(
                            "{}: {m}{{{label}{op}{value:?}}}: no such value (have {values:?})",
                            q.at
                        ));
                    }
                }
            }
        }
        for g in &r.grouping {
            if !available.contains(g.as_str()) {
                problems.push(format!(
                    "{}: groups by {g:?}, which none of {:?} has",
                    q.at, r.metrics
                ));
            }
        }
        for (m, label) in &r.label_values {
            if labels_of(m).is_none_or(|l| !l.contains_key(label)) {
                problems.push(format!(
                    "{}: label_values({m}, {label}): no such label",
                    q.at
                ));
            }
        }
        for v in &r.variables {
            if !defined.contains(v) {
                problems.push(format!("{}: ${v} is not defined", q.at));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The panels the issue asks for draw on these families.
    for m in [
        "keybroker_requests_total",
        "keybroker_request_duration_seconds_bucket",
        "keybroker_cache_lookups_total",
        "keybroker_backend_calls_total",
        "keybroker_backend_call_duration_seconds_bucket",
        "keybroker_cost_usd_total",
        "keybroker_cost_avoided_usd_total",
        "keybroker_audit_writer_healthy",
        "keybroker_audit_records_dropped_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(seen_metrics.contains(m), "no panel uses {m}");
    }
    s.stop().await;
}

#[test]
fn the_checker_catches_typos() {
    // The lexer and the reference extraction the test above relies on, on known inputs.
    let r = refs(
        r#"histogram_quantile(0.99, sum by (le, operation) (rate(keybroker_request_duration_seconds_bucket{caller=~"$caller", result="hit"}[$__rate_interval]))) and on (job, instance) process_open_fds"#,
    );
    assert_eq!(
        r.metrics,
        BTreeSet::from([
            "keybroker_request_duration_seconds_bucket".to_owned(),
            "process_open_fds".to_owned()
        ])
    );
    assert_eq!(
        r.grouping,
        BTreeSet::from(["le", "operation", "job", "instance"].map(String::from))
    );
    assert_eq!(r.matchers.len(), 2);
    assert_eq!(r.matchers[1].1, "result");
    assert_eq!(r.matchers[1].3, "hit");
    assert_eq!(
        r.variables,
        BTreeSet::from(["caller".to_owned(), "__rate_interval".to_owned()])
    );
    let r = refs(r#"label_values(keybroker_requests_total{caller=~"$caller"}, key)"#);
    assert_eq!(
        r.label_values,
        [("keybroker_requests_total".to_owned(), "key".to_owned())]
    );
    let e = parse_exposition("# TYPE a counter\na_total{x=\"1\",y=\"a,\\\"b\"} 3\nb 1\n");
    assert_eq!(e["a_total"]["y"], BTreeSet::from(["a,\"b".to_owned()]));
    assert!(e["b"].is_empty());
}

#[test]
fn dashboard_is_importable() {
    let d = dashboard();
    // What Grafana's import reads.
    assert_eq!(d["title"], "keybroker");
    let uid = d["uid"].as_str().unwrap();
    assert!(
        !uid.is_empty()
            && uid.len() <= 40
            && uid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{uid}"
    );
    assert!(
        d["id"].is_null(),
        "an exported dashboard carries no database id"
    );
    let schema = d["schemaVersion"].as_u64().unwrap();
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(d["time"]["from"].is_string() && d["time"]["to"].is_string());

    // The data source is a variable, so the dashboard imports into any Grafana.
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for (name, label) in [("caller", "caller"), ("key", "key")] {
        let v = var(name);
        assert_eq!(v["type"], "query");
        assert_eq!(v["datasource"]["uid"], "${datasource}");
        let q = v["query"]["query"].as_str().unwrap();
        assert!(
            q.starts_with("label_values(") && q.ends_with(&format!(", {label})")),
            "{q}"
        );
        assert_eq!(v["includeAll"], true);
        assert_eq!(v["multi"], true);
        assert_eq!(v["allValue"], ".*");
    }

    // Panels: unique ids, a known type, a title, a grid position inside 24 columns, no two
    // overlapping; every query panel on the data source variable with uniquely named targets.
    let panels = all_panels(&d);
    let mut ids = BTreeSet::new();
    let mut rects = Vec::new();
    for p in &panels {
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel without id: {p}"));
        assert!(ids.insert(id), "panel id {id} is used twice");
        let kind = p["type"].as_str().unwrap();
        assert!(
            ["row", "timeseries", "stat"].contains(&kind),
            "panel {id}: type {kind}"
        );
        assert!(!p["title"].as_str().unwrap().is_empty(), "panel {id}");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(w > 0 && h > 0 && x + w <= 24, "panel {id}: {g}");
        for (other, (ox, oy, ow, oh)) in &rects {
            let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
            assert!(!overlap, "panels {id} and {other} overlap");
        }
        rects.push((id, (x, y, w, h)));
        if kind == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {id}");
        assert_eq!(p["datasource"]["type"], "prometheus", "panel {id}");
        assert!(
            !p["description"].as_str().unwrap_or("").is_empty(),
            "panel {id}"
        );
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {id} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(refs.insert(t["refId"].as_str().unwrap()), "panel {id}");
            assert!(!t["expr"].as_str().unwrap().is_empty(), "panel {id}");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {id}");
        }
    }
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Requests/s by caller",
        "Requests/s by key",
        "Requests/s by gRPC code",
        "Latency p50 / p99 by operation",
        "Cache hit ratio",
        "Backend calls/s and calls avoided",
        "Spent vs saved (USD per hour)",
        "Spent vs saved, cumulative (USD)",
        "Backend latency p50 / p99",
        "Backend errors/s by outcome",
        "Audit records dropped/s",
        "Memory",
        "CPU",
    ] {
        assert!(titles.contains(&want), "no panel {want:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// A real Prometheus evaluates every query.

/// A child process that cannot outlive a failing test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query through Prometheus' HTTP API: the whole JSON answer.
async fn prom_query(prom: &str, expr: &str) -> Value {
    let (status, body) = http_get(prom, &format!("/api/v1/query?query={}", url_encode(expr))).await;
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("HTTP {status} from Prometheus for {expr:?}: {e}: {body}"))
}

/// The newest scrape time Prometheus has for the server (seconds since the epoch); None also
/// while Prometheus is starting (it answers 503 in plain text then).
async fn last_scrape(prom: &str) -> Option<f64> {
    let path = format!(
        "/api/v1/query?query={}",
        url_encode("timestamp(keybroker_build_info)")
    );
    let (_, body) = http_get(prom, &path).await;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Waits (bounded) until Prometheus has scraped the server after `after`.
async fn scraped_after(prom: &str, after: f64) {
    for _ in 0..300 {
        if last_scrape(prom).await.is_some_and(|t| t > after) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Prometheus did not scrape the server within 30s");
}

/// Queries expected to be empty after a workload without backend failures: (panel title, refId).
const EMPTY_WITHOUT_FAILURES: [(&str, &str); 1] = [("Backend errors/s by outcome", "A")];

#[tokio::test]
async fn every_query_runs_on_prometheus_and_returns_data() {
    let prometheus = which("prometheus").expect(
        "the prometheus binary (Debian package prometheus) is missing: run scripts/test-setup",
    );
    let s = TestServer::local("").await;
    let admin = s.running.as_ref().unwrap().admin_addr.unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n- job_name: keybroker\n  static_configs:\n  - targets: ['{admin}']\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prom = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _child = KillOnDrop(
        std::process::Command::new(prometheus)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let log_text =
        || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();

    // First a scrape of the idle server, then the workload twice with a scrape after each, so
    // every counter has an increase inside the rate windows.
    let mut ready = false;
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(&prom).await.is_ok() && last_scrape(&prom).await.is_some()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready,
        "Prometheus never scraped the server:\n{}",
        log_text()
    );
    for _ in 0..2 {
        workload(&s).await;
        scraped_after(&prom, now()).await;
    }

    let mut problems = Vec::new();
    let mut checked = 0;
    for p in all_panels(&dashboard()) {
        let title = p["title"].as_str().unwrap_or("");
        for t in p["targets"].as_array().into_iter().flatten() {
            let ref_id = t["refId"].as_str().unwrap_or("");
            // Grafana's substitutions: "All" for the multi-value variables; windows that fit
            // a 1s scrape interval.
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "15s")
                .replace("$__range", "1m")
                .replace("$__interval", "2s")
                .replace("$caller", ".*")
                .replace("$key", ".*");
            let v = prom_query(&prom, &expr).await;
            checked += 1;
            if v["status"] != "success" {
                problems.push(format!("{title} {ref_id}: {expr}: {v}"));
                continue;
            }
            let result = &v["data"]["result"];
            let values: Vec<f64> = match v["data"]["resultType"].as_str() {
                Some("vector") => result
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|s| s["value"][1].as_str()?.parse().ok())
                    .collect(),
                Some("scalar") => result[1]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .into_iter()
                    .collect(),
                other => {
                    problems.push(format!("{title} {ref_id}: result type {other:?}"));
                    continue;
                }
            };
            let has_data = values.iter().any(|x| x.is_finite());
            let may_be_empty = EMPTY_WITHOUT_FAILURES.contains(&(title, ref_id));
            if has_data == may_be_empty {
                problems.push(format!(
                    "{title} {ref_id}: {} data: {expr} -> {result}",
                    if has_data { "unexpected" } else { "no" }
                ));
            }
        }
    }
    assert!(checked >= 30, "{checked} queries");
    assert!(
        problems.is_empty(),
        "{}\n{}",
        problems.join("\n"),
        log_text()
    );
    s.stop().await;
}
