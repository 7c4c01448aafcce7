//! A connection as the rest of the shard sees it: where answers are
//! encoded (`out`), how many requests are in flight, and the wake-ups
//! between the connection's reader, its writer and whoever answers.
//!
//! Kept apart from the connection's tasks (`conn.rs`) so that the request
//! path (`shard/`, `cache.rs`) can name a connection without depending on
//! the tasks that drive it, which themselves call into the shard.

use super::notify::Notify;
use std::cell::{Cell, RefCell};

pub(crate) struct Conn {
    /// Encoded responses not yet handed to the writer.
    pub out: RefCell<Vec<u8>>,
    /// Requests accepted and not yet answered.
    pub in_flight: Cell<usize>,
    /// Bytes the writer is writing now (taken from `out`).
    pub(super) writing: Cell<usize>,
    pub writer_wake: Notify,
    /// The writer took `out` or finished a write (the reader waits on this
    /// under backpressure).
    pub drained: Notify,
    /// A write failed: drop further responses.
    pub dead: Cell<bool>,
    /// The reader is done: the writer exits once nothing is in flight.
    pub closing: Cell<bool>,
    /// This connection's number on its shard: feedback tickets are bound to
    /// the connection that got the answer.
    pub serial: u32,
}

impl Conn {
    pub(super) fn new(cap: usize, serial: u32) -> Self {
        Conn {
            serial,
            out: RefCell::new(Vec::with_capacity(cap)),
            in_flight: Cell::new(0),
            writing: Cell::new(0),
            writer_wake: Notify::default(),
            drained: Notify::default(),
            dead: Cell::new(false),
            closing: Cell::new(false),
        }
    }

    /// One request of this connection was answered (or dropped). Checked in
    /// release builds too: an answer for no request in flight would wrap
    /// the count, and the connection would refuse every request and its
    /// writer wait forever for the count to reach 0.
    #[inline]
    pub fn request_done(&self) {
        match self.in_flight.get().checked_sub(1) {
            Some(n) => self.in_flight.set(n),
            None => eprintln!(
                "beast: internal error: connection {}: an answer with no request in flight",
                self.serial
            ),
        }
    }

    /// Answer bytes held: encoded, being written, and `answer` for each
    /// request in flight.
    pub(super) fn pending(&self, answer: usize) -> usize {
        self.out.borrow().len() + self.writing.get() + self.in_flight.get() * answer
    }

    /// Nothing in flight and nothing left to write.
    pub(super) fn is_quiet(&self) -> bool {
        self.in_flight.get() == 0 && self.writing.get() == 0 && self.out.borrow().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::Conn;

    #[test]
    fn an_answer_with_nothing_in_flight_leaves_the_count_at_zero() {
        let c = Conn::new(16, 1);
        c.in_flight.set(1);
        c.request_done();
        assert_eq!(c.in_flight.get(), 0);
        c.request_done();
        assert_eq!(c.in_flight.get(), 0, "count wrapped");
        assert!(c.is_quiet());
    }
}
