//! Learned selection state shared between nodes (`[learning.share]`,
//! docs/SELECTION.md): one sync thread per node, on Redis through the
//! `redis` crate's synchronous client.
//!
//! Each shard keeps its own counters (what its feedback taught it) and a
//! `remote` part (everyone else's), and uses their sum. Off the request
//! path, a task per shard (`shard/share.rs`) publishes a snapshot of its
//! own counters into its [`ShardLink`] when they changed, and applies the
//! `remote` part the thread last handed it. Every `interval_ms` the thread:
//!
//! 1. sums the shards' latest snapshots into the node's total (plus what
//!    the node had published before a restart, read back at start);
//! 2. overwrites the node's own key `beast:learned:v1:<node_id>` with it
//!    and adds the node id to the set `beast:learned:v1:nodes`;
//! 3. reads every other node's key, sums all nodes' totals, and hands
//!    each shard `all − its own snapshot`.
//!
//! Nodes overwrite their own key and never increment another's, so a
//! merge is a plain sum of each node's latest total: idempotent and
//! order-free. Keys carry member fingerprints (name, version, digest):
//! counters about other bytes of a model are never used. Requests never
//! wait on any of this; with Redis down each node keeps learning (its
//! shards still share with each other, other nodes' totals are the last
//! read), logs once per transition, and counts the failed rounds.

use crate::ensemble::counters::{Counters, Kind};
use crossbeam::channel::{bounded, Receiver, RecvTimeoutError, Sender};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Prefix of every key.
pub const KEY_PREFIX: &str = "beast:learned:v1:";
/// The set of node ids.
pub const NODES_KEY: &str = "beast:learned:v1:nodes";

/// A member (or arm) a shard knows, for the metrics and to tell current
/// fingerprints from stale ones.
#[derive(Clone, Debug)]
pub(crate) struct Known {
    pub ensemble: String,
    pub member: String,
    pub fp: u64,
}

/// One shard's published state.
#[derive(Clone)]
pub(crate) struct Published {
    pub own: Arc<Counters>,
    /// Members (not arms) of the shard's ensembles.
    pub members: Arc<Vec<Known>>,
    /// Every fingerprint in use (members and arms).
    pub fps: Arc<HashSet<u64>>,
}

/// What a shard and the sync thread exchange. Locked by the shard's
/// periodic task and the thread, never on the request path.
#[derive(Default)]
pub(crate) struct ShardLink {
    own: Mutex<Option<Published>>,
    /// The shard's first snapshot (what it loaded at start), set once.
    first: Mutex<Option<Arc<Counters>>>,
    remote: Mutex<Option<Arc<Counters>>>,
    remote_seq: AtomicU64,
}

impl ShardLink {
    pub fn publish(&self, p: Published) {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(p.own.clone());
        }
        *self.own.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }

    fn first(&self) -> Option<Arc<Counters>> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn latest(&self) -> Option<Published> {
        self.own.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_remote(&self, c: Counters) {
        *self.remote.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(c));
        self.remote_seq.fetch_add(1, Ordering::Release);
    }

    /// The remote part handed over since `seen` (updated), if any.
    pub fn take_remote(&self, seen: &mut u64) -> Option<Arc<Counters>> {
        let s = self.remote_seq.load(Ordering::Acquire);
        if s == *seen {
            return None;
        }
        *seen = s;
        self.remote
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The sync thread's figures (`/metrics`).
pub struct ShareStats {
    pub node_id: String,
    pub url: String,
    pub interval: Duration,
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    /// Milliseconds after `epoch` of the last successful round, + 1 (0: never).
    last_ok_ms: AtomicU64,
    epoch: Instant,
    /// Nodes merged in the last successful round (this one included).
    pub nodes: AtomicU64,
    /// (ensemble, member) → (correct, total) over every domain, every node
    /// merged, as this node uses it (its own fingerprints only).
    members: Mutex<BTreeMap<(String, String), [f64; 2]>>,
}

impl ShareStats {
    /// Seconds since the last successful round (`None`: never).
    pub fn age_s(&self) -> Option<f64> {
        match self.last_ok_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(self.epoch.elapsed().as_secs_f64() - (t - 1) as f64 / 1e3),
        }
    }

    /// Prometheus text (admin thread).
    pub fn render(&self, out: &mut String) {
        let esc = |v: &str| {
            let mut s = String::new();
            crate::metrics::prometheus::escape_label(v, &mut s);
            s
        };
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let n = "beast_learning_sync_total";
        head(
            out,
            n,
            "counter",
            "Rounds of the learned-state sync with Redis ([learning.share]) by result.",
        );
        let _ = writeln!(
            out,
            "{n}{{result=\"ok\"}} {}",
            self.ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "{n}{{result=\"error\"}} {}",
            self.errors.load(Ordering::Relaxed)
        );
        let n = "beast_learning_sync_age_seconds";
        head(
            out,
            n,
            "gauge",
            "Seconds since the last successful learned-state sync (+Inf: none yet).",
        );
        match self.age_s() {
            Some(a) => {
                let _ = writeln!(out, "{n} {a:.3}");
            }
            None => {
                let _ = writeln!(out, "{n} +Inf");
            }
        }
        let n = "beast_learning_nodes";
        head(
            out,
            n,
            "gauge",
            "Nodes whose learned state the last successful sync merged (this one included).",
        );
        let _ = writeln!(out, "{n} {}", self.nodes.load(Ordering::Relaxed));
        let members = self.members.lock().map(|m| m.clone()).unwrap_or_default();
        for (n, i, help) in [
            ("beast_learning_member_feedback_total", 1, "Feedback on answers a member ran, every node and domain merged, as this node uses it."),
            ("beast_learning_member_correct_total", 0, "Of beast_learning_member_feedback_total, the answers where the member's own answer was right."),
        ] {
            head(out, n, "counter", help);
            for ((e, m), v) in &members {
                let _ = writeln!(out, "{n}{{ensemble=\"{}\",member=\"{}\"}} {}", esc(e), esc(m), v[i]);
            }
        }
    }
}

/// The node's handle on the sync thread.
pub struct Share {
    pub stats: Arc<ShareStats>,
    pub(crate) links: Vec<Arc<ShardLink>>,
    done: Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Share {
    /// Start the sync thread for `shards` shards. Never fails on an
    /// unreachable Redis (it keeps trying every interval).
    pub fn start(
        url: &str,
        node_id: String,
        interval: Duration,
        shards: usize,
    ) -> Result<Share, String> {
        let client =
            redis::Client::open(url).map_err(|e| format!("learning.share.url '{url}': {e}"))?;
        let stats = Arc::new(ShareStats {
            node_id: node_id.clone(),
            url: url.to_string(),
            interval,
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_ok_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            nodes: AtomicU64::new(0),
            members: Mutex::new(BTreeMap::new()),
        });
        let links: Vec<Arc<ShardLink>> = (0..shards).map(|_| Arc::default()).collect();
        let (done, stop) = bounded(1);
        let mut sync = Sync {
            client,
            con: None,
            key: format!("{KEY_PREFIX}{node_id}"),
            links: links.clone(),
            stats: stats.clone(),
            initial: None,
            restored: None,
            base: None,
            others: BTreeMap::new(),
            up: None,
        };
        eprintln!(
            "beast: learning: sharing learned selection state through {url} as node '{node_id}' every {} ms",
            interval.as_millis()
        );
        let thread = std::thread::Builder::new()
            .name("beast-learn-sync".into())
            .spawn(move || sync.run(stop, interval))
            .map_err(|e| format!("cannot start the learning sync thread: {e}"))?;
        Ok(Share {
            stats,
            links,
            done,
            thread: Some(thread),
        })
    }

    /// One last round (the shards have published their final state), then
    /// stop the thread.
    pub fn finish(mut self) {
        let _ = self.done.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Sync {
    client: redis::Client,
    con: Option<redis::Connection>,
    key: String,
    links: Vec<Arc<ShardLink>>,
    stats: Arc<ShareStats>,
    /// The sum of the shards' first snapshots (what they loaded from their
    /// state files), once every shard has published.
    initial: Option<Counters>,
    /// This node's key as read at start (what it published before a restart).
    restored: Option<Counters>,
    /// `restored − initial`: what the node had learned that its shards no
    /// longer hold; published with their counters. `None` until known: the
    /// node does not write its key before it has read it back.
    base: Option<Counters>,
    /// Every other node's total as last read.
    others: BTreeMap<String, Counters>,
    /// Redis reachable in the last round (`None`: no round yet).
    up: Option<bool>,
}

impl Sync {
    fn run(&mut self, stop: Receiver<()>, interval: Duration) {
        loop {
            let last = match stop.recv_timeout(interval) {
                Err(RecvTimeoutError::Timeout) => false,
                Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
            };
            self.round(interval);
            if last {
                return;
            }
        }
    }

    fn round(&mut self, interval: Duration) {
        let shards: Vec<Option<Published>> = self.links.iter().map(|l| l.latest()).collect();
        if self.initial.is_none() {
            let first: Vec<_> = self.links.iter().map(|l| l.first()).collect();
            if first.iter().all(Option::is_some) {
                self.initial = Some(Counters::sum(first.iter().flatten().map(|c| &**c)));
            }
        }
        let local = Counters::sum(shards.iter().flatten().map(|p| &*p.own));
        let fps: HashSet<u64> = shards
            .iter()
            .flatten()
            .flat_map(|p| p.fps.iter().copied())
            .collect();
        if self.base.is_none() {
            if let (Some(r), Some(i)) = (&self.restored, &self.initial) {
                let mut b = r.minus(i);
                b.retain_fps(&fps);
                self.base = Some(b);
            }
        }
        let mut node = local;
        if let Some(b) = &self.base {
            node.merge(b);
        }
        let result = self.exchange(&node, interval);
        self.note(result);
        let mut all = node;
        for c in self.others.values() {
            all.merge(c);
        }
        for (link, p) in self.links.iter().zip(&shards) {
            link.set_remote(match p {
                Some(p) => all.minus(&p.own),
                None => all.clone(),
            });
        }
        self.view(&all, &shards);
    }

    /// Write this node's total, read every node's. Errors leave `others` as
    /// last read.
    fn exchange(&mut self, node: &Counters, interval: Duration) -> Result<(), String> {
        let timeout = interval.clamp(Duration::from_millis(50), Duration::from_secs(2));
        if self.con.is_none() {
            let c = self
                .client
                .get_connection_with_timeout(timeout)
                .and_then(|c| {
                    c.set_read_timeout(Some(timeout))?;
                    c.set_write_timeout(Some(timeout))?;
                    Ok(c)
                })
                .map_err(|e| e.to_string())?;
            self.con = Some(c);
        }
        let con = self.con.as_mut().expect("connected above");
        let err = |e: redis::RedisError| e.to_string();
        if self.restored.is_none() {
            let text: Option<String> = redis::cmd("GET").arg(&self.key).query(con).map_err(err)?;
            let c = decode(&text.unwrap_or_default());
            self.restored = Some(c);
        }
        if self.base.is_some() {
            redis::pipe()
                .cmd("SET")
                .arg(&self.key)
                .arg(node.encode())
                .ignore()
                .cmd("SADD")
                .arg(NODES_KEY)
                .arg(&self.stats.node_id)
                .ignore()
                .query::<()>(con)
                .map_err(err)?;
        }
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(NODES_KEY)
            .query(con)
            .map_err(err)?;
        let ids: Vec<String> = ids
            .into_iter()
            .filter(|i| *i != self.stats.node_id)
            .collect();
        let mut others = BTreeMap::new();
        if !ids.is_empty() {
            let mut get = redis::cmd("MGET");
            for i in &ids {
                get.arg(format!("{KEY_PREFIX}{i}"));
            }
            let values: Vec<Option<String>> = get.query(con).map_err(err)?;
            for (id, v) in ids.into_iter().zip(values) {
                if let Some(v) = v {
                    others.insert(id, decode(&v));
                }
            }
        }
        self.stats
            .nodes
            .store(others.len() as u64 + 1, Ordering::Relaxed);
        self.others = others;
        Ok(())
    }

    fn note(&mut self, r: Result<(), String>) {
        let st = &self.stats;
        match r {
            Ok(()) => {
                st.ok.fetch_add(1, Ordering::Relaxed);
                let t = st.epoch.elapsed().as_millis() as u64 + 1;
                st.last_ok_ms.store(t, Ordering::Relaxed);
                if self.up != Some(true) {
                    eprintln!(
                        "beast: learning: {} reachable: merging the learned state of {} node(s)",
                        st.url,
                        st.nodes.load(Ordering::Relaxed)
                    );
                }
                self.up = Some(true);
            }
            Err(e) => {
                st.errors.fetch_add(1, Ordering::Relaxed);
                self.con = None;
                if self.up != Some(false) {
                    eprintln!(
                        "beast: learning: {} unreachable ({e}): learning locally, retrying every {} ms",
                        st.url,
                        st.interval.as_millis()
                    );
                }
                self.up = Some(false);
            }
        }
    }

    /// The per-member figures for `/metrics`.
    fn view(&self, all: &Counters, shards: &[Option<Published>]) {
        let mut names = BTreeMap::new();
        for p in shards.iter().flatten() {
            for k in p.members.iter() {
                names.insert((k.ensemble.clone(), k.fp), k.member.clone());
            }
        }
        let mut m: BTreeMap<(String, String), [f64; 2]> = BTreeMap::new();
        for ((e, _), name) in &names {
            m.entry((e.clone(), name.clone())).or_default();
        }
        for (k, v) in &all.map {
            if k.kind != Kind::Acc {
                continue;
            }
            if let Some(name) = names.get(&(k.ensemble.clone(), k.fp)) {
                let e = m.entry((k.ensemble.clone(), name.clone())).or_default();
                e[0] += v[0];
                e[1] += v[1];
            }
        }
        if let Ok(mut s) = self.stats.members.lock() {
            *s = m;
        }
    }
}

fn decode(text: &str) -> Counters {
    use crate::ensemble::{bandit::BANDIT_PRIOR, stacker::STACKER_ETA};
    Counters::decode(text, BANDIT_PRIOR as f64, STACKER_ETA as f64).0
}
