#!/usr/bin/env python3
"""Tree-model inference, one thread, batch 1 / 32 / 128: the libraries and compiled anchors.

    python3 perf/trees_bench.py prepare DIR   # train the bench models, write DIR/*.json|txt, DIR/rows.csv
    python3 perf/trees_bench.py time DIR      # time xgboost / lightgbm / tl2cgen / lleaves on them

perf/trees.sh runs both and `cargo bench --bench trees` on the same files (docs in
perf/trees.md). Each figure: ns per row, median of 7 runs of >= 50 ms, batches taken in turn
from the 1024 rows of rows.csv, from Python (so batch 1 includes each library's per-call cost,
as it does for a Python service). Anchors that do not import are skipped with a line saying so.
"""

import os
import sys
import time

import numpy as np

BATCHES = [1, 32, 128]


def prepare(d):
    import lightgbm as lgb
    import xgboost as xgb
    from sklearn.datasets import load_breast_cancer, make_classification
    from sklearn.model_selection import train_test_split

    os.makedirs(d, exist_ok=True)
    # "Fraud-sized": 50 features, 500 trees. Synthetic (make_classification) so trees grow full.
    X, y = make_classification(n_samples=40000, n_features=50, n_informative=30, random_state=0)
    X = X.astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=1024, random_state=0)
    xgb.XGBClassifier(n_estimators=500, max_depth=6, n_jobs=2, random_state=0).fit(Xtr, ytr) \
        .get_booster().save_model(os.path.join(d, "xgb_500x_d6.json"))
    lgb.LGBMClassifier(n_estimators=500, num_leaves=63, n_jobs=2, random_state=0, verbose=-1) \
        .fit(Xtr, ytr).booster_.save_model(os.path.join(d, "lgb_500x_l63.txt"))
    with open(os.path.join(d, "rows.csv"), "w") as f:
        for row in Xte:
            f.write(",".join(str(np.float32(v)) for v in row) + "\n")


def rows(d):
    return np.loadtxt(os.path.join(d, "rows.csv"), delimiter=",", dtype=np.float32)


def timeit(fn, X, b):
    starts = list(range(0, len(X) - b + 1, b))
    samples = []
    for _ in range(7):
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.05:
            for s in starts:
                fn(X[s:s + b])
                done += b
        samples.append((time.perf_counter() - t0) * 1e9 / done)
    return sorted(samples)[len(samples) // 2]


def run_time(d):
    import lightgbm as lgb
    import xgboost as xgb

    X = rows(d)
    files = sorted(f for f in os.listdir(d) if f.endswith((".json", ".txt")))
    print(f"{'model':<22} {'runtime':<26} " + " ".join(f"{'b=' + str(b):>10}" for b in BATCHES) + "   ns/row")
    for f in files:
        path = os.path.join(d, f)
        runners = {}
        if f.endswith(".json"):
            bst = xgb.Booster(model_file=path)
            bst.set_param({"nthread": 1})
            runners[f"xgboost {xgb.__version__} inplace"] = lambda x, b=bst: b.inplace_predict(x)
        else:
            bst = lgb.Booster(model_file=path)
            runners[f"lightgbm {lgb.__version__}"] = lambda x, b=bst: b.predict(x, num_threads=1)
        try:
            import tl2cgen
            import treelite
            tm = (treelite.frontend.load_xgboost_model(path) if f.endswith(".json")
                  else treelite.frontend.load_lightgbm_model(path))
            lib = os.path.join(d, f + ".so")
            if not os.path.exists(lib):
                tl2cgen.export_lib(tm, toolchain="gcc", libpath=lib, params={"parallel_comp": 8})
            pred = tl2cgen.Predictor(lib, nthread=1)
            runners[f"tl2cgen {tl2cgen.__version__}"] = lambda x, p=pred: p.predict(tl2cgen.DMatrix(x))
        except Exception as e:  # noqa: BLE001
            print(f"  (tl2cgen skipped for {f}: {type(e).__name__}: {e})")
        if f.endswith(".txt"):
            try:
                import lleaves
                m = lleaves.Model(model_file=path)
                m.compile(cache=os.path.join(d, f + ".lleaves.o"))
                runners["lleaves"] = lambda x, m=m: m.predict(x, n_jobs=1)
            except Exception as e:  # noqa: BLE001
                print(f"  (lleaves skipped for {f}: {type(e).__name__}: {e})")
        for name, fn in runners.items():
            cells = [timeit(fn, X, b) for b in BATCHES]
            print(f"{f:<22} {name:<26} " + " ".join(f"{c:>10.1f}" for c in cells))
        sys.stdout.flush()


if __name__ == "__main__":
    cmd, d = sys.argv[1], sys.argv[2]
    {"prepare": prepare, "time": run_time}[cmd](d)
