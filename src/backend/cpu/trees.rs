//! The CPU evaluator of tree models (`Model::forest`, model/trees).
//!
//! Layout: every tree's nodes in one flat array of 16-byte nodes
//! (threshold, feature + flags, left, right), breadth-first per tree so
//! the top levels share cache lines; a leaf points at itself on both
//! sides, so a traversal can run a fixed number of steps (the tree's
//! depth) without testing for the leaf. That makes traversals of several
//! rows (or several trees) run in lockstep, branch-free (the child is
//! picked with integer masks, not a jump: `Node::next`; with a jump every
//! node costs a mispredicted branch, 2–3× slower, measured), and lets the
//! CPU overlap their dependent loads — which is what bounds a tree walk.
//!
//! - Blocks of up to [`BLOCK`] rows: per tree, groups of [`LANES`] rows
//!   walk it together (`depth` steps) and add their leaves, the block's
//!   rows left over walk it one at a time; each tree is read from memory
//!   once per block, and the block's rows stay in L1 across all trees.
//! - Fewer than [`LANES`] rows (a batch of one): each row walks
//!   [`LANES`] trees together, `max depth of those trees` steps.
//!
//! Sums are taken as the library takes them (f32 for XGBoost, f64 for
//! LightGBM, in tree order), the output transform in f64. The scratch
//! (one block's accumulators) is kept between batches: nothing is
//! allocated per batch once a model of the same width has run.

use super::BackendError;
use crate::model::trees::{Forest, Node, TreeObjective};

/// Rows (or trees) walked in lockstep.
pub const LANES: usize = 8;
/// Rows that share one pass over the trees.
pub const BLOCK: usize = 64;

/// Accumulators kept between batches.
#[derive(Default)]
pub struct TreeScratch {
    acc32: Vec<f32>,
    acc64: Vec<f64>,
}

trait Acc: Copy + Default {
    fn from_f32(x: f32) -> Self;
    fn add(self, leaf: f64) -> Self;
    fn to_f64(self) -> f64;
    fn buf(s: &mut TreeScratch) -> &mut Vec<Self>;
}

impl Acc for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn add(self, leaf: f64) -> Self {
        self + leaf as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn buf(s: &mut TreeScratch) -> &mut Vec<Self> {
        &mut s.acc32
    }
}

impl Acc for f64 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    #[inline(always)]
    fn add(self, leaf: f64) -> Self {
        self + leaf
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    fn buf(s: &mut TreeScratch) -> &mut Vec<Self> {
        &mut s.acc64
    }
}

/// Run `forest` over `rows` rows of `input` (`rows × num_features`) into
/// `output` (`rows × forest.output_width()`), after the output transform.
pub fn run(
    forest: &Forest,
    input: &[f32],
    rows: usize,
    output: &mut [f32],
    scratch: &mut TreeScratch,
) -> Result<(), BackendError> {
    run_mode(forest, input, rows, output, scratch, false)
}

/// As [`run`], but `output` (`rows × forest.num_groups`) gets the margins
/// before the transform (XGBoost's `output_margin`, LightGBM's `raw_score`).
pub fn margins(
    forest: &Forest,
    input: &[f32],
    rows: usize,
    output: &mut [f32],
    scratch: &mut TreeScratch,
) -> Result<(), BackendError> {
    run_mode(forest, input, rows, output, scratch, true)
}

fn run_mode(
    forest: &Forest,
    input: &[f32],
    rows: usize,
    output: &mut [f32],
    scratch: &mut TreeScratch,
    raw: bool,
) -> Result<(), BackendError> {
    let nf = forest.num_features;
    let ow = if raw {
        forest.num_groups
    } else {
        forest.output_width()
    };
    if rows.checked_mul(nf) != Some(input.len()) || rows.checked_mul(ow) != Some(output.len()) {
        return Err(BackendError::Shape);
    }
    if !well_formed(forest) {
        return Err(BackendError::Shape);
    }
    if forest.accumulate_f64 {
        run_acc::<f64>(forest, input, rows, output, scratch, raw);
    } else {
        run_acc::<f32>(forest, input, rows, output, scratch, raw);
    }
    Ok(())
}

/// The lengths the walks rely on (O(trees); the parsers build only
/// well-formed forests, this guards hand-built ones).
fn well_formed(f: &Forest) -> bool {
    let n = f.nodes.len();
    f.base_margin.len() == f.num_groups
        && f.roots.len() == f.depths.len()
        && f.roots.len() == f.groups.len()
        && f.values.len() == n
        && f.roots.iter().all(|&r| (r as usize) < n)
        && f.groups.iter().all(|&g| (g as usize) < f.num_groups)
}

fn run_acc<A: Acc>(
    forest: &Forest,
    input: &[f32],
    rows: usize,
    output: &mut [f32],
    scratch: &mut TreeScratch,
    raw: bool,
) {
    let nf = forest.num_features;
    let ow = if raw {
        forest.num_groups
    } else {
        forest.output_width()
    };
    let g = forest.num_groups;
    let acc = A::buf(scratch);
    if acc.len() < BLOCK * g {
        acc.resize(BLOCK * g, A::default());
    }
    let acc = &mut acc[..BLOCK * g];
    let mut r = 0;
    while r < rows {
        let n = (rows - r).min(BLOCK);
        for lane in 0..n {
            for (k, b) in forest.base_margin.iter().enumerate() {
                acc[lane * g + k] = A::from_f32(*b);
            }
        }
        let x = &input[r * nf..(r + n) * nf];
        if n >= LANES {
            rows_block(forest, x, n, acc);
        } else {
            for lane in 0..n {
                trees_lockstep(
                    forest,
                    &x[lane * nf..(lane + 1) * nf],
                    &mut acc[lane * g..(lane + 1) * g],
                );
            }
        }
        for lane in 0..n {
            let out = &mut output[(r + lane) * ow..(r + lane + 1) * ow];
            let m = &acc[lane * g..(lane + 1) * g];
            if raw {
                for (o, v) in out.iter_mut().zip(m) {
                    *o = v.to_f64() as f32;
                }
            } else {
                transform(forest.objective, m, out);
            }
        }
        r += n;
    }
}

/// A block of `n` (≤ [`BLOCK`]) rows: per tree, groups of `LANES` rows walk
/// it together, the rows left over one at a time; the tree is fetched from
/// memory once per block, not once per row.
#[inline(never)]
fn rows_block<A: Acc>(forest: &Forest, x: &[f32], n: usize, acc: &mut [A]) {
    let nf = forest.num_features;
    let g = forest.num_groups;
    let nodes: &[Node] = &forest.nodes;
    let values: &[f64] = &forest.values;
    let x: &[f32] = &x[..n * nf];
    for ((&root, &depth), &group) in forest.roots.iter().zip(&forest.depths).zip(&forest.groups) {
        let k = group as usize;
        let mut r = 0;
        while r + LANES <= n {
            let xs = &x[r * nf..(r + LANES) * nf];
            let mut idx = [root; LANES];
            for _ in 0..depth {
                for (l, i) in idx.iter_mut().enumerate() {
                    let node = nodes[*i as usize];
                    *i = node.next(xs[l * nf + node.feature()]);
                }
            }
            for (l, i) in idx.iter().enumerate() {
                let a = &mut acc[(r + l) * g + k];
                *a = a.add(values[*i as usize]);
            }
            r += LANES;
        }
        while r < n {
            let xr = &x[r * nf..(r + 1) * nf];
            let mut i = root as usize;
            loop {
                let node = nodes[i];
                if node.is_leaf() {
                    break;
                }
                i = node.next(xr[node.feature()]) as usize;
            }
            let a = &mut acc[r * g + k];
            *a = a.add(values[i]);
            r += 1;
        }
    }
}

/// One row walks `LANES` trees at a time (the trees left over one by one).
#[inline(never)]
fn trees_lockstep<A: Acc>(forest: &Forest, x: &[f32], acc: &mut [A]) {
    let nodes: &[Node] = &forest.nodes;
    let values: &[f64] = &forest.values;
    let x: &[f32] = &x[..forest.num_features];
    let t_all = forest.roots.len();
    let mut t = 0;
    while t + LANES <= t_all {
        let mut idx = [0u32; LANES];
        idx.copy_from_slice(&forest.roots[t..t + LANES]);
        let depth = forest.depths[t..t + LANES]
            .iter()
            .copied()
            .max()
            .unwrap_or(0);
        for _ in 0..depth {
            for i in idx.iter_mut() {
                let n = nodes[*i as usize];
                *i = n.next(x[n.feature()]);
            }
        }
        for (l, i) in idx.iter().enumerate() {
            let k = forest.groups[t + l] as usize;
            acc[k] = acc[k].add(values[*i as usize]);
        }
        t += LANES;
    }
    while t < t_all {
        let mut i = forest.roots[t] as usize;
        loop {
            let n = nodes[i];
            if n.is_leaf() {
                break;
            }
            i = n.next(x[n.feature()]) as usize;
        }
        let k = forest.groups[t] as usize;
        acc[k] = acc[k].add(values[i]);
        t += 1;
    }
}

/// Margins (one per group) → the model's output columns, in f64.
#[inline]
fn transform<A: Acc>(objective: TreeObjective, m: &[A], out: &mut [f32]) {
    match objective {
        TreeObjective::Regression => out[0] = m[0].to_f64() as f32,
        TreeObjective::Binary => {
            let p = 1.0 / (1.0 + (-m[0].to_f64()).exp());
            out[0] = (1.0 - p) as f32;
            out[1] = p as f32;
        }
        TreeObjective::Multiclass => {
            let max = m
                .iter()
                .map(|v| v.to_f64())
                .fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = m.iter().map(|v| (v.to_f64() - max).exp()).sum();
            let inv = 1.0 / sum;
            for (o, v) in out.iter_mut().zip(m) {
                *o = ((v.to_f64() - max).exp() * inv) as f32;
            }
        }
    }
}

/// The obvious layout for comparison (benches/trees.rs): each row walks
/// each tree to its leaf, one at a time, testing for the leaf at every
/// step. Same answers as [`run`]; not used by the backend.
pub fn run_simple(
    forest: &Forest,
    input: &[f32],
    rows: usize,
    output: &mut [f32],
    scratch: &mut TreeScratch,
) -> Result<(), BackendError> {
    let nf = forest.num_features;
    let ow = forest.output_width();
    if rows.checked_mul(nf) != Some(input.len())
        || rows.checked_mul(ow) != Some(output.len())
        || !well_formed(forest)
    {
        return Err(BackendError::Shape);
    }
    let g = forest.num_groups;
    if scratch.acc64.len() < g {
        scratch.acc64.resize(g, 0.0);
    }
    let acc = &mut scratch.acc64[..g];
    for r in 0..rows {
        let x = &input[r * nf..(r + 1) * nf];
        for (a, b) in acc.iter_mut().zip(&forest.base_margin) {
            *a = *b as f64;
        }
        for (&root, &group) in forest.roots.iter().zip(&forest.groups) {
            let mut i = root as usize;
            loop {
                let n = forest.nodes[i];
                if n.is_leaf() {
                    break;
                }
                i = n.next(x[n.feature()]) as usize;
            }
            acc[group as usize] += forest.values[i];
        }
        transform(forest.objective, acc, &mut output[r * ow..(r + 1) * ow]);
    }
    Ok(())
}
