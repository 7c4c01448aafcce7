//! Keeps a generator thread from sleeping through its own timers.
//!
//! Seen once on the shared 2-core VM (load ~11): a generator thread's
//! glommio executor slept in `io_uring_enter` for 20 minutes with its
//! run's timers long due, and went on as soon as a debugger attached (a
//! signal ends the wait with EINTR; glommio then processes its timers).
//! glommio has open reports of timers that never fire on virtual machines
//! (DataDog/glommio#547). A run of beast-bench must end when its schedule
//! says, so while generator threads run, a watchdog thread sends each a
//! no-op signal (`SIGURG`, with a handler, so the wait is interrupted)
//! every [`NUDGE_EVERY`]: a lost wakeup then costs at most that. A thread
//! still running [`GIVE_UP_AFTER`] past the run's end stops the process
//! with an error instead of hanging (CI must not wait forever).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a running generator thread is interrupted.
pub const NUDGE_EVERY: Duration = Duration::from_millis(250);
/// After the run's end (plus its grace period), how long before giving up.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

/// The generator threads to nudge (`pthread_self` of each, registered
/// once by the thread itself at its start).
pub type Threads = Arc<Mutex<Vec<libc::pthread_t>>>;

pub struct Watchdog {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

extern "C" fn ignore(_: libc::c_int) {}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a handler that does nothing is async-signal-safe; no
        // SA_RESTART, so a blocking io_uring_enter returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGURG, &sa, std::ptr::null_mut());
        }
    });
}

/// Called by each generator thread at its start; the thread is watched
/// until the guard is dropped (on that thread, before it ends).
pub fn register(threads: &Threads) -> Registered {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    threads.lock().unwrap_or_else(|e| e.into_inner()).push(me);
    Registered {
        threads: threads.clone(),
        me,
    }
}

pub struct Registered {
    threads: Threads,
    me: libc::pthread_t,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut t = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|&x| x != self.me);
    }
}

impl Watchdog {
    /// Watch `threads` until dropped; `end` is when the run (grace
    /// included) should be over.
    pub fn start(threads: Threads, end: Instant) -> Watchdog {
        install_handler();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let thread = std::thread::Builder::new()
            .name("beast-bench-watchdog".into())
            .spawn(move || {
                let mut said = false;
                while !d.load(Ordering::Acquire) {
                    std::thread::park_timeout(NUDGE_EVERY);
                    if d.load(Ordering::Acquire) {
                        break;
                    }
                    let now = Instant::now();
                    if now > end + GIVE_UP_AFTER {
                        eprintln!(
                            "beast-bench: a generator thread is still running {}s after the run's \
                             end; giving up (its executor stopped waking: see tools/bench/watchdog.rs)",
                            GIVE_UP_AFTER.as_secs()
                        );
                        std::process::exit(3);
                    }
                    if now > end + Duration::from_secs(3) && !said {
                        said = true;
                        eprintln!("beast-bench: a generator thread overran the run's end by 3 s");
                    }
                    for &t in threads.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                        // SAFETY: `t` is live: a thread leaves the list
                        // (under this lock) before it ends.
                        unsafe { libc::pthread_kill(t, libc::SIGURG) };
                    }
                }
            })
            .expect("spawn the watchdog thread");
        Watchdog {
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
