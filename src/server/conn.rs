//! One client connection: a reader that frames and hands requests to the
//! shard, and a writer that flushes whatever responses have been encoded.
//!
//! The two halves proceed independently without a lock: either through
//! the shard's own io_uring (`uring.rs`, the default: one fd, receives
//! and sends of every connection submitted together, no interrupt per
//! arriving packet), or as two glommio streams over one socket (the fd is
//! duplicated; `uring_sockets = false`, or where the kernel refuses the
//! ring).
//! Frames come out of [`FrameReader`] (src/wire/frame.rs, the same reader
//! the client uses): the connection reads into `FrameReader::spare`, marks
//! the bytes with `filled`, and takes whole bodies with `next_frame`.
//! Responses are encoded straight into `out` by whoever finishes a request
//! (batcher or error path); the writer swaps `out` with a spare buffer and
//! writes it in one call, so a batch's responses leave in one syscall.
//! The state the request path shares with these tasks (`Conn`: `out`,
//! `in_flight`, the wake-ups) lives in `conn_state.rs`.
//!
//! Bounds:
//! - `in_flight_per_connection_max` requests (beyond: OVERLOADED);
//! - `pending_bytes_per_connection_max` answer bytes: encoded and not yet
//!   written, plus the shard's largest answer for every request in flight.
//!   The reader takes the next frame only when one more largest answer
//!   still fits, so the bound is hard (beyond it: stop reading until the
//!   peer reads);
//! - `frame_bytes_max` per frame (beyond: close);
//! - time: a frame must complete within `frame_timeout_ms` of its first
//!   bytes, a connection with nothing in flight is closed after
//!   `idle_timeout_ms` without a byte, and one whose peer reads nothing
//!   for `write_stall_timeout_ms` is closed. These are the streams' own
//!   read and write timeouts (one timer per stream, armed only when a read
//!   or write has to wait), or the ring's deadlines (checked by its
//!   sweeper): nothing per request.

use super::conn_state::Conn;
use super::shard::Current;
use super::uring::Ring;
use crate::metrics::ShardMetrics;
use crate::metrics::TimedOut;
use crate::wire::FrameReader;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::io;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Serve one connection until the peer closes, a protocol violation, a
/// timeout, or shutdown; in-flight requests are always answered (or, if
/// the peer stopped reading, dropped) before it returns.
pub(crate) async fn serve(current: Rc<Current>, ring: Option<Rc<Ring>>, mut stream: TcpStream) {
    let cfg = current.shared.cfg.clone();
    let stall = Duration::from_millis(cfg.write_stall_timeout_ms);
    let fd = stream.as_raw_fd();
    let writer = match &ring {
        Some(r) => Writer::Uring(r.clone(), fd, stall),
        None => {
            // SAFETY: dup returns a new fd we own; TcpStream takes ownership of it.
            let wfd = unsafe { libc::dup(fd) };
            if wfd < 0 {
                return;
            }
            // SAFETY: wfd is a fresh, valid socket fd owned by nobody else.
            let w = unsafe { TcpStream::from_raw_fd(wfd) };
            let _ = w.set_write_timeout(Some(stall));
            Writer::Glommio(w)
        }
    };
    let conn = Rc::new(Conn::new(cfg.read_buffer_bytes, current.next_conn_serial()));
    let metrics = current.shared.metrics.clone();
    let wtask = glommio::spawn_local(write_loop(metrics, conn.clone(), writer));
    let mut reader = match &ring {
        Some(r) => Reader::Uring(r, fd),
        None => Reader::Glommio(&mut stream),
    };
    read_loop(&current, &conn, &mut reader).await;
    conn.closing.set(true);
    conn.writer_wake.notify();
    wtask.await;
    // Both fds close on drop; make sure the peer sees the close even if a
    // writer error left the socket half-open. (The read fd stays open
    // until now: the server shuts it down by number on stop.)
    // SAFETY: the fd is still owned by `stream`.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// The receiving half of a connection.
enum Reader<'a> {
    Glommio(&'a mut TcpStream),
    Uring(&'a Ring, RawFd),
}

impl Reader<'_> {
    /// One receive into `buf`, waiting at most `timeout` (then `TimedOut`).
    async fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        match self {
            Reader::Glommio(s) => {
                let _ = s.set_read_timeout(Some(timeout));
                s.read(buf).await
            }
            Reader::Uring(r, fd) => r.recv(*fd, buf, Some(Instant::now() + timeout)).await,
        }
    }
}

/// The sending half of a connection.
enum Writer {
    /// A stream over a duplicate of the socket, its write timeout set.
    Glommio(TcpStream),
    /// The socket (owned by the reader's stream) and the write stall limit.
    Uring(Rc<Ring>, RawFd, Duration),
}

impl Writer {
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Writer::Glommio(w) => w.write_all(buf).await,
            Writer::Uring(r, fd, stall) => r.send_all(*fd, buf, *stall).await,
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Writer::Glommio(w) => w.as_raw_fd(),
            Writer::Uring(_, fd, _) => *fd,
        }
    }
}

async fn read_loop(current: &Current, conn: &Rc<Conn>, reader: &mut Reader<'_>) {
    let cfg = &current.shared.cfg;
    let metrics = &current.shared.metrics;
    let bound = cfg.pending_bytes_per_connection_max;
    // Every request in flight holds room for the largest answer; the next
    // frame is taken only when its answer fits too (`response_bytes_max`
    // <= bound was checked at start, so an idle connection always can).
    // The largest over every version installed so far: a swap can only
    // make the reservation more careful.
    let room = |c: &Conn| {
        let answer = current.response_bytes_max();
        c.pending(answer) + answer <= bound
    };
    let frame_timeout = Duration::from_millis(cfg.frame_timeout_ms);
    let idle_timeout = Duration::from_millis(cfg.idle_timeout_ms);
    let mut frames = FrameReader::with_capacity(cfg.frame_bytes_max, cfg.read_buffer_bytes);
    // When the first bytes of the frame not yet complete arrived.
    let mut frame_started: Option<Instant> = None;
    let mut arrival = Instant::now();
    loop {
        let mut took = false;
        loop {
            if !room(conn) {
                // The connection is at its fullest now.
                metrics.record_pending(conn.out.borrow().len() + conn.writing.get());
                let waited = Instant::now();
                while !room(conn) && !conn.dead.get() {
                    conn.drained.wait().await;
                }
                // Time spent waiting for our own output is not the peer's.
                if let Some(s) = frame_started.as_mut() {
                    *s += waited.elapsed();
                }
            }
            if conn.dead.get() {
                return;
            }
            match frames.next_frame() {
                Ok(Some(body)) => {
                    // The version current now: the request finishes on it.
                    current.get().handle_frame(conn, body, arrival);
                    took = true;
                }
                Ok(None) => break,
                Err(_) => {
                    // The stream cannot be resynchronised: answer what is
                    // in flight, then close.
                    metrics.connections_dropped.inc();
                    return;
                }
            }
        }
        let timeout = if frames.buffered() == 0 {
            frame_started = None;
            idle_timeout
        } else {
            // A frame is under way: it must complete in time.
            if took || frame_started.is_none() {
                frame_started = Some(arrival);
            }
            let end = frame_started.unwrap_or(arrival) + frame_timeout;
            match end.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => left,
                _ => {
                    metrics.record_timed_out(TimedOut::Frame);
                    return;
                }
            }
        };
        match reader.read(frames.spare(), timeout).await {
            Ok(0) => return,
            Ok(n) => {
                frames.filled(n);
                arrival = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::TimedOut => {
                if frames.buffered() > 0 {
                    metrics.record_timed_out(TimedOut::Frame);
                    return;
                }
                if conn.is_quiet() {
                    metrics.record_timed_out(TimedOut::Idle);
                    return;
                }
                // Requests in flight: not idle; wait again.
            }
            Err(_) => return,
        }
    }
}

async fn write_loop(metrics: std::sync::Arc<ShardMetrics>, conn: Rc<Conn>, mut w: Writer) {
    let mut spare: Vec<u8> = Vec::with_capacity(conn.out.borrow().capacity());
    loop {
        if conn.out.borrow().is_empty() {
            if conn.closing.get() && conn.in_flight.get() == 0 {
                break;
            }
            conn.writer_wake.wait().await;
            continue;
        }
        std::mem::swap(&mut *conn.out.borrow_mut(), &mut spare);
        conn.writing.set(spare.len());
        conn.drained.notify();
        let written = w.write_all(&spare).await;
        // The most this connection held: what was being written and what
        // was encoded meanwhile.
        metrics.record_pending(spare.len() + conn.out.borrow().len());
        conn.writing.set(0);
        if let Err(e) = written {
            if e.kind() == ErrorKind::TimedOut {
                metrics.record_timed_out(TimedOut::WriteStall);
            }
            conn.dead.set(true);
            conn.out.borrow_mut().clear();
            // Wake the reader out of a read (or out of waiting for room):
            // nothing more is read from a peer that does not read.
            // SAFETY: the fd is open until the connection's stream drops,
            // after this task has returned.
            unsafe { libc::shutdown(w.fd(), libc::SHUT_RDWR) };
            // Keep waiting for in-flight work so the counters settle; its
            // responses are dropped because the connection is dead.
        }
        spare.clear();
        conn.drained.notify();
        // Give back memory a burst made the buffer keep.
        if spare.capacity() > 4 << 20 {
            spare.shrink_to(1 << 20);
        }
    }
    if let Writer::Glommio(w) = &mut w {
        let _ = w.flush().await;
    }
}
