#!/usr/bin/env python3
"""Build the tabular test fixtures of tests/tabular.rs: small scikit-learn models on data
sets the digits ensemble never used, exported with tools/export_sklearn.py, plus held-out
rows and what scikit-learn itself answers on them (so the tests need no Python).

    python3 tools/make_fixtures.py --out tests/fixtures/tabular

Everything is deterministic (fixed seeds, bundled data sets, no network). Written:

- `bc_small`, `bc_medium`, `bc_large`: binary MLPClassifiers on breast_cancer (30
  features, 2 classes), trained on features divided by their training maximum (the
  held-out CSV holds the divided rows, so these models need no [preprocess]); exported
  as scikit-learn has them, one sigmoid unit. Ensembles `bc` (mean), `bc_vote` (vote),
  `bc_cascade` (cascade, threshold calibrated at start-up on the held-out rows).
- `bc_std`: Pipeline(StandardScaler, MLPClassifier) on the raw breast_cancer features,
  exported with its scaler as [preprocess] and its class names.
- `wine_mm`: Pipeline(MinMaxScaler(clip=True), MLPClassifier) on wine (13 features, 3
  classes), with class names.
- `diab_a`, `diab_b`, `diab_c`: Pipeline(StandardScaler, MLPRegressor) on diabetes (10
  features, one target); ensembles `diab` (mean), `diab_median` (median), `diab_w`
  (weighted_mean).
- `<set>_holdout.csv` (features, `label`), `<model>.expected.csv` (scikit-learn's
  predict_proba, or predict for a regressor, on those rows, one row each).
- `VERSIONS` (the library versions that produced the files).
"""

import argparse
import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_sklearn import export_sklearn_mlp, write_ensembles  # noqa: E402

BATCHING = dict(max_batch=64, max_queue_delay_us=100, queue_rows_max=4096)


def write_csv(path, x, y, label_fmt):
    with open(path, "w") as f:
        f.write(",".join([f"x{i}" for i in range(x.shape[1])] + ["label"]) + "\n")
        for row, label in zip(x, y):
            # float32 printed with 9 significant digits reads back exactly.
            f.write(",".join(f"{float(v):.9g}" for v in row) + "," + label_fmt(label) + "\n")


def write_expected(path, out):
    out = np.asarray(out, dtype=np.float64)
    if out.ndim == 1:
        out = out[:, None]
    with open(path, "w") as f:
        for row in out:
            f.write(",".join(f"{v:.9g}" for v in row) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/tabular")
    ap.add_argument("--overwrite", action="store_true", help="replace the files already there")
    ap.add_argument("--max-iter", type=int, default=0,
                    help="train this many iterations instead (a quick run: model.toml files are "
                         "the same, weights are not; tests/tabular.rs compares only model.toml)")
    args = ap.parse_args(argv)
    out = args.out
    BATCHING["overwrite"] = args.overwrite

    import sklearn
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    os.makedirs(out, exist_ok=True)
    ensembles = {}

    # --- breast_cancer, binary, no scaler in the model ------------------------------
    bc = load_breast_cancer()
    x_tr, x_te, y_tr, y_te = train_test_split(
        bc.data, bc.target, test_size=0.3, random_state=0, stratify=bc.target)
    top = x_tr.max(axis=0)
    xs_tr = (x_tr / top).astype(np.float32)
    xs_te = (x_te / top).astype(np.float32)
    write_csv(os.path.join(out, "breast_cancer_holdout.csv"), xs_te, y_te, str)
    for name, hidden, seed in [("bc_small", (4,), 3), ("bc_medium", (16,), 2),
                               ("bc_large", (64, 32), 3)]:
        clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=args.max_iter or 300, random_state=seed)
        clf.fit(xs_tr, y_tr)
        export_sklearn_mlp(clf, os.path.join(out, name), classes=(), **BATCHING)
        write_expected(os.path.join(out, f"{name}.expected.csv"), clf.predict_proba(xs_te))
        print(f"{name}: held-out accuracy {clf.score(xs_te, y_te) * 100:.2f}%")
    members = ["bc_small", "bc_medium", "bc_large"]
    ensembles["bc"] = (members, "mean", None)
    ensembles["bc_vote"] = (members, "vote", None)

    # --- breast_cancer raw features behind a StandardScaler -------------------------
    write_csv(os.path.join(out, "breast_cancer_raw_holdout.csv"), x_te.astype(np.float32), y_te, str)
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(16,), max_iter=args.max_iter or 300,
                                                         random_state=1))
    pipe.fit(x_tr.astype(np.float32), y_tr)
    export_sklearn_mlp(pipe, os.path.join(out, "bc_std"), classes=list(bc.target_names), **BATCHING)
    write_expected(os.path.join(out, "bc_std.expected.csv"),
                   pipe.predict_proba(x_te.astype(np.float32)))
    print(f"bc_std: held-out accuracy {pipe.score(x_te.astype(np.float32), y_te) * 100:.2f}%")

    # --- wine, 3 classes, MinMaxScaler(clip=True) ------------------------------------
    wine = load_wine()
    w_tr, w_te, wy_tr, wy_te = train_test_split(
        wine.data.astype(np.float32), wine.target, test_size=0.3, random_state=0,
        stratify=wine.target)
    write_csv(os.path.join(out, "wine_holdout.csv"), w_te, wy_te, str)
    pipe = make_pipeline(MinMaxScaler(clip=True), MLPClassifier(hidden_layer_sizes=(16,),
                                                               max_iter=args.max_iter or 500, random_state=1))
    pipe.fit(w_tr, wy_tr)
    export_sklearn_mlp(pipe, os.path.join(out, "wine_mm"), classes=list(wine.target_names),
                       **BATCHING)
    write_expected(os.path.join(out, "wine_mm.expected.csv"), pipe.predict_proba(w_te))
    print(f"wine_mm: held-out accuracy {pipe.score(w_te, wy_te) * 100:.2f}%")

    # --- diabetes regression behind a StandardScaler ---------------------------------
    diab = load_diabetes()
    d_tr, d_te, dy_tr, dy_te = train_test_split(
        diab.data.astype(np.float32), diab.target, test_size=0.3, random_state=0)
    write_csv(os.path.join(out, "diabetes_holdout.csv"), d_te, dy_te, lambda v: f"{v:g}")
    names = []
    for name, hidden, seed in [("diab_a", (8,), 1), ("diab_b", (32,), 2), ("diab_c", (64, 16), 3)]:
        pipe = make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=hidden,
                                                            learning_rate_init=0.01,
                                                            max_iter=args.max_iter or 300, random_state=seed))
        pipe.fit(d_tr, dy_tr)
        export_sklearn_mlp(pipe, os.path.join(out, name), **BATCHING)
        pred = pipe.predict(d_te)
        write_expected(os.path.join(out, f"{name}.expected.csv"), pred)
        print(f"{name}: held-out MAE {np.abs(pred - dy_te).mean():.2f}")
        names.append(name)
    ensembles["diab"] = (names, "mean", None)
    ensembles["diab_median"] = (names, "median", None)
    ensembles["diab_w"] = (names, "weighted_mean", [1.0, 2.0, 1.0])

    if os.path.exists(os.path.join(out, "ensembles.toml")):
        os.remove(os.path.join(out, "ensembles.toml"))
    write_ensembles(os.path.join(out, "ensembles.toml"), ensembles)
    with open(os.path.join(out, "ensembles.toml"), "a") as f:
        f.write('\n[ensembles.bc_cascade]\nmembers = ["bc_small", "bc_medium", "bc_large"]\n'
                'combiner = "mean"\npolicy = "cascade"\ncascade_target_agreement = 0.99\n'
                'calibration = "breast_cancer_holdout.csv"\n')
    with open(os.path.join(out, "VERSIONS"), "w") as f:
        f.write(f"python {sys.version.split()[0]}\nnumpy {np.__version__}\n"
                f"scikit-learn {sklearn.__version__}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
