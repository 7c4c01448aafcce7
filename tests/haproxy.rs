//! deploy/haproxy: HAProxy (TCP mode, /readyz health checks) in front of
//! two nodes: requests through it are answered by both; a node drained
//! with `POST /v1/drain` leaves the rotation (new connections go to the
//! other) without failing a request. Prints `SKIP:` without haproxy.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn accepted(admin: std::net::SocketAddr) -> f64 {
    metric(admin, "beast_connections_total").unwrap_or(0.0)
}

/// HAProxy's view of server `name` (`UP`, `DOWN`, ...), from its stats CSV.
fn status(stats: u16, name: &str) -> Option<String> {
    let (_, csv) = beast::server::admin::get(
        &format!("127.0.0.1:{stats}"),
        "/;csv",
        Duration::from_secs(2),
    )
    .ok()?;
    csv.lines().find_map(|l| {
        let f: Vec<&str> = l.split(',').collect();
        (f.len() > 17 && f[0] == "beast_nodes" && f[1] == name).then(|| f[17].to_string())
    })
}

#[test]
fn haproxy_balances_two_nodes_and_a_drained_node_leaves_the_rotation() {
    if Command::new("haproxy").arg("-v").output().is_err() {
        println!("SKIP: haproxy not found (apt-get install haproxy)");
        return;
    }
    let mut cfg = test_config();
    cfg.drain_s = 30.0;
    let nodes = [
        start_with(cfg.clone(), test_repository(300_000)),
        start_with(cfg, test_repository(300_000)),
    ];
    let admins: Vec<_> = nodes.iter().map(|n| n.admin_addr.unwrap()).collect();
    let (port, stats) = (free_port(), free_port());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy/run.sh");
    let mut cmd = Command::new(script);
    cmd.args([port.to_string(), stats.to_string()]);
    for (n, a) in nodes.iter().zip(&admins) {
        cmd.arg(format!("127.0.0.1:{}:{}", n.addr.port(), a.port()));
    }
    let _proxy = Proxy(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(Duration::from_secs(10), "both nodes UP in haproxy", || {
        status(stats, "node0").as_deref() == Some("UP")
            && status(stats, "node1").as_deref() == Some("UP")
    });
    let lb: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let x = rows(7, 1, WIDTH);
    let mut conns: Vec<Raw> = (0..6).map(|_| Raw::connect(lb)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(i as u64 + 1, &spec("a", 1, WIDTH, &x));
        assert_eq!(c.recv().status, beast::wire::Status::Ok);
    }
    assert!(
        accepted(admins[0]) >= 1.0 && accepted(admins[1]) >= 1.0,
        "both nodes serve"
    );

    let (code, body) = beast::server::admin::request(
        "POST",
        &admins[0].to_string(),
        "/v1/drain?seconds=30",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    wait_until(Duration::from_secs(10), "haproxy marks node0 DOWN", || {
        status(stats, "node0").as_deref() == Some("DOWN")
    });
    // Open connections to the draining node are still answered.
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(100 + i as u64, &spec("a", 1, WIDTH, &x));
        assert_eq!(c.recv().status, beast::wire::Status::Ok);
    }
    let before = accepted(admins[0]);
    for i in 0..6 {
        let mut c = Raw::connect(lb);
        c.send(200 + i, &spec("a", 1, WIDTH, &x));
        assert_eq!(c.recv().status, beast::wire::Status::Ok);
    }
    assert_eq!(
        accepted(admins[0]),
        before,
        "no new connection to the drained node"
    );
}
