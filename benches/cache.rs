//! Cache lookups and inserts for a 16-float value: L1 hit, L2 hit, L2 miss,
//! inserts, and key building. `cargo bench --bench cache`.

use beast::cache::{CacheKey, KeyBuilder, L1Cache, L1Config, L2Cache, L2Config};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::Duration;

const N: u64 = 4096;

fn key(i: u64) -> CacheKey {
    KeyBuilder::new("bench")
        .model("m", 1, 0)
        .input(&i.to_le_bytes())
        .finish()
}

fn benches(c: &mut Criterion) {
    let keys: Vec<CacheKey> = (0..N).map(key).collect();
    let missing: Vec<CacheKey> = (N..2 * N).map(key).collect();
    let value = [0.25f32; 16];
    let mut out = [0f32; 16];

    let mut l1 = L1Cache::new(L1Config {
        sets: 2048,
        ways: 4,
        value_f32_max: 16,
    })
    .unwrap();
    for k in &keys {
        l1.insert(*k, &value);
    }
    let path = std::env::temp_dir().join(format!("beast-bench-l2-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let (l2, _) = L2Cache::open(
        &path,
        L2Config {
            total_bytes: 64 << 20,
            ways: 8,
            value_f32_max: 16,
        },
    )
    .unwrap();
    for k in &keys {
        l2.insert(k, 1, &value, 0);
    }

    let mut g = c.benchmark_group("cache");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let mut i = 0usize;
    let mut next = || {
        i = (i + 1) & (N as usize - 1);
        i
    };
    g.bench_function("key_build_64B_input", |b| {
        let input = [7u8; 64];
        b.iter(|| {
            KeyBuilder::new("bench")
                .model("m", 1, 0)
                .shape(1, 16, 1)
                .input(black_box(&input))
                .finish()
        })
    });
    g.bench_function("l1_hit_16f32", |b| {
        b.iter(|| l1.get(black_box(&keys[next()]), &mut out))
    });
    g.bench_function("l1_insert_16f32", |b| {
        b.iter(|| l1.insert(black_box(keys[next()]), &value))
    });
    g.bench_function("l2_hit_16f32", |b| {
        b.iter(|| l2.get(black_box(&keys[next()]), &mut out))
    });
    g.bench_function("l2_miss", |b| {
        b.iter(|| l2.get(black_box(&missing[next()]), &mut out))
    });
    g.bench_function("l2_insert_16f32", |b| {
        b.iter(|| l2.insert(black_box(&keys[next()]), 1, &value, 0))
    });
    // The same lookups in a 1 MiB file: the working set stays in cache and
    // TLB, which separates the table's own cost from memory latency.
    let small_path = path.with_extension("small");
    let _ = std::fs::remove_file(&small_path);
    let (small, _) = L2Cache::open(
        &small_path,
        L2Config {
            total_bytes: 1 << 20,
            ways: 8,
            value_f32_max: 16,
        },
    )
    .unwrap();
    let hot = &keys[..1024];
    for k in hot {
        small.insert(k, 1, &value, 0);
    }
    g.bench_function("l2_1MiB_hit_16f32", |b| {
        b.iter(|| small.get(black_box(&hot[next() & 1023]), &mut out))
    });
    g.bench_function("l2_1MiB_miss", |b| {
        b.iter(|| small.get(black_box(&missing[next()]), &mut out))
    });
    drop(small);
    let _ = std::fs::remove_file(&small_path);
    g.finish();
    drop(l2);
    let _ = std::fs::remove_file(&path);
}

criterion_group!(cache, benches);
criterion_main!(cache);
