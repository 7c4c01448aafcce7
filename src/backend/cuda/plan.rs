//! The CUDA backend's host-side planning, in plain Rust (built with or
//! without the `cuda` feature, tested without a GPU):
//! - [`check_shapes`]: every length and GEMM dimension a batch relies on;
//! - [`graph_bucket`]: which captured CUDA graph a small batch replays
//!   (rows padded up to a bucket);
//! - [`plan_groups`]: which members of an ensemble run from one upload of
//!   their shared input, and which of those have the same layer shapes so
//!   each layer is one strided-batched GEMM over all of them, with the
//!   offsets and strides of their stacked weights and activations.

use crate::backend::BackendError;
use crate::model::Model;

/// Batch sizes with a captured graph per model: a batch of `rows` ≤ 32
/// replays the graph of the smallest bucket ≥ `rows` (the padding rows
/// compute garbage nobody reads). Larger batches launch directly: there
/// the launches are a small part of the batch's time.
pub const GRAPH_BUCKETS: [usize; 6] = [1, 2, 4, 8, 16, 32];

/// The graph bucket for a batch of `rows`, `None` above the largest.
pub fn graph_bucket(rows: usize) -> Option<usize> {
    if rows == 0 {
        return None;
    }
    GRAPH_BUCKETS.iter().copied().find(|&b| b >= rows)
}

/// Index of a bucket in [`GRAPH_BUCKETS`].
pub fn bucket_index(bucket: usize) -> Option<usize> {
    GRAPH_BUCKETS.iter().position(|&b| b == bucket)
}

/// Every length the launches rely on, and every GEMM dimension within i32
/// (the CPU backend's checks plus the cuBLAS/grid limits). `rows` counts
/// padding rows too when a graph bucket is used.
pub fn check_shapes(
    model: &Model,
    input_len: usize,
    rows: usize,
    output_len: usize,
) -> Result<(), BackendError> {
    let in_len = rows.checked_mul(model.input_width);
    let out_len = rows.checked_mul(model.output_width);
    if in_len != Some(input_len) || out_len != Some(output_len) {
        return Err(BackendError::Shape);
    }
    check_model(model, rows)
}

/// The model's own shape (layers chain, weights and norms sized) and its
/// GEMM dimensions at `rows` rows within i32.
pub fn check_model(model: &Model, rows: usize) -> Result<(), BackendError> {
    if model.forest.is_some() {
        // A tree model: the CPU twin's evaluator checks its own shapes.
        return Ok(());
    }
    let fits = |v: Option<usize>| v.is_some_and(|v| v <= i32::MAX as usize);
    let mut width = model.input_width;
    for l in &model.layers {
        let ln_ok = l
            .layer_norm
            .as_ref()
            .is_none_or(|ln| ln.gamma.len() == l.out_dim && ln.beta.len() == l.out_dim);
        if l.in_dim != width
            || l.in_dim.checked_mul(l.out_dim) != Some(l.weight().len())
            || l.bias.len() != l.out_dim
            || !ln_ok
            || !fits(l.in_dim.checked_mul(2))
            || !fits(l.out_dim.checked_mul(2))
            || !fits(
                rows.checked_mul(l.in_dim.max(l.out_dim))
                    .and_then(|v| v.checked_mul(2)),
            )
        {
            return Err(BackendError::Shape);
        }
        width = l.out_dim;
    }
    if width != model.output_width || !fits(Some(rows)) {
        return Err(BackendError::Shape);
    }
    Ok(())
}

/// The widest layer side of `model` (for [`rows_fit`]).
pub fn max_dim(model: &Model) -> usize {
    model
        .layers
        .iter()
        .map(|l| l.in_dim.max(l.out_dim))
        .max()
        .unwrap_or(0)
}

/// Whether a batch of `rows` keeps every GEMM dimension of a model whose
/// widest layer side is `max_dim` within i32 (what [`check_model`] checks
/// of the rows, for a model checked once at registration).
pub fn rows_fit(max_dim: usize, rows: usize) -> bool {
    rows <= i32::MAX as usize
        && rows
            .checked_mul(max_dim)
            .and_then(|v| v.checked_mul(2))
            .is_some_and(|v| v <= i32::MAX as usize)
}

/// True when the device path cannot run `model` (a tree model, which is
/// never put on the GPU; no layers, or a zero-width one: cuBLAS rejects
/// ld = 0); the CPU twin does these.
pub fn degenerate(model: &Model) -> bool {
    model.forest.is_some()
        || model.layers.is_empty()
        || model.layers.iter().any(|l| l.in_dim == 0 || l.out_dim == 0)
}

/// Members of an ensemble that run together on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Indices into the members given to [`plan_groups`], ascending.
    pub members: Vec<usize>,
    /// `(k, n)` of each layer, the same for every member of the group.
    pub layers: Vec<(usize, usize)>,
    /// Per layer: elements between two members' weights in the stacked
    /// FP16 weight buffer (`k·n·copies`), i.e. cuBLAS `strideA`.
    pub weight_stride: Vec<usize>,
    /// Per layer: offset of this layer's first member's weights in the
    /// group's stacked weight buffer (elements).
    pub weight_offset: Vec<usize>,
    /// Elements of the stacked weight buffer.
    pub weight_len: usize,
}

impl Group {
    /// Strides of one layer's strided-batched GEMM at `rows` rows, in
    /// elements: (A = weights, B = FP16 activations, C = f32 outputs).
    /// The input of the first layer is shared (stride 0: one upload).
    pub fn strides(&self, layer: usize, rows: usize, copies: usize) -> (usize, usize, usize) {
        let (k, n) = self.layers[layer];
        let b = if layer == 0 { 0 } else { rows * k * copies };
        (self.weight_stride[layer], b, rows * n)
    }
}

/// How an ensemble's members run: one input upload for all of them (they
/// share the request's rows), then per group of identically shaped
/// members one strided-batched GEMM per layer; a member whose shape
/// matches no other is a group of one (plain GEMMs); degenerate members
/// run on the CPU twin and are in no group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlan {
    /// The input width every member reads (one upload).
    pub input_width: usize,
    pub groups: Vec<Group>,
    /// Members the CPU twin runs.
    pub on_cpu: Vec<usize>,
}

/// Plan an ensemble's members (all must take the same input width: they
/// share the request's rows). `copies` is 2 for the split precision (the
/// weights stored twice along k), 1 for half.
pub fn plan_groups(members: &[&Model], copies: usize) -> Result<GroupPlan, BackendError> {
    let input_width = members.first().ok_or(BackendError::Shape)?.input_width;
    let mut groups: Vec<Group> = Vec::new();
    let mut on_cpu = Vec::new();
    for (i, m) in members.iter().enumerate() {
        if m.input_width != input_width {
            return Err(BackendError::Shape);
        }
        check_model(m, 1)?;
        if degenerate(m) {
            on_cpu.push(i);
            continue;
        }
        let dims: Vec<(usize, usize)> = m.layers.iter().map(|l| (l.in_dim, l.out_dim)).collect();
        match groups.iter_mut().find(|g| g.layers == dims) {
            Some(g) => g.members.push(i),
            None => groups.push(Group {
                members: vec![i],
                layers: dims,
                weight_stride: Vec::new(),
                weight_offset: Vec::new(),
                weight_len: 0,
            }),
        }
    }
    for g in &mut groups {
        let mut off = 0;
        for &(k, n) in &g.layers {
            let stride = k * n * copies;
            g.weight_stride.push(stride);
            g.weight_offset.push(off);
            off += stride * g.members.len();
        }
        g.weight_len = off;
    }
    Ok(GroupPlan {
        input_width,
        groups,
        on_cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, OutputTransform};

    fn m(dims: &[usize], seed: u64) -> Model {
        Model::random("m", dims, Activation::Relu, OutputTransform::Softmax, seed)
    }

    #[test]
    fn small_batches_replay_the_smallest_bucket_that_holds_them() {
        assert_eq!(graph_bucket(0), None);
        assert_eq!(graph_bucket(1), Some(1));
        assert_eq!(graph_bucket(3), Some(4));
        assert_eq!(graph_bucket(17), Some(32));
        assert_eq!(graph_bucket(32), Some(32));
        assert_eq!(graph_bucket(33), None);
        for b in GRAPH_BUCKETS {
            assert_eq!(GRAPH_BUCKETS[bucket_index(b).unwrap()], b);
        }
        assert_eq!(bucket_index(3), None);
    }

    #[test]
    fn shapes_are_checked_before_any_launch() {
        let a = m(&[4, 8, 3], 1);
        assert_eq!(check_shapes(&a, 8, 2, 6), Ok(()));
        assert_eq!(check_shapes(&a, 7, 2, 6), Err(BackendError::Shape));
        assert_eq!(check_shapes(&a, 8, 2, 5), Err(BackendError::Shape));
        assert_eq!(check_shapes(&a, 0, 0, 0), Ok(()));
        // GEMM dimensions beyond i32 are refused, not wrapped.
        assert_eq!(
            check_shapes(&a, 4 << 30, 1 << 30, 3 << 30),
            Err(BackendError::Shape)
        );
        assert!(rows_fit(max_dim(&a), 1 << 20));
        assert!(!rows_fit(max_dim(&a), 1 << 30));
        let mut broken = m(&[4, 8, 3], 1);
        broken.layers[1].bias.pop();
        assert_eq!(check_model(&broken, 1), Err(BackendError::Shape));
        let mut none = m(&[4, 8, 3], 1);
        none.layers.clear();
        none.output_width = 4;
        assert!(degenerate(&none));
        assert!(!degenerate(&a));
    }

    #[test]
    fn identically_shaped_members_share_one_batched_gemm_per_layer() {
        // bench_ens-like: three members, two of one shape, one of another.
        let (a, b, c) = (m(&[16, 32, 4], 1), m(&[16, 64, 4], 2), m(&[16, 32, 4], 3));
        let p = plan_groups(&[&a, &b, &c], 2).unwrap();
        assert_eq!(p.input_width, 16);
        assert!(p.on_cpu.is_empty());
        assert_eq!(p.groups.len(), 2);
        let g = &p.groups[0];
        assert_eq!(g.members, vec![0, 2]);
        assert_eq!(g.layers, vec![(16, 32), (32, 4)]);
        // Split precision stores each weight matrix twice along k.
        assert_eq!(g.weight_stride, vec![16 * 32 * 2, 32 * 4 * 2]);
        assert_eq!(g.weight_offset, vec![0, 2 * 16 * 32 * 2]);
        assert_eq!(g.weight_len, 2 * (16 * 32 + 32 * 4) * 2);
        // The first layer reads the one shared upload (stride 0).
        assert_eq!(g.strides(0, 8, 2), (16 * 32 * 2, 0, 8 * 32));
        assert_eq!(g.strides(1, 8, 2), (32 * 4 * 2, 8 * 32 * 2, 8 * 4));
        assert_eq!(p.groups[1].members, vec![1]);
        assert_eq!(p.groups[1].weight_len, (16 * 64 + 64 * 4) * 2);
        // Half precision: one copy.
        let p = plan_groups(&[&a, &c], 1).unwrap();
        assert_eq!(p.groups[0].weight_stride, vec![16 * 32, 32 * 4]);
    }

    #[test]
    fn members_that_cannot_share_are_refused_or_run_apart() {
        let (a, other_width) = (m(&[16, 8, 4], 1), m(&[12, 8, 4], 2));
        assert_eq!(
            plan_groups(&[&a, &other_width], 2),
            Err(BackendError::Shape)
        );
        assert_eq!(plan_groups(&[], 2), Err(BackendError::Shape));
        let mut empty = m(&[16, 16], 3);
        empty.layers.clear();
        let p = plan_groups(&[&a, &empty], 2).unwrap();
        assert_eq!(p.on_cpu, vec![1]);
        assert_eq!(p.groups.len(), 1);
    }
}
