//! One client connection: a reader that frames and hands requests to the
//! shard, and a writer that flushes whatever responses have been encoded.
//!
//! The two halves are two glommio streams over one socket (the fd is
//! duplicated), so reads and writes proceed independently without a lock.
//! Responses are encoded straight into `out` by whoever finishes a request
//! (batcher or error path); the writer swaps `out` with a spare buffer and
//! writes it in one call, so a batch's responses leave in one syscall.
//! Bounds: `in_flight_per_connection_max` requests (beyond: OVERLOADED),
//! `write_buffer_bytes_max` pending bytes (beyond: stop reading until the
//! peer reads), `frame_bytes_max` per frame (beyond: close).

use super::notify::Notify;
use super::shard::Shard;
use crate::wire::{check_frame, FrameCheck, FRAME_HEADER_LEN};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, FromRawFd};
use std::rc::Rc;
use std::time::Instant;

pub(crate) struct Conn {
    /// Encoded responses not yet handed to the writer.
    pub out: RefCell<Vec<u8>>,
    /// Requests accepted and not yet answered.
    pub in_flight: Cell<usize>,
    pub writer_wake: Notify,
    /// The writer took `out` (the reader waits on this under backpressure).
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
    fn new(cap: usize, serial: u32) -> Self {
        Conn {
            serial,
            out: RefCell::new(Vec::with_capacity(cap)),
            in_flight: Cell::new(0),
            writer_wake: Notify::default(),
            drained: Notify::default(),
            dead: Cell::new(false),
            closing: Cell::new(false),
        }
    }
}

/// Serve one connection until the peer closes, a protocol violation, or
/// shutdown; in-flight requests are always answered before it returns.
pub(crate) async fn serve(shard: Rc<Shard>, mut reader: TcpStream) {
    let cfg = shard.cfg.clone();
    // SAFETY: dup returns a new fd we own; TcpStream takes ownership of it.
    let wfd = unsafe { libc::dup(reader.as_raw_fd()) };
    if wfd < 0 {
        return;
    }
    // SAFETY: wfd is a fresh, valid socket fd owned by nobody else.
    let writer = unsafe { TcpStream::from_raw_fd(wfd) };
    let conn = Rc::new(Conn::new(cfg.read_buffer_bytes, shard.next_conn_serial()));
    let wtask = glommio::spawn_local(write_loop(conn.clone(), writer));

    let mut buf = vec![0u8; cfg.read_buffer_bytes];
    let (mut start, mut end) = (0usize, 0usize);
    'conn: loop {
        let arrival = Instant::now();
        loop {
            match check_frame(&buf[start..end], cfg.frame_bytes_max) {
                FrameCheck::Complete { body_len } => {
                    let body = &buf[start + FRAME_HEADER_LEN..start + FRAME_HEADER_LEN + body_len];
                    shard.handle_frame(&conn, body, arrival);
                    start += FRAME_HEADER_LEN + body_len;
                }
                FrameCheck::Incomplete => break,
                FrameCheck::Invalid { .. } => {
                    // The stream cannot be resynchronised: answer what is in
                    // flight, then close.
                    shard.metrics.connections_dropped.inc();
                    break 'conn;
                }
            }
        }
        // Make room: move a partial frame to the front; grow (bounded by
        // frame_bytes_max) only when one frame is larger than the buffer,
        // and only as its bytes arrive (doubling), so a length prefix alone
        // cannot make a connection hold a whole maximal frame.
        if start == end {
            start = 0;
            end = 0;
            // A large frame grew the buffer: give the memory back once it
            // has been handled, so an idle connection holds only its
            // initial buffer.
            if buf.len() > cfg.read_buffer_bytes {
                buf.truncate(cfg.read_buffer_bytes);
                buf.shrink_to_fit();
            }
        } else if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        if end >= FRAME_HEADER_LEN {
            let need =
                FRAME_HEADER_LEN + u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if need > buf.len() && end == buf.len() {
                buf.resize(need.min(buf.len() * 2), 0);
            }
        }
        while conn.out.borrow().len() > cfg.write_buffer_bytes_max && !conn.dead.get() {
            conn.drained.wait().await;
        }
        if conn.dead.get() {
            break;
        }
        match reader.read(&mut buf[end..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => end += n,
        }
    }
    conn.closing.set(true);
    conn.writer_wake.notify();
    wtask.await;
    // Both fds close on drop; make sure the peer sees the close even if a
    // writer error left the socket half-open.
    // SAFETY: the fd is still owned by `reader`.
    unsafe { libc::shutdown(reader.as_raw_fd(), libc::SHUT_RDWR) };
}

async fn write_loop(conn: Rc<Conn>, mut w: TcpStream) {
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
        conn.drained.notify();
        if w.write_all(&spare).await.is_err() {
            conn.dead.set(true);
            conn.out.borrow_mut().clear();
            conn.drained.notify();
            // Keep waiting for in-flight work so the counters settle; its
            // responses are dropped because the connection is dead.
        }
        spare.clear();
        // Give back memory a burst made the buffer keep.
        if spare.capacity() > 4 << 20 {
            spare.shrink_to(1 << 20);
        }
    }
    let _ = w.flush().await;
}
