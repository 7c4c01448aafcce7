//! Gradient-boosted tree ensembles (XGBoost JSON, LightGBM text) as
//! [`Forest`]: the parsed model in a layout made for inference.
//!
//! Owns: the in-memory form of a tree model (flattened node array, leaf
//! values, per-tree root/depth/output group), the two parsers
//! (`xgboost.rs`, `lightgbm.rs`), the `model.toml` of a tree model
//! (`manifest.rs`) and `beast import-trees` (`import.rs`). The evaluator
//! lives with the CPU backend (`backend/cpu/trees.rs`).
//! May touch: the file system at load and import time only.
//!
//! Both libraries' split rules are reduced to one comparison per node:
//! go left when `x < thr`, except when the value is *missing* (NaN, and
//! for a LightGBM "zero as missing" node also |x| ≤ 1e-35), where the node's
//! default direction is taken. LightGBM's `x <= t` (double) becomes
//! `x < thr` with `thr` the next f32 above `t` rounded down to f32, which is
//! the same decision for every f32 `x`; its "missing type none" (NaN is
//! read as 0.0) becomes a default direction computed from `0.0 <= t`.
//!
//! Sums follow the library: XGBoost adds leaves in f32 in tree order
//! starting from its base margin, LightGBM in f64 (its `init_score` is
//! already folded into the first trees' leaves).

pub mod import;
pub mod lightgbm;
pub mod manifest;
pub mod xgboost;

/// What one node visit costs in the FLOP-equivalents the cost model uses
/// ([`crate::model::Model::flops_per_row`]): a node visit of the tree
/// evaluator takes about as long as this many FLOPs of the AVX2 MLP
/// kernel (measured 180–197 at batch 1/32/128 by `cargo bench --bench
/// trees` on the 2-core dev VM, cancer_gbt vs cancer_mlp; perf/trees.md).
pub const FLOPS_PER_NODE_VISIT: f64 = 190.0;

/// A forest's cost per row in FLOP-equivalents (at least 1), from its
/// expected node visits plus one leaf read per tree.
pub fn flops_equivalent(f: &Forest) -> u64 {
    let visits = f.node_visits_per_row + f.num_trees() as f64;
    ((visits * FLOPS_PER_NODE_VISIT).round() as u64).max(1)
}

/// Which library wrote the model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeFormat {
    /// `Booster.save_model("m.json")`.
    XgboostJson,
    /// `Booster.save_model("m.txt")`.
    LightgbmText,
}

impl TreeFormat {
    /// The `format` value in `model.toml`.
    pub fn name(self) -> &'static str {
        match self {
            TreeFormat::XgboostJson => "xgboost-json",
            TreeFormat::LightgbmText => "lightgbm-text",
        }
    }

    pub fn from_name(s: &str) -> Option<TreeFormat> {
        match s {
            "xgboost-json" => Some(TreeFormat::XgboostJson),
            "lightgbm-text" => Some(TreeFormat::LightgbmText),
            _ => None,
        }
    }

    /// The model file's name inside a version folder.
    pub fn file_name(self) -> &'static str {
        match self {
            TreeFormat::XgboostJson => "model.json",
            TreeFormat::LightgbmText => "model.txt",
        }
    }

    /// Parse a model file's bytes of this format.
    pub fn parse(self, bytes: &[u8]) -> Result<Forest, String> {
        match self {
            TreeFormat::XgboostJson => xgboost::parse(bytes),
            TreeFormat::LightgbmText => lightgbm::parse(bytes),
        }
    }
}

/// What the forest's margins become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeObjective {
    /// One margin; output `[1 - p, p]` with `p = sigmoid(margin)`.
    Binary,
    /// One margin per class; output softmax over them.
    Multiclass,
    /// One margin; output as is.
    Regression,
}

/// Node flag: the default (missing-value) direction is left.
pub const DEFAULT_LEFT: u32 = 1 << 31;
/// Node flag: a leaf (`left == right ==` its own index).
pub const LEAF: u32 = 1 << 30;
/// Node flag: |x| ≤ 1e-35 is missing too (LightGBM `missing_type = Zero`).
pub const ZERO_MISSING: u32 = 1 << 29;
/// The feature index bits of [`Node::feat`].
pub const FEATURE_MASK: u32 = (1 << 29) - 1;
/// LightGBM's `kZeroThreshold`: |x| at or below it is "zero".
pub const ZERO_THRESHOLD: f32 = 1e-35;

/// One node, 16 bytes. A leaf points at itself on both sides (so a
/// traversal may take more steps than the leaf's depth and stay there) and
/// has feature 0 with [`LEAF`] set; its value is `Forest::values[index]`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct Node {
    pub thr: f32,
    pub feat: u32,
    pub left: u32,
    pub right: u32,
}

impl Node {
    #[inline]
    pub fn feature(&self) -> usize {
        (self.feat & FEATURE_MASK) as usize
    }

    #[inline]
    pub fn is_leaf(&self) -> bool {
        self.feat & LEAF != 0
    }

    /// The child a value `x` goes to. Branch-free on purpose (integer
    /// masks, no `if`): a tree walk's direction is a coin flip to the
    /// branch predictor, so a jump here costs a misprediction per node.
    #[inline(always)]
    pub fn next(&self, x: f32) -> u32 {
        let zero_flag = (self.feat >> 29) & 1;
        let zero = zero_flag & ((x > -ZERO_THRESHOLD) as u32) & ((x <= ZERO_THRESHOLD) as u32);
        let missing = (x.is_nan() as u32) | zero;
        let lt = (x < self.thr) as u32;
        let go_left = (missing & (self.feat >> 31)) | ((missing ^ 1) & lt);
        // 0 when going left, all ones when going right.
        let mask = go_left.wrapping_sub(1);
        self.left ^ ((self.left ^ self.right) & mask)
    }
}

/// A parsed tree ensemble, immutable once built.
#[derive(Debug, Clone, PartialEq)]
pub struct Forest {
    pub format: TreeFormat,
    /// The library's own objective name (`binary:logistic`, `multiclass`...).
    pub objective_name: String,
    pub objective: TreeObjective,
    /// Features per input row.
    pub num_features: usize,
    /// Margins per row: the class count for multiclass, else 1.
    pub num_groups: usize,
    /// Added to each group's margin before the trees (XGBoost's base score
    /// in margin space; 0 for LightGBM).
    pub base_margin: Vec<f32>,
    /// Sum the leaves in f64 (LightGBM) rather than f32 (XGBoost).
    pub accumulate_f64: bool,
    /// Every tree's nodes, one after the other.
    pub nodes: Vec<Node>,
    /// Leaf values, indexed like `nodes` (0 for inner nodes).
    pub values: Vec<f64>,
    /// Per tree: its root's index in `nodes`.
    pub roots: Vec<u32>,
    /// Per tree: the depth of its deepest leaf (0 for a lone leaf).
    pub depths: Vec<u32>,
    /// Per tree: which margin (class) it adds to.
    pub groups: Vec<u32>,
    /// Expected inner nodes visited per row, over all trees (each tree's
    /// leaf depths weighted by the training rows that reached them, where
    /// the file records that).
    pub node_visits_per_row: f64,
}

impl Forest {
    /// Columns of the output: 2 for binary ([1-p, p]), classes for
    /// multiclass, 1 for regression.
    pub fn output_width(&self) -> usize {
        match self.objective {
            TreeObjective::Binary => 2,
            TreeObjective::Multiclass => self.num_groups,
            TreeObjective::Regression => 1,
        }
    }

    pub fn num_trees(&self) -> usize {
        self.roots.len()
    }

    pub fn max_depth(&self) -> u32 {
        self.depths.iter().copied().max().unwrap_or(0)
    }

    /// The margins of one row, the slow obvious way (early exit at the
    /// leaf); the reference the batched evaluator is tested against.
    pub fn margins_one(&self, row: &[f32], out: &mut [f64]) {
        for (g, o) in out.iter_mut().enumerate() {
            *o = self.base_margin[g] as f64;
        }
        let mut acc32: Vec<f32> = self.base_margin.clone();
        for (t, &root) in self.roots.iter().enumerate() {
            let mut i = root as usize;
            while !self.nodes[i].is_leaf() {
                let n = &self.nodes[i];
                i = n.next(row[n.feature()]) as usize;
            }
            let g = self.groups[t] as usize;
            if self.accumulate_f64 {
                out[g] += self.values[i];
            } else {
                acc32[g] += self.values[i] as f32;
            }
        }
        if !self.accumulate_f64 {
            for (o, a) in out.iter_mut().zip(&acc32) {
                *o = *a as f64;
            }
        }
    }
}

/// Builds the flat node array one tree at a time. Parsers hand it each
/// tree as parallel arrays in the file's own numbering, children given as
/// [`Child`].
pub(crate) struct ForestBuilder {
    pub nodes: Vec<Node>,
    pub values: Vec<f64>,
    pub roots: Vec<u32>,
    pub depths: Vec<u32>,
    pub groups: Vec<u32>,
    pub visits: f64,
}

/// A child reference inside one tree, as the files number them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Child {
    Inner(usize),
    Leaf(usize),
}

/// One inner node as a parser read it.
pub(crate) struct Split {
    pub feature: u32,
    pub thr: f32,
    pub default_left: bool,
    pub zero_missing: bool,
    pub left: Child,
    pub right: Child,
}

impl ForestBuilder {
    pub fn new() -> Self {
        ForestBuilder {
            nodes: Vec::new(),
            values: Vec::new(),
            roots: Vec::new(),
            depths: Vec::new(),
            groups: Vec::new(),
            visits: 0.0,
        }
    }

    /// Add one tree: `root` is its root, `splits` its inner nodes,
    /// `leaves` its leaf values with the training weight that reached each
    /// (`None`: unknown, leaves weigh the same). Checks that every child
    /// index exists and that the tree is a tree (each node reached once).
    /// Errors name the tree's node; the caller prefixes the tree.
    pub fn push_tree(
        &mut self,
        root: Child,
        splits: &[Split],
        leaves: &[(f64, Option<f64>)],
        group: u32,
    ) -> Result<(), String> {
        // Breadth-first: new index of each inner node and leaf, and the
        // depth each is reached at.
        let base = self.nodes.len();
        let mut inner_at = vec![u32::MAX; splits.len()];
        let mut leaf_at = vec![u32::MAX; leaves.len()];
        let mut order: Vec<(Child, u32)> = vec![(root, 0)];
        let mut k = 0;
        let mut max_depth = 0;
        let mut weighted = 0.0;
        let mut weight_sum = 0.0;
        let mut plain = 0.0;
        while k < order.len() {
            let (c, depth) = order[k];
            let new = (base + k) as u32;
            match c {
                Child::Inner(i) => {
                    let s = splits
                        .get(i)
                        .ok_or_else(|| format!("node {i}: does not exist"))?;
                    if inner_at[i] != u32::MAX {
                        return Err(format!("node {i}: reached twice (not a tree)"));
                    }
                    inner_at[i] = new;
                    order.push((s.left, depth + 1));
                    order.push((s.right, depth + 1));
                }
                Child::Leaf(l) => {
                    let &(_, w) = leaves
                        .get(l)
                        .ok_or_else(|| format!("leaf {l}: does not exist"))?;
                    if leaf_at[l] != u32::MAX {
                        return Err(format!("leaf {l}: reached twice (not a tree)"));
                    }
                    leaf_at[l] = new;
                    max_depth = max_depth.max(depth);
                    plain += depth as f64;
                    if let Some(w) = w.filter(|w| w.is_finite() && *w > 0.0) {
                        weighted += w * depth as f64;
                        weight_sum += w;
                    }
                }
            }
            k += 1;
            if k > splits.len() + leaves.len() {
                return Err("more nodes reached than the tree has".into());
            }
        }
        let n_leaves = leaf_at.iter().filter(|&&x| x != u32::MAX).count().max(1);
        let visits = if weight_sum > 0.0 {
            weighted / weight_sum
        } else {
            plain / n_leaves as f64
        };
        // Emit in the breadth-first order.
        for (k, &(c, _)) in order.iter().enumerate() {
            let me = (base + k) as u32;
            let (node, value) = match c {
                Child::Inner(i) => {
                    let s = &splits[i];
                    let idx = |c: Child| match c {
                        Child::Inner(j) => inner_at[j],
                        Child::Leaf(j) => leaf_at[j],
                    };
                    let mut feat = s.feature;
                    if s.default_left {
                        feat |= DEFAULT_LEFT;
                    }
                    if s.zero_missing {
                        feat |= ZERO_MISSING;
                    }
                    (
                        Node {
                            thr: s.thr,
                            feat,
                            left: idx(s.left),
                            right: idx(s.right),
                        },
                        0.0,
                    )
                }
                Child::Leaf(l) => (
                    Node {
                        thr: 0.0,
                        feat: LEAF,
                        left: me,
                        right: me,
                    },
                    leaves[l].0,
                ),
            };
            self.nodes.push(node);
            self.values.push(value);
        }
        self.roots.push(base as u32);
        self.depths.push(max_depth);
        self.groups.push(group);
        self.visits += visits;
        Ok(())
    }
}

/// The smallest f32 threshold `thr` such that `x < thr` ⟺ `x as f64 <= t`
/// for every f32 `x` (LightGBM's rule `fval <= threshold` in double).
pub fn lightgbm_threshold(t: f64) -> f32 {
    if t.is_nan() {
        return f32::NAN;
    }
    // Round t down to an f32: the largest f32 ≤ t.
    let mut d = t as f32;
    if (d as f64) > t {
        d = next_down(d);
    }
    next_up(d)
}

fn next_up(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f32::from_bits(1);
    }
    let b = x.to_bits();
    f32::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
}

fn next_down(x: f32) -> f32 {
    -next_up(-x)
}

#[cfg(test)]
mod tests;
