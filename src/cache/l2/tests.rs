use super::layout::encode_header;
use super::*;
use crate::cache::key::{target_tag, KeyBuilder};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beast-l2-unit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&d);
    d
}

fn key(t: &str, i: u64) -> CacheKey {
    KeyBuilder::new(t).input(&i.to_le_bytes()).finish()
}

const CFG: L2Config = L2Config {
    total_bytes: 1 << 20,
    ways: 8,
    value_f32_max: 16,
};

#[test]
fn cache_l2_geometry() {
    let g = Geometry::for_config(&CFG).unwrap();
    assert_eq!(g.slot_size, 128);
    assert_eq!(g.file_bytes, HEADER_BYTES as u64 + g.bucket_count * 8 * 128);
    assert!(g.file_bytes <= CFG.total_bytes);
    assert!(Geometry::for_config(&L2Config {
        total_bytes: 4096,
        ..CFG
    })
    .is_err());
    assert!(Geometry::for_config(&L2Config { ways: 0, ..CFG }).is_err());
    let h = encode_header(&g, 7);
    assert_eq!(decode_header(&h, g.file_bytes).unwrap().created_unix, 7);
    assert!(decode_header(&h, g.file_bytes + 1).is_err());
    let mut bad = h;
    bad[20] ^= 1;
    assert!(decode_header(&bad, g.file_bytes).is_err());
}

#[test]
fn cache_l2_get_insert_remove() {
    let p = tmp("basic");
    let (c, r) = L2Cache::open(&p, CFG).unwrap();
    assert!(r.created);
    let mut out = [0f32; 16];
    let k = key("t", 1);
    assert_eq!(c.get(&k, &mut out), None);
    assert!(c.insert(&k, 1, &[1.0, 2.0, 3.0], 0));
    assert_eq!(c.get(&k, &mut out), Some(3));
    assert_eq!(&out[..3], &[1.0, 2.0, 3.0]);
    assert!(c.insert(&k, 1, &[4.0], 0));
    assert_eq!(c.get(&k, &mut out), Some(1));
    assert_eq!(out[0], 4.0);
    assert!(!c.insert(&k, 1, &[0.0; 17], 0), "too long");
    let mut short = [0f32; 0];
    assert_eq!(c.get(&k, &mut short), None);
    assert!(c.remove(&k));
    assert_eq!(c.get(&k, &mut out), None);
    let st = c.stats();
    assert_eq!((st.hits, st.inserts, st.occupancy), (2, 2, 0));
    drop(c);
    let _ = std::fs::remove_file(&p);
}

#[test]
fn cache_l2_ttl_expiry() {
    let p = tmp("ttl");
    let (c, _) = L2Cache::open(&p, CFG).unwrap();
    let mut out = [0f32; 16];
    let (k1, k2) = (key("t", 1), key("t", 2));
    c.insert(&k1, 1, &[1.0], 1_000);
    c.insert(&k2, 1, &[2.0], 0);
    assert_eq!(c.get_at(&k1, &mut out, Some(999)), Some(1));
    assert_eq!(
        c.get_at(&k1, &mut out, Some(1_000)),
        None,
        "expired at its second"
    );
    assert_eq!(
        c.get_at(&k2, &mut out, Some(u64::MAX)),
        Some(1),
        "0 = never"
    );
    assert_eq!(c.get(&k1, &mut out), None, "wall clock is past 1000");
    let far = unix_now() + 3600;
    c.insert(&k1, 1, &[3.0], far);
    assert_eq!(c.get(&k1, &mut out), Some(1));
    assert_eq!(c.stats().expired, 2);
    drop(c);
    let _ = std::fs::remove_file(&p);
}

#[test]
fn cache_l2_purge_target() {
    let p = tmp("purge");
    let (c, _) = L2Cache::open(&p, CFG).unwrap();
    let (ta, tb) = (target_tag("a"), target_tag("b"));
    for i in 0..100 {
        c.insert(&key("a", i), ta, &[i as f32], 0);
        c.insert(&key("b", i), tb, &[i as f32], 0);
    }
    let mut out = [0f32; 16];
    let before_b = (0..100)
        .filter(|&i| c.get(&key("b", i), &mut out).is_some())
        .count();
    let before_a = (0..100)
        .filter(|&i| c.get(&key("a", i), &mut out).is_some())
        .count();
    assert!(before_a > 90 && before_b > 90);
    assert_eq!(c.purge_target(ta), before_a as u64);
    assert_eq!(
        (0..100)
            .filter(|&i| c.get(&key("a", i), &mut out).is_some())
            .count(),
        0
    );
    let after_b = (0..100)
        .filter(|&i| c.get(&key("b", i), &mut out).is_some())
        .count();
    assert_eq!(after_b, before_b, "other target untouched");
    drop(c);
    let _ = std::fs::remove_file(&p);
}
