#!/usr/bin/env python3
"""Export a trained XGBoost or LightGBM model into a beast model repository.

Library use (from your own training script):

    from export_trees import export_trees
    export_trees(clf, "models/fraud_gbt", version=1, classes=["ok", "fraud"])

`clf` may be an xgboost `XGBClassifier`/`XGBRegressor`/`Booster` or a lightgbm
`LGBMClassifier`/`LGBMRegressor`/`Booster`. It writes

    <model_dir>/model.toml          kind = "trees", format, input_width, task, classes
    <model_dir>/<version>/model.json   (XGBoost, Booster.save_model)
    <model_dir>/<version>/model.txt    (LightGBM, Booster.save_model)

(docs/MODELS.md, "Tree models"). `beast import-trees m.json --out DIR` does the same
from a saved file. beast serves binary:logistic / binary, multi:softprob / multiclass
and the squared/absolute-error regressions; it refuses categorical splits, linear trees,
DART and ranking objectives with a message when it loads the folder.

As a script:

    python3 tools/export_trees.py MODEL_FILE --out models/NAME [--version 1] [--classes a,b]

copies a saved model file (.json: XGBoost, .txt: LightGBM) into the folder.
"""

import argparse
import json
import os
import shutil
import sys


def _booster_of(model):
    """(library, booster) of an xgboost/lightgbm model or booster."""
    mod = type(model).__module__
    if mod.startswith("xgboost"):
        return "xgboost", model.get_booster() if hasattr(model, "get_booster") else model
    if mod.startswith("lightgbm"):
        return "lightgbm", model.booster_ if hasattr(model, "booster_") else model
    raise TypeError(f"{type(model).__name__}: not an xgboost or lightgbm model")


def _describe(path):
    """(format, input_width, task) of a saved model file."""
    if path.endswith(".json"):
        with open(path) as f:
            j = json.load(f)
        p = j["learner"]["learner_model_param"]
        obj = j["learner"]["objective"]["name"]
        task = "regression" if obj.startswith("reg:") else "classification"
        return "xgboost-json", int(p["num_feature"]), task
    with open(path) as f:
        head = {}
        for line in f:
            if line.startswith("Tree="):
                break
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                head[k] = v
    obj = head.get("objective", "").split()[0] if head.get("objective") else ""
    task = "classification" if obj in ("binary", "multiclass", "softmax") else "regression"
    return "lightgbm-text", int(head["max_feature_idx"]) + 1, task


def write_manifest(model_dir, fmt, input_width, task, classes=None, **batching):
    lines = ['kind = "trees"', f'format = "{fmt}"', f"input_width = {input_width}",
             f'task = "{task}"']
    if classes:
        lines.append("classes = [" + ", ".join(json.dumps(str(c)) for c in classes) + "]")
    text = "\n".join(lines) + "\n"
    if batching:
        text += "\n[batching]\n" + "".join(f"{k} = {int(v)}\n" for k, v in batching.items())
    path = os.path.join(model_dir, "model.toml")
    if os.path.exists(path):
        with open(path) as f:
            if f.read() != text:
                raise FileExistsError(f"{path}: exists with other content (all versions share it)")
    with open(path, "w") as f:
        f.write(text)


def export_file(model_file, model_dir, version=1, classes=None, **batching):
    """Copy a saved model file into `<model_dir>/<version>/` and write model.toml."""
    fmt, width, task = _describe(model_file)
    vdir = os.path.join(model_dir, str(int(version)))
    os.makedirs(vdir, exist_ok=True)
    name = "model.json" if fmt == "xgboost-json" else "model.txt"
    shutil.copyfile(model_file, os.path.join(vdir, name))
    write_manifest(model_dir, fmt, width, task, classes, **batching)
    return os.path.join(vdir, name)


def export_trees(model, model_dir, version=1, classes=None, **batching):
    """Save a trained xgboost/lightgbm model as a beast tree model folder."""
    lib, booster = _booster_of(model)
    if classes is None and hasattr(model, "classes_"):
        classes = [str(c) for c in model.classes_]
    vdir = os.path.join(model_dir, str(int(version)))
    os.makedirs(vdir, exist_ok=True)
    path = os.path.join(vdir, "model.json" if lib == "xgboost" else "model.txt")
    booster.save_model(path)
    fmt, width, task = _describe(path)
    if task == "regression":
        classes = None
    write_manifest(model_dir, fmt, width, task, classes, **batching)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_file", help="saved model: .json (XGBoost) or .txt (LightGBM)")
    ap.add_argument("--out", required=True, help="model folder (models/NAME)")
    ap.add_argument("--version", type=int, default=1)
    ap.add_argument("--classes", help="class names, comma-separated")
    a = ap.parse_args(argv)
    classes = a.classes.split(",") if a.classes else None
    path = export_file(a.model_file, a.out, a.version, classes)
    print(f"wrote {path} and {os.path.join(a.out, 'model.toml')}", file=sys.stderr)


if __name__ == "__main__":
    main()
