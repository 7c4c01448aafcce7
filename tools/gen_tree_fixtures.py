#!/usr/bin/env python3
"""Generate the tree-model test fixtures in tests/fixtures/trees/ (committed).

    python3 tools/gen_tree_fixtures.py            # rewrites tests/fixtures/trees/

Small XGBoost and LightGBM models trained on data sets scikit-learn ships (no network):
breast_cancer (binary), wine (multiclass), diabetes (regression); 10% of the training
and held-out feature values are set to NaN so the models learn default directions and
the held-out rows exercise them. For each model it writes the model file and the
library's own predictions on the held-out rows:

    <model>.json | <model>.txt
    <model>.expect.csv       margin_0..margin_{G-1} (output_margin / raw_score),
                             out_0..out_{K-1} (predict_proba, or predict for regression)
    rows_<dataset>.csv       the held-out rows (float32, 'nan' for missing)
    VERSIONS.txt             library versions the fixtures were made with

and the mixed tree + MLP repository of the README's cascade table:

    cancer/cancer_gbt        XGBoost binary classifier (kind = "trees")
    cancer/cancer_mlp        scikit-learn MLP 30-256-256-2 (scaler folded into layer 0)
    cancer/ensembles.toml    [ensembles.cancer]: cascade, tree first
    cancer/cancer_holdout.csv  held-out rows with a label column (no NaN)
    cancer/cancer_calibration.csv  rows the cascade threshold is derived from

Everything is seeded, so a rerun with the same library versions writes the same bytes.
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
OUT = os.path.join(HERE, "..", "tests", "fixtures", "trees")


def fmt(x):
    return "nan" if np.isnan(x) else str(np.float32(x))


def write_rows(path, X, header=None, labels=None):
    with open(path, "w") as f:
        if header:
            f.write(",".join(header) + "\n")
        for i, row in enumerate(X):
            cells = [fmt(v) for v in row]
            if labels is not None:
                cells.append(str(int(labels[i])))
            f.write(",".join(cells) + "\n")


def write_expect(path, margins, outs):
    margins = np.asarray(margins, dtype=np.float64).reshape(len(margins), -1)
    outs = np.asarray(outs, dtype=np.float64).reshape(len(outs), -1)
    head = [f"margin_{i}" for i in range(margins.shape[1])] + [f"out_{i}" for i in range(outs.shape[1])]
    with open(path, "w") as f:
        f.write(",".join(head) + "\n")
        for m, o in zip(margins, outs):
            f.write(",".join(repr(float(v)) for v in list(m) + list(o)) + "\n")


def split_with_nan(X, y, seed):
    from sklearn.model_selection import train_test_split
    rng = np.random.default_rng(seed)
    X = X.astype(np.float32).copy()
    X[rng.random(X.shape) < 0.10] = np.nan
    return train_test_split(X, y, test_size=0.3, random_state=seed)


def main():
    import lightgbm as lgb
    import sklearn
    import xgboost as xgb
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine

    os.makedirs(OUT, exist_ok=True)
    sets = {
        "cancer": (load_breast_cancer(return_X_y=True), "binary"),
        "wine": (load_wine(return_X_y=True), "multi"),
        "diabetes": (load_diabetes(return_X_y=True), "reg"),
    }
    for ds, ((X, y), kind) in sets.items():
        Xtr, Xte, ytr, yte = split_with_nan(X, y, seed=7)
        write_rows(os.path.join(OUT, f"rows_{ds}.csv"), Xte)
        # XGBoost
        params = dict(n_estimators=40, max_depth=4, learning_rate=0.2, random_state=0, n_jobs=1)
        if kind == "reg":
            m = xgb.XGBRegressor(**params).fit(Xtr, ytr)
        else:
            m = xgb.XGBClassifier(**params).fit(Xtr, ytr)
        b = m.get_booster()
        path = os.path.join(OUT, f"xgb_{kind}.json")
        b.save_model(path)
        b = xgb.Booster(model_file=path)  # predict from the saved file, as beast does
        d = xgb.DMatrix(Xte)
        margins = b.predict(d, output_margin=True)
        outs = b.predict(d)
        if kind == "binary":
            outs = np.stack([1 - outs, outs], axis=1)
        write_expect(os.path.join(OUT, f"xgb_{kind}.expect.csv"), margins, outs)
        # LightGBM
        params = dict(n_estimators=40, num_leaves=15, learning_rate=0.2, random_state=0,
                      n_jobs=1, verbose=-1, min_child_samples=5)
        if kind == "reg":
            m = lgb.LGBMRegressor(**params).fit(Xtr, ytr)
        else:
            m = lgb.LGBMClassifier(**params).fit(Xtr, ytr)
        path = os.path.join(OUT, f"lgb_{kind}.txt")
        m.booster_.save_model(path)
        b = lgb.Booster(model_file=path)
        margins = b.predict(Xte, raw_score=True)
        outs = b.predict(Xte)
        if kind == "binary":
            outs = np.stack([1 - outs, outs], axis=1)
        write_expect(os.path.join(OUT, f"lgb_{kind}.expect.csv"), margins, outs)
        if kind == "binary":
            # Missing type "zero": zeros (and NaN) take the default direction.
            Xz = np.nan_to_num(Xtr, nan=0.0)
            m = lgb.LGBMClassifier(**params, zero_as_missing=True).fit(Xz, ytr)
            path = os.path.join(OUT, "lgb_zero.txt")
            m.booster_.save_model(path)
            b = lgb.Booster(model_file=path)
            margins = b.predict(Xte, raw_score=True)
            outs = b.predict(Xte)
            write_expect(os.path.join(OUT, "lgb_zero.expect.csv"), margins,
                         np.stack([1 - outs, outs], axis=1))

    cancer_repository(xgb)
    with open(os.path.join(OUT, "VERSIONS.txt"), "w") as f:
        f.write(f"xgboost {xgb.__version__}\nlightgbm {lgb.__version__}\n"
                f"scikit-learn {sklearn.__version__}\nnumpy {np.__version__}\n"
                f"python {sys.version.split()[0]}\n")
    print(f"wrote {os.path.normpath(OUT)}", file=sys.stderr)


def cancer_repository(xgb):
    """The mixed tree + MLP ensemble of the README's cascade table."""
    from export_sklearn import write_model
    from export_trees import export_trees
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    repo = os.path.join(OUT, "cancer")
    X, y = load_breast_cancer(return_X_y=True)
    X = X.astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.5, random_state=3, stratify=y)
    # Half of the other half calibrates the cascade threshold, the rest is held out.
    Xcal, Xte, ycal, yte = train_test_split(Xte, yte, test_size=0.6, random_state=4, stratify=yte)
    gbt = xgb.XGBClassifier(n_estimators=40, max_depth=3, learning_rate=0.3, random_state=0,
                            n_jobs=1).fit(Xtr, ytr)
    if os.path.exists(os.path.join(repo, "cancer_gbt", "model.toml")):
        os.remove(os.path.join(repo, "cancer_gbt", "model.toml"))
    export_trees(gbt, os.path.join(repo, "cancer_gbt"), classes=["malignant", "benign"])
    mu, sd = Xtr.mean(axis=0), Xtr.std(axis=0) + 1e-6
    mlp = MLPClassifier(hidden_layer_sizes=(256, 256), max_iter=600, random_state=0)
    mlp.fit((Xtr - mu) / sd, ytr)
    # Fold the standardisation into layer 0: ((x - mu) / sd) @ W + b.
    W0 = mlp.coefs_[0] / sd[:, None]
    b0 = mlp.intercepts_[0] - (mu / sd) @ mlp.coefs_[0]
    # One logistic output z → two softmax columns [0, z]: [1 - sigmoid(z), sigmoid(z)].
    w2, b2 = mlp.coefs_[-1], mlp.intercepts_[-1]
    W2 = np.concatenate([np.zeros_like(w2), w2], axis=1)
    B2 = np.concatenate([np.zeros_like(b2), b2])
    write_model(os.path.join(repo, "cancer_mlp"), [W0, mlp.coefs_[1], W2], [b0, mlp.intercepts_[1], B2],
                ["relu", "relu", "identity"], "softmax")
    with open(os.path.join(repo, "ensembles.toml"), "w") as f:
        f.write("# A cheap tree model first, the MLP only for the rows it is unsure of.\n"
                "[ensembles.cancer]\n"
                'members = ["cancer_gbt", "cancer_mlp"]\n'
                'combiner = "mean"\n'
                'policy = "cascade"\n'
                "# The threshold is derived at start-up: the smallest whose answers agree\n"
                "# with running both members on every calibration row.\n"
                "cascade_target_agreement = 1.0\n"
                'calibration = "cancer_calibration.csv"\n')
    header = [f"f{i}" for i in range(X.shape[1])] + ["label"]
    write_rows(os.path.join(repo, "cancer_holdout.csv"), Xte, header, yte)
    write_rows(os.path.join(repo, "cancer_calibration.csv"), Xcal, header, ycal)
    acc = lambda p: float((p.argmax(axis=1) == yte).mean())
    pg = gbt.predict_proba(Xte)
    pm = mlp.predict_proba((Xte - mu) / sd)
    print(f"cancer holdout ({len(yte)} rows): gbt {acc(pg):.4f}, mlp {acc(pm):.4f}, "
          f"mean {acc((pg + pm) / 2):.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
