//! Learned state shared between nodes, the shard's side
//! (`server/share.rs` has the node's sync thread): a task that publishes
//! this shard's own counters when feedback changed them, and applies the
//! remote part the thread hands back. Off the request path: it runs
//! between requests, every quarter of `learning.share.interval_ms` (at
//! most 250 ms).

use super::{Current, Shard};
use crate::server::share::{Known, Published, ShardLink};
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Shard {
    /// Hand this shard's own counters to the sync thread.
    pub(crate) fn publish_learned(&self, link: &ShardLink) {
        let sel = self.sel.borrow();
        let own = sel.own_counters(&self.plans);
        let mut members = Vec::new();
        let mut fps = HashSet::new();
        for (p, plan) in self.plans.iter().enumerate() {
            let l = &sel.learned[p];
            for (m, &fp) in l.fps.iter().enumerate() {
                members.push(Known {
                    ensemble: plan.name.clone(),
                    member: self.slots[plan.members[m]].model.name.clone(),
                    fp,
                });
                fps.insert(fp);
            }
            fps.extend(l.arm_fps.iter().copied());
        }
        link.publish(Published {
            own: Arc::new(own),
            members: Arc::new(members),
            fps: Arc::new(fps),
        });
    }

    /// Feedback messages this version has learned from.
    fn lessons(&self) -> u64 {
        self.sel.borrow().learned.iter().map(|l| l.lessons).sum()
    }
}

/// The shard's sync task.
pub(crate) async fn run_share(current: Rc<Current>, link: Arc<ShardLink>, interval: Duration) {
    let every = (interval / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let (mut lessons, mut generation, mut seen) = (u64::MAX, u64::MAX, 0u64);
    let mut remote = None;
    loop {
        let shard = current.get();
        let (g, n) = (shard.generation, shard.lessons());
        if (g, n) != (generation, lessons) {
            shard.publish_learned(&link);
        }
        // A new remote part, or a new version (which starts without one).
        let fresh = link.take_remote(&mut seen);
        let apply = fresh.is_some() || g != generation;
        if fresh.is_some() {
            remote = fresh;
        }
        if let (true, Some(r)) = (apply, &remote) {
            shard.sel.borrow_mut().set_remote(&shard.plans, r);
        }
        (generation, lessons) = (g, n);
        drop(shard);
        // Short sleeps: the task must notice a stop quickly (it holds the
        // current version, which shutdown waits for).
        let until = Instant::now() + every;
        while Instant::now() < until {
            if current.shared.stopping.get() {
                return;
            }
            glommio::timer::sleep(every.min(Duration::from_millis(20))).await;
        }
    }
}
