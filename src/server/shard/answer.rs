//! What an answer may carry and how big it may get: pure helpers shared by
//! every piece of the shard (no shard state here).

use super::state::ModelSlot;
use crate::config::Config;
use crate::ensemble::EnsemblePlan;
use crate::wire::{self, Status};
use std::time::{Duration, Instant};

/// What an answer carries besides its output.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Extra {
    pub ticket: u64,
    pub partial: bool,
}

/// Why a computed answer cannot go out as OK: the backend failed, or the
/// request's deadline passed while it was computed. Callers pass the time
/// of answering itself (not of the batch's end): answering a batch can be
/// interrupted by the OS, and an OK answer must not leave after its deadline.
pub(super) fn refusal(
    ok: bool,
    deadline: Option<Instant>,
    now: Instant,
) -> Option<(Status, &'static str)> {
    if !ok {
        Some((Status::Internal, "backend failed"))
    } else if deadline.is_some_and(|d| now > d) {
        Some((
            Status::DeadlineExceeded,
            "deadline passed before the answer was ready",
        ))
    } else {
        None
    }
}

#[inline]
pub(super) fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

/// The largest answer frame any request can get from these targets (an
/// error answer at least), or why it cannot fit a connection's
/// `pending_bytes_per_connection_max`.
pub(super) fn largest_answer(
    cfg: &Config,
    slots: &[ModelSlot],
    plans: &[EnsemblePlan],
    plan_rows_max: &[(usize, usize)],
) -> Result<usize, String> {
    let bound = cfg.pending_bytes_per_connection_max;
    let mut largest = wire::response_frame_len_max(MESSAGE_BYTES_MAX, 0, []);
    let mut check = |name: &str, rows: usize, cols: usize, n: usize| {
        if n > bound {
            return Err(format!(
                "'{name}': its largest answer ({rows} rows x {cols} outputs) takes {n} bytes, \
                 over pending_bytes_per_connection_max ({bound}): raise it or lower \
                 rows_per_request_max"
            ));
        }
        largest = largest.max(n);
        Ok(())
    };
    for s in slots {
        let m = &s.model;
        let rows = cfg.rows_per_request_max.min(m.batch.queue_rows_max);
        let n = wire::response_frame_len_max(0, rows * m.output_width, [m.name.len()]);
        check(&m.name, rows, m.output_width, n)?;
    }
    for (plan, &(cap, _)) in plans.iter().zip(plan_rows_max) {
        let rows = cfg.rows_per_request_max.min(cap);
        let names = plan.members.iter().map(|&m| slots[m].model.name.len());
        let n = wire::response_frame_len_max(0, rows * plan.output_width, names);
        check(&plan.name, rows, plan.output_width, n)?;
    }
    Ok(largest)
}

/// Longest name quoted in a message (bytes, cut on a char boundary): a
/// client's 4 MiB target name must not come back in a 4 MiB answer.
pub(crate) const NAME_BYTES_MAX: usize = 256;

/// Longest message text of any answer (bytes).
pub(crate) const MESSAGE_BYTES_MAX: usize = 1024;

/// `s` cut to at most `max` bytes on a char boundary.
pub(super) fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A name for a message: at most [`NAME_BYTES_MAX`] bytes, "..." when cut.
pub(super) struct Clip<'a>(pub &'a str);

impl std::fmt::Display for Clip<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = clip(self.0, NAME_BYTES_MAX);
        f.write_str(c)?;
        if c.len() < self.0.len() {
            f.write_str("...")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_batch_is_answered_internal_whatever_its_deadline() {
        // The batcher passes `ok = false` for a batch whose backend verdict
        // (submit refusal or completion error) was an error.
        let now = Instant::now();
        let later = Some(now + Duration::from_secs(1));
        for deadline in [None, later, Some(now - Duration::from_millis(1))] {
            assert_eq!(
                refusal(false, deadline, now),
                Some((Status::Internal, "backend failed"))
            );
        }
        assert_eq!(refusal(true, later, now), None);
        assert_eq!(refusal(true, None, now), None);
        assert_eq!(
            refusal(true, Some(now - Duration::from_millis(1)), now).map(|r| r.0),
            Some(Status::DeadlineExceeded)
        );
    }
}
