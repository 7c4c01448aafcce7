//! The shard's own io_uring for connection sockets: receives and sends of
//! every connection go through one ring per shard, submitted together by
//! one `io_uring_enter` per turn of the shard's loop, with completions run
//! only when the shard asks for them.
//!
//! Why not glommio's stream types: their read is a `recv` syscall, then a
//! one-shot poll armed in glommio's ring, whose completion the kernel
//! signals to the shard thread with an inter-processor interrupt while it
//! runs (glommio's ring is set up without `COOP_TASKRUN`). The profile of
//! the hit path (perf/profile-hit.md) put 17 % of the shard's CPU in those
//! interrupts at 16 in flight. This ring is set up with `DEFER_TASKRUN`
//! (single issuer): data arriving for a pending receive is copied in only
//! when the shard enters the ring, and nothing interrupts it meanwhile.
//!
//! How it sits in glommio's executor: operations are futures
//! ([`Ring::recv`], [`Ring::send`]) that queue a submission and wake the
//! ring's *driver* task; the driver submits everything queued (one
//! syscall for all connections), reaps completions and wakes their
//! futures. When nothing is ready it sleeps until new submissions or the
//! kernel's signal: the ring's registered eventfd, which the kernel writes
//! when deferred work arrives for an idle ring, read by a task through
//! glommio (so an idle shard still parks in glommio's reactor).
//!
//! Timeouts: every operation carries an optional deadline; a sweeper task
//! (period: a tenth of the shortest connection timeout, 1..100 ms)
//! cancels operations past theirs, which then end with `TimedOut`.
//! Nothing per request is allocated: operation slots are reused.
//!
//! Safety: the kernel writes into (or reads from) an operation's buffer
//! until its completion is reaped. A future dropped before then (its
//! connection task dropped) cancels the operation and waits for that
//! completion before returning, so the buffer outlives the kernel's use.

use super::notify::Notify;
use io_uring::{opcode, types, IoUring};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// `IORING_ENTER_GETEVENTS` (the crate keeps its constants private).
const ENTER_GETEVENTS: u32 = 1;

/// Most enters in a row made on TASKRUN alone (see `Ring::work_left`).
const RETRIES_MAX: u32 = 8;

/// user_data of cancellations (their own completions are ignored).
const CANCEL: u64 = u64::MAX;

enum State {
    Free,
    Pending(Option<Waker>),
    Done(i32),
}

struct Slot {
    state: State,
    deadline: Option<Instant>,
    timed_out: bool,
    cancel_sent: bool,
}

pub(crate) struct Ring {
    uring: RefCell<IoUring>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    /// Operations submitted or queued and not yet reaped.
    outstanding: Cell<usize>,
    /// Submissions queued, or the kernel signalled: the driver turns.
    kick: Notify,
    /// The driver found nothing to do: arm the eventfd read. Armed only
    /// then, so a busy shard takes no wake-up (an interrupt, glommio's
    /// ring being what it is) per batch of arrivals.
    idle: Notify,
    efd: RawFd,
    /// The eventfd fired: enter the ring even if its flags show nothing.
    signalled: Cell<bool>,
    stop: Cell<bool>,
}

impl Ring {
    /// A ring for this shard's connections, with its driver, eventfd
    /// reader and sweeper tasks spawned on the current glommio executor;
    /// `None` (with the reason) where the kernel refuses such a ring
    /// (io_uring disabled, or older than 6.1's `DEFER_TASKRUN`). `tick`:
    /// how often deadlines are checked.
    pub fn start(tick: Duration) -> Result<Rc<Ring>, io::Error> {
        let uring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(8192)
            .build(1024)?;
        // SAFETY: plain syscall; the fd is checked and owned by the ring.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Err(e) = uring.submitter().register_eventfd(efd) {
            // SAFETY: efd is ours and not shared.
            unsafe { libc::close(efd) };
            return Err(e);
        }
        // The eventfd's reader gets its own fd (glommio closes it on drop).
        // SAFETY: plain syscall on our fd.
        let efd2 = unsafe { libc::dup(efd) };
        if efd2 < 0 {
            // SAFETY: efd is ours.
            unsafe { libc::close(efd) };
            return Err(io::Error::last_os_error());
        }
        let ring = Rc::new(Ring {
            uring: RefCell::new(uring),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            outstanding: Cell::new(0),
            kick: Notify::default(),
            idle: Notify::default(),
            efd,
            signalled: Cell::new(false),
            stop: Cell::new(false),
        });
        glommio::spawn_local(ring.clone().drive()).detach();
        // SAFETY: efd2 is a fresh fd owned by nobody else.
        let efile = unsafe { glommio::io::BufferedFile::from_raw_fd(efd2) };
        glommio::spawn_local(ring.clone().signals(efile)).detach();
        glommio::spawn_local(ring.clone().sweep(tick)).detach();
        Ok(ring)
    }

    /// Let the ring's tasks return once no operation is outstanding.
    pub fn stop(&self) {
        self.stop.set(true);
        self.kick.notify();
        self.idle.notify();
        self.signal();
    }

    /// Test hook: the kernel no longer writes the eventfd, as if every
    /// wake-up through it were lost.
    #[cfg(test)]
    pub fn lose_eventfd_wakeups(&self) {
        self.uring
            .borrow()
            .submitter()
            .unregister_eventfd()
            .unwrap();
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.efd, (&one as *const u64).cast(), 8) };
    }

    /// Receive into `buf` (at most its length; 0: end of stream). Past
    /// `deadline` the receive is cancelled and ends with `TimedOut`.
    pub fn recv<'a>(&'a self, fd: RawFd, buf: &'a mut [u8], deadline: Option<Instant>) -> Op<'a> {
        let len = buf.len().min(u32::MAX as usize) as u32;
        let e = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), len).build();
        self.submit_op(e, deadline)
    }

    /// Send from `buf` (returns the count sent, which may be short).
    pub fn send<'a>(&'a self, fd: RawFd, buf: &'a [u8], deadline: Option<Instant>) -> Op<'a> {
        let len = buf.len().min(u32::MAX as usize) as u32;
        let e = opcode::Send::new(types::Fd(fd), buf.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        self.submit_op(e, deadline)
    }

    /// Send all of `buf`; `stall`: the longest one send may wait for the
    /// peer to take bytes.
    pub async fn send_all(&self, fd: RawFd, mut buf: &[u8], stall: Duration) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.send(fd, buf, Some(Instant::now() + stall)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    fn submit_op(&self, entry: io_uring::squeue::Entry, deadline: Option<Instant>) -> Op<'_> {
        let slot = self.acquire(deadline);
        let entry = entry.user_data(slot as u64);
        let pushed = self.push(&entry);
        if let Err(e) = pushed {
            // Never submitted: complete it with the error at once.
            let code = -e.raw_os_error().unwrap_or(libc::EIO);
            self.slots.borrow_mut()[slot as usize].state = State::Done(code);
        }
        self.kick.notify();
        Op {
            ring: self,
            slot,
            done: false,
        }
    }

    fn acquire(&self, deadline: Option<Instant>) -> u32 {
        let mut slots = self.slots.borrow_mut();
        let s = Slot {
            state: State::Pending(None),
            deadline,
            timed_out: false,
            cancel_sent: false,
        };
        self.outstanding.set(self.outstanding.get() + 1);
        match self.free.borrow_mut().pop() {
            Some(i) => {
                slots[i as usize] = s;
                i
            }
            None => {
                slots.push(s);
                (slots.len() - 1) as u32
            }
        }
    }

    fn release(&self, slot: u32) {
        self.slots.borrow_mut()[slot as usize].state = State::Free;
        self.free.borrow_mut().push(slot);
        self.outstanding.set(self.outstanding.get() - 1);
    }

    /// Queue one submission; a full queue is submitted first.
    fn push(&self, e: &io_uring::squeue::Entry) -> io::Result<()> {
        let mut u = self.uring.borrow_mut();
        loop {
            // SAFETY: the entry's buffers stay valid until its completion
            // is reaped (see `Op`'s drop).
            if unsafe { u.submission().push(e) }.is_ok() {
                return Ok(());
            }
            u.submit()?;
        }
    }

    /// Submit what is queued (running deferred completions too) and reap
    /// every completion; true when any operation completed.
    fn turn(&self) -> bool {
        let mut u = self.uring.borrow_mut();
        let busy = {
            let mut sq = u.submission();
            sq.sync();
            !sq.is_empty() || sq.taskrun() || sq.cq_overflow() || self.signalled.take()
        };
        if busy {
            // GETEVENTS: runs the deferred work (the copies of received
            // data), whatever the flags say.
            // SAFETY: no argument; submits what was pushed above.
            let n = u.submission().len() as u32;
            let r = unsafe {
                u.submitter()
                    .enter::<libc::sigset_t>(n, 0, ENTER_GETEVENTS, None)
            };
            if let Err(e) = r {
                if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                    eprintln!("beast: io_uring_enter: {e}");
                }
            }
        }
        let mut any = false;
        let mut slots = self.slots.borrow_mut();
        for cqe in u.completion() {
            let ud = cqe.user_data();
            if ud == CANCEL {
                continue;
            }
            let Some(s) = slots.get_mut(ud as usize) else {
                continue;
            };
            let prev = std::mem::replace(&mut s.state, State::Done(cqe.result()));
            if let State::Pending(Some(w)) = prev {
                w.wake();
            }
            any = true;
        }
        if any {
            // One enter may run only a bounded number of deferred
            // completions (recent kernels keep the rest for the next enter
            // and say so through the eventfd alone): enter once more
            // before going idle, whatever the flags say.
            self.signalled.set(true);
        }
        any
    }

    /// Deferred work is left after the last enter. One enter runs at
    /// most a bounded number of task works (20 since 6.13); the kernel
    /// keeps the rest on a retry list and sets TASKRUN again, but does
    /// not write the eventfd (written only when its work list goes from
    /// empty to not empty). A task work need not post a completion (a
    /// poll wake-up whose receive retries and re-arms), so an enter that
    /// completed nothing can still have left work.
    fn work_left(&self) -> bool {
        self.uring.borrow_mut().submission().taskrun()
    }

    async fn drive(self: Rc<Self>) {
        // Enters in a row that completed nothing while the kernel said
        // work was left (bounded: the flag can also be left set with no
        // work behind it; the sweeper's turn covers the rest).
        let mut retries = 0;
        loop {
            if self.turn() {
                retries = 0;
                // Let the woken connections run (and queue their next
                // operations) before the next syscall.
                futures_lite::future::yield_now().await;
                continue;
            }
            if self.work_left() && retries < RETRIES_MAX {
                retries += 1;
                self.signalled.set(true);
                futures_lite::future::yield_now().await;
                continue;
            }
            retries = 0;
            if self.stop.get() && self.outstanding.get() == 0 {
                return;
            }
            self.idle.notify();
            self.kick.wait().await;
        }
    }

    /// The kernel writes the eventfd when work arrives for this ring while
    /// the shard is not in it: wake the driver. Read only once the driver
    /// went idle (what the kernel wrote meanwhile makes that read return
    /// at once).
    async fn signals(self: Rc<Self>, efile: glommio::io::BufferedFile) {
        loop {
            self.idle.wait().await;
            if self.stop.get() && self.outstanding.get() == 0 {
                break;
            }
            let r = efile.read_at(0, 8).await;
            if self.stop.get() && self.outstanding.get() == 0 {
                break;
            }
            self.signalled.set(true);
            self.kick.notify();
            if r.is_err() {
                // Not expected; do not spin.
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        }
        let _ = efile.close().await;
    }

    async fn sweep(self: Rc<Self>, tick: Duration) {
        while !(self.stop.get() && self.outstanding.get() == 0) {
            glommio::timer::sleep(tick).await;
            self.cancel_expired(Instant::now());
            if self.outstanding.get() > 0 {
                // Enter the ring once per tick whatever the eventfd said:
                // a wake-up lost there delays an operation by a tick at
                // most, instead of until the connection's next arrival.
                self.signalled.set(true);
                self.kick.notify();
            }
        }
        self.kick.notify();
        self.idle.notify();
        self.signal();
    }

    /// Cancel every operation whose deadline is past `now`.
    fn cancel_expired(&self, now: Instant) {
        let mut expired = false;
        {
            let mut slots = self.slots.borrow_mut();
            for (i, s) in slots.iter_mut().enumerate() {
                if let (State::Pending(_), Some(d)) = (&s.state, s.deadline) {
                    if d <= now && !s.cancel_sent {
                        s.timed_out = true;
                        s.cancel_sent = true;
                        let c = opcode::AsyncCancel::new(i as u64).build().user_data(CANCEL);
                        // A failure here leaves it to the next sweep.
                        if self.push(&c).is_err() {
                            s.cancel_sent = false;
                        }
                        expired = true;
                    }
                }
            }
        }
        if expired {
            self.kick.notify();
        }
    }

    /// An operation's future was dropped before completing: cancel it and
    /// wait (blocking, briefly: a cancel completes at once) until the
    /// kernel no longer uses its buffer.
    fn abandon(&self, slot: u32) {
        let pending = |r: &Ring| matches!(r.slots.borrow()[slot as usize].state, State::Pending(_));
        if pending(self) {
            let c = opcode::AsyncCancel::new(slot as u64)
                .build()
                .user_data(CANCEL);
            let _ = self.push(&c);
            while pending(self) {
                {
                    let u = self.uring.borrow_mut();
                    if let Err(e) = u.submit_and_wait(1) {
                        if e.raw_os_error() != Some(libc::EINTR) {
                            eprintln!("beast: io_uring: cancel on drop: {e}");
                            // Leak the slot rather than free a buffer the
                            // kernel may still use.
                            return;
                        }
                    }
                }
                self.turn();
            }
        }
        self.release(slot);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: our eventfd; the ring itself closes on its own drop.
        unsafe { libc::close(self.efd) };
    }
}

/// One operation in flight; resolves to its result.
pub(crate) struct Op<'a> {
    ring: &'a Ring,
    slot: u32,
    done: bool,
}

impl Future for Op<'_> {
    type Output = io::Result<usize>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (res, timed_out) = {
            let mut slots = self.ring.slots.borrow_mut();
            let s = &mut slots[self.slot as usize];
            match &mut s.state {
                State::Done(r) => (*r, s.timed_out),
                State::Pending(w) => {
                    match w {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => *w = Some(cx.waker().clone()),
                    }
                    return Poll::Pending;
                }
                State::Free => unreachable!("an operation's slot freed under it"),
            }
        };
        self.done = true;
        self.ring.release(self.slot);
        Poll::Ready(if res >= 0 {
            Ok(res as usize)
        } else if timed_out && (res == -libc::ECANCELED || res == -libc::EINTR) {
            Err(io::ErrorKind::TimedOut.into())
        } else {
            Err(io::Error::from_raw_os_error(-res))
        })
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.ring.abandon(self.slot);
        }
    }
}

#[cfg(test)]
mod tests;
