use super::*;

/// `x < lightgbm_threshold(t)` ⟺ `x as f64 <= t` for f32 values around t
/// (t = +inf, where LightGBM sends every value left, gives thr = +inf:
/// all but an input of +inf itself go left).
#[test]
fn lightgbm_threshold_is_the_same_decision_for_every_f32() {
    let ts: Vec<f64> = vec![
        0.0,
        -0.0,
        0.1,
        -0.1,
        0.1454500034451485,
        114.65000152587892,
        1e-40,
        -1e-40,
        1.0000000000000002,
        f32::MAX as f64,
        f32::MAX as f64 * 2.0,
        -(f32::MAX as f64) * 2.0,
        f64::NEG_INFINITY,
        16777217.0,
        0.3f32 as f64,
    ];
    for t in ts {
        let thr = lightgbm_threshold(t);
        let c = t as f32;
        let mut xs = vec![
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
        ];
        let mut x = c;
        let mut y = c;
        for _ in 0..4 {
            x = next_up(x);
            y = next_down(y);
            xs.push(x);
            xs.push(y);
        }
        xs.push(c);
        for x in xs {
            if x.is_nan() {
                continue;
            }
            assert_eq!(x < thr, (x as f64) <= t, "t {t:e}, x {x:e}, thr {thr:e}");
        }
    }
}

fn split(feature: u32, thr: f32, left: Child, right: Child) -> Split {
    Split {
        feature,
        thr,
        default_left: true,
        zero_missing: false,
        left,
        right,
    }
}

#[test]
fn builder_refuses_what_is_not_a_tree() {
    let mut b = ForestBuilder::new();
    // Node 0's right child is node 0 again.
    let cyc = [split(0, 0.5, Child::Leaf(0), Child::Inner(0))];
    let e = b
        .push_tree(Child::Inner(0), &cyc, &[(1.0, None)], 0)
        .unwrap_err();
    assert!(e.contains("reached twice"), "{e}");
    let shared = [split(0, 0.5, Child::Leaf(0), Child::Leaf(0))];
    let e = b
        .push_tree(Child::Inner(0), &shared, &[(1.0, None)], 0)
        .unwrap_err();
    assert!(e.contains("leaf 0: reached twice"), "{e}");
    let missing = [split(0, 0.5, Child::Leaf(0), Child::Leaf(7))];
    let e = b
        .push_tree(Child::Inner(0), &missing, &[(1.0, None)], 0)
        .unwrap_err();
    assert!(e.contains("leaf 7: does not exist"), "{e}");
}

#[test]
fn builder_lays_out_breadth_first_with_self_looping_leaves() {
    let mut b = ForestBuilder::new();
    // x0 < 0.5 ? (x1 < 2 ? 1 : 2) : 3, cover 10/30/60.
    let splits = [
        split(0, 0.5, Child::Inner(1), Child::Leaf(2)),
        split(1, 2.0, Child::Leaf(0), Child::Leaf(1)),
    ];
    let leaves = [(1.0, Some(10.0)), (2.0, Some(30.0)), (3.0, Some(60.0))];
    b.push_tree(Child::Inner(0), &splits, &leaves, 0).unwrap();
    assert_eq!(b.depths, vec![2]);
    // Expected visits: 0.1·2 + 0.3·2 + 0.6·1.
    assert!((b.visits - 1.4).abs() < 1e-12, "{}", b.visits);
    // Root, then its children (inner 1, leaf 3), then leaves 1 and 2.
    assert_eq!(b.nodes[0].left, 1);
    assert_eq!(b.nodes[0].right, 2);
    assert!(b.nodes[2].is_leaf() && b.nodes[2].left == 2 && b.nodes[2].right == 2);
    assert_eq!(b.values[2], 3.0);
    let walk = |x: [f32; 2]| {
        let mut i = 0usize;
        for _ in 0..5 {
            let n = b.nodes[i];
            i = n.next(x[n.feature()]) as usize;
        }
        b.values[i]
    };
    assert_eq!(walk([0.0, 0.0]), 1.0);
    assert_eq!(walk([0.0, 5.0]), 2.0);
    assert_eq!(walk([1.0, 0.0]), 3.0);
    // NaN goes the default way (left here).
    assert_eq!(walk([f32::NAN, f32::NAN]), 1.0);
}

#[test]
fn zero_missing_nodes_send_zeros_and_nan_the_default_way() {
    let n = Node {
        thr: -1.0,
        feat: ZERO_MISSING | DEFAULT_LEFT,
        left: 1,
        right: 2,
    };
    assert_eq!(n.next(0.0), 1);
    assert_eq!(n.next(-0.0), 1);
    assert_eq!(n.next(1e-36), 1);
    assert_eq!(n.next(f32::NAN), 1);
    assert_eq!(n.next(1e-30), 2);
    assert_eq!(n.next(-2.0), 1);
}
