//! Answers: encode an OK or error response into the connection's output
//! and wake its writer. Owns the shard's `encoder` and `message` buffers.

use super::answer::{clip, micros, Extra, MESSAGE_BYTES_MAX};
use super::Shard;
use crate::server::conn_state::Conn;
use crate::wire::{ResponseHeader, RunInfo, Status, Timings};
use std::fmt::Write as _;
use std::time::Instant;

impl Shard {
    /// Answer an error at once.
    pub fn respond_error(
        &self,
        conn: &Conn,
        id: u64,
        status: Status,
        message: &str,
        arrival: Instant,
    ) {
        let total_us = micros(arrival.elapsed());
        self.metrics
            .record_response(id, status, arrival, total_us, 0, 0);
        if conn.dead.get() {
            // The writer of a dead connection waits for the last answer in
            // flight to exit: wake it even though nothing is written.
            conn.writer_wake.notify();
            return;
        }
        let h = ResponseHeader {
            id,
            status,
            // Names in messages are clipped already; this bounds the rest,
            // so an error answer has a fixed largest size.
            message: clip(message, MESSAGE_BYTES_MAX),
            rows: 0,
            cols: 0,
            timings: Timings {
                total_us,
                ..Timings::default()
            },
            cached: false,
            partial: false,
            ticket: 0,
        };
        self.encoder
            .borrow_mut()
            .response(&h, &[], &[], &mut conn.out.borrow_mut());
        conn.writer_wake.notify();
    }

    pub(super) fn respond_error_fmt(
        &self,
        conn: &Conn,
        id: u64,
        status: Status,
        arrival: Instant,
        args: std::fmt::Arguments<'_>,
    ) {
        let mut msg = self.message.borrow_mut();
        msg.clear();
        let _ = msg.write_fmt(args);
        self.respond_error(conn, id, status, &msg, arrival);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn respond_ok(
        &self,
        conn: &Conn,
        id: u64,
        rows: usize,
        cols: usize,
        out: &[f32],
        runs: &[RunInfo<'_>],
        arrival: Instant,
        t: Timings,
        cached: bool,
        extra: Extra,
    ) {
        let total_us = micros(arrival.elapsed());
        self.metrics
            .record_response(id, Status::Ok, arrival, total_us, t.queue_us, t.compute_us);
        if conn.dead.get() {
            // The writer of a dead connection waits for the last answer in
            // flight to exit: wake it even though nothing is written.
            conn.writer_wake.notify();
            return;
        }
        let h = ResponseHeader {
            id,
            status: Status::Ok,
            message: "",
            rows: rows as u32,
            cols: cols as u32,
            timings: Timings { total_us, ..t },
            cached,
            partial: extra.partial,
            ticket: extra.ticket,
        };

        self.encoder
            .borrow_mut()
            .response(&h, runs, out, &mut conn.out.borrow_mut());
        conn.writer_wake.notify();
    }
}
