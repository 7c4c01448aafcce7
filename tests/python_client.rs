//! The Python client package (tools/python, `pip install ./tools/python`)
//! against a real server: tools/python/tests/check_client.py checks ids from
//! 1, pipelining, typed errors, versions, FP16 input, feedback and timeouts;
//! its values are compared here with the model computed directly. Needs
//! python3 with the `flatbuffers` package (.ci/run installs it); prints
//! `SKIP: ...` without them.

mod common;

use beast::client::route;
use beast::wire::Input;
use common::*;
use std::path::Path;
use std::process::Command;

fn python_ready() -> Result<(), String> {
    match Command::new("python3")
        .args(["-c", "import flatbuffers"])
        .output()
    {
        Err(e) => Err(format!("python3 not runnable: {e}")),
        Ok(o) if !o.status.success() => Err(format!(
            "python3 has no flatbuffers package ({})",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => Ok(()),
    }
}

#[test]
fn python_client_against_a_real_server() {
    if let Err(why) = python_ready() {
        println!("SKIP: python client test: {why}");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // `slow` holds a request for 2 s: the script's 50 ms timeout fires first.
    let server = start_with(test_config(), test_repository(2_000_000));
    let out = Command::new("python3")
        .arg(root.join("tools/python/tests/check_client.py"))
        .arg(server.addr.to_string())
        .env("PYTHONPATH", root.join("tools/python"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("python client: ok"),
        "check_client.py failed:\n{stdout}\n{stderr}"
    );
    let values: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("VALUES "))
            .expect("a VALUES line"),
    )
    .unwrap();
    let f = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let (row, got) = (f(&values["row"]), f(&values["a"]));
    let want = direct(&model("a"), &row, 1);
    assert_close(&got, &want, 1e-6);
    server.shutdown();
}

/// beast.Cluster (tools/python/beast/cluster.py): its rendezvous rule gives
/// the order `beast::client::route` gives on the same inputs (f32 and f16),
/// and against two real nodes and a dead address every answer comes from
/// the first live node of its order (tools/python/tests/check_cluster.py).
/// Needs the `xxhash` package too; prints `SKIP:` without it.
#[test]
fn python_cluster_routes_like_rust_against_two_nodes() {
    if let Err(why) = python_ready() {
        println!("SKIP: python cluster test: {why}");
        return;
    }
    if !Command::new("python3")
        .args(["-c", "import xxhash"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("SKIP: python cluster test: python3 has no xxhash package (pip install xxhash)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let nodes = [start_server(), start_server()];
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let live = format!("{},{}", nodes[0].addr, nodes[1].addr);
    let out = Command::new("python3")
        .arg(root.join("tools/python/tests/check_cluster.py"))
        .args([&live, &dead.to_string()])
        .env("PYTHONPATH", root.join("tools/python"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("python cluster: ok"),
        "check_cluster.py failed:\n{stdout}\n{stderr}"
    );
    let names = [
        nodes[0].addr.to_string(),
        nodes[1].addr.to_string(),
        dead.to_string(),
    ];
    let seeds: Vec<u64> = names.iter().map(|n| route::node_seed(n)).collect();
    let mut checked = 0;
    for line in stdout.lines().filter_map(|l| l.strip_prefix("ROUTE ")) {
        let (lhs, order) = line.split_once(" -> ").unwrap();
        let mut it = lhs.split(' ');
        let (target, f16) = (it.next().unwrap(), it.next().unwrap() == "1");
        let x: Vec<f32> = it.map(|v| v.parse().unwrap()).collect();
        let bits: Vec<u16> = x
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
        let input = if f16 {
            Input::F16(&bits)
        } else {
            Input::F32(&x)
        };
        let want: Vec<&str> = route::order(route::request_key(target, &input), &seeds)
            .into_iter()
            .map(|i| names[i].as_str())
            .collect();
        assert_eq!(order, want.join(","), "{line}");
        checked += 1;
    }
    assert_eq!(checked, 120);
}
