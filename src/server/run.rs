//! One shard's thread: build its backend and first version, warm up,
//! listen, run the accept loop (each connection served by `conn.rs`), the
//! registry watcher (`shard::watch`) and the rollout comparer; on stop,
//! answer what is in flight and let every task return.

use super::cache::CacheShared;
use super::conn;
use super::registry::Hub;
use super::rollout;
use super::shard::{self, Current, Shard, Shared};
use super::uring::Ring;
use super::watchdog::{Beat, ExitGuard, Stage};
use crate::backend;
use crate::config::Config;
use crate::ensemble::cost::SelectionCounters;
use crate::metrics::ShardMetrics;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Everything a shard thread starts from.
pub(super) struct ShardStart {
    pub id: usize,
    pub cfg: Arc<Config>,
    pub hub: Arc<Hub>,
    pub addr: SocketAddr,
    pub stop: Arc<AtomicBool>,
    pub metrics: Arc<ShardMetrics>,
    /// Reports the backend name once listening, or why the shard could not start.
    pub ready: mpsc::Sender<Result<String, String>>,
    pub cache: Arc<CacheShared>,
    pub selection: Arc<SelectionCounters>,
    /// This shard's link to the learned-state sync thread (`[learning.share]`).
    pub share: Option<Arc<super::share::ShardLink>>,
    /// Wake-ups from the watchdog thread, and where this shard's stop is.
    pub beat: Arc<Beat>,
}

pub(super) async fn run_shard(start: ShardStart) {
    let ShardStart {
        id,
        cfg,
        hub,
        addr,
        stop,
        metrics,
        ready,
        cache,
        selection,
        share,
        beat,
    } = start;
    let _exited = ExitGuard(beat.clone());
    // Woken by the watchdog every PERIOD and at the stop: no wait below
    // rests on a glommio timer alone.
    let woken = Rc::new(super::notify::Notify::default());
    let backend = match cfg.backend_choice() {
        Ok(choice) => backend::select(&choice),
        Err(e) => {
            let _ = ready.send(Err(format!("shard {id}: {e}")));
            return;
        }
    };
    let reg = hub.latest();
    let first = Shared::new(id, cfg.clone(), backend, metrics, cache, selection).and_then(|sh| {
        let s = Shard::new(&sh, &reg, None)?;
        Ok((sh, s))
    });
    let (shared, first) = match first {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(format!("shard {id}: {e}")));
            return;
        }
    };
    if let Err(e) = first.warm_up() {
        let _ = ready.send(Err(format!("shard {id}: {e}")));
        return;
    }
    hub.shards[id]
        .applied
        .store(reg.generation, Ordering::Release);
    drop(reg);
    let listener = match listen(addr) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("shard {id}: bind {addr}: {e}")));
            return;
        }
    };
    let first = Rc::new(first);
    shard::spawn_tasks(&first);
    let backend_name = first.backend_name();
    let current = Rc::new(Current::new(first, shared.clone()));
    glommio::spawn_local(shard::watch(current.clone(), hub.clone(), stop.clone())).detach();
    if shared.l3.is_some() {
        glommio::spawn_local(shard::run_l3(current.clone())).detach();
    }
    if let (Some(link), Some(s)) = (&share, &cfg.learning.share) {
        let every = Duration::from_millis(s.interval_ms);
        glommio::spawn_local(shard::run_share(current.clone(), link.clone(), every)).detach();
    }
    // Rollout comparisons run at low priority, between batches.
    let comparer = rollout::run_comparer(
        shared.shadow.clone(),
        shared.backend.clone(),
        shared.cache.clone(),
        shared.metrics.clone(),
        stop.clone(),
    );
    let low = glommio::executor().create_task_queue(
        glommio::Shares::Static(50),
        glommio::Latency::NotImportant,
        "beast-rollout",
    );
    match glommio::spawn_local_into(comparer, low) {
        Ok(t) => t.detach(),
        Err(_) => {
            let c = rollout::run_comparer(
                shared.shadow.clone(),
                shared.backend.clone(),
                shared.cache.clone(),
                shared.metrics.clone(),
                stop.clone(),
            );
            glommio::spawn_local(c).detach()
        }
    };
    let _ = ready.send(Ok(backend_name));
    drop(ready);
    beat.stage(Stage::Serving);
    let beats = glommio::spawn_local(beat.clone().listen(woken.clone()));

    let metrics = shared.metrics.clone();
    let ring = start_ring(&cfg, id);
    let open = Rc::new(Cell::new(0usize));
    // Read-side fds of open connections, to shut them down on stop.
    let fds: Rc<RefCell<Vec<i32>>> = Rc::new(RefCell::new(Vec::new()));
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            while !stop.load(Ordering::Relaxed) {
                let tick = glommio::timer::sleep(Duration::from_millis(20));
                futures_lite::future::or(tick, woken.wait()).await;
            }
            None
        })
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("beast: shard {id}: accept: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.get() >= cfg.connections_per_shard_max {
            metrics.connections_refused.inc();
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        metrics.connections_accepted.inc();
        open.set(open.get() + 1);
        beat.open(open.get());
        let fd = stream.as_raw_fd();
        fds.borrow_mut().push(fd);
        let (current2, open2, fds2) = (current.clone(), open.clone(), fds.clone());
        let (ring2, beat2) = (ring.clone(), beat.clone());
        glommio::spawn_local(async move {
            let m = current2.shared.metrics.clone();
            conn::serve(current2, ring2, stream).await;
            m.connections_closed.inc();
            open2.set(open2.get() - 1);
            beat2.open(open2.get());
            fds2.borrow_mut().retain(|&f| f != fd);
        })
        .detach();
    }
    drop(listener);
    beat.stage(Stage::Draining);
    super::watchdog::test_stall_hook();
    shared.stopping.set(true);
    for &fd in fds.borrow().iter() {
        // SAFETY: fd belongs to a live connection (removed from the list when it closes).
        unsafe { libc::shutdown(fd, libc::SHUT_RD) };
    }
    let grace = Instant::now() + Duration::from_millis(cfg.shutdown_grace_ms);
    while open.get() > 0 && Instant::now() < grace {
        futures_lite::future::or(
            glommio::timer::sleep(Duration::from_millis(5)),
            woken.wait(),
        )
        .await;
    }
    if open.get() > 0 {
        eprintln!(
            "beast: shard {id}: {} connection(s) still open after shutdown_grace_ms; stopping anyway",
            open.get()
        );
    }
    beat.stage(Stage::Stopping);
    if let Some(r) = &ring {
        r.stop();
    }
    // Let the batchers see the stop and return, so every reference to the
    // shard (and through it the L2 file and its lock) is dropped. Retired
    // versions' batchers look every few ms on their own.
    let shard = current.get();
    for s in &shard.slots {
        s.wake.notify();
    }
    shard.deadline_wake.notify();
    glommio::timer::sleep(Duration::from_millis(1)).await;
    shard.save_selection_state();
    if let Some(link) = &share {
        shard.publish_learned(link);
    }
    drop(shard);
    drop(current);
    // Tasks still sleeping when this returns are never dropped by the
    // executor: wait until the watcher (which holds the current version)
    // and the comparer (which holds the cache) have returned, so the L2
    // file and its lock are released with the last reference.
    shared.shadow.wake.notify();
    let grace = Instant::now() + Duration::from_millis(500);
    let held = || shared.alive.get() > 0 || Rc::strong_count(&shared.shadow) > 1;
    beat.stage(Stage::Releasing);
    while held() && Instant::now() < grace {
        futures_lite::future::or(
            glommio::timer::sleep(Duration::from_millis(2)),
            woken.wait(),
        )
        .await;
    }
    if held() {
        eprintln!(
            "beast: shard {id}: {} version(s) and {} comparer(s) still held by tasks at exit",
            shared.alive.get(),
            Rc::strong_count(&shared.shadow) - 1
        );
    }
    // The beat task returns on the watchdog's next wake-up.
    beat.done();
    beats.await;
}

/// A shard's listener: SO_REUSEPORT (every shard binds the same port) and
/// SO_REUSEADDR. The latter is inherited by every accepted connection, so
/// the connections a stopped or killed server leaves in TIME_WAIT or
/// FIN_WAIT2 do not block the free-port check (a plain SO_REUSEADDR bind)
/// of the next server on that port; a live listener still does.
fn listen(addr: SocketAddr) -> std::io::Result<glommio::net::TcpListener> {
    use std::os::fd::IntoRawFd;
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    // SAFETY: a bound, listening socket whose fd we hand over (into_raw_fd
    // gives up our ownership).
    Ok(unsafe {
        <glommio::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(s.into_raw_fd())
    })
}

/// The shard's own io_uring for its connections (`uring_sockets`), or
/// `None`: glommio's streams.
fn start_ring(cfg: &Config, id: usize) -> Option<Rc<Ring>> {
    if !cfg.uring_sockets {
        return None;
    }
    // Deadlines are checked every tenth of the shortest timeout.
    let shortest = cfg
        .frame_timeout_ms
        .min(cfg.idle_timeout_ms)
        .min(cfg.write_stall_timeout_ms);
    let tick = Duration::from_millis((shortest / 10).clamp(1, 100));
    match Ring::start(tick) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("beast: shard {id}: no io_uring for sockets ({e}); using glommio's streams");
            None
        }
    }
}
