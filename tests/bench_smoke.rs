//! beast-bench against a real in-process server: a short open-loop run
//! must reach its offered rate with no errors and print valid JSON, and a
//! run against an unknown target must fail.

mod common;

use std::process::Command;

/// beast-bench runs are timed (an offered rate, a window's end): one at a
/// time, not five generator + server pairs on a 2-core machine at once.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn bench(addr: std::net::SocketAddr, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_beast-bench"))
        .args([
            "--server",
            &addr.to_string(),
            "--width",
            "12",
            "-c",
            "4",
            "-k",
            "8",
            "--warmup",
            "0.3",
            "--json",
        ])
        .args(extra)
        .output()
        .expect("run beast-bench")
}

#[test]
fn open_loop_run_reaches_its_rate_and_prints_json() {
    let _one = serial();
    let server = common::start_server();
    let out = bench(
        server.addr,
        &[
            "--target",
            "ens:3,a:1",
            "--rate",
            "2000",
            "--duration",
            "1",
            "--arrivals",
            "poisson",
            "--distinct",
            "64",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let j = serde_json::from_str::<serde_json::Value>(line)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {line}"));
    let num = |k: &str| {
        j.get(k)
            .and_then(|v| v.as_f64())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    let (offered, achieved) = (num("offered_rps"), num("achieved_rps"));
    assert_eq!(offered, 2000.0);
    // Poisson arrivals: the count in 1 s varies by ~sqrt(2000) ≈ 2%.
    assert!(
        (achieved / offered - 1.0).abs() < 0.10,
        "achieved {achieved} of {offered}"
    );
    assert_eq!(num("error_count"), 0.0, "{line}");
    assert_eq!(num("unanswered"), 0.0, "{line}");
    assert_eq!(j.get("mode").and_then(|v| v.as_str()), Some("open/poisson"));
    let lat = j.get("latency_ms").expect("latency_ms");
    let p50 = lat.get("p50").and_then(|v| v.as_f64()).unwrap();
    let p99 = lat.get("p99").and_then(|v| v.as_f64()).unwrap();
    assert!(p50 > 0.0 && p99 >= p50, "{line}");
    // The mix ens:3,a:1 is reported per target too, in proportion.
    let Some(serde_json::Value::Array(per)) = j.get("per_target") else {
        panic!("no per_target in {line}")
    };
    let ok_of = |i: usize| per[i].get("ok").and_then(|v| v.as_f64()).unwrap_or(0.0);
    assert_eq!(per.len(), 2, "{line}");
    assert_eq!(per[0].get("target").and_then(|v| v.as_str()), Some("ens"));
    assert!(
        (ok_of(0) / (ok_of(0) + ok_of(1)) - 0.75).abs() < 0.06,
        "{line}"
    );
    assert!(j
        .get("server")
        .and_then(|s| s.get("total_p50_us"))
        .and_then(|v| v.as_f64())
        .is_some());
}

#[test]
fn unknown_target_fails_the_run() {
    let _one = serial();
    let server = common::start_server();
    let out = bench(
        server.addr,
        &[
            "--target",
            "no_such_model",
            "--rate",
            "500",
            "--duration",
            "0.5",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a run with only errors must fail; stderr: {stderr}"
    );
    assert!(stderr.contains("FAIL"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let j = serde_json::from_str::<serde_json::Value>(
        stdout
            .lines()
            .find(|l| l.starts_with('{'))
            .expect("a JSON line"),
    )
    .unwrap();
    assert!(
        j.get("errors")
            .and_then(|e| e.get("not_found"))
            .and_then(|v| v.as_f64())
            .unwrap()
            > 0.0
    );
}

#[test]
fn recorded_trace_replays_with_its_timing() {
    let _one = serial();
    let server = common::start_server();
    let trace = std::env::temp_dir().join(format!("beast-bench-smoke-{}.csv", std::process::id()));
    let trace_s = trace.to_str().expect("utf-8 temp path");
    let out = bench(
        server.addr,
        &[
            "--target",
            "a:1,c:1",
            "--rate",
            "1000",
            "--duration",
            "0.5",
            "--zipf",
            "1.0",
            "--distinct",
            "1000",
            "--record-trace",
            trace_s,
        ],
    );
    assert!(
        out.status.success(),
        "record: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&trace).expect("trace written");
    assert!(text.starts_with("offset_us,target,row_index\n"));
    // 0.3 s warm-up + 0.5 s at 1000 req/s.
    let n = text.lines().count() - 1;
    assert!((780..=820).contains(&n), "{n} requests recorded");
    // The helper passes --warmup 0.3: the replay measures the entries after it.
    let measured = text
        .lines()
        .skip(1)
        .filter(|l| {
            l.split(',')
                .next()
                .and_then(|o| o.parse::<u64>().ok())
                .is_some_and(|o| o >= 300_000)
        })
        .count();
    assert!(measured > 400, "{measured}");
    let out = bench(server.addr, &["--trace", trace_s, "--distinct", "1000"]);
    let _ = std::fs::remove_file(&trace);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "replay: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = serde_json::from_str::<serde_json::Value>(
        stdout
            .lines()
            .find(|l| l.starts_with('{'))
            .expect("a JSON line"),
    )
    .unwrap();
    assert_eq!(j.get("mode").and_then(|v| v.as_str()), Some("trace"));
    assert_eq!(j.get("ok").and_then(|v| v.as_f64()), Some(measured as f64));
}

#[test]
fn a_server_that_goes_away_gets_a_report_not_an_abort() {
    let _one = serial();
    let server = common::start_server();
    let addr = server.addr;
    let child = Command::new(env!("CARGO_BIN_EXE_beast-bench"))
        .args(["--server", &addr.to_string(), "--width", "12", "-c", "4"])
        .args(["-k", "8", "--warmup", "0", "--duration", "30", "--json"])
        .args([
            "--target",
            "ens",
            "--rate",
            "2000",
            "--deadline-us",
            "1000000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run beast-bench");
    // Once requests flow, the server stops (and closes every connection).
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while server.totals().responses[0] < 100 {
        assert!(
            std::time::Instant::now() < end,
            "no requests reached the server"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    server.shutdown();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no report\nstdout: {stdout}\nstderr: {stderr}"));
    let j = serde_json::from_str::<serde_json::Value>(line)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {line}"));
    assert_eq!(
        j.get("server_gone"),
        Some(&serde_json::Value::Bool(true)),
        "{line}"
    );
    assert_eq!(j.get("deadline_us").and_then(|v| v.as_f64()), Some(1e6));
    assert!(
        j.get("ok").and_then(|v| v.as_f64()).unwrap() >= 100.0,
        "{line}"
    );
    // 1 s budgets on a light load: nothing late (the cut-off applies to
    // ensembles: nothing partial either).
    assert_eq!(j.get("late_server").and_then(|v| v.as_f64()), Some(0.0));
    assert_eq!(j.get("partial").and_then(|v| v.as_f64()), Some(0.0));
}

#[test]
fn three_servers_share_the_load_with_per_node_and_total_figures() {
    let _one = serial();
    let servers: Vec<_> = (0..3).map(|_| common::start_server()).collect();
    let list: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_beast-bench"))
        .args(["--server", &list.join(","), "--width", "12", "-c", "2"])
        .args(["-k", "8", "--warmup", "0.3", "--duration", "1", "--json"])
        .args(["--target", "a", "--rate", "1500", "--distinct", "300"])
        .args(["--no-cache"])
        .output()
        .expect("run beast-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let line = stdout.lines().find(|l| l.starts_with('{')).unwrap();
    let j = serde_json::from_str::<serde_json::Value>(line).unwrap();
    let num =
        |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k}: {line}"));
    let nodes = j["per_node"].as_array().expect("per_node");
    assert_eq!(nodes.len(), 3, "{line}");
    let ok: f64 = nodes.iter().map(|n| num(n, "ok")).sum();
    assert_eq!(ok, num(&j, "ok"), "per-node figures add up to the total");
    assert_eq!(num(&j, "error_count"), 0.0, "{line}");
    for (n, s) in nodes.iter().zip(&servers) {
        assert_eq!(n["node"].as_str(), Some(s.addr.to_string().as_str()));
        // 300 distinct inputs by rendezvous: about a third each.
        assert!(num(n, "ok") > 0.2 * ok, "{line}");
        // What the bench counts for a node is what that node answered
        // (plus the warm-up and the pre-flight request).
        assert!(s.totals().responses[0] as f64 >= num(n, "ok"), "{line}");
    }
    // A single --server has no per_node field (its JSON is unchanged).
    let one = bench(
        servers[0].addr,
        &["--target", "a", "--rate", "200", "--duration", "0.3"],
    );
    let line = String::from_utf8_lossy(&one.stdout);
    assert!(one.status.success() && !line.contains("per_node"), "{line}");
}
