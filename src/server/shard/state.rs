//! The shard's request state as data: the jobs in batch queues, the model
//! slots, what a target name resolves to, and the pending ensemble entries.
//! No behaviour lives here (it is in the sibling files), so every piece of
//! the shard can name these types without importing another piece.

use crate::batch::{Queue, RowCost};
use crate::cache::CacheKey;
use crate::config::ENSEMBLE_MEMBERS_MAX;
use crate::ensemble::{Accumulator, MemberSet};
use crate::model::rollout::RolloutMode;
use crate::model::{Model, Policy};
use crate::server::cache::TargetPolicy;
use crate::server::conn_state::Conn;
use crate::server::notify::Notify;
use crate::server::rollout::RolloutStats;
use crate::server::slab::Slab;
use crate::wire::CacheControl;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Whose rows these are: a token in a batch queue.
pub(crate) enum Job {
    /// A request for one model: answer the connection directly.
    Direct {
        conn: Rc<Conn>,
        id: u64,
        arrival: Instant,
        deadline: Option<Instant>,
        /// Cache the answer under this key.
        key: Option<CacheKey>,
        /// Identical requests wait on this one (coalescing).
        leader: bool,
    },
    /// One member's share of an ensemble request.
    Member {
        pending: usize,
        /// The entry's generation when enqueued: a result for an entry
        /// answered since (straggler cutoff) is dropped.
        generation: u32,
        member: u8,
        /// The member-level cache key.
        key: Option<CacheKey>,
    },
}

/// One loaded (model, version) on this shard.
pub(crate) struct ModelSlot {
    pub model: Arc<Model>,
    /// The model as the shard's backend knows it (`Backend::register`).
    pub backend_id: crate::backend::ModelId,
    pub queue: RefCell<Queue<Job>>,
    pub wake: Notify,
    /// µs per row of this model's batches on this shard (admission).
    pub row_cost: Cell<RowCost>,
    pub cache: TargetPolicy,
}

/// What a target name resolves to.
pub(super) enum TargetRef {
    Model {
        /// Slots of each loaded version, ascending by version.
        versions: Vec<(u32, usize)>,
        /// The slot a request without a version (or version 0) gets.
        current: usize,
        /// A rollout's candidate, when one runs.
        trial: Option<Trial>,
    },
    Ensemble(usize),
}

/// A model's rollout as the request path sees it.
pub(super) struct Trial {
    pub slot: usize,
    pub mode: RolloutMode,
    /// `fraction` in parts per million.
    pub ppm: u64,
    pub stats: Arc<RolloutStats>,
}

/// An ensemble request waiting for its members.
#[derive(Default)]
pub(super) struct EnsemblePending {
    pub conn: Option<Rc<Conn>>,
    pub id: u64,
    pub plan: usize,
    pub rows: u32,
    /// Members enqueued in the current step and not answered yet.
    pub remaining: u8,
    /// Members whose output was computed (not read from the cache).
    pub computed: MemberSet,
    /// Members whose output was combined (computed or from the cache).
    pub ran: MemberSet,
    pub failed: bool,
    /// Bumped when the entry is answered: late member results see a
    /// different generation and are ignored.
    pub generation: u32,
    pub policy: Policy,
    pub domain_slot: u16,
    pub domain_hash: u64,
    /// Cascade: position in the plan's cost order of the next member.
    pub step: u8,
    /// Bandit: the arm that chose the members.
    pub arm: Option<u8>,
    /// Deadline: µs from arrival to answer the profiles predicted, before
    /// the learned slack (0: not predicted).
    pub predicted_us: f32,
    /// Answered before every chosen member did (deadline, full queue).
    pub partial: bool,
    pub cache_control: CacheControl,
    /// Member-level cache keys (computed while the request was at hand).
    pub member_keys: [Option<CacheKey>; ENSEMBLE_MEMBERS_MAX],
    /// The request's rows, kept for later cascade steps (capacity reused).
    pub input: Vec<f32>,
    /// Each member's first output row (`members × cols`), for feedback.
    pub first_rows: Vec<f32>,
    pub arrival: Option<Instant>,
    pub deadline: Option<Instant>,
    pub queue_us: u32,
    pub compute_us: u32,
    pub key: Option<CacheKey>,
    pub leader: bool,
    pub acc: Accumulator,
}

impl Slab<EnsemblePending> {
    /// Entry `k` is still waiting for members, in generation `generation`.
    pub(super) fn is_live(&self, k: usize, generation: u32) -> bool {
        self.get(k)
            .is_some_and(|e| e.generation == generation && e.conn.is_some())
    }
}
