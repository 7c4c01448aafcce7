//! The server: one glommio executor per core ("shard"), each with its own
//! SO_REUSEPORT listener, connections, batch queues and backend.
//!
//! Owns: starting and stopping shards, the accept loop (`run`), and (in
//! `conn`) the connection loop — the only place that drives a request from
//! socket to socket. Shards share nothing mutable: models are `Arc`s,
//! metrics are per-shard counters summed by readers. What they serve
//! changes without a restart through `registry` generations published by
//! `lifecycle` (reload, load, unload, drain, rollouts in `rollout`).
//!
//! Shutdown (SIGINT/SIGTERM or [`ServerHandle::stop`]): every shard stops
//! accepting, shuts down the read side of its connections (no new
//! requests), answers everything in flight, closes, and exits; the process
//! then exits 0.

pub mod admin;
mod cache;
mod conn;
mod conn_state;
pub mod lifecycle;
mod notify;
pub mod registry;
pub mod rollout;
mod run;
mod select;
mod shard;
pub mod share;
mod slab;
mod uring;
mod watchdog;

use crate::config::Config;
use crate::ensemble::cost::{self, SelectionCounters, SelectionStat};
use crate::metrics::{ShardMetrics, Targets, Totals};
use crate::model::load::Repository;
pub use cache::CacheShared;
use glommio::{LocalExecutorBuilder, Placement};
use registry::{Hub, Registry};
use run::{run_shard, ShardStart};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

/// A running server.
pub struct ServerHandle {
    /// The address the shards listen on (the real port when 0 was asked for).
    pub addr: SocketAddr,
    /// Name of the backend each shard uses.
    pub backend: String,
    /// The admin HTTP port's address (the real port when 0 was asked for);
    /// `None` when `admin_listen` is off.
    pub admin_addr: Option<SocketAddr>,
    admin: Option<admin::Admin>,
    /// The prediction cache shared by all shards (purges go here).
    pub cache: Arc<CacheShared>,
    stop: Arc<AtomicBool>,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
    metrics: Vec<Arc<ShardMetrics>>,
    selection: Vec<Arc<SelectionCounters>>,
    lifecycle: Arc<lifecycle::Lifecycle>,
    share: Option<share::Share>,
    watchdog: watchdog::Watchdog,
}

impl ServerHandle {
    /// Exit the process (status 1) when a stop has not ended 10 s past
    /// `shutdown_grace_ms`, after logging what each shard still waits on
    /// (the binary; a library user gets the log line only).
    pub fn exit_on_stalled_stop(&self) {
        self.watchdog.exit_on_stall();
    }

    /// Reloads, loads and unloads without a restart (docs/MODELS.md).
    pub fn lifecycle(&self) -> Arc<lifecycle::Lifecycle> {
        self.lifecycle.clone()
    }

    /// The flag that stops the server when set (signal handlers set it).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Ask every shard to stop (returns at once).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Counters summed over shards.
    pub fn totals(&self) -> Totals {
        Totals::sum(&self.metrics)
    }

    /// Member-selection cost and feedback counters per ensemble and
    /// domain, summed over shards (docs/SELECTION.md).
    pub fn selection_stats(&self) -> Vec<SelectionStat> {
        cost::snapshot(&self.selection)
    }

    /// Wait until every shard has exited.
    pub fn wait(self) -> Totals {
        for t in self.threads {
            let _ = t.join();
        }
        self.watchdog.join();
        // The shards published their last counters on the way out.
        if let Some(s) = self.share {
            s.finish();
        }
        if let Some(a) = self.admin {
            a.shutdown();
        }
        self.cache.flush();
        Totals::sum(&self.metrics)
    }

    /// `stop` then `wait`.
    pub fn shutdown(self) -> Totals {
        self.stop();
        self.wait()
    }
}

/// Start one shard per configured CPU and return once all listen
/// ([`Starting::begin`] then [`Starting::start`]).
pub fn start(cfg: Config, repo: Arc<Repository>) -> Result<ServerHandle, String> {
    Starting::begin(cfg)?.start(repo)
}

/// A server on its way up. [`Starting::begin`] does the fast checks (the
/// config, the port is free) and brings up the admin port, so that
/// `/healthz` answers and `/readyz` says `starting: <step>` while the slow
/// steps run: loading the models (the caller's, between `begin` and
/// `start`), the L2 open scan and shard warm-up (in [`Starting::start`]).
pub struct Starting {
    cfg: Config,
    /// The port the shards will bind (the real one when 0 was asked for).
    addr: SocketAddr,
    /// With port 0: a bound, not listening socket that holds the port
    /// until the shards have bound it too.
    placeholder: Option<socket2::Socket>,
    stop: Arc<AtomicBool>,
    admin: Option<admin::Admin>,
}

impl Starting {
    /// Validate `cfg`, check that its port is free, and start the admin port.
    pub fn begin(cfg: Config) -> Result<Starting, String> {
        cfg.validate()?;
        let mut addr: SocketAddr = cfg
            .listen
            .parse()
            .map_err(|e| format!("listen {}: {e}", cfg.listen))?;
        // With port 0 every shard would get a different port: bind (without
        // listening, so it never takes a connection) to learn one, and hold it
        // until the shards have bound it too.
        let placeholder = if addr.port() == 0 {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )
            .map_err(|e| format!("socket: {e}"))?;
            s.set_reuse_port(true)
                .map_err(|e| format!("SO_REUSEPORT: {e}"))?;
            s.set_reuse_address(true)
                .map_err(|e| format!("SO_REUSEADDR: {e}"))?;
            s.bind(&addr.into())
                .map_err(|e| format!("bind {addr}: {e}"))?;
            addr = s
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or("placeholder socket has no address")?;
            Some(s)
        } else {
            // SO_REUSEPORT would let this server silently share the port with
            // another process of the same user (splitting its traffic): bind
            // once without it to make sure the port is really free. std binds
            // with SO_REUSEADDR, as the shards' listeners do (see `listen`), so
            // connections left in TIME_WAIT by a previous server on this port
            // do not count as "in use"; a live listener does.
            std::net::TcpListener::bind(addr).map_err(|e| format!("listen {addr}: {e}"))?;
            None
        };
        let stop = Arc::new(AtomicBool::new(false));
        let admin = match cfg.admin_addr()? {
            Some(a) => Some(admin::Admin::spawn(
                a,
                Arc::new(admin::AdminState::new(
                    stop.clone(),
                    cfg.trace_sample_rate,
                    cfg.ready_with_refused,
                )),
            )?),
            None => None,
        };
        Ok(Starting {
            cfg,
            addr,
            placeholder,
            stop,
            admin,
        })
    }

    /// The validated config.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The admin port's address (the real port when 0 was asked for).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr)
    }

    /// Name the start-up step under way; `/readyz` answers
    /// `starting: <step>` meanwhile.
    pub fn step(&self, step: &'static str) {
        if let Some(a) = &self.admin {
            a.state.set_step(step);
        }
    }

    /// Open the cache, start one shard per configured CPU and return once
    /// all listen.
    pub fn start(mut self, repo: Arc<Repository>) -> Result<ServerHandle, String> {
        let admin = self.admin.take();
        let stop = self.stop.clone();
        let stop_admin = |admin: Option<admin::Admin>| admin.map(admin::Admin::shutdown);
        let started = start_shards(&self.cfg, self.addr, stop.clone(), repo, admin.as_ref());
        // The shards have bound the port (or given up): let it go.
        drop(self.placeholder.take());
        match started {
            Ok(parts) => Ok(ServerHandle {
                addr: self.addr,
                admin_addr: admin.as_ref().map(|a| a.addr),
                admin,
                stop,
                backend: parts.backend,
                cache: parts.cache,
                threads: parts.threads,
                metrics: parts.metrics,
                selection: parts.selection,
                lifecycle: parts.lifecycle,
                share: parts.share,
                watchdog: parts.watchdog,
            }),
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                stop_admin(admin);
                Err(e)
            }
        }
    }
}

/// Open the cache and start the shards; returns once all listen.
fn start_shards(
    cfg: &Config,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    repo: Arc<Repository>,
    admin: Option<&admin::Admin>,
) -> Result<Running, String> {
    let step = |s: &'static str| {
        if let Some(a) = admin {
            a.state.set_step(s);
        }
    };
    if let Some(a) = admin {
        a.state.repo.set(repo.clone());
    }
    let cfg = Arc::new(cfg.clone());
    let cpus = cfg.shard_cpus();
    let hub = Arc::new(Hub::new(
        Arc::new(Registry::new(1, repo.clone(), Default::default(), None)),
        cpus.len(),
    ));
    step("opening the L2 cache");
    let cache = Arc::new(CacheShared::open(
        &cfg,
        repo.models.keys().chain(repo.ensembles.keys()).cloned(),
    ));
    step("warming up shards");
    let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
    let mut threads: Vec<glommio::ExecutorJoinHandle<()>> = Vec::new();
    // Metrics: sized once for every target name, labelled by CPU.
    crate::metrics::trace::epoch();
    let targets = Arc::new(Targets::from_repo(&repo));
    let metrics: Vec<Arc<ShardMetrics>> = cpus
        .iter()
        .map(|&cpu| {
            Arc::new(ShardMetrics::new(
                cpu,
                targets.clone(),
                cfg.trace_sample_rate,
                cfg.trace_ring_records,
            ))
        })
        .collect();
    let share = match cfg.share_url() {
        Some(url) => {
            let s = cfg
                .learning
                .share
                .as_ref()
                .map(|s| s.interval_ms)
                .unwrap_or(1000);
            let id = cfg.share_node_id(addr.port());
            Some(share::Share::start(
                &url,
                id,
                std::time::Duration::from_millis(s),
                cpus.len(),
            )?)
        }
        None => None,
    };
    if let Some(a) = admin {
        let _ = a.state.serving.set(admin::Serving {
            metrics: metrics.clone(),
            cache: cache.clone(),
            learning: share.as_ref().map(|s| s.stats.clone()),
        });
    }
    let io_memory = io_memory_per_shard(cfg.io_memory_bytes, cpus.len(), memlock_limit());
    if io_memory < cfg.io_memory_bytes {
        eprintln!(
            "beast: io_memory {} KiB per shard instead of {} KiB: {} shards must fit the memlock limit of {} KiB",
            io_memory >> 10,
            cfg.io_memory_bytes >> 10,
            cpus.len(),
            memlock_limit().unwrap_or(0) >> 10
        );
    }
    let mut selection = Vec::new();
    let mut beats = Vec::new();
    for (id, &cpu) in cpus.iter().enumerate() {
        let m = metrics[id].clone();
        let sel = Arc::new(SelectionCounters::new(
            repo.ensembles.keys().cloned().collect(),
            cfg.selection_domains_max,
        ));
        selection.push(sel.clone());
        let start = ShardStart {
            id,
            cfg: cfg.clone(),
            hub: hub.clone(),
            addr,
            stop: stop.clone(),
            metrics: m,
            ready: ready_tx.clone(),
            cache: cache.clone(),
            selection: sel,
            share: share.as_ref().map(|s| s.links[id].clone()),
            beat: match watchdog::Beat::new() {
                Ok(b) => b,
                Err(e) => {
                    stop.store(true, Ordering::SeqCst);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(format!("shard {id}: eventfd: {e}"));
                }
            },
        };
        beats.push(start.beat.clone());
        let placement = if cfg.pin_shards {
            Placement::Fixed(cpu)
        } else {
            Placement::Unbound
        };
        let builder = LocalExecutorBuilder::new(placement)
            .name(&format!("beast-shard-{id}"))
            .io_memory(io_memory);
        let spawned = builder.spawn(move || async move {
            run_shard(start).await;
        });
        match spawned {
            Ok(h) => threads.push(h),
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                for t in threads {
                    let _ = t.join();
                }
                return Err(format!(
                    "shard {id} on cpu {cpu}: cannot start executor: {e}"
                ));
            }
        }
    }
    drop(ready_tx);
    let mut backend = String::new();
    for _ in 0..cpus.len() {
        match ready_rx.recv() {
            Ok(Ok(name)) => backend = name,
            other => {
                let e = match other {
                    Ok(Err(e)) => e,
                    _ => "a shard exited during start-up".to_string(),
                };
                stop.store(true, Ordering::SeqCst);
                for t in threads {
                    let _ = t.join();
                }
                return Err(e);
            }
        }
    }
    let lifecycle = Arc::new(lifecycle::Lifecycle::new(
        cfg.clone(),
        hub,
        stop.clone(),
        admin.map(|a| a.state.clone() as Arc<dyn lifecycle::Observer>),
    ));
    lifecycle.start_polling();
    if let Some(a) = admin {
        let _ = a.state.backend.set(backend.clone());
        let _ = a.state.lifecycle.set(lifecycle.clone());
        a.state.ready.store(true, Ordering::Release);
    }
    let grace = std::time::Duration::from_millis(cfg.shutdown_grace_ms);
    Ok(Running {
        backend,
        cache,
        threads,
        metrics,
        selection,
        lifecycle,
        share,
        watchdog: watchdog::Watchdog::spawn(beats, stop, grace),
    })
}

impl Drop for Starting {
    /// A start-up given up before [`Starting::start`]: close the admin port.
    fn drop(&mut self) {
        if let Some(a) = self.admin.take() {
            a.shutdown();
        }
    }
}

/// What [`start_shards`] hands to the [`ServerHandle`].
struct Running {
    backend: String,
    cache: Arc<CacheShared>,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
    metrics: Vec<Arc<ShardMetrics>>,
    selection: Vec<Arc<SelectionCounters>>,
    lifecycle: Arc<lifecycle::Lifecycle>,
    share: Option<share::Share>,
    watchdog: watchdog::Watchdog,
}

/// The soft RLIMIT_MEMLOCK in bytes; `None` when unlimited or unknown.
fn memlock_limit() -> Option<usize> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0
        || r.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(r.rlim_cur as usize)
}

/// glommio registers each shard's I/O memory with io_uring, which a
/// non-root user pays for out of RLIMIT_MEMLOCK (8 MiB by default). Keep
/// the shards together under half the limit (the rest is left for the
/// rings and anything else locked), never below glommio's 64 KiB minimum.
fn io_memory_per_shard(wanted: usize, shards: usize, limit: Option<usize>) -> usize {
    match limit {
        None => wanted,
        Some(limit) => wanted.min((limit / 2) / shards.max(1)).max(64 << 10),
    }
}

#[cfg(test)]
mod tests {
    use super::io_memory_per_shard;

    #[test]
    fn io_memory_fits_the_memlock_limit() {
        let mib = 1 << 20;
        // 2 shards of 512 KiB fit half of 8 MiB: unchanged.
        assert_eq!(io_memory_per_shard(512 << 10, 2, Some(8 * mib)), 512 << 10);
        // 64 shards share 4 MiB: 64 KiB each.
        assert_eq!(io_memory_per_shard(512 << 10, 64, Some(8 * mib)), 64 << 10);
        // 16 shards: 256 KiB each.
        assert_eq!(io_memory_per_shard(512 << 10, 16, Some(8 * mib)), 256 << 10);
        // Unlimited (root, or raised limit): as configured.
        assert_eq!(io_memory_per_shard(4 * mib, 64, None), 4 * mib);
    }
}
