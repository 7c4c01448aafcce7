//! Models: the repository format and loading.
//!
//! Owns: what a model *is* in memory (`Model`, `Dense`, `LayerNorm`), how a
//! repository folder becomes a set of models and ensembles (`load`,
//! `manifest`) and the deterministic benchmark models (`demo`). The loaded
//! `Repository` is shared by the shards through an `Arc`; a reload builds a
//! new one and publishes it (`server::lifecycle`, `server::registry`).
//! May touch: the file system at load time only (each file is read once into
//! memory the process owns; nothing is mapped, so changing a file later
//! cannot reach a loaded model). Nothing here runs per request.
//!
//! Layout conventions (see docs/MODELS.md):
//! - a dense layer's weight is `[in, out]` row-major ("x @ W", the layout of
//!   scikit-learn's `coefs_` and Flax's `Dense.kernel`; PyTorch's `nn.Linear`
//!   weight is transposed by the export script). Rows of W are contiguous in
//!   the output dimension, which is what the SIMD kernels stream.
//! - the order inside a layer is: `x @ W + b` → layer norm (optional) → activation.

pub mod demo;
mod fields;
pub mod io;
pub mod load;
pub mod manifest;
pub mod rollout;
pub mod trees;
pub mod versions;
mod weights;

pub use io::{ModelIo, Task};

use half::f16;
use std::sync::Arc;

/// Element-wise activation after a dense layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Identity,
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
}

impl Activation {
    pub const ALL: [Activation; 5] = [
        Activation::Identity,
        Activation::Relu,
        Activation::Gelu,
        Activation::Tanh,
        Activation::Sigmoid,
    ];
}

/// Transform applied to the last layer's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputTransform {
    Identity,
    Softmax,
    Sigmoid,
}

impl OutputTransform {
    pub const ALL: [OutputTransform; 3] = [
        OutputTransform::Identity,
        OutputTransform::Softmax,
        OutputTransform::Sigmoid,
    ];
}

/// The bytes of a weights file, read once into memory the process owns
/// (64-byte aligned, like the start of a page), so that nothing done to the
/// file afterwards — overwritten or truncated in place — can reach a
/// loaded model. Tensors are windows into it ([`F16Storage::Window`]).
pub struct WeightsBuf {
    blocks: Vec<Block>,
    len: usize,
}

#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Block([u8; 64]);

impl WeightsBuf {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> WeightsBuf {
        WeightsBuf {
            blocks: vec![Block([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    /// Read all of `file`, whose length is expected to be `len`: an error
    /// when it is shorter or longer by the time it is read (it is being
    /// written), rather than a model built from half a file.
    pub fn read(file: &mut impl std::io::Read, len: usize) -> std::io::Result<WeightsBuf> {
        let mut buf = WeightsBuf::zeroed(len);
        file.read_exact(buf.as_bytes_mut()).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                std::io::Error::other(format!(
                    "shorter than its {len} bytes while being read (is it being written?)"
                ))
            } else {
                e
            }
        })?;
        if file.read(&mut [0u8; 1])? != 0 {
            return Err(std::io::Error::other(format!(
                "longer than its {len} bytes while being read (is it being written?)"
            )));
        }
        Ok(buf)
    }

    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<Block, u8>(&self.blocks)[..self.len]
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<Block, u8>(&mut self.blocks)[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// FP16 storage that is either a window into the model's weights buffer
/// (zero copy) or a buffer of its own (weights converted from f32, or
/// unaligned in the file, or built in memory for tests). Both are memory
/// the process owns.
pub enum F16Storage {
    Window {
        buf: Arc<WeightsBuf>,
        /// Byte offset of the first element; always 2-byte aligned in memory.
        offset: usize,
        len: usize,
    },
    Owned(Vec<f16>),
}

impl F16Storage {
    #[inline]
    pub fn as_slice(&self) -> &[f16] {
        match self {
            F16Storage::Window { buf, offset, len } => {
                bytemuck::cast_slice(&buf.as_bytes()[*offset..*offset + *len * 2])
            }
            F16Storage::Owned(v) => v,
        }
    }

    /// True when the weights are a window into the file's bytes (no copy).
    pub fn is_window(&self) -> bool {
        matches!(self, F16Storage::Window { .. })
    }
}

impl std::fmt::Debug for F16Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            F16Storage::Window { len, .. } => write!(f, "F16Storage::Window({len})"),
            F16Storage::Owned(v) => write!(f, "F16Storage::Owned({})", v.len()),
        }
    }
}

/// Layer normalisation over the output features of a dense layer.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub eps: f32,
}

/// One dense layer: `act(LN(x @ W + b))`.
#[derive(Debug)]
pub struct Dense {
    pub in_dim: usize,
    pub out_dim: usize,
    /// `[in_dim, out_dim]` row-major FP16.
    pub weight: F16Storage,
    /// `out_dim` biases, kept in f32 (they are tiny and added in f32).
    pub bias: Vec<f32>,
    pub layer_norm: Option<LayerNorm>,
    pub activation: Activation,
}

impl Dense {
    #[inline]
    pub fn weight(&self) -> &[f16] {
        self.weight.as_slice()
    }
}

/// Batching limits of one model (from `model.toml`, with defaults from config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// A batch takes at most this many rows (a larger request runs alone).
    pub max_batch: usize,
    /// When the backend is free, a batch runs once this many rows are
    /// queued; 1 (the default): whatever is queued runs at once.
    pub min_batch: usize,
    /// The longest the oldest queued row waits for `min_batch` rows.
    pub max_queue_delay_us: u64,
    /// Rows that may wait in one shard's queue for this model; beyond it
    /// requests are answered OVERLOADED at once.
    pub queue_rows_max: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_batch: 64,
            min_batch: 1,
            max_queue_delay_us: 200,
            queue_rows_max: 4096,
        }
    }
}

/// A loaded multi-layer perceptron, immutable once built and shared by all
/// shards through `Arc`.
#[derive(Debug)]
pub struct Model {
    pub name: String,
    pub version: u32,
    pub input_width: usize,
    pub output_width: usize,
    pub layers: Vec<Dense>,
    pub output: OutputTransform,
    pub batch: BatchLimits,
    /// Classification (default) or regression (`task` in model.toml).
    pub task: Task,
    /// Class names, input transform, binary expansion (module `io`).
    pub io: ModelIo,
    /// What the model is, byte for byte: for a loaded model the xxh3-128 of
    /// its `model.toml` and `weights.safetensors` bytes, for one built in
    /// memory that of its parameters ([`Model::params_digest`]). Part of
    /// every cache key beside name and version, so an answer computed by
    /// other bytes under the same name and version is never returned.
    pub digest: u128,
    /// A tree model (`kind = "trees"`, docs/MODELS.md): `layers` is empty
    /// and the backend evaluates this forest instead. `None` for an MLP.
    pub forest: Option<Arc<trees::Forest>>,
}

impl Model {
    /// The first 12 hex digits of [`Model::digest`], as logs and
    /// /v1/models show it.
    pub fn short_digest(&self) -> String {
        format!("{:012x}", self.digest >> 80)
    }

    /// A digest of everything that decides the model's answers (shapes,
    /// activations, weights, biases, layer norms, output transform), for
    /// models built in memory rather than loaded from files.
    pub fn params_digest(&self) -> u128 {
        let mut h = xxhash_rust::xxh3::Xxh3Default::new();
        let usize_ =
            |h: &mut xxhash_rust::xxh3::Xxh3Default, x: usize| h.update(&(x as u64).to_le_bytes());
        usize_(&mut h, self.input_width);
        usize_(&mut h, self.layers.len());
        for l in &self.layers {
            usize_(&mut h, l.in_dim);
            usize_(&mut h, l.out_dim);
            h.update(&[l.activation as u8]);
            h.update(bytemuck::cast_slice(l.weight()));
            h.update(bytemuck::cast_slice(&l.bias));
            match &l.layer_norm {
                Some(n) => {
                    h.update(&[1]);
                    h.update(bytemuck::cast_slice(&n.gamma));
                    h.update(bytemuck::cast_slice(&n.beta));
                    h.update(&n.eps.to_le_bytes());
                }
                None => h.update(&[0]),
            }
        }
        h.update(&[self.output as u8]);
        if let Some(p) = &self.io.preprocess {
            p.hash_into(&mut h);
        }
        if let Some(f) = &self.forest {
            usize_(&mut h, f.nodes.len());
            for n in &f.nodes {
                h.update(&n.thr.to_le_bytes());
                h.update(&n.feat.to_le_bytes());
                h.update(&n.left.to_le_bytes());
                h.update(&n.right.to_le_bytes());
            }
            h.update(bytemuck::cast_slice(&f.values));
            h.update(bytemuck::cast_slice(&f.roots));
            h.update(bytemuck::cast_slice(&f.groups));
            h.update(bytemuck::cast_slice(&f.base_margin));
            h.update(&[f.objective as u8, f.accumulate_f64 as u8]);
        }
        h.digest128()
    }

    /// The model with [`Model::digest`] set to [`Model::params_digest`]
    /// (for models built in memory).
    pub fn with_params_digest(mut self) -> Model {
        self.digest = self.params_digest();
        self
    }

    /// Multiply-adds × 2 for one input row. For a tree model, its expected
    /// node visits per row × [`trees::FLOPS_PER_NODE_VISIT`] (a
    /// FLOP-equivalent, so the cost model compares trees and MLPs in one
    /// unit; [`Model::node_visits_per_row`] is the tree work itself).
    pub fn flops_per_row(&self) -> u64 {
        if let Some(f) = &self.forest {
            return trees::flops_equivalent(f);
        }
        self.layers
            .iter()
            .map(|l| 2 * (l.in_dim as u64) * (l.out_dim as u64))
            .sum()
    }

    /// The shape for logs: `64→32→10`, or for a tree model
    /// `30→[40 xgboost-json trees, depth 3, 78 node visits/row]→2`.
    pub fn shape_summary(&self) -> String {
        let mut dims: Vec<String> = std::iter::once(self.input_width.to_string())
            .chain(self.layers.iter().map(|l| l.out_dim.to_string()))
            .collect();
        if let Some(f) = &self.forest {
            dims.push(format!(
                "[{} {} trees, depth {}, {:.0} node visits/row]",
                f.num_trees(),
                f.format.name(),
                f.max_depth(),
                f.node_visits_per_row
            ));
            dims.push(self.output_width.to_string());
        }
        dims.join("→")
    }

    /// Expected tree nodes visited per input row (0 for an MLP): the unit
    /// tree work is reported in beside FLOPs.
    pub fn node_visits_per_row(&self) -> f64 {
        self.forest.as_ref().map_or(0.0, |f| f.node_visits_per_row)
    }

    /// Widest activation a batch passes through (input, hidden or output),
    /// used to size a backend's scratch buffers once.
    pub fn max_width(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.out_dim.max(l.in_dim))
            .max()
            .unwrap_or(self.input_width)
            .max(self.input_width)
            .max(self.output_width)
    }

    /// A model with deterministic pseudo-random weights (He-style scale so
    /// activations stay O(1) through deep stacks). `dims` = [in, h1, ..., out].
    /// Used by `beast demo-models`, tests and benches.
    pub fn random(
        name: &str,
        dims: &[usize],
        hidden: Activation,
        output: OutputTransform,
        seed: u64,
    ) -> Model {
        use rand::{Rng, SeedableRng};
        assert!(
            dims.len() >= 2,
            "a model needs an input and an output width"
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(dims.len() - 1);
        for i in 0..dims.len() - 1 {
            let (k, n) = (dims[i], dims[i + 1]);
            let scale = (2.0 / k as f32).sqrt();
            let w: Vec<f16> = (0..k * n)
                .map(|_| f16::from_f32(rng.random_range(-1.0f32..1.0) * scale * 1.7))
                .collect();
            let b: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
            let last = i == dims.len() - 2;
            layers.push(Dense {
                in_dim: k,
                out_dim: n,
                weight: F16Storage::Owned(w),
                bias: b,
                layer_norm: None,
                activation: if last { Activation::Identity } else { hidden },
            });
        }
        let mut m = Model {
            name: name.to_string(),
            version: 1,
            input_width: dims[0],
            output_width: *dims.last().unwrap(),
            layers,
            output,
            batch: BatchLimits::default(),
            task: Task::Classification,
            io: ModelIo::default(),
            digest: 0,
            forest: None,
        };
        m.digest = m.params_digest();
        m
    }
}

impl Model {
    /// [`Model::random`] with `act` on every layer (the last too) and, when
    /// `ln`, a seeded layer norm on every layer wider than one output. The
    /// CPU and CUDA backend tests both check exactly these models.
    pub fn random_with_layer_norm(
        name: &str,
        dims: &[usize],
        act: Activation,
        ln: bool,
        output: OutputTransform,
        seed: u64,
    ) -> Model {
        use rand::{Rng, SeedableRng};
        let mut m = Model::random(name, dims, act, output, seed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
        let last = m.layers.len() - 1;
        for (i, l) in m.layers.iter_mut().enumerate() {
            l.activation = act;
            if ln && (i < last || l.out_dim > 1) {
                l.layer_norm = Some(LayerNorm {
                    gamma: (0..l.out_dim)
                        .map(|_| rng.random_range(0.5f32..1.5))
                        .collect(),
                    beta: (0..l.out_dim)
                        .map(|_| rng.random_range(-0.2f32..0.2))
                        .collect(),
                    eps: 1e-5,
                });
            }
        }
        m.digest = m.params_digest();
        m
    }
}

/// A named ensemble as declared in `ensembles.toml`.
#[derive(Debug, Clone)]
pub struct EnsembleSpec {
    pub name: String,
    pub members: Vec<String>,
    pub combiner: Combiner,
    /// Per-member weights for `WeightedMean` (same order as `members`);
    /// all 1.0 for `Mean`.
    pub weights: Vec<f32>,
    /// How members are chosen per request (docs/SELECTION.md).
    pub selection: SelectionSpec,
}

impl EnsembleSpec {
    /// An ensemble with the `mean` combiner and the `all` policy.
    pub fn mean(name: &str, members: &[&str]) -> Self {
        EnsembleSpec {
            name: name.to_string(),
            members: members.iter().map(|m| m.to_string()).collect(),
            combiner: Combiner::Mean,
            weights: vec![1.0; members.len()],
            selection: SelectionSpec::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Combiner {
    Mean,
    WeightedMean,
    /// Majority of the members' argmax; output = vote fractions per class,
    /// ties broken by the mean probability.
    Vote,
    /// Weights per member and class learned online from feedback
    /// (multiplicative weights, starting uniform).
    Stacked,
    /// Per output value, the median of the members' values (regression
    /// ensembles; an even count takes the mean of the middle two).
    Median,
}

/// The default per-request selection policy of an ensemble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    #[default]
    All,
    Cascade,
    Deadline,
    Bandit,
}

/// Confidence measure a cascade stops on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CascadeMetric {
    /// Largest combined probability of the row.
    #[default]
    MaxProb,
    /// Largest minus second-largest combined probability.
    Margin,
}

impl Combiner {
    /// The combiners that make sense for a task: a regression ensemble
    /// combines values (mean, weighted mean, median), a classifier
    /// probabilities (every combiner but median).
    pub fn fits(self, task: Task) -> bool {
        match task {
            Task::Regression => matches!(
                self,
                Combiner::Mean | Combiner::WeightedMean | Combiner::Median
            ),
            Task::Classification => self != Combiner::Median,
        }
    }
}

impl Policy {
    /// Policies that need class probabilities (a confidence, or feedback
    /// with a class label) refuse a regression ensemble: cascade, bandit.
    pub fn fits(self, task: Task) -> bool {
        task == Task::Classification || matches!(self, Policy::All | Policy::Deadline)
    }
}

/// Selection settings of one ensemble (`ensembles.toml`).
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionSpec {
    pub policy: Policy,
    /// Stop the cascade when every row's metric is >= this.
    pub cascade_threshold: f32,
    pub cascade_metric: CascadeMetric,
    /// If set, `cascade_threshold` is derived at start-up, after the load
    /// (`ensemble::calibrate`): the smallest
    /// threshold whose answers agree with `all` on at least this fraction
    /// of the `calibration` rows.
    pub cascade_target_agreement: Option<f32>,
    /// CSV of feature rows (a `label` column is ignored), relative to the
    /// repository folder.
    pub calibration: Option<std::path::PathBuf>,
    /// Bandit: accuracy given up per unit of compute (1.0 = all members).
    pub bandit_cost_weight: f32,
}

impl Default for SelectionSpec {
    fn default() -> Self {
        SelectionSpec {
            policy: Policy::All,
            cascade_threshold: 0.9,
            cascade_metric: CascadeMetric::MaxProb,
            cascade_target_agreement: None,
            calibration: None,
            bandit_cost_weight: 0.01,
        }
    }
}
