//! `--admin ADDR`: scrape the server's Prometheus text at `/metrics` before
//! and after a run (with the crate's one HTTP client,
//! `beast::server::admin::get`), and report the deltas of the few series
//! the bench cares about. Every series is optional: a server without them
//! (or without an admin port) only loses these lines.

use std::collections::HashMap;
use std::time::Duration;

/// The series summed (over all label sets) from each scrape.
pub const SERIES: [&str; 4] = [
    "beast_batch_size_sum",
    "beast_batch_size_count",
    "beast_cache_hits_total",
    "beast_cache_misses_total",
];

pub type Scrape = HashMap<&'static str, f64>;

pub fn scrape(addr: &str) -> Result<Scrape, String> {
    let (code, body) = beast::server::admin::get(addr, "/metrics", Duration::from_secs(5))
        .map_err(|e| format!("--admin {e}"))?;
    if code != 200 {
        return Err(format!("--admin {addr}/metrics: HTTP {code}"));
    }
    Ok(parse_metrics(&body))
}

/// Sum each wanted series over its label sets.
pub fn parse_metrics(body: &str) -> Scrape {
    let mut out = Scrape::new();
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let Some(&key) = SERIES.iter().find(|s| **s == name) else {
            continue;
        };
        // The value follows the closing brace (labels may contain spaces).
        let rest = match line.rfind('}') {
            Some(i) if line[..name_end].len() < i => &line[i + 1..],
            _ => &line[name_end..],
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *out.entry(key).or_insert(0.0) += v;
        }
    }
    out
}

/// Human lines (and JSON fields) for the difference of two scrapes.
pub struct Delta {
    pub mean_batch: Option<f64>,
    pub batches: Option<f64>,
    pub cache_hit_ratio: Option<f64>,
    pub cache_lookups: Option<f64>,
}

pub fn delta(before: &Scrape, after: &Scrape) -> Delta {
    let d = |k: &str| Some(after.get(k)? - before.get(k).copied().unwrap_or(0.0));
    let (sum, count) = (d("beast_batch_size_sum"), d("beast_batch_size_count"));
    let (hits, misses) = (d("beast_cache_hits_total"), d("beast_cache_misses_total"));
    let mean_batch = match (sum, count) {
        (Some(s), Some(c)) if c > 0.0 => Some(s / c),
        _ => None,
    };
    let lookups = match (hits, misses) {
        (Some(h), Some(m)) => Some(h + m),
        _ => None,
    };
    Delta {
        mean_batch,
        batches: count,
        cache_hit_ratio: match (hits, lookups) {
            (Some(h), Some(l)) if l > 0.0 => Some(h / l),
            _ => None,
        },
        cache_lookups: lookups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A one-shot HTTP server answering each connection with `responses[i]`.
    fn serve(responses: Vec<&'static str>) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for r in responses {
                let (mut s, _) = l.accept().unwrap();
                // Read the whole request head before answering.
                let mut req = Vec::new();
                let mut buf = [0u8; 512];
                while !req.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "request cut short");
                    req.extend_from_slice(&buf[..n]);
                }
                assert!(req.starts_with(b"GET /metrics HTTP/1.1\r\n"));
                s.write_all(r.as_bytes()).unwrap();
            }
        });
        addr
    }

    #[test]
    fn scrapes_over_http_and_reports_bad_status() {
        let addr = serve(vec![
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nbeast_cache_hits_total 3\nbeast_cache_misses_total 1\n",
            "HTTP/1.0 404 Not Found\r\n\r\n",
        ]);
        let m = scrape(&addr).unwrap();
        assert_eq!(
            (m["beast_cache_hits_total"], m["beast_cache_misses_total"]),
            (3.0, 1.0)
        );
        let e = scrape(&addr).unwrap_err();
        assert_eq!(e, format!("--admin {addr}/metrics: HTTP 404"));
    }

    #[test]
    fn parses_and_differences_prometheus_text() {
        let before = parse_metrics("# HELP x\nbeast_batch_size_sum{core=\"0\"} 10\nbeast_batch_size_sum{core=\"1\"} 20\nbeast_batch_size_count 10\nbeast_cache_hits_total 5\nother 1\n");
        assert_eq!(before["beast_batch_size_sum"], 30.0);
        let after = parse_metrics("beast_batch_size_sum 130\nbeast_batch_size_count 35\nbeast_cache_hits_total 85\nbeast_cache_misses_total 20\n");
        let d = delta(&before, &after);
        assert_eq!(d.mean_batch, Some(4.0));
        assert_eq!(d.cache_lookups, Some(100.0));
        assert_eq!(d.cache_hit_ratio, Some(0.8));
        let none = delta(&Scrape::new(), &Scrape::new());
        assert!(none.mean_batch.is_none() && none.cache_hit_ratio.is_none());
    }
}
