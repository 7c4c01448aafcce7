//! What a [`super::Cluster`] is given: its nodes (`host:port[:admin_port]`)
//! and its settings. Apart from `cluster.rs` so that a node's health
//! (`health.rs`) needs no import of the cluster.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Most nodes in one cluster (the tried set of a request is a bit mask).
pub const NODES_MAX: usize = 64;

/// One node: its data address and, optionally, its admin address (for
/// `/readyz`; same host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSpec {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
}

impl NodeSpec {
    /// `host:port` or `host:port:admin_port` (the node spec of
    /// deploy/haproxy/run.sh; IPv6 hosts in brackets). A host name that
    /// resolves to several addresses gives one node per address.
    pub fn parse(s: &str) -> Result<Vec<NodeSpec>, String> {
        let s = s.trim();
        let bad = |why: &str| format!("node '{s}': {why} (want host:port or host:port:admin_port)");
        let (hostport, admin) = match s.rsplit_once(':') {
            // host:port:admin — the part before the last ':' is itself host:port.
            Some((hp, a)) if has_port(hp) => {
                let a: u16 = a.parse().map_err(|_| bad("admin port is not a number"))?;
                (hp, Some(a))
            }
            _ => (s, None),
        };
        let addrs: Vec<SocketAddr> = hostport
            .to_socket_addrs()
            .map_err(|e| bad(&format!("cannot resolve: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(bad("resolves to no address"));
        }
        let mut out: Vec<NodeSpec> = Vec::new();
        for addr in addrs {
            let spec = NodeSpec {
                addr,
                admin: admin.map(|p| SocketAddr::new(addr.ip(), p)),
            };
            if !out.contains(&spec) {
                out.push(spec);
            }
        }
        Ok(out)
    }

    /// A comma-separated list of [`NodeSpec::parse`] items.
    pub fn parse_list(s: &str) -> Result<Vec<NodeSpec>, String> {
        let mut out: Vec<NodeSpec> = Vec::new();
        for item in s.split(',').filter(|i| !i.trim().is_empty()) {
            for n in NodeSpec::parse(item)? {
                if !out.iter().any(|o| o.addr == n.addr) {
                    out.push(n);
                }
            }
        }
        if out.is_empty() {
            return Err(format!("no node in '{s}'"));
        }
        Ok(out)
    }
}

/// `x` ends in `:digits` after a host (`name`, `1.2.3.4` or `[v6]`).
fn has_port(x: &str) -> bool {
    match x.rsplit_once(':') {
        Some((h, p)) => {
            !h.is_empty()
                && p.parse::<u16>().is_ok()
                && (!h.contains(':') || (h.starts_with('[') && h.ends_with(']')))
        }
        None => false,
    }
}

/// When to send a second copy of a request to the next node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hedge {
    /// After this long without an answer.
    After(Duration),
    /// After this quantile (0..1, e.g. 0.95) of the latencies of recent
    /// answers; no hedging until [`LATENCY_WINDOW`] / 4 answers are known.
    Percentile(f64),
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Connections per node (requests are spread over them round-robin).
    pub connections_per_node: usize,
    /// Most nodes one request is sent to (the first try, retries and
    /// hedges together).
    pub attempts: usize,
    pub hedge: Option<Hedge>,
    /// How often each node's `/readyz` is polled and its closed
    /// connections reopened.
    pub health_interval: Duration,
    pub readyz_timeout: Duration,
    pub connect_timeout: Duration,
    /// Backoff between failed connects to a node: doubles from min to max.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long past a request's deadline the client still waits for the
    /// node's own DEADLINE_EXCEEDED before giving up on it.
    pub deadline_slack: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            connections_per_node: 1,
            attempts: 3,
            hedge: None,
            health_interval: Duration::from_millis(250),
            readyz_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            deadline_slack: Duration::from_millis(50),
        }
    }
}
