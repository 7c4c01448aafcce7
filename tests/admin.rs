//! The admin HTTP port against a real server on ephemeral ports: the
//! Prometheus exposition, health and readiness, models, stats, traces,
//! and robustness against bad HTTP.

mod common;

use beast::client::{Client, ClientError};
use beast::config::Config;
use beast::metrics::stats::Stats;
use beast::server::admin::get;
use common::*;
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

/// Counts the allocations of threads that opt in, so a test can prove the
/// recording hooks allocate nothing while other tests run in parallel.
struct CountingAlloc;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        if COUNTING.try_with(|c| c.get()).unwrap_or(false) {
            let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
        }
        // SAFETY: forwarded unchanged.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn fetch(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    get(&addr.to_string(), path, T).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Value of the sample `name{labels...}` (labels must match exactly, in any order).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .find_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, ls) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let mut got: Vec<(String, String)> = ls
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    p.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            let mut want: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            got.sort();
            want.sort();
            (got == want).then(|| v.parse().ok()).flatten()
        })
}

/// Cumulative bucket counts of one histogram series, in exposition order.
fn buckets(text: &str, name: &str, label: (&str, &str)) -> Vec<(String, f64)> {
    let prefix = format!("{name}_bucket{{{}=\"{}\",le=\"", label.0, label.1);
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let (le, v) = rest.split_once("\"} ").unwrap();
            (le.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// Ten requests, every input different (so the prediction cache never
/// answers and every row is computed): 5 ok for `a`, 1 unknown target,
/// 2 ok for `ens` (4 rows), 1 ok for `m` v2, 1 bad request for `b`.
fn send_mix(addr: std::net::SocketAddr) {
    let client = Client::connect(addr).unwrap();
    for seed in 10..15 {
        let x = rows(seed, 1, WIDTH);
        client.predict(&spec("a", 1, WIDTH, &x)).unwrap();
    }
    let x = rows(1, 1, WIDTH);
    assert!(matches!(
        client.predict(&spec("nope", 1, WIDTH, &x)),
        Err(ClientError::NotFound(_))
    ));
    let x3 = rows(2, 3, WIDTH);
    client.predict(&spec("ens", 3, WIDTH, &x3)).unwrap();
    client.predict(&spec("ens", 1, WIDTH, &x)).unwrap();
    let x4 = rows(4, 1, WIDTH);
    let mut v2 = spec("m", 1, WIDTH, &x4);
    v2.version = Some(2);
    client.predict(&v2).unwrap();
    let narrow = rows(3, 1, WIDTH - 1);
    assert!(matches!(
        client.predict(&spec("b", 1, WIDTH - 1, &narrow)),
        Err(ClientError::BadRequest(_))
    ));
}

#[test]
fn metrics_count_requests_by_target_and_status() {
    let server = start_server();
    let admin = server
        .admin_addr
        .expect("test_config turns the admin port on");
    send_mix(server.addr);
    let (code, text) = fetch(admin, "/metrics");
    assert_eq!(code, 200);
    let req = |t: &str, s: &str| {
        value(
            &text,
            "beast_requests_total",
            &[("target", t), ("status", s)],
        )
    };
    assert_eq!(req("a", "ok"), Some(5.0));
    assert_eq!(req("a", "not_found"), Some(0.0));
    assert_eq!(req("_unknown", "not_found"), Some(1.0));
    assert_eq!(req("ens", "ok"), Some(2.0));
    assert_eq!(req("m", "ok"), Some(1.0));
    assert_eq!(req("b", "bad_request"), Some(1.0));
    assert_eq!(req("slow", "ok"), Some(0.0));
    assert_eq!(
        value(&text, "beast_core_requests_total", &[("core", "0")]),
        Some(10.0)
    );
    assert_eq!(
        value(&text, "beast_in_flight_requests", &[("core", "0")]),
        Some(0.0)
    );
    assert_eq!(value(&text, "beast_up", &[]), Some(1.0));
    assert!(text.contains("beast_build_info{version=\""), "{text}");
    assert!(value(&text, "process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert!(value(&text, "process_cpu_seconds_total", &[]).is_some());
    assert_eq!(
        value(&text, "beast_connections_total", &[("core", "0")]),
        Some(1.0)
    );
    assert!(value(&text, "beast_cache_misses_total", &[]).unwrap() > 0.0);
    for tier in ["l1", "l2"] {
        assert_eq!(
            value(&text, "beast_cache_hits_total", &[("tier", tier)]),
            Some(0.0)
        );
    }
    assert_eq!(
        value(
            &text,
            "beast_requests_shed_total",
            &[("reason", "queue_full")]
        ),
        Some(0.0)
    );

    // Histograms: _count equals the requests, buckets are cumulative.
    for (t, n) in [("a", 5.0), ("ens", 2.0), ("_unknown", 1.0)] {
        let b = buckets(&text, "beast_request_duration_seconds", ("target", t));
        assert!(b.len() > 10, "{t}: {b:?}");
        assert!(
            b.windows(2).all(|w| w[0].1 <= w[1].1),
            "{t}: not monotone: {b:?}"
        );
        assert_eq!(b.last().unwrap(), &("+Inf".to_string(), n));
        assert_eq!(
            value(
                &text,
                "beast_request_duration_seconds_count",
                &[("target", t)]
            ),
            Some(n)
        );
        // A NOT_FOUND answer can leave within the microsecond (recorded
        // as 0): only requests that computed must have taken time.
        let sum = value(
            &text,
            "beast_request_duration_seconds_sum",
            &[("target", t)],
        )
        .unwrap();
        assert!(sum > 0.0 || t == "_unknown", "{t}: {sum}");
    }
    assert_eq!(
        value(
            &text,
            "beast_queue_duration_seconds_count",
            &[("target", "a")]
        ),
        Some(5.0)
    );
    // Model `a` ran its own 5 rows and 4 rows as a member of `ens`.
    assert_eq!(
        value(&text, "beast_batch_size_sum", &[("model", "a")]),
        Some(9.0)
    );
    let batches = value(&text, "beast_batch_size_count", &[("model", "a")]).unwrap();
    assert!((2.0..=7.0).contains(&batches), "{batches}");
    assert_eq!(
        value(
            &text,
            "beast_compute_duration_seconds_count",
            &[("model", "a")]
        ),
        Some(batches)
    );
    let bs = buckets(&text, "beast_batch_size", ("model", "a"));
    let les: Vec<&str> = bs.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(
        les,
        ["1", "2", "4", "8", "16", "32", "64", "128", "256", "512", "1024", "+Inf"]
    );

    // The JSON stats agree.
    let (code, body) = fetch(admin, "/v1/stats");
    assert_eq!(code, 200);
    let stats: Stats = serde_json::from_str(&body).unwrap();
    let a = stats.targets.iter().find(|t| t.name == "a").unwrap();
    assert_eq!((a.ok, a.errors, a.shed), (5, 0, 0));
    assert!(a.p50_seconds.unwrap() > 0.0 && a.p99_seconds.unwrap() >= a.p50_seconds.unwrap());
    assert_eq!(stats.cores.len(), 1);
    assert_eq!(stats.cores[0].requests, 10);

    // Asking again for an answer already computed is a cache hit, and the
    // request is still counted under its target.
    let client = Client::connect(server.addr).unwrap();
    client
        .predict(&spec("a", 1, WIDTH, &rows(10, 1, WIDTH)))
        .unwrap();
    let (_, text) = fetch(admin, "/metrics");
    let hits: f64 = ["l1", "l2"]
        .iter()
        .map(|t| value(&text, "beast_cache_hits_total", &[("tier", t)]).unwrap())
        .sum();
    assert_eq!(hits, 1.0);
    assert_eq!(
        value(
            &text,
            "beast_requests_total",
            &[("target", "a"), ("status", "ok")]
        ),
        Some(6.0)
    );
    server.shutdown();
}

#[test]
fn health_readiness_models_and_unknown_paths() {
    let server = start_server();
    let admin = server.admin_addr.unwrap();
    assert_eq!(fetch(admin, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(fetch(admin, "/readyz").0, 200);
    assert_eq!(fetch(admin, "/no/such/thing").0, 404);

    let (code, body) = fetch(admin, "/v1/models");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ens = v["ensembles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "ens")
        .expect("ens is listed");
    assert_eq!(ens["members"], serde_json::json!(["a", "b", "c"]));
    let models = v["models"].as_array().unwrap();
    for name in ["a", "b", "c"] {
        let m = models
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} is listed"));
        assert_eq!(m["input_width"], WIDTH);
        assert_eq!(m["output_width"], CLASSES);
        assert!(m["flops_per_row"].as_u64().unwrap() > 0);
        assert_eq!(m["batch"]["max_batch"], 16);
    }
    let m_versions: Vec<u64> = models
        .iter()
        .filter(|m| m["name"] == "m")
        .map(|m| m["version"].as_u64().unwrap())
        .collect();
    assert_eq!(m_versions, [1, 2]);
    assert!(v["refused"].as_array().unwrap().is_empty());

    // During shutdown the server is no longer ready (the admin port stays
    // up until every shard has exited).
    server.stop();
    assert_eq!(fetch(admin, "/readyz").0, 503);
    server.wait();
    assert!(TcpStream::connect(admin).is_err() || fetch_err(admin));
}

/// After shutdown, the admin port answers nothing.
fn fetch_err(admin: std::net::SocketAddr) -> bool {
    get(&admin.to_string(), "/healthz", Duration::from_secs(2)).is_err()
}

fn raw_exchange(admin: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn bad_http_does_not_kill_the_admin_thread() {
    let server = start_server();
    let admin = server.admin_addr.unwrap();
    // A client that connects and says nothing holds one handler until the
    // read timeout; others are served meanwhile.
    let idle = TcpStream::connect(admin).unwrap();
    assert!(raw_exchange(admin, b"\x00\x01\x02 garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(raw_exchange(admin, b"GET\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(raw_exchange(admin, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(
        raw_exchange(admin, b"GET /debug/trace?seconds=-1 HTTP/1.1\r\n\r\n")
            .starts_with("HTTP/1.1 400")
    );
    // A head larger than the limit, with no end: answered 400, not buffered forever.
    let big = vec![b'A'; 64 << 10];
    let r = raw_exchange(admin, &big);
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");
    // Not UTF-8.
    assert!(raw_exchange(admin, b"GET /\xff\xfe HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 400"));
    drop(TcpStream::connect(admin).unwrap());
    assert_eq!(fetch(admin, "/healthz").0, 200);
    assert_eq!(fetch(admin, "/metrics").0, 200);
    drop(idle);
    server.shutdown();
}

#[test]
fn promtool_accepts_the_exposition() {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("\n==================================================================");
        eprintln!("SKIPPED: promtool is not on PATH, so the exposition was not checked");
        eprintln!("by Prometheus' own linter. Install it: apt-get install -y prometheus");
        eprintln!("==================================================================\n");
        return;
    }
    // With an L2 file, so its metrics are linted too.
    let mut cfg = test_config();
    cfg.cache.l2_path = temp_dir("promtool").join("l2.cache");
    cfg.cache.l2_bytes = 1 << 20;
    let server = start_with(cfg, test_repository(300_000));
    send_mix(server.addr);
    let (_, text) = fetch(server.admin_addr.unwrap(), "/metrics");
    assert!(text.contains("beast_cache_l2_slots 8160"), "{text}");
    assert!(text.contains("beast_cache_l2_entries "), "{text}");
    assert!(common::promtool_accepts(&text), "promtool was found above");
    server.shutdown();
}

fn trace_config() -> Config {
    Config {
        trace_sample_rate: 1.0,
        trace_ring_records: 1024,
        ..test_config()
    }
}

#[test]
fn traces_have_every_stage_with_sane_durations() {
    let server = start_with(trace_config(), test_repository(300_000));
    let admin = server.admin_addr.unwrap();
    // The mix, then what the rings hold (the window is checked below).
    send_mix(server.addr);
    let (code, body) = fetch(admin, "/debug/trace?seconds=0");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    let slices: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    for stage in ["request", "queue", "compute", "respond"] {
        assert!(
            slices.iter().any(|e| e["name"] == stage),
            "no {stage} event in {body}"
        );
    }
    // 10 requests, 8 of them ok (4 slices each), 2 errors (1 slice each).
    assert_eq!(slices.iter().filter(|e| e["name"] == "request").count(), 10);
    assert_eq!(slices.len(), 8 * 4 + 2);
    for e in &slices {
        assert!(e["dur"].as_f64().unwrap() >= 0.0, "{e}");
        assert!(e["ts"].as_f64().unwrap() >= 0.0, "{e}");
        assert_eq!(e["pid"], 1);
        assert!(e["args"]["target"].is_string());
    }
    assert!(slices
        .iter()
        .any(|e| e["name"] == "compute" && e["args"]["target"] == "a"));
    // Stages nest inside their request.
    for r in slices
        .iter()
        .filter(|e| e["name"] == "request" && e["args"]["status"] == "ok")
    {
        let (ts, end) = (
            r["ts"].as_f64().unwrap(),
            r["ts"].as_f64().unwrap() + r["dur"].as_f64().unwrap(),
        );
        for s in slices.iter().filter(|e| {
            e["name"] != "request" && e["args"]["id"] == r["args"]["id"] && e["tid"] == r["tid"]
        }) {
            let (s0, s1) = (
                s["ts"].as_f64().unwrap(),
                s["ts"].as_f64().unwrap() + s["dur"].as_f64().unwrap(),
            );
            assert!(s0 >= ts - 1e-6 && s1 <= end + 1e-6, "{s} outside {r}");
        }
    }
    assert_eq!(v["otherData"]["records"], 10);
    // seconds=0: whatever the rings hold now.
    let (_, now) = fetch(admin, "/debug/trace?seconds=0");
    let v: serde_json::Value = serde_json::from_str(&now).unwrap();
    assert_eq!(v["otherData"]["records"], 10);

    // `beast trace` writes the same JSON to a file.
    let out = std::env::temp_dir().join(format!(
        "beast-trace-{}-{}.json",
        std::process::id(),
        admin.port()
    ));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_beast"))
        .args([
            "trace",
            "--admin",
            &admin.to_string(),
            "--seconds",
            "0",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out);
    assert_eq!(file["otherData"]["records"], 10);
    assert!(file["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "compute"));

    // A window holds what arrives inside it, and nothing from before:
    // requests go on until it closes, however late the admin thread opens it.
    let requests = |v: &serde_json::Value| -> Vec<f64> {
        v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ph"] == "X" && e["name"] == "request")
            .map(|e| e["ts"].as_f64().unwrap())
            .collect()
    };
    let before = serde_json::from_str(&now).unwrap();
    let latest = requests(&before).into_iter().fold(f64::MIN, f64::max);
    let window = std::thread::spawn(move || fetch(admin, "/debug/trace?seconds=1"));
    while !window.is_finished() {
        send_mix(server.addr);
    }
    let (code, body) = window.join().unwrap();
    assert_eq!(code, 200);
    let inside = requests(&serde_json::from_str(&body).unwrap());
    assert!(!inside.is_empty(), "no request in the window: {body}");
    assert!(
        inside.iter().all(|&ts| ts > latest),
        "a request from before the window is in it"
    );
    server.shutdown();
}

#[test]
fn tracing_off_records_nothing_and_admin_can_be_off() {
    let server = start_server();
    send_mix(server.addr);
    let (_, body) = fetch(server.admin_addr.unwrap(), "/debug/trace?seconds=0");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["otherData"]["records"], 0);
    assert!(v["traceEvents"].as_array().unwrap().is_empty());
    server.shutdown();

    let cfg = Config {
        admin_listen: "off".into(),
        ..test_config()
    };
    let server = start_with(cfg, test_repository(300_000));
    assert!(server.admin_addr.is_none());
    server.shutdown();
}

#[test]
fn recording_hooks_do_not_allocate() {
    use beast::metrics::{CacheTier, ShardMetrics, Shed, Targets};
    use beast::wire::Status;
    let repo = test_repository(300_000);
    let m = ShardMetrics::new(0, std::sync::Arc::new(Targets::from_repo(&repo)), 1.0, 256);
    let now = std::time::Instant::now();
    COUNTING.with(|c| c.set(true));
    for i in 0..10_000u64 {
        m.begin_request();
        m.set_target_slot((i % 7) as usize);
        m.record_response(i, Status::Ok, now, (i % 5000) as u32, 3, 4);
        m.set_target_plan((i % 2) as usize);
        m.record_response(i, Status::ALL[(i % 6) as usize], now, 10, 0, 0);
        m.record_batch(
            (i % 7) as usize,
            (i % 40) as usize,
            Duration::from_micros(i % 900),
        );
        m.record_shed(Shed::QueueFull);
        m.record_cache_hit(CacheTier::L2);
        m.record_cache_miss();
        m.record_cache_coalesced();
    }
    COUNTING.with(|c| c.set(false));
    assert_eq!(ALLOCS.with(|a| a.get()), 0, "the hot-path hooks allocated");
    assert_eq!(m.trace.written(), 20_000);
    // The counter does count: one allocation is seen.
    COUNTING.with(|c| c.set(true));
    drop(std::hint::black_box(vec![1u8; 16]));
    COUNTING.with(|c| c.set(false));
    assert_eq!(ALLOCS.with(|a| a.get()), 1);
}

#[test]
fn trace_windows_cannot_starve_scrapes() {
    // Every handler held by a long /debug/trace window used to leave
    // /metrics with 503 for the whole window.
    let server = start_server();
    let admin = server.admin_addr.unwrap();
    let traces: Vec<_> = (0..beast::server::admin::HANDLERS_MAX + 4)
        .map(|_| std::thread::spawn(move || get(&admin.to_string(), "/debug/trace?seconds=3", T)))
        .collect();
    // Every trace window there is room for is open once one more is refused.
    common::wait_until(Duration::from_secs(10), "the trace windows to open", || {
        matches!(get(&admin.to_string(), "/debug/trace?seconds=0", T),
            Ok((503, body)) if body.contains("too many trace windows"))
    });
    let t0 = std::time::Instant::now();
    let (code, _) = fetch(admin, "/metrics");
    assert_eq!(code, 200, "a scrape during trace windows");
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(fetch(admin, "/healthz").0, 200);
    let mut busy = 0;
    for t in traces {
        match t.join().unwrap() {
            Ok((200, _)) => {}
            // Refused (by the handler, or at accept when every handler is
            // momentarily busy reading heads: then the reset may win).
            Ok((503, _)) | Err(_) => busy += 1,
            other => panic!("trace: {other:?}"),
        }
    }
    assert!(busy >= 4, "trace windows beyond their share are refused");
    server.shutdown();
}

#[test]
fn heads_with_bare_newlines_are_served_and_control_bytes_refused() {
    // The admin port ends a head at "\n\n" too, but parsed only "\r\n"
    // lines: a bare-newline head with a header got 400 (fuzz/admin_head).
    let server = start_server();
    let admin = server.admin_addr.unwrap();
    let r = raw_exchange(admin, b"GET /healthz HTTP/1.1\nHost: x\n\n");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = raw_exchange(admin, b"GET /heal\rthz HTTP/1.1\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let r = raw_exchange(admin, b"GET /healthz HTTP/1.\x07\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    server.shutdown();
}
