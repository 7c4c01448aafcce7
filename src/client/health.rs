//! One node of a [`super::Cluster`]: its connections and what the client
//! knows of its health. A thread per node keeps that knowledge fresh: it
//! polls the node's `/readyz` (when its admin port is known) and reopens
//! closed connections, backing off exponentially while the node refuses.

use super::nodes::{ClusterConfig, NodeSpec};
use super::{lock, Client};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

pub(crate) struct Node {
    pub spec: NodeSpec,
    /// `ip:port`: the name its rendezvous seed is taken from.
    pub name: String,
    conns: Vec<Mutex<Option<Arc<Client>>>>,
    next: AtomicUsize,
    /// The last `/readyz` said 200 (always true without an admin port).
    ready: AtomicBool,
    /// Consecutive failed connects, for the backoff.
    failures: AtomicU32,
    /// No connect before this (ms since `epoch`).
    retry_at_ms: AtomicU64,
    epoch: Instant,
    pub answered: AtomicU64,
    /// Attempts on this node that failed with a retryable error.
    pub failed: AtomicU64,
}

impl Node {
    pub fn new(spec: NodeSpec, connections: usize, epoch: Instant) -> Node {
        Node {
            name: spec.addr.to_string(),
            spec,
            conns: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            ready: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            retry_at_ms: AtomicU64::new(0),
            epoch,
            answered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// An open connection, round-robin over the node's connections.
    pub fn conn(&self) -> Option<Arc<Client>> {
        let n = self.conns.len();
        for _ in 0..n {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
            if let Some(c) = lock(&self.conns[i]).as_ref() {
                if !c.is_closed() {
                    return Some(c.clone());
                }
            }
        }
        None
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn live_connections(&self) -> usize {
        self.conns
            .iter()
            .filter(|c| lock(c).as_ref().is_some_and(|c| !c.is_closed()))
            .count()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Reopen every closed connection, unless backing off. Returns the
    /// error of a failed connect.
    pub fn reconnect(&self, cfg: &ClusterConfig) -> Result<(), String> {
        if self.now_ms() < self.retry_at_ms.load(Ordering::Relaxed) {
            return Ok(());
        }
        for slot in &self.conns {
            if lock(slot).as_ref().is_some_and(|c| !c.is_closed()) {
                continue;
            }
            match Client::connect_timeout(&self.spec.addr, cfg.connect_timeout) {
                Ok(c) => {
                    // The old client (if any) is dropped outside the lock:
                    // its drop joins its reader thread.
                    let old = lock(slot).replace(Arc::new(c));
                    drop(old);
                    self.failures.store(0, Ordering::Relaxed);
                }
                Err(e) => {
                    let n = self.failures.fetch_add(1, Ordering::Relaxed).min(20);
                    let backoff = cfg
                        .backoff_min
                        .saturating_mul(1 << n.min(16))
                        .min(cfg.backoff_max);
                    self.retry_at_ms.store(
                        self.now_ms() + backoff.as_millis() as u64,
                        Ordering::Relaxed,
                    );
                    return Err(format!("{}: connect: {e}", self.name));
                }
            }
        }
        Ok(())
    }

    /// Ask the admin port's `/readyz` (a node without one is ready while
    /// it has a connection).
    pub fn poll_ready(&self, cfg: &ClusterConfig) {
        let Some(admin) = self.spec.admin else { return };
        let ok = matches!(
            crate::server::admin::get(&admin.to_string(), "/readyz", cfg.readyz_timeout),
            Ok((200, _))
        );
        self.ready.store(ok, Ordering::Relaxed);
    }

    /// Close every connection (requests in flight fail with `Closed`).
    pub fn close_all(&self) {
        for slot in &self.conns {
            let old = lock(slot).take();
            drop(old);
        }
    }
}

/// The node's keeper: every `health_interval`, poll `/readyz` and reopen
/// closed connections, until `stop` is dropped or the cluster is gone.
pub(crate) fn keep(
    node: Weak<Node>,
    cfg: ClusterConfig,
    stop: Receiver<()>,
) -> impl FnOnce() + Send + 'static {
    move || loop {
        match stop.recv_timeout(cfg.health_interval) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let Some(node) = node.upgrade() else { return };
        node.poll_ready(&cfg);
        // A failed connect is remembered as backoff; the next tick retries.
        let _ = node.reconnect(&cfg);
    }
}
