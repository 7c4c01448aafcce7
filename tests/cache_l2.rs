//! L2 cache integration tests: concurrency (no torn reads), kill -9 of a
//! writer, restart warmth, bad headers, and the eviction policy against an
//! exact LRU on Zipf traces. Uses only `beast::cache`.

use beast::cache::{inspect, target_tag, CacheKey, KeyBuilder, L2Cache, L2Config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

const CHILD_ENV: &str = "BEAST_L2_CHILD_PATH";

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("beast-cache-l2-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn cleanup(p: &PathBuf) {
    let _ = std::fs::remove_file(p);
    if let (Some(dir), Some(name)) = (p.parent(), p.file_name()) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name();
                if n.to_string_lossy()
                    .starts_with(&format!("{}.bad-", name.to_string_lossy()))
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// A count from `inspect`'s report (`live`, `expired`, `corrupt`, ...).
fn scanned(text: &str, field: &str) -> u64 {
    let line = text.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn key(i: u64) -> CacheKey {
    KeyBuilder::new("t")
        .model("m", 1, 0)
        .shape(1, 2, 1)
        .input(&i.to_le_bytes())
        .finish()
}

/// The value every writer stores for key index `i`: its length (1..=16)
/// and contents both depend on `i`, so any mix of two writes is visible.
fn value_of(i: u64, buf: &mut [f32; 16]) -> usize {
    let len = 1 + (i % 16) as usize;
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (j, v) in buf[..len].iter_mut().enumerate() {
        *v = (((h >> 40) as u32).wrapping_add(j as u32 * 7919) & 0xff_ffff) as f32;
    }
    len
}

fn check(i: u64, got: &[f32]) {
    let mut want = [0f32; 16];
    let len = value_of(i, &mut want);
    assert_eq!(got.len(), len, "key {i}: length of another value");
    assert_eq!(got, &want[..len], "key {i}: torn or foreign value");
}

const SMALL: L2Config = L2Config {
    total_bytes: 64 << 10,
    ways: 8,
    value_f32_max: 16,
};

#[test]
fn cache_l2_concurrent_readers_writers_never_torn() {
    let p = tmp("concurrent");
    let (c, _) = L2Cache::open(&p, SMALL).unwrap();
    let c = Arc::new(c);
    let slots = c.geometry().slots();
    let keys = slots * 4; // more keys than slots: evictions race reads
    let hits = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let c = c.clone();
            let hits = hits.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(t);
                let mut out = [0f32; 16];
                let mut v = [0f32; 16];
                let mut h = 0;
                for _ in 0..200_000 {
                    // Skewed: half the traffic on a hot eighth of the keys.
                    let i = if rng.random::<bool>() {
                        rng.random_range(0..keys / 8)
                    } else {
                        rng.random_range(0..keys)
                    };
                    let k = key(i);
                    match c.get(&k, &mut out) {
                        Some(n) => {
                            check(i, &out[..n]);
                            h += 1;
                        }
                        None => {
                            let n = value_of(i, &mut v);
                            c.insert(&k, 1, &v[..n], 0);
                        }
                    }
                }
                hits.fetch_add(h, Ordering::Relaxed);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let st = c.stats();
    let hits = hits.load(Ordering::Relaxed);
    println!("concurrent: slots {slots} keys {keys} hits {hits} {st:?}");
    assert!(hits > 100_000, "hits must happen: {hits}");
    assert!(st.evictions > 10_000, "evictions must race reads");
    assert_eq!(st.checksum_failures, 0);
    let text = inspect(&p).unwrap();
    assert_eq!(
        st.occupancy,
        scanned(&text, "live") + scanned(&text, "expired"),
        "the occupancy counter agrees with a scan after racing writers"
    );
    drop(c);
    cleanup(&p);
}

/// The `live` count of an `inspect` report.
fn live_entries(report: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("live"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Child mode for the kill -9 test: write forever until killed.
#[test]
#[ignore = "run by cache_l2_kill9_writer_leaves_no_bad_entries as a child"]
fn cache_l2_kill9_child_writer() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (c, _) = L2Cache::open(&path, SMALL).unwrap();
    let c = Arc::new(c);
    // The parent kills us long before this; the bound only ends an orphan.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ts: Vec<_> = (0..2u64)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(100 + t);
                let mut v = [0f32; 16];
                while Instant::now() < deadline {
                    let i = rng.random_range(0..10_000u64);
                    let n = value_of(i, &mut v);
                    c.insert(&key(i), 1, &v[..n], 0);
                }
            })
        })
        .collect();
    for t in ts {
        let _ = t.join();
    }
}

#[test]
fn cache_l2_kill9_writer_leaves_no_bad_entries() {
    let p = tmp("kill9");
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "cache_l2_kill9_child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &p)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it while it writes: once the file (read beside the writer, as
    // `beast cache inspect` does) holds a good number of live entries.
    common::wait_until(
        Duration::from_secs(20),
        "the child to write 200 entries (of 480 slots)",
        || inspect(&p).is_ok_and(|report| live_entries(&report) >= 200),
    );
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "child must have died by the signal");

    let (c, report) = L2Cache::open(&p, SMALL).unwrap();
    println!("kill9 reopen: {report:?}");
    assert!(!report.created, "the file must be reused");
    let mut out = [0f32; 16];
    let mut found = 0;
    for i in 0..10_000u64 {
        if let Some(n) = c.get(&key(i), &mut out) {
            check(i, &out[..n]);
            found += 1;
        }
    }
    println!("kill9: {found} intact entries");
    assert!(found > 0, "entries written before the kill must be served");
    assert_eq!(found, report.entries, "every live entry is reachable");
    assert_eq!(c.stats().checksum_failures, 0);
    drop(c);
    cleanup(&p);
}

/// Zipf(s) over `n` ranks by inverse CDF; ranks are scattered over key
/// space by the key hash.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for r in 1..=n {
            acc += 1.0 / (r as f64).powf(s);
            cdf.push(acc);
        }
        for x in &mut cdf {
            *x /= acc;
        }
        Zipf { cdf }
    }
    fn sample(&self, rng: &mut StdRng) -> u64 {
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c < u) as u64
    }
}

#[test]
fn cache_l2_restart_keeps_hit_ratio() {
    let p = tmp("restart");
    let cfg = L2Config {
        total_bytes: 1 << 20,
        ..SMALL
    };
    let zipf = Zipf::new(50_000, 1.0);
    let mut rng = StdRng::seed_from_u64(7);
    let warm: Vec<u64> = (0..200_000).map(|_| zipf.sample(&mut rng)).collect();
    let probe: Vec<u64> = (0..100_000).map(|_| zipf.sample(&mut rng)).collect();
    let mut v = [0f32; 16];
    let mut out = [0f32; 16];
    // Read-only replay so both measurements see the same state.
    let replay = |c: &L2Cache, out: &mut [f32; 16]| {
        let mut h = 0usize;
        for &i in &probe {
            if let Some(n) = c.get(&key(i), out) {
                check(i, &out[..n]);
                h += 1;
            }
        }
        100.0 * h as f64 / probe.len() as f64
    };
    let (before, occupancy) = {
        let (c, _) = L2Cache::open(&p, cfg).unwrap();
        for &i in &warm {
            if c.get(&key(i), &mut out).is_none() {
                let n = value_of(i, &mut v);
                c.insert(&key(i), 1, &v[..n], 0);
            }
        }
        (replay(&c, &mut out), c.stats().occupancy)
    }; // dropped: flushed and closed
    let (c, report) = L2Cache::open(&p, cfg).unwrap();
    assert!(!report.created);
    assert_eq!(report.entries, occupancy);
    let after = replay(&c, &mut out);
    println!("restart: hit ratio before {before:.2}% after {after:.2}%");
    assert!(before > 20.0, "the workload must hit: {before}");
    assert!((before - after).abs() <= 1.0, "{before} vs {after}");
    let text = inspect(&p).unwrap();
    assert!(
        text.contains(&format!("live           {occupancy} ")),
        "{text}"
    );
    drop(c);
    cleanup(&p);
}

#[test]
fn cache_l2_bad_header_moved_aside() {
    let p = tmp("badheader");
    {
        let (c, _) = L2Cache::open(&p, SMALL).unwrap();
        c.insert(&key(1), 1, &[1.0], 0);
    }
    // Garbage over the header.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(&[0xA5; 56]).unwrap();
    }
    assert!(
        inspect(&p).is_err(),
        "inspect must refuse a bad header, not panic"
    );
    let (c, report) = L2Cache::open(&p, SMALL).unwrap();
    println!("bad header: {report:?}");
    assert!(report.created);
    let aside = report.moved_aside.clone().expect("moved aside");
    assert!(aside.exists());
    assert!(aside.to_string_lossy().contains(".bad-"));
    let mut out = [0f32; 16];
    assert_eq!(c.get(&key(1), &mut out), None, "fresh cache");
    assert!(c.insert(&key(2), 1, &[2.0], 0));
    assert_eq!(c.get(&key(2), &mut out), Some(1));
    drop(c);

    // Another geometry is also set aside, not misread.
    let other = L2Config { ways: 4, ..SMALL };
    let (c, report) = L2Cache::open(&p, other).unwrap();
    assert!(report.created && report.moved_aside.is_some());
    drop(c);

    // A truncated file too.
    std::fs::write(&p, b"short").unwrap();
    let (c, report) = L2Cache::open(&p, SMALL).unwrap();
    assert!(report.created && report.reason.is_some());
    drop(c);
    cleanup(&p);
}

#[test]
fn cache_l2_purge_and_inspect_per_target() {
    let p = tmp("purge");
    let (c, _) = L2Cache::open(
        &p,
        L2Config {
            total_bytes: 1 << 20,
            ..SMALL
        },
    )
    .unwrap();
    let (a, b) = (target_tag("fraud"), target_tag("rank"));
    for i in 0..300 {
        c.insert(
            &KeyBuilder::new("fraud")
                .input(&[i as u8, (i >> 8) as u8])
                .finish(),
            a,
            &[1.0],
            0,
        );
    }
    for i in 0..100 {
        c.insert(
            &KeyBuilder::new("rank").input(&[i as u8]).finish(),
            b,
            &[1.0],
            0,
        );
    }
    let text = inspect(&p).unwrap();
    assert!(text.contains(&format!("tag {a:016x}  300")), "{text}");
    assert!(text.contains(&format!("tag {b:016x}  100")), "{text}");
    assert_eq!(c.purge_target(a), 300);
    assert_eq!(c.stats().occupancy, 100);
    drop(c);
    cleanup(&p);
}

/// Exact LRU of `cap` entries.
struct Lru {
    cap: usize,
    clock: u64,
    stamp_of: HashMap<u64, u64>,
    by_stamp: BTreeMap<u64, u64>,
}

impl Lru {
    fn access(&mut self, k: u64) -> bool {
        self.clock += 1;
        let hit = if let Some(old) = self.stamp_of.insert(k, self.clock) {
            self.by_stamp.remove(&old);
            true
        } else {
            false
        };
        self.by_stamp.insert(self.clock, k);
        if self.stamp_of.len() > self.cap {
            let (_, victim) = self.by_stamp.pop_first().unwrap();
            self.stamp_of.remove(&victim);
        }
        hit
    }
}

#[test]
fn cache_l2_eviction_vs_exact_lru_zipf() {
    let cfg = L2Config {
        total_bytes: 1 << 20,
        ..SMALL
    };
    let universe = 100_000;
    let requests = 600_000;
    let warmup = 100_000;
    println!("| zipf s | L2 set-assoc freq+aging % | exact LRU % | diff (points) |");
    println!("|---|---|---|---|");
    for (n, s) in [0.8f64, 1.0, 1.2].into_iter().enumerate() {
        let p = tmp(&format!("sim{n}"));
        let (c, _) = L2Cache::open(&p, cfg).unwrap();
        let cap = c.geometry().slots() as usize;
        let mut lru = Lru {
            cap,
            clock: 0,
            stamp_of: HashMap::new(),
            by_stamp: BTreeMap::new(),
        };
        let zipf = Zipf::new(universe, s);
        let mut rng = StdRng::seed_from_u64(42 + n as u64);
        let (mut h_l2, mut h_lru) = (0u64, 0u64);
        let mut out = [0f32; 16];
        let v = [0.5f32; 16];
        for r in 0..requests {
            let i = zipf.sample(&mut rng);
            let k = key(i);
            let hit_l2 = c.get(&k, &mut out).is_some();
            if !hit_l2 {
                c.insert(&k, 1, &v, 0);
            }
            let hit_lru = lru.access(i);
            if r >= warmup {
                h_l2 += hit_l2 as u64;
                h_lru += hit_lru as u64;
            }
        }
        let m = (requests - warmup) as f64;
        let (r_l2, r_lru) = (100.0 * h_l2 as f64 / m, 100.0 * h_lru as f64 / m);
        println!("| {s} | {r_l2:.2} | {r_lru:.2} | {:+.2} |", r_l2 - r_lru);
        assert!(
            r_l2 >= r_lru,
            "s={s}: L2 {r_l2:.2}% below LRU {r_lru:.2}% (cap {cap})"
        );
        drop(c);
        cleanup(&p);
    }
}

#[test]
fn cache_l2_odd_and_corrupt_slots_repaired_on_open() {
    let p = tmp("repair");
    let geo;
    {
        let (c, _) = L2Cache::open(&p, SMALL).unwrap();
        geo = c.geometry();
        let mut v = [0f32; 16];
        for i in 0..40 {
            let n = value_of(i, &mut v);
            c.insert(&key(i), 1, &v[..n], 0);
        }
    }
    // Find two occupied slots in the file and damage them: one left odd
    // (a writer died mid-write), one with a flipped value byte.
    let mut bytes = std::fs::read(&p).unwrap();
    let slot_size = geo.slot_size as usize;
    let occupied: Vec<usize> = (0..geo.slots() as usize)
        .map(|i| 4096 + i * slot_size)
        .filter(|&o| bytes[o + 44] & 1 == 1)
        .take(2)
        .collect();
    assert_eq!(occupied.len(), 2);
    bytes[occupied[0]] |= 1; // seq odd
    bytes[occupied[1] + 64] ^= 0x40; // value bit flip
    std::fs::write(&p, &bytes).unwrap();

    let text = inspect(&p).unwrap();
    assert!(text.contains("odd            1"), "{text}");
    assert!(text.contains("corrupt        1"), "{text}");
    let (c, report) = L2Cache::open(&p, SMALL).unwrap();
    println!("repair: {report:?}");
    assert_eq!(report.odd_slots_cleared, 1);
    assert_eq!(report.corrupt_slots_cleared, 1);
    assert_eq!(report.entries, 38);
    let mut out = [0f32; 16];
    let mut found = 0;
    for i in 0..40 {
        if let Some(n) = c.get(&key(i), &mut out) {
            check(i, &out[..n]);
            found += 1;
        }
    }
    assert_eq!(found, 38);
    // The repaired slots are writable again.
    let mut v = [0f32; 16];
    for i in 0..40 {
        let n = value_of(i, &mut v);
        assert!(c.insert(&key(i), 1, &v[..n], 0));
    }
    assert_eq!(c.stats().occupancy, 40);
    drop(c);
    cleanup(&p);
}

#[test]
fn cache_l2_checksum_failure_never_served_live() {
    // Corrupt a value byte underneath a live mapping (as a bad disk page
    // would): the get must miss and count, not serve.
    let p = tmp("live-corrupt");
    let (c, _) = L2Cache::open(&p, SMALL).unwrap();
    c.insert(&key(5), 1, &[1.0, 2.0], 0);
    let geo = c.geometry();
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        for i in 0..geo.slots() {
            let o = 4096 + i * geo.slot_size as u64;
            let mut lf = [0u8; 8];
            f.seek(SeekFrom::Start(o + 40)).unwrap();
            f.read_exact(&mut lf).unwrap();
            if lf[4] & 1 == 1 {
                f.seek(SeekFrom::Start(o + 64)).unwrap();
                f.write_all(&[0x11]).unwrap();
            }
        }
    }
    let mut out = [0f32; 16];
    assert_eq!(c.get(&key(5), &mut out), None);
    assert_eq!(c.stats().checksum_failures, 1);
    drop(c);
    cleanup(&p);
}

const RACE_ENV: &str = "BEAST_L2_RACE_DIR";

/// Child mode for the concurrent-create test: many rounds of two openers
/// racing on a new path; the winner then writes every slot.
#[test]
#[ignore = "run by cache_l2_two_openers_of_a_new_path_never_truncate_the_winner as a child"]
fn cache_l2_race_child() {
    let Ok(dir) = std::env::var(RACE_ENV) else {
        return;
    };
    let cfg = SMALL;
    for round in 0..1000 {
        let p = PathBuf::from(&dir).join(format!("race-{round}.cache"));
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let opened: Vec<_> = (0..2)
            .map(|_| {
                let (p, barrier) = (p.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    L2Cache::open(&p, cfg)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let (won, lost): (Vec<_>, Vec<_>) = opened.into_iter().partition(|r| r.is_ok());
        let errs: Vec<_> = lost.iter().filter_map(|r| r.as_ref().err()).collect();
        assert_eq!(won.len(), 1, "round {round}: one owner, errors {errs:?}");
        let lost = lost.into_iter().next().unwrap().err().unwrap();
        assert!(lost.contains("locked"), "round {round}: {lost}");
        let (c, report) = won.into_iter().next().unwrap().unwrap();
        assert!(report.created, "round {round}: {report:?}");
        assert_eq!(
            report.moved_aside, None,
            "round {round}: the loser set the winner's new file aside"
        );
        // Touch every page: a file truncated under the mapping kills us here.
        let geo = c.geometry();
        for i in 0..geo.slots() * 2 {
            c.insert(&key(i), 1, &[1.0], 0);
        }
        assert_eq!(std::fs::metadata(&p).unwrap().len(), geo.file_bytes);
        drop(c);
        cleanup(&p);
    }
}

#[test]
fn cache_l2_two_openers_of_a_new_path_never_truncate_the_winner() {
    let dir = std::env::temp_dir().join(format!("beast-cache-l2-race-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "cache_l2_race_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(RACE_ENV, &dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "racing openers: child {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
}

/// `<name>.bad-<digits>` files next to `p`.
fn bad_files(p: &std::path::Path) -> Vec<PathBuf> {
    let prefix = format!("{}.bad-", p.file_name().unwrap().to_string_lossy());
    let mut v: Vec<PathBuf> = std::fs::read_dir(p.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix(&prefix)
                .is_some_and(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

#[test]
fn cache_l2_only_the_newest_bad_file_is_kept() {
    let dir = std::env::temp_dir().join(format!("beast-cache-l2-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("l2.cache");
    // Leftovers of earlier move-asides, and files that are not ours.
    for old in ["l2.cache.bad-1000", "l2.cache.bad-2000"] {
        std::fs::write(dir.join(old), b"old").unwrap();
    }
    for keep in ["l2.cache.bad-notes", "other.cache.bad-5"] {
        std::fs::write(dir.join(keep), b"keep").unwrap();
    }
    for (round, garbage) in [b"first garbage", b"secnd garbage"].iter().enumerate() {
        std::fs::write(&p, garbage).unwrap();
        let (c, report) = L2Cache::open(&p, SMALL).unwrap();
        let aside = report.moved_aside.clone().expect("moved aside");
        assert_eq!(bad_files(&p), vec![aside.clone()], "round {round}");
        assert_eq!(&std::fs::read(&aside).unwrap(), garbage, "the newest kept");
        drop(c);
    }
    for keep in ["l2.cache.bad-notes", "other.cache.bad-5"] {
        assert!(dir.join(keep).exists(), "{keep} is not ours to remove");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cache_l2_occupancy_is_counted_not_scanned() {
    let p = tmp("occupancy");
    let (c, _) = L2Cache::open(&p, SMALL).unwrap();
    let geo = c.geometry();
    let mut v = [0f32; 16];
    // Fill past capacity (evictions), replace in place, remove, purge,
    // replace expired entries: the counter must follow every path.
    for i in 0..geo.slots() * 2 {
        let n = value_of(i, &mut v);
        c.insert(&key(i), 1, &v[..n], 0);
    }
    for i in 0..200 {
        c.remove(&key(i));
    }
    let other = target_tag("other");
    for i in 0..300 {
        let k = KeyBuilder::new("other").input(&[i as u8, 7]).finish();
        c.insert(&k, other, &[1.0], 1); // expired at once
    }
    for i in 0..300 {
        let k = KeyBuilder::new("other2").input(&[i as u8, 9]).finish();
        c.insert(&k, 2, &[2.0], 0); // may take the expired slots
    }
    c.purge_target(other);
    let text = inspect(&p).unwrap();
    let occupied = scanned(&text, "live") + scanned(&text, "expired");
    let st = c.stats();
    assert_eq!(st.occupancy, occupied, "counter vs a scan of the file");
    assert!(occupied > 0 && occupied < geo.slots(), "{occupied}");

    // Mark an empty slot occupied behind the cache's back (through the file,
    // which the mapping shares): a scrape that scans the slots would count
    // it; the counter must not move. O(slots) per scrape is what this rules
    // out (a 64 GiB file has 500 M slots).
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let empty = (0..geo.slots())
            .map(|i| 4096 + i * geo.slot_size as u64)
            .find(|&o| {
                let mut lf = [0u8; 8];
                f.seek(SeekFrom::Start(o + 40)).unwrap();
                f.read_exact(&mut lf).unwrap();
                lf[4] & 1 == 0
            })
            .expect("an empty slot");
        f.seek(SeekFrom::Start(empty + 44)).unwrap();
        f.write_all(&[1]).unwrap();
    }
    let text = inspect(&p).unwrap();
    let seen = scanned(&text, "live") + scanned(&text, "expired") + scanned(&text, "corrupt");
    assert_eq!(seen, occupied + 1, "the forged slot is visible to a scan");
    assert_eq!(
        c.stats().occupancy,
        st.occupancy,
        "stats() must read a counter, not scan the slots"
    );
    drop(c);
    cleanup(&p);
}

#[test]
fn cache_l2_file_shorter_than_its_header_is_never_mapped() {
    // A valid header over a file cut short (a failed copy, a truncate):
    // inspect and open compare the length with the header before mapping.
    let p = tmp("cut");
    let file_bytes = {
        let (c, _) = L2Cache::open(&p, SMALL).unwrap();
        c.insert(&key(1), 1, &[1.0], 0);
        c.geometry().file_bytes
    };
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(file_bytes / 2).unwrap();
    drop(f);
    let e = inspect(&p).expect_err("a short file is refused");
    assert!(e.contains("header says"), "{e}");
    let (c, report) = L2Cache::open(&p, SMALL).unwrap();
    assert!(report.created, "{report:?}");
    assert!(report.reason.unwrap().contains("header says"));
    let mut out = [0f32; 16];
    assert_eq!(c.get(&key(1), &mut out), None);
    drop(c);
    cleanup(&p);
}
