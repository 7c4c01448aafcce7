//! Rust client: one TCP connection, many requests in flight, responses
//! matched by id. Blocking API on std threads so any service (sync, tokio,
//! glommio) can use it; the load generator uses the wire encoder directly.
//! INTERFACE CONTRACT (wire/client helper implements).

pub mod npy;

use crate::wire::{RequestSpec, Status, Timings};
use std::net::ToSocketAddrs;

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
        write!(f, "{self:?}")
    }
}
impl std::error::Error for ClientError {}

/// Thread-safe (`Send + Sync`): share it between threads; each call may be
/// in flight at the same time on the one connection.
pub struct Client {}

/// A request in flight; `wait` blocks for its response.
pub struct Pending {}

impl Pending {
    pub fn wait(self) -> Result<Prediction, ClientError> {
        todo!("client helper")
    }
}

impl Client {
    pub fn connect<A: ToSocketAddrs>(addr: A) -> std::io::Result<Client> {
        let _ = addr;
        todo!("client helper")
    }
    /// Send without waiting.
    pub fn send(&self, req: &RequestSpec<'_>) -> Result<Pending, ClientError> {
        let _ = req;
        todo!("client helper")
    }
    /// Send and wait.
    pub fn predict(&self, req: &RequestSpec<'_>) -> Result<Prediction, ClientError> {
        self.send(req)?.wait()
    }
}
