//! The cluster-aware client: several nodes, each request sent to the node
//! that rendezvous hashing picks for its target and input (so identical
//! inputs meet the same node's cache), retried on the next node in that
//! order when its node fails, is closed, or answers OVERLOADED (predictions
//! are idempotent), never past the request's deadline; optionally hedged
//! (a second copy to the next node after a delay, first answer wins).
//! docs/CLIENT.md is the manual.

use super::health::{self, Node};
pub use super::nodes::{ClusterConfig, Hedge, NodeSpec, NODES_MAX};
use super::route;
use super::{Client, ClientError, Prediction, Reply, Slot};
use crate::wire::RequestSpec;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A node as the client sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// The last `/readyz` said 200 (true without an admin port).
    pub ready: bool,
    pub live_connections: usize,
    /// Answers (of any status) that came from this node.
    pub answered: u64,
    /// Attempts on this node that failed and were retried elsewhere.
    pub failed: u64,
}

/// An answer and where it came from. Derefs to the [`Prediction`].
pub struct Answer {
    pub prediction: Prediction,
    /// The node that answered.
    pub node: SocketAddr,
    /// Nodes the request was sent to (1 = first try).
    pub attempts: u32,
    /// The connection that answered: feedback for its ticket must go there.
    conn: Arc<Client>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("prediction", &self.prediction)
            .field("node", &self.node)
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl std::ops::Deref for Answer {
    type Target = Prediction;
    fn deref(&self) -> &Prediction {
        &self.prediction
    }
}

/// Latencies of recent answers, for [`Hedge::Percentile`].
pub const LATENCY_WINDOW: usize = 512;

struct Latencies {
    ring: Box<[AtomicU32]>,
    n: AtomicUsize,
    /// The current hedge delay in µs (0 = none yet).
    delay_us: AtomicU64,
}

impl Latencies {
    fn record(&self, us: u32, q: f64) {
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        self.ring[n % LATENCY_WINDOW].store(us, Ordering::Relaxed);
        // Recompute now and then, on the caller's thread: a copy on the stack.
        let known = (n + 1).min(LATENCY_WINDOW);
        if (n + 1).is_multiple_of(64) && known >= LATENCY_WINDOW / 4 {
            let mut v = [0u32; LATENCY_WINDOW];
            for (d, s) in v.iter_mut().zip(self.ring.iter()).take(known) {
                *d = s.load(Ordering::Relaxed);
            }
            let k = ((known as f64 * q) as usize).min(known - 1);
            let (_, x, _) = v[..known].select_nth_unstable(k);
            self.delay_us.store(*x as u64, Ordering::Relaxed);
        }
    }
}

/// A request's view of the nodes: which it tried (a bit each).
struct Tried(u64);

/// Thread-safe (`Send + Sync`): share it between threads.
pub struct Cluster {
    nodes: Vec<Arc<Node>>,
    seeds: Vec<u64>,
    cfg: ClusterConfig,
    latencies: Latencies,
    /// Dropped on drop: tells the keepers to stop.
    stop: Vec<SyncSender<()>>,
    keepers: Vec<JoinHandle<()>>,
}

impl Cluster {
    /// Connect to `nodes` ("a:7878,b:7878:9464,..."; see [`NodeSpec::parse`]).
    pub fn connect(nodes: &str, cfg: ClusterConfig) -> Result<Cluster, String> {
        Cluster::with_nodes(NodeSpec::parse_list(nodes)?, cfg)
    }

    /// Open every node's connections and ask each `/readyz` once; fails
    /// only when no node can be reached. Unreachable nodes are retried in
    /// the background.
    pub fn with_nodes(specs: Vec<NodeSpec>, cfg: ClusterConfig) -> Result<Cluster, String> {
        if specs.is_empty() || specs.len() > NODES_MAX {
            return Err(format!(
                "a cluster has 1..={NODES_MAX} nodes, got {}",
                specs.len()
            ));
        }
        if cfg.attempts == 0 {
            return Err("attempts must be at least 1".into());
        }
        if let Some(Hedge::Percentile(q)) = cfg.hedge {
            if !(q > 0.0 && q < 1.0) {
                return Err(format!("hedge percentile must be within (0, 1), got {q}"));
            }
        }
        let epoch = Instant::now();
        let nodes: Vec<Arc<Node>> = specs
            .into_iter()
            .map(|s| Arc::new(Node::new(s, cfg.connections_per_node, epoch)))
            .collect();
        let mut errors = Vec::new();
        for n in &nodes {
            n.poll_ready(&cfg);
            if let Err(e) = n.reconnect(&cfg) {
                errors.push(e);
            }
        }
        if nodes.iter().all(|n| n.live_connections() == 0) {
            return Err(format!("no node reachable: {}", errors.join("; ")));
        }
        let mut stop = Vec::new();
        let mut keepers = Vec::new();
        for n in &nodes {
            let (tx, rx) = sync_channel(0);
            let keep = health::keep(Arc::downgrade(n), cfg.clone(), rx);
            let h = std::thread::Builder::new()
                .name("beast-cluster-health".into())
                .spawn(keep)
                .map_err(|e| format!("cannot start a health thread: {e}"))?;
            stop.push(tx);
            keepers.push(h);
        }
        Ok(Cluster {
            seeds: nodes.iter().map(|n| route::node_seed(&n.name)).collect(),
            nodes,
            cfg,
            latencies: Latencies {
                ring: (0..LATENCY_WINDOW).map(|_| AtomicU32::new(0)).collect(),
                n: AtomicUsize::new(0),
                delay_us: AtomicU64::new(0),
            },
            stop,
            keepers,
        })
    }

    /// The nodes, in the order given.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.nodes
            .iter()
            .map(|n| NodeStatus {
                addr: n.spec.addr,
                admin: n.spec.admin,
                ready: n.ready(),
                live_connections: n.live_connections(),
                answered: n.answered.load(Ordering::Relaxed),
                failed: n.failed.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The nodes a request tries, best first, when all are healthy.
    pub fn route(&self, req: &RequestSpec<'_>) -> Vec<SocketAddr> {
        let key = route::request_key(req.target, &req.input);
        route::order(key, &self.seeds)
            .into_iter()
            .map(|i| self.nodes[i].spec.addr)
            .collect()
    }

    /// The current hedge delay (`None`: no hedging, or not enough
    /// latencies known yet for a percentile).
    pub fn hedge_delay(&self) -> Option<Duration> {
        match self.cfg.hedge? {
            Hedge::After(d) => Some(d),
            Hedge::Percentile(_) => match self.latencies.delay_us.load(Ordering::Relaxed) {
                0 => None,
                us => Some(Duration::from_micros(us)),
            },
        }
    }

    /// Tell the node that answered the true class of `answer` (see
    /// [`Client::feedback`]): tickets belong to the connection that
    /// answered, so feedback goes there.
    pub fn feedback(&self, answer: &Answer, label: u32) -> Result<(), ClientError> {
        answer.conn.feedback(answer.prediction.ticket, label)
    }

    /// The next node to send to: the best untried node that is ready and
    /// connected; failing that, the best untried node with a connection
    /// (a node whose `/readyz` fails may still answer, e.g. draining).
    fn next_node(&self, key: u64, tried: &Tried) -> Option<(usize, Arc<Client>)> {
        for need_ready in [true, false] {
            let mut skip = tried.0;
            while let Some(i) = route::best(key, &self.seeds, |i| {
                skip & (1 << i) == 0 && (!need_ready || self.nodes[i].ready())
            }) {
                if let Some(c) = self.nodes[i].conn() {
                    return Some((i, c));
                }
                skip |= 1 << i;
            }
        }
        None
    }

    /// Send and wait, retrying on other nodes as the module doc says.
    pub fn predict(&self, req: &RequestSpec<'_>) -> Result<Answer, ClientError> {
        let start = Instant::now();
        let key = route::request_key(req.target, &req.input);
        let deadline = req
            .deadline_us
            .filter(|&d| d > 0)
            .map(|d| start + Duration::from_micros(d));
        let give_up = deadline.map(|d| d + self.cfg.deadline_slack);
        let max = self.cfg.attempts.min(self.nodes.len());
        // Room for every attempt's reply: the reader threads never block.
        let (tx, rx) = sync_channel::<Reply>(max);
        let mut tried = Tried(0);
        // (tag, node, connection, slot) of each attempt still waiting.
        let mut in_flight: Vec<(u32, usize, Arc<Client>, Slot)> = Vec::with_capacity(max);
        let mut attempts = 0u32;
        let mut last_err: Option<ClientError> = None;
        let mut hedge_at = None;
        loop {
            let now = Instant::now();
            let due = in_flight.is_empty() || hedge_at.is_some_and(|t| now >= t);
            // What is left of the budget travels with a retry; none left: no
            // retry, nor hedge.
            let left = deadline.map(|d| d.saturating_duration_since(now).as_micros() as u64);
            if due && (attempts as usize) < max && left != Some(0) {
                hedge_at = None;
                let spec = RequestSpec {
                    deadline_us: left.or(req.deadline_us),
                    ..*req
                };
                match self.send_next(&spec, key, &mut tried, &tx, attempts) {
                    Ok((i, c, slot)) => {
                        in_flight.push((attempts, i, c, slot));
                        attempts += 1;
                        if (attempts as usize) < max {
                            hedge_at = self.hedge_delay().map(|d| Instant::now() + d);
                        }
                    }
                    Err(e) => last_err = Some(last_err.unwrap_or(e)),
                }
            }
            if in_flight.is_empty() {
                return Err(last_err.unwrap_or_else(|| {
                    ClientError::DeadlineExceeded("deadline passed in the client".into())
                }));
            }
            // Wait for an answer, the hedge time, or the deadline (+ slack).
            let until = match (hedge_at, give_up) {
                (Some(h), Some(g)) => Some(h.min(g)),
                (h, g) => h.or(g),
            };
            let got = match until {
                Some(t) => rx.recv_timeout(t.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let (tag, result) = match got {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => {
                    if give_up.is_some_and(|g| Instant::now() >= g) {
                        return Err(ClientError::DeadlineExceeded(format!(
                            "no answer from {attempts} node(s) within the deadline"
                        )));
                    }
                    continue;
                }
                // Cannot happen while `tx` lives.
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ClientError::Closed("reply channel closed".into()))
                }
            };
            let Some(pos) = in_flight.iter().position(|f| f.0 == tag) else {
                continue;
            };
            let (_, i, conn, _slot) = in_flight.swap_remove(pos);
            let node = &self.nodes[i];
            match result {
                Ok(prediction) => {
                    node.answered.fetch_add(1, Ordering::Relaxed);
                    if let Some(Hedge::Percentile(q)) = self.cfg.hedge {
                        let us = start.elapsed().as_micros().min(u32::MAX as u128);
                        self.latencies.record(us as u32, q);
                    }
                    return Ok(Answer {
                        prediction,
                        node: node.spec.addr,
                        attempts,
                        conn,
                    });
                }
                Err(e) if retryable(&e) => {
                    node.failed.fetch_add(1, Ordering::Relaxed);
                    last_err = Some(e);
                }
                Err(e) => {
                    node.answered.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }

    /// Send to the next untried node; a connection found closed on send
    /// marks that node tried and moves on.
    fn send_next(
        &self,
        spec: &RequestSpec<'_>,
        key: u64,
        tried: &mut Tried,
        tx: &SyncSender<Reply>,
        tag: u32,
    ) -> Result<(usize, Arc<Client>, Slot), ClientError> {
        let mut last = None;
        while let Some((i, conn)) = self.next_node(key, tried) {
            tried.0 |= 1 << i;
            match conn.send_tagged(spec, tx, tag) {
                Ok(slot) => return Ok((i, conn, slot)),
                Err(e) if retryable(&e) => {
                    self.nodes[i].failed.fetch_add(1, Ordering::Relaxed);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Closed("no node available".into())))
    }
}

/// Errors another node may not have: the node or its connection failed,
/// or it is too busy now.
fn retryable(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Closed(_) | ClientError::Protocol(_) | ClientError::Overloaded(_)
    )
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.clear();
        for h in self.keepers.drain(..) {
            let _ = h.join();
        }
        for n in &self.nodes {
            n.close_all();
        }
    }
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
