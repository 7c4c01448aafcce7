//! Versions of a shard: the registry swaps without a lock on the request
//! path. [`Current`] holds the version new frames go to (an `Rc` swapped
//! on the shard's own thread, read once per frame: no lock, no
//! allocation); a new version gets its batchers and cutoff task before it
//! becomes current; the version it replaces is *retired*: it admits
//! nothing new, its batchers answer what is queued and its pending
//! ensembles finish, then its tasks return and the last `Rc` dropped
//! unloads its models (`Drop` below counts it out of `alive`).

use super::state::ModelSlot;
use super::{spawn_tasks, Shard, Shared};
use crate::backend::ModelId;
use crate::batch::RowCost;
use crate::ensemble::cost::DomainCounters;
use crate::server::registry::{Hub, ProfileSeeds};
use crate::server::select::SelState;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The version a shard's connections send new frames to.
pub(crate) struct Current {
    shard: RefCell<Rc<Shard>>,
    pub shared: Shared,
    /// The largest answer of any version installed so far (connections
    /// reserve this much per request in flight: a hard bound across swaps).
    response_bytes_max: Cell<usize>,
}

impl Current {
    pub fn new(first: Rc<Shard>, shared: Shared) -> Current {
        Current {
            response_bytes_max: Cell::new(first.response_bytes_max),
            shard: RefCell::new(first),
            shared,
        }
    }

    /// The version a frame arriving now runs on.
    #[inline]
    pub fn get(&self) -> Rc<Shard> {
        self.shard.borrow().clone()
    }

    pub fn response_bytes_max(&self) -> usize {
        self.response_bytes_max.get()
    }

    /// A fresh number for a new connection.
    pub fn next_conn_serial(&self) -> u32 {
        let c = &self.shared.conn_serial;
        let n = c.get().wrapping_add(1).max(1);
        c.set(n);
        n
    }

    /// Start `next`'s tasks, make it current and retire the one it replaces.
    pub fn install(&self, next: Rc<Shard>) {
        spawn_tasks(&next);
        self.response_bytes_max
            .set(self.response_bytes_max.get().max(next.response_bytes_max));
        let old = self.shard.replace(next);
        old.retire();
    }
}

impl Shard {
    /// No new work comes here: wake the tasks so they see it (they exit
    /// once queues and pending entries are empty).
    fn retire(&self) {
        self.retired.set(true);
        for s in &self.slots {
            s.wake.notify();
        }
        self.deadline_wake.notify();
    }

    /// The selection counters of plan `p`, domain slot `slot` (a spare set
    /// for an ensemble added since start).
    pub(super) fn sel_counters(&self, p: usize, slot: usize) -> &DomainCounters {
        match self.plan_selection[p] {
            Some(i) => self.selection.at(i, slot),
            None => &self.selection.spare,
        }
    }

    /// Stopping (shutdown) or retired (replaced by a newer version).
    #[inline]
    pub(super) fn winding_down(&self) -> bool {
        self.stopping.get() || self.retired.get()
    }
}

impl Drop for Shard {
    /// Count this version out, and unregister from the backend the models
    /// no other version of this shard holds.
    fn drop(&mut self) {
        self.alive.set(self.alive.get().saturating_sub(1));
        let mut reg = self.registered.borrow_mut();
        for s in &self.slots {
            if let Some(n) = reg.get_mut(&s.backend_id) {
                *n -= 1;
                if *n == 0 {
                    reg.remove(&s.backend_id);
                    self.backend.borrow_mut().unregister(s.backend_id);
                }
            }
        }
    }
}

/// The backend id of model `m` in a new version: the one the version it
/// replaces uses for the same model (`Arc`), else a new registration;
/// counted per version holding it (`Drop` above unregisters at zero).
pub(super) fn backend_id(
    sh: &Shared,
    prev: Option<&Shard>,
    m: &Arc<crate::model::Model>,
) -> Result<ModelId, String> {
    let kept = prev.and_then(|p| {
        p.slots
            .iter()
            .find(|o| Arc::ptr_eq(&o.model, m))
            .map(|o| o.backend_id)
    });
    let id = match kept {
        Some(id) => id,
        None => {
            let mut b = sh.backend.borrow_mut();
            b.register(m).map_err(|e| {
                format!("model {} v{}: backend {}: {e}", m.name, m.version, b.name())
            })?
        }
    };
    *sh.registered.borrow_mut().entry(id).or_insert(0) += 1;
    Ok(id)
}

/// Seed the latency profiles and admission costs of a new version's
/// slots: from the version it replaces where the model is the same
/// (`Arc`), else from the loader's warm-up measurement.
pub(super) fn seed_profiles(
    slots: &[ModelSlot],
    sel: &mut SelState,
    prev: Option<&Shard>,
    seeds: &ProfileSeeds,
) {
    for (i, s) in slots.iter().enumerate() {
        let m = &s.model;
        let old = prev.and_then(|p| {
            p.slots
                .iter()
                .position(|o| Arc::ptr_eq(&o.model, m))
                .map(|j| (p.sel.borrow().profiles[j], p.slots[j].row_cost.get()))
        });
        if let Some((profile, cost)) = old {
            sel.profiles[i] = profile;
            s.row_cost.set(cost);
        } else if let Some(us) = seeds.get(&(m.name.clone(), m.version, m.digest)) {
            let p = &mut sel.profiles[i];
            for (k, &u) in us.iter().enumerate() {
                p.set(k, u);
            }
            s.row_cost
                .set(RowCost::new(p.us[2] / p.sizes[2].max(1) as f32));
        }
    }
}

/// The shard's watcher task: when the hub has a newer generation, build
/// this shard's version of it and install it. A version that cannot be
/// built (the same on every shard: the loader's checks missed something)
/// is reported and the current one keeps serving.
pub(crate) async fn watch(current: Rc<Current>, hub: Arc<Hub>, stop: Arc<AtomicBool>) {
    let id = current.shared.id;
    let me = &hub.shards[id];
    loop {
        me.alive
            .store(current.shared.alive.get(), Ordering::Relaxed);
        if stop.load(Ordering::Relaxed) || current.shared.stopping.get() {
            return;
        }
        let g = hub.generation();
        if g == current.get().generation {
            glommio::timer::sleep(WATCH_EVERY).await;
            continue;
        }
        let reg = hub.latest();
        let prev = current.get();
        let t0 = std::time::Instant::now();
        match Shard::new(&current.shared, &reg, Some(&prev)) {
            Ok(next) => {
                drop(prev);
                current.install(Rc::new(next));
                me.applied.store(reg.generation, Ordering::Release);
                eprintln!(
                    "beast: shard {id}: generation {} serving (built and swapped in {} us on the shard)",
                    reg.generation,
                    t0.elapsed().as_micros()
                );
            }
            Err(e) => {
                eprintln!(
                    "beast: shard {id}: generation {}: {e}; the current one keeps serving",
                    reg.generation
                );
                *me.error.lock().unwrap_or_else(|e| e.into_inner()) = Some((reg.generation, e));
                // Not again for this generation.
                while hub.generation() == reg.generation && !stop.load(Ordering::Relaxed) {
                    glommio::timer::sleep(WATCH_EVERY).await;
                }
            }
        }
    }
}

/// How often a shard's watcher looks for a new generation (one atomic load).
const WATCH_EVERY: Duration = Duration::from_millis(2);
