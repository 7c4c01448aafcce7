//! A thread outside the shards' executors that keeps them from sleeping
//! through a lost wake-up, and names what a stop still waits on.
//!
//! Every wait in a shard ends on a glommio timer or on I/O: the accept
//! loop looks at the stop flag every 20 ms, the batcher waits
//! `max_queue_delay_us`, the ring's sweeper ticks, the drain loops sleep.
//! glommio has open reports of an executor sleeping in `io_uring_enter`
//! with its timers due (DataDog/glommio#547; seen once here in a
//! beast-bench generator, 20 min, until gdb attached). A shard whose
//! connections are idle would then leave a queued request unanswered, or
//! never see the stop.
//!
//! So each shard has an eventfd ([`Beat`]) that a task of its own reads
//! through glommio; this thread writes it every [`PERIOD`] (one wake-up
//! of an idle executor, which then runs whatever timers are due) and at
//! once when the stop flag is set (the accept loop ends without waiting
//! for its timer). Each shard names the step of its stop it is in; when
//! the shards have not all exited [`STALL`] after `shutdown_grace_ms`,
//! the thread logs every shard's step and open connections, and (the
//! binary: [`Watchdog::exit_on_stall`]) exits the process with status 1:
//! a server that hangs on stop is worse than one that fails.

use super::notify::Notify;
use std::os::fd::{FromRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often an idle shard is woken.
pub(super) const PERIOD: Duration = Duration::from_millis(100);
/// How long past `shutdown_grace_ms` a stop may take before it is reported.
pub(super) const STALL: Duration = Duration::from_secs(10);

/// The step of its life a shard is in (what a stalled stop waits on).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(super) enum Stage {
    Starting = 0,
    Serving = 1,
    /// Listener closed; waiting for the open connections to answer what
    /// is in flight and close.
    Draining = 2,
    /// Stopping the ring and the batchers, saving learned state.
    Stopping = 3,
    /// Waiting for the watcher and comparer tasks to let go of the shard.
    Releasing = 4,
    Exited = 5,
}

impl Stage {
    fn name(s: u8) -> &'static str {
        match s {
            0 => "starting",
            1 => "serving (has not seen the stop)",
            2 => "draining connections",
            3 => "stopping the ring and batchers",
            4 => "waiting for its tasks to let go",
            _ => "exited",
        }
    }
}

/// One shard's wake-up fd and where its stop is.
pub(super) struct Beat {
    efd: RawFd,
    stage: AtomicU8,
    open: AtomicUsize,
    /// The shard no longer needs wake-ups: its beat task returns.
    done: AtomicBool,
}

impl Beat {
    pub fn new() -> std::io::Result<Arc<Beat>> {
        // SAFETY: plain syscall; the fd is checked and owned by the Beat.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(Beat {
            efd,
            stage: AtomicU8::new(Stage::Starting as u8),
            open: AtomicUsize::new(0),
            done: AtomicBool::new(false),
        }))
    }

    pub fn stage(&self, s: Stage) {
        self.stage.store(s as u8, Ordering::Release);
    }

    pub fn open(&self, n: usize) {
        self.open.store(n, Ordering::Relaxed);
    }

    /// Let the beat task return (on its next wake-up).
    pub fn done(&self) {
        self.done.store(true, Ordering::Release);
        self.poke();
    }

    fn exited(&self) -> bool {
        self.stage.load(Ordering::Acquire) == Stage::Exited as u8
    }

    /// Wake the shard's beat task (and so its executor).
    pub fn poke(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.efd, (&one as *const u64).cast(), 8) };
    }

    /// The shard's task: read the eventfd through glommio and notify
    /// `woken` each time, until [`Beat::done`].
    pub async fn listen(self: Arc<Self>, woken: Rc<Notify>) {
        // SAFETY: dup of our fd; the file owns (and closes) the copy.
        let fd = unsafe { libc::dup(self.efd) };
        if fd < 0 {
            return;
        }
        // SAFETY: a fresh fd owned by nobody else.
        let file = unsafe { glommio::io::BufferedFile::from_raw_fd(fd) };
        while !self.done.load(Ordering::Acquire) {
            let r = file.read_at(0, 8).await;
            woken.notify();
            if r.is_err() {
                // Not expected; do not spin.
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = file.close().await;
    }
}

impl Drop for Beat {
    fn drop(&mut self) {
        // SAFETY: our eventfd, closed once.
        unsafe { libc::close(self.efd) };
    }
}

/// Sets the shard's stage to `Exited` however `run_shard` returns.
pub(super) struct ExitGuard(pub Arc<Beat>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.stage(Stage::Exited);
        self.0.poke();
    }
}

/// Test hook (tests/lifecycle.rs): with `BEAST_TEST_STALL_STOP` set, a
/// shard's thread blocks for good once its stop has begun, as a syscall
/// that never returns would.
pub(super) fn test_stall_hook() {
    if std::env::var_os("BEAST_TEST_STALL_STOP").is_some() {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// The thread that pokes the shards and reports a stalled stop.
pub(super) struct Watchdog {
    exit_on_stall: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn spawn(beats: Vec<Arc<Beat>>, stop: Arc<AtomicBool>, grace: Duration) -> Watchdog {
        let exit_on_stall = Arc::new(AtomicBool::new(false));
        let exit = exit_on_stall.clone();
        let thread = std::thread::Builder::new()
            .name("beast-watchdog".into())
            .spawn(move || watch(&beats, &stop, grace + STALL, &exit))
            .ok();
        Watchdog {
            exit_on_stall,
            thread,
        }
    }

    /// Exit the process (status 1) after reporting a stalled stop.
    pub fn exit_on_stall(&self) {
        self.exit_on_stall.store(true, Ordering::Relaxed);
    }

    /// Returns once every shard has exited.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(beats: &[Arc<Beat>], stop: &AtomicBool, limit: Duration, exit: &AtomicBool) {
    let mut stopped: Option<Instant> = None;
    let mut report = limit;
    while !beats.iter().all(|b| b.exited()) {
        for b in beats.iter().filter(|b| !b.exited()) {
            b.poke();
        }
        if stop.load(Ordering::Relaxed) {
            let since = *stopped.get_or_insert_with(Instant::now);
            let waited = since.elapsed();
            if waited >= report {
                eprintln!("{}", stall_report(beats, waited));
                if exit.load(Ordering::Relaxed) {
                    eprintln!("beast: exiting with status 1: the stop stalled");
                    // SAFETY: ends the process at once; the shards are
                    // stuck, so their destructors would never run anyway
                    // (the L2 file is repaired when next opened).
                    unsafe { libc::_exit(1) };
                }
                report += STALL;
            }
            // Soon after the stop, then at the usual pace.
            std::thread::sleep(Duration::from_millis(5).max(PERIOD.min(waited)));
        } else {
            std::thread::sleep(PERIOD);
        }
    }
}

/// "beast: stop stalled for 20.0 s: shard 0: draining connections (2 open); ..."
pub(super) fn stall_report(beats: &[Arc<Beat>], waited: Duration) -> String {
    let shards: Vec<String> = beats
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "shard {i}: {} ({} connection(s) open)",
                Stage::name(b.stage.load(Ordering::Acquire)),
                b.open.load(Ordering::Relaxed)
            )
        })
        .collect();
    format!(
        "beast: stop stalled for {:.1} s: {}",
        waited.as_secs_f64(),
        shards.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_stop_names_each_shards_step() {
        let a = Beat::new().unwrap();
        let b = Beat::new().unwrap();
        a.stage(Stage::Draining);
        a.open(2);
        b.stage(Stage::Exited);
        let r = stall_report(&[a, b], Duration::from_secs(20));
        assert_eq!(
            r,
            "beast: stop stalled for 20.0 s: shard 0: draining connections (2 connection(s) open); \
             shard 1: exited (0 connection(s) open)"
        );
    }

    #[test]
    fn the_watchdog_returns_once_every_shard_has_exited() {
        let a = Beat::new().unwrap();
        let stop = Arc::new(AtomicBool::new(true));
        let w = Watchdog::spawn(vec![a.clone()], stop, Duration::ZERO);
        drop(ExitGuard(a));
        w.join();
    }
}
