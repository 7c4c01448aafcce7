//! A real `redis-server` for the L3 tests (Debian package `redis-server`,
//! installed by `.ci/run`): standalone on a free loopback port, or three
//! masters made into a Redis Cluster with `redis-cli --cluster create`.
//! Included with `#[path]` by tests/l3.rs and tests/l3_cluster.rs; the
//! callers print `SKIP:` when a binary is missing.

#![allow(dead_code)]

use super::common::{temp_dir, wait_until};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Redis {
    child: Child,
    pub port: u16,
}

fn bin(name: &str) -> Option<String> {
    ["/usr/bin", "/usr/local/bin"]
        .into_iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| std::path::Path::new(p).exists())
}

impl Redis {
    /// A fresh redis-server on `port` (0: a free one), or `None` when the
    /// binary is missing.
    pub fn start(port: u16) -> Option<Redis> {
        Redis::start_with(port, &[])
    }

    fn start_with(port: u16, extra: &[String]) -> Option<Redis> {
        let bin = bin("redis-server")?;
        let port = if port == 0 { free_port() } else { port };
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let r = Redis { child, port };
        wait_until(Duration::from_secs(10), "redis-server answers PING", || {
            r.ping()
        });
        Some(r)
    }

    pub fn ping(&self) -> bool {
        self.command("PING").is_some_and(|r| r == "+PONG\r\n")
    }

    /// One inline command; the first reply chunk (enough for short replies).
    pub fn command(&self, cmd: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
        let mut buf = vec![0u8; 8192];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Keys held by this server (`DBSIZE`).
    pub fn dbsize(&self) -> u64 {
        self.command("DBSIZE")
            .and_then(|r| r.trim().strip_prefix(':')?.parse().ok())
            .unwrap_or(0)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} redis-server");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub fn redis_or_skip() -> Option<Redis> {
    let r = Redis::start(0);
    if r.is_none() {
        println!("SKIP: redis-server not found (apt-get install redis-server)");
    }
    r
}

/// Three masters (no replicas) on free ports, made one Redis Cluster with
/// `redis-cli --cluster create`, every node reporting `cluster_state:ok`.
/// `None` (after a `SKIP:` line) without redis-server or redis-cli.
pub fn cluster_or_skip(name: &str) -> Option<Vec<Redis>> {
    let (Some(_), Some(cli)) = (bin("redis-server"), bin("redis-cli")) else {
        println!("SKIP: redis-server or redis-cli not found (apt-get install redis-server)");
        return None;
    };
    let dir = temp_dir(name);
    let nodes: Vec<Redis> = (0..3)
        .map(|i| {
            let extra = [
                "--cluster-enabled",
                "yes",
                // The bus port defaults to port + 10000, which may not be
                // free (or exist) for an ephemeral port: choose one.
                "--cluster-port",
                &free_port().to_string(),
                "--cluster-config-file",
                &dir.join(format!("nodes-{i}.conf")).display().to_string(),
                "--dir",
                &dir.display().to_string(),
                "--cluster-node-timeout",
                "2000",
            ]
            .map(String::from);
            Redis::start_with(0, &extra).expect("redis-server starts")
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = Command::new(cli)
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    assert!(
        out.status.success(),
        "redis-cli --cluster create: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for n in &nodes {
        wait_until(Duration::from_secs(20), "cluster_state:ok", || {
            n.command("CLUSTER INFO")
                .is_some_and(|i| i.contains("cluster_state:ok"))
        });
    }
    Some(nodes)
}
