//! Feedback: a message naming an answer's ticket and the true label
//! updates the selection state (per-member accuracy, bandit, stacker); the
//! selection state is saved at a clean shutdown.

use super::answer::Extra;
use super::state::TargetRef;
use super::Shard;
use crate::ensemble::feedback::Entry;
use crate::ensemble::{argmax, MemberSet};
use crate::server::conn_state::Conn;
use crate::wire::{FeedbackView, Status, Timings};
use std::time::Instant;

/// `Entry::plan` of a model answer's ticket (a canary's; `domain_slot`
/// holds the model slot that answered).
const MODEL_TICKET: u16 = u16::MAX;

impl Shard {
    /// A feedback message: learn from it and answer OK, or NOT_FOUND.
    pub(super) fn handle_feedback(&self, conn: &Conn, f: &FeedbackView, arrival: Instant) {
        let mut guard = self.sel.borrow_mut();
        let sel = &mut *guard;
        let Some((entry, rows)) = sel.window.take(f.ticket, conn.serial) else {
            return self.respond_error(
                conn,
                f.id,
                Status::NotFound,
                "unknown ticket: expired, already given feedback, or issued to another connection (send feedback on the connection that got the answer)",
                arrival,
            );
        };
        if entry.plan == MODEL_TICKET {
            drop(guard);
            return self.model_feedback(conn, f, &entry, arrival);
        }
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
        self.feedback_ok(conn, f.id, arrival);
    }

    /// The ticket of a model's answer `out` (its first row is judged), when
    /// the request was `labelled` (routed by a canary); 0 otherwise.
    pub(super) fn model_ticket(
        &self,
        labelled: bool,
        conn: &Conn,
        slot: usize,
        out: &[f32],
    ) -> u64 {
        let w = self.slots[slot].model.output_width;
        if !labelled || out.len() < w || w == 0 {
            return 0;
        }
        let entry = Entry {
            ticket: 0,
            conn: conn.serial,
            plan: MODEL_TICKET,
            domain_slot: slot as u16,
            ran: MemberSet::default(),
            arm: None,
            answer: argmax(&out[..w]) as u16,
            used: false,
        };
        self.sel.borrow_mut().window.push(entry, 0, |_| &[])
    }

    /// Feedback on a canary's answer: count the label for the version that
    /// answered (the rollout's accuracy figures).
    fn model_feedback(&self, conn: &Conn, f: &FeedbackView, e: &Entry, arrival: Instant) {
        let slot = e.domain_slot as usize;
        let m = &self.slots[slot].model;
        let trial = match self.targets.get(m.name.as_str()) {
            Some(TargetRef::Model { trial: Some(t), .. }) => t,
            _ => {
                return self.respond_error(
                    conn,
                    f.id,
                    Status::NotFound,
                    "unknown ticket: the rollout it was issued under has ended",
                    arrival,
                )
            }
        };
        if f.label as usize >= m.output_width {
            self.sel.borrow_mut().window.restore(f.ticket);
            return self.respond_error_fmt(
                conn,
                f.id,
                Status::BadRequest,
                arrival,
                format_args!(
                    "label {} is not a class of '{}' ({} classes)",
                    f.label, m.name, m.output_width
                ),
            );
        }
        trial
            .stats
            .label(slot == trial.slot, e.answer as u32 == f.label);
        self.feedback_ok(conn, f.id, arrival);
    }

    /// The empty OK that acknowledges a counted label.
    fn feedback_ok(&self, conn: &Conn, id: u64, arrival: Instant) {
        self.respond_ok(
            conn,
            id,
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
        let r = self.sel.borrow().save(path, self.id, &self.plans);
        if let Err(e) = r {
            eprintln!("beast: shard {}: saving selection state: {e}", self.id);
        }
    }
}
