//! The tree evaluator allocates nothing per batch once warm: a counting
//! global allocator counts this thread's allocations while the CPU backend
//! runs tree models (XGBoost f32 and LightGBM f64 sums, binary and
//! multiclass) at batch 1, 7, 64 and 200 after one warm-up run of the
//! largest batch.

use beast::backend::Backend;
use beast::model::trees::TreeFormat;
use beast::model::Model;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = COUNTING.try_with(|c| {
            if c.get() {
                let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
            }
        });
        // SAFETY: forwarded as is to the system allocator.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded as is to the system allocator.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn load(file: &str) -> Model {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/trees")
        .join(file);
    let fmt = if file.ends_with(".json") {
        TreeFormat::XgboostJson
    } else {
        TreeFormat::LightgbmText
    };
    let forest = fmt.parse(&std::fs::read(path).unwrap()).unwrap();
    Model::from_forest(file, 1, forest, Default::default(), 0)
}

#[test]
fn tree_batches_allocate_nothing_once_warm() {
    let models = [
        load("xgb_binary.json"),
        load("lgb_multi.txt"),
        load("lgb_reg.txt"),
    ];
    let mut cpu = beast::backend::cpu::CpuBackend::new();
    for m in &models {
        let rows_max = 200;
        let x: Vec<f32> = (0..rows_max * m.input_width)
            .map(|i| ((i * 7919) % 1000) as f32 / 10.0)
            .collect();
        let mut out = vec![0.0f32; rows_max * m.output_width];
        cpu.run(m, &x, rows_max, &mut out).unwrap();
        COUNTING.with(|c| c.set(true));
        for rows in [1, 7, 64, 200] {
            for _ in 0..10 {
                cpu.run(
                    m,
                    &x[..rows * m.input_width],
                    rows,
                    &mut out[..rows * m.output_width],
                )
                .unwrap();
            }
        }
        COUNTING.with(|c| c.set(false));
        let n = ALLOCS.with(|a| a.replace(0));
        assert_eq!(n, 0, "{}: {n} allocations in 40 warm batches", m.name);
    }
}
