//! Feedback: a message naming an answer's ticket and the true label
//! updates the selection state (per-member accuracy, bandit, stacker); the
//! selection state is saved at a clean shutdown.

use super::answer::Extra;
use super::Shard;
use crate::server::conn_state::Conn;
use crate::wire::{FeedbackView, Status, Timings};
use std::time::Instant;

impl Shard {
    /// A feedback message: learn from it and answer OK, or NOT_FOUND.
    pub(super) fn handle_feedback(&self, conn: &Conn, f: &FeedbackView, arrival: Instant) {
        let mut sel = self.sel.borrow_mut();
        let sel = &mut *sel;
        let Some((entry, rows)) = sel.window.take(f.ticket, conn.serial) else {
            return self.respond_error(
                conn,
                f.id,
                Status::NotFound,
                "unknown ticket: expired, already given feedback, or issued to another connection (send feedback on the connection that got the answer)",
                arrival,
            );
        };
        let p = entry.plan as usize;
        let plan = &self.plans[p];
        if plan.task == crate::model::Task::Regression {
            sel.window.restore(f.ticket);
            return self.respond_error_fmt(
                conn,
                f.id,
                Status::BadRequest,
                arrival,
                format_args!(
                    "'{}' is a regression ensemble: feedback takes a class label, and regression answers have none",
                    plan.name
                ),
            );
        }
        if f.label as usize >= plan.output_width {
            // A bad label does not spend the ticket.
            sel.window.restore(f.ticket);
            return self.respond_error_fmt(
                conn,
                f.id,
                Status::BadRequest,
                arrival,
                format_args!(
                    "label {} is not a class of '{}' ({} classes)",
                    f.label, plan.name, plan.output_width
                ),
            );
        }
        let correct = sel.learned[p].learn(&entry, rows, f.label as usize);
        let c = self.sel_counters(p, entry.domain_slot as usize);
        c.feedback
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        c.feedback_correct
            .fetch_add(correct as u64, std::sync::atomic::Ordering::Relaxed);
        self.respond_ok(
            conn,
            f.id,
            0,
            0,
            &[],
            &[],
            arrival,
            Timings::default(),
            false,
            Extra::default(),
        );
    }

    /// Save what selection learned (clean shutdown).
    pub fn save_selection_state(&self) {
        let path = &self.cfg.selection_state_path;
        if path.as_os_str().is_empty() {
            return;
        }
        let r = self.sel.borrow().save(path, self.id, &self.plans, |slot| {
            let m = &self.slots[slot].model;
            (m.name.clone(), m.version, m.digest)
        });
        if let Err(e) = r {
            eprintln!("beast: shard {}: saving selection state: {e}", self.id);
        }
    }
}
