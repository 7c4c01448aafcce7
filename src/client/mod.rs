//! Rust client: one TCP connection, many requests in flight, responses
//! matched by id. Blocking API on std threads so any service (sync, tokio,
//! glommio) can use it; the load generator uses the wire encoder directly.

mod cluster;
mod health;
pub mod labels;
mod nodes;
pub mod npy;
pub mod route;

pub use cluster::{Answer, Cluster, ClusterConfig, Hedge, NodeSpec, NodeStatus, NODES_MAX};

use crate::wire::{
    decode_response, Encoder, FeedbackView, FrameReader, Input, RequestSpec, ResponseView, Status,
    Timings,
};
use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// A successful prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub id: u64,
    pub rows: u32,
    pub cols: u32,
    /// rows × cols, row-major.
    pub outputs: Vec<f32>,
    pub timings: Timings,
    pub cached: bool,
    pub partial: bool,
    /// Names this answer in [`Client::feedback`]; 0 = not eligible (a
    /// model's answer outside a canary rollout, a cached ensemble answer).
    pub ticket: u64,
    /// (model, version, flops) of each model that ran.
    pub runs: Vec<(String, u32, u64)>,
}

/// One error type per wire status, plus transport failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    BadRequest(String),
    NotFound(String),
    Overloaded(String),
    DeadlineExceeded(String),
    Internal(String),
    /// The server sent something this client cannot read.
    Protocol(String),
    /// The connection closed (or failed) before the response came.
    Closed(String),
}

impl ClientError {
    pub fn status(&self) -> Option<Status> {
        Some(match self {
            ClientError::BadRequest(_) => Status::BadRequest,
            ClientError::NotFound(_) => Status::NotFound,
            ClientError::Overloaded(_) => Status::Overloaded,
            ClientError::DeadlineExceeded(_) => Status::DeadlineExceeded,
            ClientError::Internal(_) => Status::Internal,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Text for people (`beast predict`, tools): the status in words, then
        // the server's message; never Rust's debug form.
        let (what, msg) = match self {
            ClientError::BadRequest(m) => ("bad request", m),
            ClientError::NotFound(m) => ("not found", m),
            ClientError::Overloaded(m) => ("overloaded", m),
            ClientError::DeadlineExceeded(m) => ("deadline exceeded", m),
            ClientError::Internal(m) => ("internal error", m),
            ClientError::Protocol(m) => ("protocol error", m),
            ClientError::Closed(m) => ("connection closed", m),
        };
        if msg.is_empty() {
            f.write_str(what)
        } else {
            write!(f, "{what}: {msg}")
        }
    }
}
impl std::error::Error for ClientError {}

/// Largest response frame this client accepts. Generous: the server bounds
/// what it sends by its own limits; this only stops a corrupt length from
/// making the client allocate gigabytes.
pub const RESPONSE_FRAME_BYTES_MAX: usize = 64 << 20;

/// Thread-safe (`Send + Sync`): share it between threads; each call may be
/// in flight at the same time on the one connection.
///
/// One reader thread owns the read half and completes requests by id;
/// writers take turns on the write half under a mutex. Ids come from a
/// counter, so they are unique on the connection.
pub struct Client {
    shared: Arc<Shared>,
    /// For shutting the socket down on drop (wakes the reader).
    stream: TcpStream,
    reader: Option<JoinHandle<()>>,
}

/// A request in flight; `wait` blocks for its response.
pub struct Pending {
    slot: Slot,
    rx: Receiver<Reply>,
}

/// A response and the tag its request was sent with (see [`Client::send_tagged`]).
pub(crate) type Reply = (u32, Result<Prediction, ClientError>);

/// A registered request id; dropping it forgets the request (a response
/// that comes later finds no slot and is discarded).
pub(crate) struct Slot {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.shared.pending).waiting.remove(&self.id);
    }
}

struct Shared {
    next_id: AtomicU64,
    pending: Mutex<Slots>,
    writer: Mutex<Writer>,
}

struct Slots {
    /// The reply channel of each request in flight, and its tag. A channel
    /// has room for every request sent on it (one for `send`; one per
    /// attempt for the cluster client), so the reader's send never blocks.
    waiting: HashMap<u64, (SyncSender<Reply>, u32)>,
    /// Set once the connection is gone; later sends fail with it.
    closed: Option<String>,
}

struct Writer {
    stream: TcpStream,
    enc: Encoder,
    buf: Vec<u8>,
}

impl Pending {
    /// The id this request went out with.
    pub fn id(&self) -> u64 {
        self.slot.id
    }

    pub fn wait(self) -> Result<Prediction, ClientError> {
        self.rx
            .recv()
            .map(|r| r.1)
            .unwrap_or_else(|_| Err(closed("response channel dropped")))
    }

    /// Wait at most `timeout`; `None` if the response has not come yet (the
    /// request stays in flight: wait again, or drop to forget it).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Result<Prediction, ClientError>> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => Some(r.1),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Err(closed("response channel dropped"))),
        }
    }
}

impl Client {
    pub fn connect<A: ToSocketAddrs>(addr: A) -> std::io::Result<Client> {
        Client::from_stream(TcpStream::connect(addr)?)
    }

    /// Connect to one address, giving up after `timeout`.
    pub fn connect_timeout(addr: &SocketAddr, timeout: Duration) -> std::io::Result<Client> {
        Client::from_stream(TcpStream::connect_timeout(addr, timeout)?)
    }

    fn from_stream(stream: TcpStream) -> std::io::Result<Client> {
        stream.set_nodelay(true)?;
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(1),
            pending: Mutex::new(Slots {
                waiting: HashMap::new(),
                closed: None,
            }),
            writer: Mutex::new(Writer {
                stream: stream.try_clone()?,
                enc: Encoder::new(),
                buf: Vec::with_capacity(4096),
            }),
        });
        let read_half = stream.try_clone()?;
        let reader = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("beast-client-reader".into())
                .spawn(move || shared.read_loop(read_half))?
        };
        Ok(Client {
            shared,
            stream,
            reader: Some(reader),
        })
    }

    /// Send without waiting.
    pub fn send(&self, req: &RequestSpec<'_>) -> Result<Pending, ClientError> {
        check_spec(req)?;
        self.pending(|enc, id, buf| encode_request_frame(enc, id, req, buf))
    }

    /// Send with the reply going to `tx` as `(tag, result)`: several
    /// requests (on several connections) can share one channel, and the
    /// caller waits for whichever answers first. `tx` must have room for
    /// every request sent on it. Drop the [`Slot`] to forget the request.
    pub(crate) fn send_tagged(
        &self,
        req: &RequestSpec<'_>,
        tx: &SyncSender<Reply>,
        tag: u32,
    ) -> Result<Slot, ClientError> {
        check_spec(req)?;
        self.send_frame(tx.clone(), tag, |enc, id, buf| {
            encode_request_frame(enc, id, req, buf)
        })
    }

    /// True once the connection is gone (every later send fails).
    pub fn is_closed(&self) -> bool {
        lock(&self.shared.pending).closed.is_some()
    }

    /// Tell the server the true class of an earlier ensemble answer (its
    /// first row), by the answer's `ticket`. Tickets belong to the shard
    /// that answered and to its connection: feedback for it from any other
    /// connection gets NOT_FOUND. (This client is one connection.)
    pub fn feedback(&self, ticket: u64, label: u32) -> Result<(), ClientError> {
        self.pending(|enc, id, buf| enc.feedback(&FeedbackView { id, ticket, label }, buf))?
            .wait()
            .map(|_| ())
    }

    /// A frame sent with its own reply channel.
    fn pending(
        &self,
        encode: impl FnOnce(&mut Encoder, u64, &mut Vec<u8>),
    ) -> Result<Pending, ClientError> {
        let (tx, rx) = sync_channel(1);
        let slot = self.send_frame(tx, 0, encode)?;
        Ok(Pending { slot, rx })
    }

    /// Register a fresh id, encode one frame with it and write it.
    fn send_frame(
        &self,
        tx: SyncSender<Reply>,
        tag: u32,
        encode: impl FnOnce(&mut Encoder, u64, &mut Vec<u8>),
    ) -> Result<Slot, ClientError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut slots = lock(&self.shared.pending);
            if let Some(reason) = &slots.closed {
                return Err(ClientError::Closed(reason.clone()));
            }
            slots.waiting.insert(id, (tx, tag));
        }
        // From here on `slot` owns the id: dropping it on error frees it.
        let pending = Slot {
            id,
            shared: self.shared.clone(),
        };
        let mut w = lock(&self.shared.writer);
        let Writer { stream, enc, buf } = &mut *w;
        buf.clear();
        encode(enc, id, buf);
        if let Err(e) = stream.write_all(buf) {
            drop(w);
            // Wake the reader so every other request learns it too.
            let _ = self.stream.shutdown(Shutdown::Both);
            return Err(closed(&format!("write failed: {e}")));
        }
        Ok(pending)
    }

    /// Send and wait.
    pub fn predict(&self, req: &RequestSpec<'_>) -> Result<Prediction, ClientError> {
        self.send(req)?.wait()
    }

    /// Requests sent and not yet answered (nor dropped).
    pub fn in_flight(&self) -> usize {
        lock(&self.shared.pending).waiting.len()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Shared {
    fn read_loop(&self, mut stream: TcpStream) {
        let mut frames = FrameReader::new(RESPONSE_FRAME_BYTES_MAX);
        let err = 'conn: loop {
            loop {
                match frames.next_frame() {
                    Ok(Some(body)) => match decode_response(body) {
                        Ok(v) => self.complete(&v),
                        Err(e) => {
                            break 'conn ClientError::Protocol(format!(
                                "undecodable response: {}",
                                e.message()
                            ))
                        }
                    },
                    Ok(None) => break,
                    Err(e) => break 'conn ClientError::Protocol(e.to_string()),
                }
            }
            match frames.read_from(&mut stream) {
                Ok(0) => break closed("connection closed by server"),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break closed(&format!("read failed: {e}")),
            }
        };
        let _ = stream.shutdown(Shutdown::Both);
        let reason = match &err {
            ClientError::Protocol(m) | ClientError::Closed(m) => m.clone(),
            other => other.to_string(),
        };
        let waiting = {
            let mut slots = lock(&self.pending);
            slots.closed = Some(reason);
            std::mem::take(&mut slots.waiting)
        };
        for (_, (tx, tag)) in waiting {
            let _ = tx.try_send((tag, Err(err.clone())));
        }
    }

    fn complete(&self, v: &ResponseView<'_>) {
        let Some((tx, tag)) = lock(&self.pending).waiting.remove(&v.id) else {
            return; // its Pending was dropped (timed out, or not wanted)
        };
        let _ = tx.try_send((tag, response_to_result(v)));
    }
}

/// Append the frame for request `id` to `out`. The sans-IO half of `send`,
/// for tools that drive their own sockets (the load generator).
pub fn encode_request_frame(enc: &mut Encoder, id: u64, req: &RequestSpec<'_>, out: &mut Vec<u8>) {
    enc.request(id, req, out);
}

/// What a decoded response means to a caller.
pub fn response_to_result(v: &ResponseView<'_>) -> Result<Prediction, ClientError> {
    let msg = || v.message.to_string();
    match v.status {
        Status::Ok => Ok(Prediction {
            id: v.id,
            rows: v.rows,
            cols: v.cols,
            outputs: v.output_f32(),
            timings: v.timings,
            cached: v.cached,
            partial: v.partial,
            ticket: v.ticket,
            runs: v
                .runs
                .iter()
                .map(|&(m, ver, flops)| (m.to_string(), ver, flops))
                .collect(),
        }),
        Status::BadRequest => Err(ClientError::BadRequest(msg())),
        Status::NotFound => Err(ClientError::NotFound(msg())),
        Status::Overloaded => Err(ClientError::Overloaded(msg())),
        Status::DeadlineExceeded => Err(ClientError::DeadlineExceeded(msg())),
        Status::Internal => Err(ClientError::Internal(msg())),
    }
}

/// Refuse locally what the server would answer BAD_REQUEST anyway.
fn check_spec(req: &RequestSpec<'_>) -> Result<(), ClientError> {
    let len = match req.input {
        Input::F32(x) => x.len(),
        Input::F16(x) => x.len(),
    };
    let want = (req.rows as usize).checked_mul(req.cols as usize);
    if req.rows == 0 || req.cols == 0 || want != Some(len) {
        return Err(ClientError::BadRequest(format!(
            "input has {len} values, shape is {} x {}",
            req.rows, req.cols
        )));
    }
    Ok(())
}

fn closed(reason: &str) -> ClientError {
    ClientError::Closed(reason.to_string())
}

/// A panic elsewhere must not wedge the client: the data under these locks
/// stays consistent at every await-free step, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
