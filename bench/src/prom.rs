//! Prometheus plumbing: the text exposition format the agents serve, the JSON the Prometheus
//! server's HTTP API answers, and a minimal HTTP/1.0 GET (127.0.0.1 only, no dependencies).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::stats::Bucket;

/// One sample of a scrape: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` page.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

fn parse_value(s: &str) -> Result<f64> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|e| anyhow!("bad sample value {s:?}: {e}")),
    }
}

/// Parses the label set after `{`; returns the labels and the rest after `}`.
fn parse_labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let eq = s.find('=').ok_or_else(|| anyhow!("label without '='"))?;
        let name = s[..eq].trim().to_string();
        let rest = s[eq + 1..].trim_start();
        let mut chars = rest.char_indices();
        if chars.next().map(|c| c.1) != Some('"') {
            bail!("label value of {name} is not quoted");
        }
        let mut value = String::new();
        let mut end = None;
        let mut escaped = false;
        for (i, c) in chars {
            if escaped {
                value.push(match c {
                    'n' => '\n',
                    other => other,
                });
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                end = Some(i);
                break;
            } else {
                value.push(c);
            }
        }
        let end = end.ok_or_else(|| anyhow!("unterminated label value of {name}"))?;
        labels.insert(name, value);
        s = &rest[end + 1..];
    }
}

impl Scrape {
    /// Parses the Prometheus text exposition format (0.0.4): comments and blank lines are skipped,
    /// each other line is `name{labels} value [timestamp]`.
    pub fn parse(text: &str) -> Result<Scrape> {
        let mut samples = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parse = || -> Result<Sample> {
                let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).ok_or_else(|| anyhow!("no value"))?;
                let name = line[..name_end].to_string();
                let (labels, rest) = if line[name_end..].starts_with('{') {
                    parse_labels(&line[name_end + 1..])?
                } else {
                    (BTreeMap::new(), &line[name_end..])
                };
                let value = rest.split_whitespace().next().ok_or_else(|| anyhow!("no value"))?;
                Ok(Sample { name, labels, value: parse_value(value)? })
            };
            samples.push(parse().with_context(|| format!("metrics line {}: {line:?}", n + 1))?);
        }
        Ok(Scrape { samples })
    }

    /// Sum of every series of `name` (the agents export one per name, labelled with vm_id).
    pub fn get(&self, name: &str) -> Option<f64> {
        let mut found = None;
        for s in self.samples.iter().filter(|s| s.name == name) {
            *found.get_or_insert(0.0) += s.value;
        }
        found
    }

    /// The cumulative buckets of histogram `name` (from its `_bucket` series).
    pub fn histogram(&self, name: &str) -> Vec<Bucket> {
        let bucket = format!("{name}_bucket");
        let mut out: Vec<Bucket> = Vec::new();
        for s in self.samples.iter().filter(|s| s.name == bucket) {
            let Some(le) = s.labels.get("le").and_then(|v| parse_value(v).ok()) else { continue };
            match out.iter_mut().find(|b| b.le == le) {
                Some(b) => b.count += s.value,
                None => out.push(Bucket { le, count: s.value }),
            }
        }
        out.sort_by(|a, b| a.le.partial_cmp(&b.le).expect("bucket bounds are not NaN"));
        out
    }
}

/// One element of an instant vector answered by `/api/v1/query`.
#[derive(Debug, Clone, PartialEq)]
pub struct VectorSample {
    pub metric: BTreeMap<String, String>,
    pub timestamp: f64,
    pub value: f64,
}

/// Parses the JSON body of a Prometheus `/api/v1/query` answer whose result is an instant vector
/// (or a scalar, answered as one unlabelled sample). An `"status":"error"` answer is an error
/// carrying Prometheus' own message.
pub fn parse_query_response(body: &str) -> Result<Vec<VectorSample>> {
    let v: serde_json::Value = serde_json::from_str(body).context("Prometheus answered something that is not JSON")?;
    if v["status"] != "success" {
        bail!(
            "Prometheus query failed: {} {}",
            v["errorType"].as_str().unwrap_or("?"),
            v["error"].as_str().unwrap_or("(no message)")
        );
    }
    let pair = |p: &serde_json::Value| -> Result<(f64, f64)> {
        let ts = p.get(0).and_then(|t| t.as_f64()).ok_or_else(|| anyhow!("sample without a timestamp: {p}"))?;
        let val = p.get(1).and_then(|t| t.as_str()).ok_or_else(|| anyhow!("sample without a value: {p}"))?;
        Ok((ts, parse_value(val)?))
    };
    match v["data"]["resultType"].as_str() {
        Some("vector") => v["data"]["result"]
            .as_array()
            .ok_or_else(|| anyhow!("vector without a result array"))?
            .iter()
            .map(|r| {
                let metric = r["metric"]
                    .as_object()
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
                    .unwrap_or_default();
                let (timestamp, value) = pair(&r["value"])?;
                Ok(VectorSample { metric, timestamp, value })
            })
            .collect(),
        Some("scalar") => {
            let (timestamp, value) = pair(&v["data"]["result"])?;
            Ok(vec![VectorSample { metric: BTreeMap::new(), timestamp, value }])
        }
        other => bail!("unexpected result type {other:?}"),
    }
}

/// Percent-encodes a query-string component (RFC 3986 unreserved characters stay).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Splits an HTTP response into status code and body.
pub fn split_response(raw: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("HTTP response without a header end"))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line"))?;
    Ok((status, body.to_string()))
}

/// `GET path` over HTTP/1.0 (so the server closes the connection and never chunks the body).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).with_context(|| format!("reading http://{addr}{path}"))?;
    split_response(&raw)
}

/// Scrapes an agent's `/metrics`.
pub fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let (status, body) = http_get(addr, "/metrics", Duration::from_secs(2))?;
    if status != 200 {
        bail!("http://{addr}/metrics answered {status}");
    }
    Scrape::parse(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP lockstep_exits_total Guest-caused VM exits (logical time).
# TYPE lockstep_exits_total counter
lockstep_exits_total{vm_id="bench"} 12345
lockstep_log_bytes_sent_total{vm_id="bench"} 6.5e3
# TYPE lockstep_output_hold_seconds histogram
lockstep_output_hold_seconds_bucket{vm_id="bench",le="0.000025"} 1
lockstep_output_hold_seconds_bucket{vm_id="bench",le="0.00005"} 3
lockstep_output_hold_seconds_bucket{vm_id="bench",le="+Inf"} 4
lockstep_output_hold_seconds_sum{vm_id="bench"} 0.0001
lockstep_output_hold_seconds_count{vm_id="bench"} 4
weird{a="x,y}",b="q\"uote"} NaN 1700000000000
bare 1
"#;

    #[test]
    fn parses_the_text_format() {
        let s = Scrape::parse(PAGE).unwrap();
        assert_eq!(s.get("lockstep_exits_total"), Some(12345.0));
        assert_eq!(s.get("lockstep_log_bytes_sent_total"), Some(6500.0));
        assert_eq!(s.get("bare"), Some(1.0));
        assert_eq!(s.get("missing"), None);
        let w = s.samples.iter().find(|x| x.name == "weird").unwrap();
        assert_eq!(w.labels["a"], "x,y}");
        assert_eq!(w.labels["b"], "q\"uote");
        assert!(w.value.is_nan());
        let h = s.histogram("lockstep_output_hold_seconds");
        assert_eq!(h.len(), 3);
        assert_eq!(h[0], Bucket { le: 0.000025, count: 1.0 });
        assert!(h[2].le.is_infinite());
        assert!(Scrape::parse("x{a=\"unterminated} 1").is_err());
        assert!(Scrape::parse("novalue").is_err());
    }

    #[test]
    fn parses_query_answers() {
        let ok = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"vm_id":"bench"},"value":[1764115200.5,"1234.5"]},
            {"metric":{},"value":[1764115200.5,"NaN"]}]}}"#;
        let v = parse_query_response(ok).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].metric["vm_id"], "bench");
        assert_eq!(v[0].value, 1234.5);
        assert_eq!(v[0].timestamp, 1764115200.5);
        assert!(v[1].value.is_nan());
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"2"]}}"#;
        assert_eq!(parse_query_response(scalar).unwrap()[0].value, 2.0);
        let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert!(parse_query_response(empty).unwrap().is_empty());
        let err = r#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#;
        let e = parse_query_response(err).unwrap_err().to_string();
        assert!(e.contains("bad_data") && e.contains("parse error"), "{e}");
        assert!(parse_query_response("<html>").is_err());
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(parse_query_response(matrix).is_err());
    }

    #[test]
    fn encodes_promql_for_a_url() {
        assert_eq!(
            url_encode("rate(lockstep_log_bytes_sent_total{vm_id=~\"a\"}[30s]) * 8"),
            "rate%28lockstep_log_bytes_sent_total%7Bvm_id%3D~%22a%22%7D%5B30s%5D%29%20%2A%208"
        );
    }

    #[test]
    fn splits_http_responses() {
        let (code, body) = split_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
        assert_eq!((code, body.as_str()), (200, "ok"));
        assert_eq!(split_response(b"HTTP/1.0 404 Not Found\r\n\r\n").unwrap().0, 404);
        assert!(split_response(b"garbage").is_err());
    }
}
