//! The shard's side of the L3 tier (`crate::cache::l3`): a model or
//! ensemble request that missed L1 and L2 is parked (its frame copied into a reused slab entry)
//! while its key is looked up in Redis by the process's L3 thread; the
//! `run_l3` task answers it on a hit, or hands the frame back to
//! `handle_frame` to compute on a miss, an error, or once the lookup budget
//! is spent. Nothing here blocks the shard: while lookups are outstanding
//! the task waits for the L3 thread to wake it (glommio wakers may be woken
//! from another thread) or for the oldest budget to end; with none, it
//! sleeps on a local `Notify`.
//!
//! Members of an ensemble are looked up too (`l3_park_member`): a member
//! that missed L1/L2 counts as outstanding in its pending entry while its
//! key (the one a direct request to the member uses) is asked; a hit is
//! combined like an L1/L2 hit, a miss or a spent budget enqueues the
//! member as usual. The entry may belong to a version retired meanwhile:
//! the lookup keeps a `Weak` to its version (registered by `spawn_tasks`),
//! which lives while its tasks wait for pending entries.

use super::state::EnsemblePending;
use super::{Current, Shard};
use crate::cache::l3::{decode, Reply, L3};
use crate::cache::CacheKey;
use crate::config::ENSEMBLE_MEMBERS_MAX;
use crate::ensemble::MemberSet;
use crate::server::cache::TargetPolicy;
use crate::server::conn_state::Conn;
use crate::server::notify::Notify;
use crate::server::slab::Slab;
use crate::wire::{RunInfo, Timings};
use crossbeam::channel::Receiver;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

/// Lookups one shard keeps outstanding; beyond, requests compute at once.
const PARKED_MAX: usize = 1024;
/// Set in a reply token that names a member lookup (else a parked request).
const MEMBER: u32 = 1 << 31;

/// A member of a pending ensemble entry waiting for L3.
#[derive(Default)]
struct ParkedMember {
    /// The version whose `pending` holds the entry.
    shard: Weak<Shard>,
    k: usize,
    generation: u32,
    member: u8,
    slot: usize,
    n: usize,
    key: CacheKey,
    serial: u64,
    sent: Option<Instant>,
}

#[derive(Default)]
struct Parked {
    conn: Option<Rc<Conn>>,
    frame: Vec<u8>,
    arrival: Option<Instant>,
    key: CacheKey,
    /// The models answering, (name, version) (their version's slots may be
    /// gone by the reply: a reload can install another version meanwhile);
    /// the first `nruns` are this request's (the rest keep their buffers).
    runs: Vec<(String, u32)>,
    nruns: usize,
    output_width: usize,
    policy: TargetPolicy,
    out_len: usize,
    rows: usize,
    id: u64,
    /// Tells a live entry from an earlier use of the same slab index.
    serial: u64,
    sent: Option<Instant>,
}

pub(crate) struct L3Shard {
    l3: Arc<L3>,
    replies: Receiver<Reply>,
    parked: RefCell<Slab<Parked>>,
    /// (entry, serial, when its budget ends), oldest first.
    due: RefCell<VecDeque<(u32, u64, Instant)>>,
    serial: Cell<u64>,
    wake: Notify,
    /// Set while a frame whose L3 lookup missed is handled again.
    pub skip: Cell<bool>,
    /// Moving average of park → reply, µs (a budget spent counts as the
    /// budget): what a lookup costs here.
    rtt_us: Cell<f32>,
    members: RefCell<Slab<ParkedMember>>,
    /// The versions with tasks on this executor (`spawn_tasks`).
    versions: RefCell<Vec<Weak<Shard>>>,
    /// Set while a member whose lookup missed is enqueued.
    skip_member: Cell<bool>,
}

impl L3Shard {
    pub fn new(l3: &Arc<L3>, shard: usize) -> Option<L3Shard> {
        Some(L3Shard {
            replies: l3.take_replies(shard)?,
            l3: l3.clone(),
            parked: RefCell::new(Slab::with_capacity(PARKED_MAX)),
            due: RefCell::new(VecDeque::with_capacity(PARKED_MAX)),
            serial: Cell::new(0),
            wake: Notify::default(),
            skip: Cell::new(false),
            rtt_us: Cell::new(0.0),
            members: RefCell::new(Slab::with_capacity(PARKED_MAX)),
            versions: RefCell::new(Vec::new()),
            skip_member: Cell::new(false),
        })
    }

    /// `shard` runs on this executor (its member lookups find it here).
    pub fn register_version(&self, shard: &Rc<Shard>) {
        let mut v = self.versions.borrow_mut();
        v.retain(|w| w.strong_count() > 0);
        v.push(Rc::downgrade(shard));
    }
}

/// What a parked request needs to be answered from L3.
pub(super) struct ParkReq<'a> {
    pub body: &'a [u8],
    pub key: CacheKey,
    /// The model slots whose answer this is: one model, or an ensemble's
    /// members (named in the answer's runs, as an L1/L2 hit does).
    pub slots: &'a [usize],
    /// Width and cache policy of the target (the model or the ensemble).
    pub output_width: usize,
    pub policy: TargetPolicy,
    pub out_len: usize,
    pub rows: usize,
    pub id: u64,
    pub arrival: Instant,
}

impl Shard {
    /// After an L1/L2 miss: send the key to L3 and park the request.
    /// False when it was not parked (no L3, breaker open, full): compute.
    pub(super) fn l3_park(&self, conn: &Rc<Conn>, p: ParkReq<'_>) -> bool {
        let Some(s) = &self.l3 else {
            return false;
        };
        if s.skip.get() {
            return false;
        }
        let predicted_us = || {
            p.slots
                .iter()
                .map(|&m| self.predicted_wait_us(m, p.rows))
                .fold(0.0f32, f32::max)
        };
        if !s.l3.cfg.always && predicted_us() < s.rtt_us.get() {
            // Computing is predicted to answer sooner than L3 would.
            s.l3.stats.cheaper.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut parked = s.parked.borrow_mut();
        let Some(i) = parked.acquire() else {
            s.l3.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        if !s.l3.lookup(self.id, i as u32, p.key) {
            parked.release(i);
            return false;
        }
        let serial = s.serial.get() + 1;
        s.serial.set(serial);
        let e = parked.get_mut(i);
        e.conn = Some(conn.clone());
        e.frame.clear();
        e.frame.extend_from_slice(p.body);
        e.arrival = Some(p.arrival);
        e.key = p.key;
        e.nruns = p.slots.len().min(ENSEMBLE_MEMBERS_MAX);
        for (k, &slot) in p.slots.iter().take(ENSEMBLE_MEMBERS_MAX).enumerate() {
            let m = &self.slots[slot].model;
            if k == e.runs.len() {
                e.runs.push((String::new(), 0));
            }
            e.runs[k].0.clear();
            e.runs[k].0.push_str(&m.name);
            e.runs[k].1 = m.version;
        }
        e.output_width = p.output_width;
        e.policy = p.policy;
        e.out_len = p.out_len;
        e.rows = p.rows;
        e.id = p.id;
        e.serial = serial;
        e.sent = Some(Instant::now());
        s.due
            .borrow_mut()
            .push_back((i as u32, serial, Instant::now() + s.l3.cfg.lookup_budget));
        conn.in_flight.set(conn.in_flight.get() + 1);
        s.wake.notify();
        true
    }
}

impl Shard {
    /// Member `member` of pending entry `k` (`e`) missed L1/L2: ask L3
    /// for it and count it outstanding. False when not asked (no L3, an
    /// uncacheable member, computing predicted quicker, breaker open,
    /// full): enqueue it.
    pub(super) fn l3_park_member(
        &self,
        e: &mut EnsemblePending,
        k: usize,
        member: usize,
        slot: usize,
    ) -> bool {
        let (Some(s), Some(key)) = (&self.l3, e.member_keys[member]) else {
            return false;
        };
        let rows = e.rows as usize;
        if s.skip_member.get() {
            return false;
        }
        if !s.l3.cfg.always && self.predicted_wait_us(slot, rows) < s.rtt_us.get() {
            s.l3.stats.cheaper.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let me = {
            let v = s.versions.borrow();
            let found = v.iter().find(|w| std::ptr::eq(w.as_ptr(), self));
            match found {
                Some(w) => w.clone(),
                None => return false,
            }
        };
        let mut members = s.members.borrow_mut();
        let Some(i) = members.acquire() else {
            s.l3.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        if !s.l3.lookup(self.id, MEMBER | i as u32, key) {
            members.release(i);
            return false;
        }
        let serial = s.serial.get() + 1;
        s.serial.set(serial);
        *members.get_mut(i) = ParkedMember {
            shard: me,
            k,
            generation: e.generation,
            member: member as u8,
            slot,
            n: rows * self.slots[slot].model.output_width,
            key,
            serial,
            sent: Some(Instant::now()),
        };
        s.due.borrow_mut().push_back((
            MEMBER | i as u32,
            serial,
            Instant::now() + s.l3.cfg.lookup_budget,
        ));
        e.remaining += 1;
        s.wake.notify();
        true
    }

    /// A member lookup's outcome: combine a hit, enqueue a miss; advance
    /// the entry once nothing else is outstanding.
    fn l3_member_answer(&self, s: &L3Shard, p: &ParkedMember, value: Option<&[u8]>) {
        let now = Instant::now();
        let mut pending = self.pending.borrow_mut();
        if !pending.is_live(p.k, p.generation) {
            return; // answered without it (straggler cutoff)
        }
        let e = pending.get_mut(p.k);
        let hit = {
            let mut buf = self.cache.buf.borrow_mut();
            let hit = value.is_some_and(|v| decode(p.key, v, &mut buf[..p.n]));
            if hit {
                self.combine_member(e, p.member as usize, &buf[..p.n]);
                let policy = self.slots[p.slot].cache;
                self.cache.insert_local(p.key, policy, &buf[..p.n]);
            }
            hit
        };
        if hit {
            s.l3.stats.hits.fetch_add(1, Ordering::Relaxed);
            self.metrics.cache_hits_l3.inc();
        } else {
            if value.is_some() {
                s.l3.stats.corrupt.fetch_add(1, Ordering::Relaxed);
            }
            s.l3.stats.misses.fetch_add(1, Ordering::Relaxed);
        }
        e.remaining = e.remaining.saturating_sub(1);
        if !hit {
            drop(pending);
            s.skip_member.set(true);
            let r = self.run_members(p.k, MemberSet::one(p.member as usize), false, now);
            s.skip_member.set(false);
            pending = self.pending.borrow_mut();
            if r.is_err() {
                // Its queue filled up meanwhile: answered as failed
                // rather than left waiting for a member that never runs.
                pending.get_mut(p.k).failed = true;
            }
        }
        if pending.get_mut(p.k).remaining == 0 {
            drop(pending);
            self.advance(p.k, now);
        }
    }
}

/// Member lookup `i` is still waiting (not answered, not timed out;
/// settling takes the entry, leaving `sent` empty).
fn member_live(s: &L3Shard, i: usize, serial: u64) -> bool {
    s.members
        .borrow()
        .get(i)
        .is_some_and(|p| p.serial == serial && p.sent.is_some())
}

/// Settle member lookup `i` with `value` (`None`: a miss or a spent budget).
fn member_settle(s: &L3Shard, i: usize, value: Option<&[u8]>) {
    let p = {
        let mut members = s.members.borrow_mut();
        let p = std::mem::take(members.get_mut(i));
        members.release(i);
        p
    };
    if let Some(shard) = p.shard.upgrade() {
        shard.l3_member_answer(s, &p, value);
    }
}

fn member_reply(s: &L3Shard, r: Reply) {
    let i = (r.token & !MEMBER) as usize;
    let sent = match s.members.borrow().get(i) {
        Some(p) if p.sent.is_some() && p.key == r.key => p.sent,
        _ => return, // its budget ran out first
    };
    if let Some(t) = sent {
        l3_rtt(s, t.elapsed().as_secs_f32() * 1e6);
    }
    member_settle(s, i, r.value.as_deref());
}

/// Answers parked requests from L3 replies; computes those whose lookup
/// missed or ran out of budget, on the version current then. One task per
/// executor (`run.rs`), across versions.
pub(crate) async fn run_l3(current: Rc<Current>) {
    let Some(s) = current.shared.l3.clone() else {
        return;
    };
    let id = current.shared.id;
    loop {
        if s.due.borrow().is_empty() {
            s.wake.wait().await;
            continue;
        }
        while let Ok(r) = s.replies.try_recv() {
            if r.token & MEMBER != 0 {
                member_reply(&s, r);
            } else {
                current.get().l3_reply(&s, r);
            }
        }
        let now = Instant::now();
        let mut next = None;
        loop {
            let front = s.due.borrow().front().copied();
            match front {
                Some((i, serial, until)) if until <= now => {
                    s.due.borrow_mut().pop_front();
                    if i & MEMBER != 0 {
                        let m = (i & !MEMBER) as usize;
                        if member_live(&s, m, serial) {
                            s.l3.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                            l3_rtt(&s, s.l3.cfg.lookup_budget.as_secs_f32() * 1e6);
                            member_settle(&s, m, None);
                        }
                    } else if l3_live(&s, i as usize, serial) {
                        s.l3.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                        l3_rtt(&s, s.l3.cfg.lookup_budget.as_secs_f32() * 1e6);
                        current.get().l3_compute(&s, i as usize);
                    }
                }
                Some((_, _, until)) => {
                    next = Some(until);
                    break;
                }
                None => break,
            }
        }
        if let Some(until) = next {
            // Until a reply is posted (the L3 thread wakes this task from
            // its own thread) or the oldest budget ends.
            let replied = std::future::poll_fn(|cx| {
                if !s.replies.is_empty() {
                    return Poll::Ready(());
                }
                s.l3.register(id, cx.waker());
                if s.replies.is_empty() {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            });
            let wait = until.saturating_duration_since(now);
            futures_lite::future::or(replied, glommio::timer::sleep(wait)).await;
        }
    }
}

fn l3_live(s: &L3Shard, i: usize, serial: u64) -> bool {
    let parked = s.parked.borrow();
    parked
        .get(i)
        .is_some_and(|e| e.serial == serial && e.conn.is_some())
}

fn l3_rtt(s: &L3Shard, us: f32) {
    let old = s.rtt_us.get();
    s.rtt_us.set(if old == 0.0 {
        us
    } else {
        old + (us - old) / 16.0
    });
}

impl Shard {
    fn l3_reply(&self, s: &L3Shard, r: Reply) {
        let i = r.token as usize;
        let (live, out_len, sent) = {
            let parked = s.parked.borrow();
            match parked.get(i) {
                Some(e) if e.conn.is_some() && e.key == r.key => (true, e.out_len, e.sent),
                _ => (false, 0, None),
            }
        };
        if !live {
            return; // already computing: its budget ran out first
        }
        if let Some(t) = sent {
            l3_rtt(s, t.elapsed().as_secs_f32() * 1e6);
        }
        let hit = {
            let mut buf = self.cache.buf.borrow_mut();
            r.value
                .as_deref()
                .is_some_and(|v| decode(r.key, v, &mut buf[..out_len]))
        };
        if !hit {
            if r.value.is_some() {
                s.l3.stats.corrupt.fetch_add(1, Ordering::Relaxed);
            }
            s.l3.stats.misses.fetch_add(1, Ordering::Relaxed);
            return self.l3_compute(s, i);
        }
        s.l3.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.metrics.cache_hits_l3.inc();
        let mut parked = s.parked.borrow_mut();
        let e = parked.get_mut(i);
        let (Some(conn), Some(arrival)) = (e.conn.take(), e.arrival.take()) else {
            return;
        };
        conn.request_done();
        let buf = self.cache.buf.borrow();
        self.cache.insert_local(r.key, e.policy, &buf[..out_len]);
        let mut runs = [RunInfo {
            model: "",
            version: 0,
            flops: 0,
        }; ENSEMBLE_MEMBERS_MAX];
        for (r, (name, version)) in runs.iter_mut().zip(&e.runs[..e.nruns]) {
            *r = RunInfo {
                model: name,
                version: *version,
                flops: 0,
            };
        }
        self.respond_ok(
            &conn,
            e.id,
            e.rows,
            e.output_width,
            &buf[..out_len],
            &runs[..e.nruns],
            arrival,
            Timings::default(),
            true,
            Default::default(),
        );
        parked.release(i);
    }

    /// Hand parked entry `i` back to the request path, L3 skipped.
    fn l3_compute(&self, s: &L3Shard, i: usize) {
        let (conn, mut frame, arrival) = {
            let mut parked = s.parked.borrow_mut();
            let e = parked.get_mut(i);
            (
                e.conn.take(),
                std::mem::take(&mut e.frame),
                e.arrival.take(),
            )
        };
        if let (Some(conn), Some(arrival)) = (conn, arrival) {
            conn.request_done();
            s.skip.set(true);
            self.handle_frame(&conn, &frame, arrival);
            s.skip.set(false);
        }
        frame.clear();
        let mut parked = s.parked.borrow_mut();
        parked.get_mut(i).frame = frame;
        parked.release(i);
    }
}
