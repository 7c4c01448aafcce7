//! The cluster client (`beast::client::Cluster`) against real nodes:
//! identical inputs meet the same node's cache, feedback reaches the node
//! that answered, a draining node (its /readyz 503) leaves the rotation,
//! and a node killed with SIGKILL under load fails no request that had
//! budget left: its requests in flight are retried on the next node and
//! its keys re-route to their second choice.

mod common;

use beast::client::{Cluster, ClusterConfig};
use beast::model::{Activation, BatchLimits, Model, OutputTransform};
use beast::wire::{CacheControl, RequestSpec};
use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn fast_health() -> ClusterConfig {
    ClusterConfig {
        health_interval: Duration::from_millis(50),
        // A live node's /readyz slower than 500 ms on a loaded machine would
        // mark it down; a killed node is still seen at once (refused).
        readyz_timeout: Duration::from_secs(5),
        ..ClusterConfig::default()
    }
}

fn node_list(nodes: &[beast::server::ServerHandle]) -> String {
    nodes
        .iter()
        .map(|n| format!("{}:{}", n.addr, n.admin_addr.unwrap().port()))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn identical_inputs_meet_the_same_node_and_hit_its_cache() {
    let nodes: Vec<_> = (0..3).map(|_| start_server()).collect();
    let c = Cluster::connect(&node_list(&nodes), fast_health()).unwrap();
    let mut used = std::collections::HashSet::new();
    for i in 0..30 {
        let x = rows(100 + i, 1, WIDTH);
        let first = c.predict(&spec("a", 1, WIDTH, &x)).unwrap();
        let again = c.predict(&spec("a", 1, WIDTH, &x)).unwrap();
        assert_eq!(first.node, c.route(&spec("a", 1, WIDTH, &x))[0]);
        assert_eq!(again.node, first.node);
        assert!(!first.cached && again.cached, "the second ask is a hit");
        assert_eq!(again.outputs, first.outputs);
        used.insert(first.node);
    }
    assert_eq!(used.len(), 3, "keys spread over every node");
}

#[test]
fn feedback_goes_to_the_node_that_answered() {
    let nodes: Vec<_> = (0..2).map(|_| start_server()).collect();
    let c = Cluster::connect(&node_list(&nodes), fast_health()).unwrap();
    let mut used = std::collections::HashSet::new();
    for i in 0..12 {
        let x = rows(200 + i, 1, WIDTH);
        let a = c
            .predict(&RequestSpec {
                cache: CacheControl::Bypass,
                ..spec("ens", 1, WIDTH, &x)
            })
            .unwrap();
        assert_ne!(a.ticket, 0);
        c.feedback(&a, 1).unwrap();
        used.insert(a.node);
    }
    assert_eq!(used.len(), 2);
}

#[test]
fn a_draining_node_leaves_the_rotation_and_its_keys_go_to_their_second_choice() {
    let mut cfg = test_config();
    cfg.drain_s = 30.0;
    let nodes: Vec<_> = (0..3)
        .map(|_| start_with(cfg.clone(), test_repository(300_000)))
        .collect();
    let c = Cluster::connect(&node_list(&nodes), fast_health()).unwrap();
    let victim = nodes[1].addr;
    let xs: Vec<Vec<f32>> = (0..2000)
        .map(|i| rows(300 + i, 1, WIDTH))
        .filter(|x| c.route(&spec("a", 1, WIDTH, x))[0] == victim)
        .take(10)
        .collect();
    assert_eq!(xs.len(), 10);
    for x in &xs {
        assert_eq!(c.predict(&spec("a", 1, WIDTH, x)).unwrap().node, victim);
    }
    let admin = nodes[1].admin_addr.unwrap().to_string();
    let (code, body) = beast::server::admin::request(
        "POST",
        &admin,
        "/v1/drain?seconds=30",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    wait_until(
        Duration::from_secs(10),
        "the client sees /readyz 503",
        || !c.nodes()[1].ready,
    );
    for x in &xs {
        let a = c.predict(&spec("a", 1, WIDTH, x)).unwrap();
        assert_eq!(a.node, c.route(&spec("a", 1, WIDTH, x))[1]);
        assert_eq!(a.attempts, 1);
    }
}

/// A `beast serve` child process.
struct Node {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_node(models: &Path, cfg: &Path) -> Node {
    let mut child = Command::new(env!("CARGO_BIN_EXE_beast"))
        .args(["serve", "--listen", "127.0.0.1:0", "--cores", "0"])
        .arg("--models")
        .arg(models)
        .arg("--config")
        .arg(cfg)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let (mut addr, mut admin) = (None, None);
    let end = Instant::now() + Duration::from_secs(60);
    let after = |l: &str, marker: &str| -> Option<SocketAddr> {
        let rest = l.split(marker).nth(1)?;
        rest.split(|c: char| c.is_whitespace() || c == '/')
            .next()?
            .parse()
            .ok()
    };
    while addr.is_none() || admin.is_none() {
        let l = lines
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .expect("beast serve logs its addresses");
        addr = addr.or(after(&l, "listening on "));
        admin = admin.or(after(&l, "admin port on http://"));
    }
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || while lines.recv().is_ok() {});
    Node {
        child,
        addr: addr.unwrap(),
        admin: admin.unwrap(),
    }
}

/// One request's outcome: (input index, started after the kill, result).
type Outcome = (usize, bool, Result<(SocketAddr, u32), String>);

#[test]
fn a_node_killed_under_load_fails_no_request_and_its_keys_re_route() {
    let dir = temp_dir("cluster-kill");
    let models = dir.join("models");
    let mut m = Model::random(
        "m",
        &[WIDTH, 16, CLASSES],
        Activation::Relu,
        OutputTransform::Softmax,
        5,
    );
    m.batch = BatchLimits {
        max_batch: 64,
        min_batch: 1,
        max_queue_delay_us: 100,
        queue_rows_max: 4096,
    };
    beast::model::demo::write_model(&models, &m).unwrap();
    let cfg = dir.join("beast.toml");
    std::fs::write(
        &cfg,
        "admin_listen = \"127.0.0.1:0\"\n[cache]\nl2_path = \"\"\n",
    )
    .unwrap();
    let mut nodes: Vec<Node> = (0..3).map(|_| spawn_node(&models, &cfg)).collect();
    let list: Vec<String> = nodes
        .iter()
        .map(|n| format!("{}:{}", n.addr, n.admin.port()))
        .collect();
    let cluster = Arc::new(Cluster::connect(&list.join(","), fast_health()).unwrap());
    // Distinct inputs, uncached: every request reaches a node.
    let inputs: Arc<Vec<Vec<f32>>> = Arc::new((0..300).map(|i| rows(i, 1, WIDTH)).collect());
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let (c, xs, killed, stop, out) = (
                cluster.clone(),
                inputs.clone(),
                killed.clone(),
                stop.clone(),
                outcomes.clone(),
            );
            std::thread::spawn(move || {
                let mut i = t * 37;
                while !stop.load(Ordering::Relaxed) {
                    i = (i + 7) % xs.len();
                    let after = killed.load(Ordering::SeqCst);
                    let r = c.predict(&RequestSpec {
                        deadline_us: Some(2_000_000),
                        cache: CacheControl::Bypass,
                        ..spec("m", 1, WIDTH, &xs[i])
                    });
                    let r = r.map(|a| (a.node, a.attempts)).map_err(|e| e.to_string());
                    out.lock().unwrap().push((i, after, r));
                }
            })
        })
        .collect();
    wait_until(Duration::from_secs(30), "every node answers", || {
        cluster.nodes().iter().all(|n| n.answered >= 50)
    });
    let victim = nodes[0].addr;
    // SIGKILL: no drain, no goodbye; its connections reset mid-request.
    nodes[0].child.kill().unwrap();
    let _ = nodes[0].child.wait();
    killed.store(true, Ordering::SeqCst);
    let answered_at_kill: u64 = cluster.nodes()[1..].iter().map(|n| n.answered).sum();
    wait_until(
        Duration::from_secs(30),
        "survivors answer 3000 more",
        || cluster.nodes()[1..].iter().map(|n| n.answered).sum::<u64>() >= answered_at_kill + 3000,
    );
    wait_until(
        Duration::from_secs(10),
        "the client sees the dead node's /readyz fail",
        || !cluster.nodes()[0].ready,
    );
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    // Each connection's reader thread sees the reset on its own: polled.
    wait_until(
        Duration::from_secs(10),
        "no live connection to the dead node",
        || cluster.nodes()[0].live_connections == 0,
    );

    let out = outcomes.lock().unwrap();
    let failed: Vec<_> = out.iter().filter(|o| o.2.is_err()).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let (mut rerouted, mut retried) = (0, 0);
    for (i, after, r) in out.iter() {
        let (node, attempts) = r.as_ref().unwrap();
        let order = cluster.route(&spec("m", 1, WIDTH, &inputs[*i]));
        retried += (*attempts > 1) as usize;
        if !after {
            continue;
        }
        assert_ne!(*node, victim, "answered by the dead node after the kill");
        if order[0] == victim {
            // The dead node's keys go to their second choice.
            assert!(
                *node == order[1] || *attempts > 1,
                "{i}: {node} not {order:?}"
            );
            rerouted += 1;
        } else {
            // The others keep their node.
            assert_eq!(*node, order[0]);
        }
    }
    assert!(rerouted >= 100, "only {rerouted} re-routed requests");
    eprintln!(
        "{} requests, {rerouted} re-routed after the kill, {retried} retried on another node",
        out.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
