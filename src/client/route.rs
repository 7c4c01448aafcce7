//! Rendezvous (highest-random-weight) routing: which node a request goes
//! to. The cluster client, `beast-bench --server a,b,c` and the Python
//! client (tools/python/beast/cluster.py) use this one rule, so that
//! identical inputs meet the same node's L1/L2 cache:
//!
//! - input digest `d = xxh3_64(input bytes as sent)` (f32 or f16 bits,
//!   little-endian, the bytes of the wire's `input` vector);
//! - request key `k = xxh3_64_with_seed(target UTF-8 bytes, d)`;
//! - node seed `s = xxh3_64(node name UTF-8 bytes)`, the name being the
//!   node's data address as `ip:port` (`[v6]:port` for IPv6);
//! - score `mix64(k ^ s)` (the splitmix64 finalizer); nodes are tried in
//!   descending score, ties by position in the list.
//!
//! Adding or removing a node moves only the keys that node wins or
//! loses; the others keep their node (and its warm cache).

use crate::wire::Input;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// The input's bytes as they travel on the wire (little-endian).
fn input_bytes<'a>(input: &Input<'a>) -> &'a [u8] {
    match *input {
        Input::F32(x) => bytemuck::cast_slice(x),
        Input::F16(x) => bytemuck::cast_slice(x),
    }
}

/// The routing key of a request: its target and input digest.
pub fn request_key(target: &str, input: &Input<'_>) -> u64 {
    key_of(target, xxh3_64(input_bytes(input)))
}

/// The routing key from a target and an input digest already taken.
pub fn key_of(target: &str, input_digest: u64) -> u64 {
    xxh3_64_with_seed(target.as_bytes(), input_digest)
}

/// A node's seed, from its name (`ip:port`).
pub fn node_seed(name: &str) -> u64 {
    xxh3_64(name.as_bytes())
}

/// The splitmix64 finalizer: every bit of the input moves every bit of the output.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Node `seed`'s score for `key`: the highest score wins.
pub fn score(key: u64, seed: u64) -> u64 {
    mix64(key ^ seed)
}

/// The best node for `key` among `seeds` that `usable` accepts (by
/// index), or `None` when it accepts none. No allocation.
pub fn best(key: u64, seeds: &[u64], mut usable: impl FnMut(usize) -> bool) -> Option<usize> {
    let mut top: Option<(u64, usize)> = None;
    for (i, &s) in seeds.iter().enumerate() {
        let sc = score(key, s);
        // Strictly greater: ties go to the earlier node.
        if top.is_none_or(|(t, _)| sc > t) && usable(i) {
            top = Some((sc, i));
        }
    }
    top.map(|(_, i)| i)
}

/// Every node's index in the order a request with `key` tries them.
pub fn order(key: u64, seeds: &[u64]) -> Vec<usize> {
    let mut v: Vec<usize> = (0..seeds.len()).collect();
    // Stable sort: equal scores keep list order.
    v.sort_by_key(|&i| std::cmp::Reverse(score(key, seeds[i])));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds(n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| node_seed(&format!("10.0.0.{i}:7878")))
            .collect()
    }

    #[test]
    fn best_is_the_head_of_the_order_and_skips_what_is_unusable() {
        let s = seeds(5);
        for k in 0..1000u64 {
            let key = mix64(k);
            let o = order(key, &s);
            assert_eq!(best(key, &s, |_| true), Some(o[0]));
            assert_eq!(best(key, &s, |i| i != o[0]), Some(o[1]));
            assert_eq!(best(key, &s, |i| i != o[0] && i != o[1]), Some(o[2]));
        }
        assert_eq!(best(1, &s, |_| false), None);
    }

    #[test]
    fn keys_spread_evenly_and_a_removed_node_moves_only_its_own_keys() {
        let s = seeds(3);
        let mut count = [0usize; 3];
        let mut moved_elsewhere = 0;
        for k in 0..30_000u64 {
            let key = request_key("t", &Input::F32(&[k as f32, 1.0]));
            let b = best(key, &s, |_| true).unwrap();
            count[b] += 1;
            // Without node 2: keys of 0 and 1 stay put.
            let without = best(key, &s, |i| i != 2).unwrap();
            if b != 2 && without != b {
                moved_elsewhere += 1;
            }
        }
        for c in count {
            assert!((9_000..11_000).contains(&c), "{count:?}");
        }
        assert_eq!(moved_elsewhere, 0);
    }

    #[test]
    fn the_key_depends_on_target_and_input_bytes() {
        let x = [1.0f32, 2.0];
        let a = request_key("a", &Input::F32(&x));
        assert_eq!(a, request_key("a", &Input::F32(&[1.0, 2.0])));
        assert_ne!(a, request_key("b", &Input::F32(&x)));
        assert_ne!(a, request_key("a", &Input::F32(&[1.0, 2.5])));
        // The same bytes as f16 bits: the same digest.
        let bits: &[u16] = bytemuck::cast_slice(&x);
        assert_eq!(a, request_key("a", &Input::F16(bits)));
    }

    /// Fixed values, the same as the Python rule gives
    /// (`beast.cluster.request_key`, `node_seed`, `route_order`), so a
    /// change of either rule shows here; tests/python_client.rs compares
    /// the two on many more inputs.
    #[test]
    fn known_values() {
        let key = request_key("digits", &Input::F32(&[0.5, -1.0, 2.0]));
        assert_eq!(key, 0xe329_33b1_9c8c_eadf);
        assert_eq!(
            key,
            xxh3_64_with_seed(b"digits", xxh3_64(&to_le(&[0.5, -1.0, 2.0])))
        );
        let names = ["127.0.0.1:7878", "127.0.0.1:7879", "[::1]:7880"];
        let s: Vec<u64> = names.iter().map(|n| node_seed(n)).collect();
        assert_eq!(
            s,
            [
                0x4419_93e9_bbf0_3ffc,
                0x4153_6c39_9863_a89b,
                0x22b6_20b4_0d66_b8bd
            ]
        );
        assert_eq!(order(key, &s), [0, 2, 1]);
    }

    fn to_le(x: &[f32]) -> Vec<u8> {
        x.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}
