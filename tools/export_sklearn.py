#!/usr/bin/env python3
"""Export MLPs into a beast model repository, and build the shipped `digits` ensemble.

Library use (from your own training script):

    from export_sklearn import export_sklearn_mlp, export_torch_sequential
    export_sklearn_mlp(clf, "models/my_model", version=1)
    export_torch_sequential(seq, "models/my_torch_model", input_width=64, output="softmax")

Each writes `<model_dir>/model.toml` and `<model_dir>/<version>/weights.safetensors`
(FP16 tensors `layers.{i}.weight` [in, out] and `layers.{i}.bias` [out]); the format is
documented in docs/MODELS.md. The safetensors file is written by hand (it is an 8-byte
little-endian header length, a JSON header, then the raw tensor bytes), so the only
requirement is numpy; torch is imported only by `export_torch_sequential`.

Run as a script it trains the three digits MLPs on scikit-learn's bundled digits data
(no network needed), writes them into --out (refusing to replace existing weights unless
--overwrite), merges `digits` into --out's `ensembles.toml` (other entries, such as
`digits_cascade`, are kept), writes the held-out split to `digits_holdout.csv`, and prints
the held-out accuracy of each member and of the ensemble computed in float32 with the
FP16-rounded weights the server uses. To check the committed models:

    python3 tools/export_sklearn.py --out /tmp/digits && cmp /tmp/digits/digits_small/1/weights.safetensors models/digits_small/1/weights.safetensors
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

# scikit-learn activation name -> beast activation name.
SKLEARN_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "logistic": "sigmoid", "identity": "identity"}


# ---------------------------------------------------------------------------------------
# Writing the repository format
# ---------------------------------------------------------------------------------------

def write_safetensors(path, tensors):
    """Write {name: np.ndarray} as a safetensors file, deterministic bytes.

    Tensors are laid out in name order; every dtype written here is 2 or 4 bytes wide and
    the header is padded to a multiple of 8, so each tensor starts aligned to its element
    size (beast maps F16 tensors in place when they are 2-byte aligned).
    """
    dtypes = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}
    header = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in dtypes:
            raise ValueError(f"{name}: dtype {arr.dtype} not supported (float16/float32)")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtypes[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def _toml_list(v):
    # float32 values printed so that they read back to the same float32.
    return "[" + ", ".join(repr(float(np.float32(x))) for x in np.asarray(v).ravel()) + "]"


def write_model(model_dir, weights, biases, activations, output, version=1,
                max_batch=64, max_queue_delay_us=100, queue_rows_max=4096,
                task=None, classes=None, preprocess=None, layer_norms=None,
                layer_norm_eps=1e-5, overwrite=False):
    """Write one model: `weights[i]` is [in, out], `biases[i]` is [out]; stored as FP16.

    task: None (classification) or "regression". classes: one name per output column (a
    binary classifier with one sigmoid unit is served as two classes: give two names).
    preprocess: {"standardize": (mean, scale)} or {"min_max": (scale, min)}, optionally
    with "clip": (lo, hi). layer_norms: per layer None or (gamma, beta).
    Refuses to replace an existing version's weights unless `overwrite`.
    """
    if len(weights) != len(biases) or len(weights) != len(activations):
        raise ValueError("weights, biases and activations must have one entry per layer")
    if output not in ("softmax", "sigmoid", "identity"):
        raise ValueError(f"output {output!r}: expected softmax, sigmoid or identity")
    wpath = os.path.join(model_dir, str(version), "weights.safetensors")
    if os.path.exists(wpath) and not overwrite:
        raise FileExistsError(f"{wpath}: exists (write a new version, or pass overwrite=True)")
    layer_norms = layer_norms or [None] * len(weights)
    tensors = {}
    in_width = weights[0].shape[0]
    prev = in_width
    for i, (w, b) in enumerate(zip(weights, biases)):
        w = np.asarray(w)
        b = np.asarray(b)
        if w.ndim != 2 or w.shape[0] != prev or b.shape != (w.shape[1],):
            raise ValueError(f"layer {i}: weight {w.shape} / bias {b.shape} do not chain from width {prev}")
        f16w = w.astype(np.float16)
        f16b = b.astype(np.float16)
        if not (np.isfinite(f16w).all() and np.isfinite(f16b).all()):
            raise ValueError(f"layer {i}: weights overflow FP16 (|w| > 65504) or are not finite")
        tensors[f"layers.{i}.weight"] = f16w
        tensors[f"layers.{i}.bias"] = f16b
        if layer_norms[i] is not None:
            g, be = layer_norms[i]
            tensors[f"layers.{i}.ln_gamma"] = np.asarray(g, np.float32)
            tensors[f"layers.{i}.ln_beta"] = np.asarray(be, np.float32)
        prev = w.shape[1]
    lines = [
        f"input_width = {in_width}",
        f'output = "{output}"',
    ]
    if task == "regression":
        lines.append('task = "regression"')
    elif task not in (None, "classification"):
        raise ValueError(f"task {task!r}: expected classification or regression")
    if classes:
        lines.append("classes = [" + ", ".join(json.dumps(str(c)) for c in classes) + "]")
    if any(ln is not None for ln in layer_norms):
        lines.append(f"layer_norm_eps = {float(layer_norm_eps)!r}")
    lines.append("layers = [")
    for w, act, ln in zip(weights, activations, layer_norms):
        extra = ", layer_norm = true" if ln is not None else ""
        lines.append(f'  {{ units = {w.shape[1]}, activation = "{act}"{extra} }},')
    lines += [
        "]",
        "",
        "[batching]",
        f"max_batch = {max_batch}",
        f"max_queue_delay_us = {max_queue_delay_us}",
        f"queue_rows_max = {queue_rows_max}",
        "",
    ]
    if preprocess:
        lines.append("[preprocess]")
        if "standardize" in preprocess:
            mean, scale = preprocess["standardize"]
            lines.append(f"standardize = {{ mean = {_toml_list(mean)}, scale = {_toml_list(scale)} }}")
        if "min_max" in preprocess:
            scale, mn = preprocess["min_max"]
            lines.append(f"min_max = {{ scale = {_toml_list(scale)}, min = {_toml_list(mn)} }}")
        if "clip" in preprocess:
            lo, hi = preprocess["clip"]
            lines.append(f"clip = {{ min = {float(lo)!r}, max = {float(hi)!r} }}")
        lines.append("")
    os.makedirs(os.path.join(model_dir, str(version)), exist_ok=True)
    with open(os.path.join(model_dir, "model.toml"), "w") as f:
        f.write("\n".join(lines))
    write_safetensors(wpath, tensors)


def sklearn_preprocess(steps):
    """The [preprocess] of a Pipeline's steps before the MLP: at most one StandardScaler
    or MinMaxScaler ('passthrough' steps are skipped); anything else is refused."""
    from sklearn.preprocessing import MinMaxScaler, StandardScaler
    pre = {}
    for step in steps:
        if step is None or step == "passthrough":
            continue
        if pre:
            raise ValueError(f"{type(step).__name__}: only one scaler is supported in a pipeline")
        if isinstance(step, StandardScaler):
            n = step.n_features_in_
            mean = step.mean_ if step.mean_ is not None else np.zeros(n)
            scale = step.scale_ if step.scale_ is not None else np.ones(n)
            pre["standardize"] = (mean, scale)
        elif isinstance(step, MinMaxScaler):
            pre["min_max"] = (step.scale_, step.min_)
            if step.clip:
                pre["clip"] = step.feature_range
        else:
            raise ValueError(f"{type(step).__name__}: unsupported pipeline step "
                             "(StandardScaler, MinMaxScaler, then MLPClassifier or MLPRegressor)")
    return pre or None


def export_sklearn_mlp(est, model_dir, version=1, classes=None, overwrite=False, **batching):
    """Export a fitted MLPClassifier or MLPRegressor (coefs_ are already [in, out]), or a
    Pipeline of a StandardScaler/MinMaxScaler and one of those (the scaler becomes the
    model's [preprocess]). A classifier's class names default to str(classes_); a binary
    classifier (one sigmoid unit) is served as two classes."""
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import Pipeline
    pre = None
    clf = est
    if isinstance(est, Pipeline):
        steps = [s for _, s in est.steps]
        clf = steps[-1]
        pre = sklearn_preprocess(steps[:-1])
    if not isinstance(clf, (MLPClassifier, MLPRegressor)):
        raise ValueError(f"{type(clf).__name__}: expected MLPClassifier or MLPRegressor")
    act = SKLEARN_ACTIVATIONS.get(clf.activation)
    if act is None:
        raise ValueError(f"activation {clf.activation!r} has no beast equivalent")
    n_layers = len(clf.coefs_)
    acts = [act] * (n_layers - 1) + ["identity"]
    # sklearn's out_activation_ is softmax for multi-class, logistic for binary/multi-label.
    output = {"softmax": "softmax", "logistic": "sigmoid", "identity": "identity"}[clf.out_activation_]
    task = "regression" if isinstance(clf, MLPRegressor) else None
    if task is None and classes is None:
        multilabel = clf.out_activation_ == "logistic" and clf.coefs_[-1].shape[1] > 1
        classes = None if multilabel else [str(c) for c in clf.classes_]
    write_model(model_dir, clf.coefs_, clf.intercepts_, acts, output, version,
                task=task, classes=classes, preprocess=pre, overwrite=overwrite, **batching)


def export_torch_sequential(seq, model_dir, output=None, version=1, input_width=None,
                            gelu_exact_as_tanh=False, overwrite=False, **kwargs):
    """Export a torch nn.Sequential (in eval mode) into one beast model.

    Supported: Linear; ReLU, GELU(approximate="tanh"), Tanh, Sigmoid, Identity after a
    Linear; BatchNorm1d right after a Linear (folded into it) or first of all (folded into
    the first Linear); LayerNorm right after a Linear (the server's per-layer norm; one
    eps for the model); Dropout and Flatten (dropped: identity in eval); a last Softmax,
    LogSoftmax or Sigmoid becomes the output transform (LogSoftmax is served as
    probabilities, same argmax). Exact GELU (nn.GELU(), approximate="none") is refused:
    the server computes the tanh approximation (they differ by up to ~1e-3); pass
    gelu_exact_as_tanh=True to accept that. Anything else is refused naming the module.
    nn.Linear stores [out, in]; it is transposed."""
    import torch.nn as nn  # optional dependency: only needed here

    torch_acts = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}
    mods = [m for m in seq if not isinstance(m, (nn.Dropout, nn.Flatten))]
    # A trailing squashing module is the output transform.
    tail = {nn.Softmax: "softmax", nn.LogSoftmax: "softmax", nn.Sigmoid: "sigmoid"}
    if mods and type(mods[-1]) in tail:
        found = tail[type(mods[-1])]
        if output is not None and output != found:
            raise ValueError(f"{mods[-1]}: output {output!r} given but the model ends in {found}")
        output = found
        mods = mods[:-1]
    output = output or "identity"
    weights, biases, acts, lns = [], [], [], []
    eps = None
    pre_bn = None  # (scale, shift) of a BatchNorm1d before the first Linear
    state = "start"  # start | linear (just after a Linear) | act (after its activation)

    def bn_affine(m):
        s = (m.weight.detach().double().numpy() if m.affine else 1.0) / np.sqrt(
            m.running_var.detach().double().numpy() + m.eps)
        t = (m.bias.detach().double().numpy() if m.affine else 0.0) - m.running_mean.detach().double().numpy() * s
        return s, t

    for module in mods:
        if isinstance(module, nn.Linear):
            w = module.weight.detach().double().numpy().T.copy()
            b = (module.bias.detach().double().numpy().copy() if module.bias is not None
                 else np.zeros(w.shape[1]))
            if pre_bn is not None and not weights:
                s, t = pre_bn
                b = b + t @ w
                w = w * s[:, None]
            weights.append(w)
            biases.append(b)
            acts.append("identity")
            lns.append(None)
            state = "linear"
        elif isinstance(module, nn.BatchNorm1d):
            if module.running_mean is None:
                raise ValueError(f"{module}: no running statistics (track_running_stats=False)")
            s, t = bn_affine(module)
            if state == "start":
                pre_bn = (s, t)
            elif state == "linear" and lns[-1] is None:
                weights[-1] = weights[-1] * s[None, :]
                biases[-1] = biases[-1] * s + t
            else:
                raise ValueError(f"{module}: a BatchNorm1d must come first or right after a Linear")
        elif isinstance(module, nn.LayerNorm):
            if state != "linear" or lns[-1] is not None:
                raise ValueError(f"{module}: a LayerNorm must come right after a Linear")
            if tuple(module.normalized_shape) != (weights[-1].shape[1],):
                raise ValueError(f"{module}: normalized_shape must be the Linear's out_features")
            if eps is not None and module.eps != eps:
                raise ValueError(f"{module}: every LayerNorm of a model must share one eps")
            eps = module.eps
            n = weights[-1].shape[1]
            g = module.weight.detach().float().numpy() if module.elementwise_affine else np.ones(n, np.float32)
            be = (module.bias.detach().float().numpy()
                  if module.elementwise_affine and module.bias is not None else np.zeros(n, np.float32))
            lns[-1] = (g, be)
        elif isinstance(module, nn.GELU) or type(module) in torch_acts:
            if state != "linear":
                raise ValueError(f"{module}: an activation must follow a Linear (or its norm)")
            if isinstance(module, nn.GELU):
                if module.approximate != "tanh" and not gelu_exact_as_tanh:
                    raise ValueError(f"{module}: exact GELU (approximate='none') is not what the "
                                     "server computes (the tanh approximation); use "
                                     "nn.GELU(approximate='tanh'), or gelu_exact_as_tanh=True")
                acts[-1] = "gelu"
            else:
                acts[-1] = torch_acts[type(module)]
            state = "act"
        else:
            raise ValueError(f"{module}: unsupported module")
    if not weights:
        raise ValueError("no Linear layer")
    if input_width is not None and input_width != weights[0].shape[0]:
        raise ValueError(f"input_width {input_width} but the first Linear takes {weights[0].shape[0]}")
    write_model(model_dir, weights, biases, acts, output, version, layer_norms=lns,
                layer_norm_eps=eps if eps is not None else 1e-5, overwrite=overwrite, **kwargs)


def merge_ensembles(path, ensembles):
    """Write `ensembles` ({name: (members, combiner, weights or None)}) into the
    ensembles.toml at `path`, replacing entries of the same name and keeping every other
    entry (and its comments) as it was."""
    fresh = {}
    for name, (members, combiner, weights) in ensembles.items():
        block = [f"[ensembles.{name}]",
                 "members = [" + ", ".join(f'"{m}"' for m in members) + "]",
                 f'combiner = "{combiner}"']
        if weights is not None:
            block.append("weights = [" + ", ".join(repr(float(w)) for w in weights) + "]")
        fresh[name] = "\n".join(block) + "\n"
    kept = []
    if os.path.exists(path):
        # Split before each header, keeping the comments above a header with it.
        text = open(path).read()
        chunks, cur = [], []
        for line in text.splitlines(keepends=True):
            if line.startswith("[ensembles."):
                head = []
                while cur and (cur[-1].startswith("#") or not cur[-1].strip()):
                    head.insert(0, cur.pop())
                chunks.append(cur)
                cur = head
            cur.append(line)
        chunks.append(cur)
        for c in chunks:
            header = next((l for l in c if l.startswith("[ensembles.")), None)
            name = header.strip()[len("[ensembles."):-1] if header else None
            if name not in fresh and "".join(c).strip():
                kept.append("".join(c).strip("\n") + "\n")
    out = [fresh[n] for n in fresh] + kept
    with open(path, "w") as f:
        f.write("\n".join(out))


def write_ensembles(path, ensembles):
    """Kept for callers of earlier versions: merges (see merge_ensembles)."""
    merge_ensembles(path, ensembles)


# ---------------------------------------------------------------------------------------
# A float32 forward pass with FP16-rounded weights: what the server computes
# ---------------------------------------------------------------------------------------

def forward_f16(clf, x):
    act = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh,
           "logistic": lambda z: 1 / (1 + np.exp(-z)), "identity": lambda z: z}[clf.activation]
    h = x.astype(np.float16).astype(np.float32)  # the wire carries FP16 rows
    n = len(clf.coefs_)
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        w = w.astype(np.float16).astype(np.float32)
        b = b.astype(np.float16).astype(np.float32)
        h = h @ w + b
        if i < n - 1:
            h = act(h)
    h = h - h.max(axis=1, keepdims=True)
    e = np.exp(h)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# The shipped digits ensemble
# ---------------------------------------------------------------------------------------

# Held-out split: 30% of the 1797 digits, stratified, random_state 0 -> 540 rows.
SPLIT_SEED = 0
TEST_SIZE = 0.3

# name, hidden layers, L2 alpha, seed. Picked so that the mean of probabilities beats the
# best member and the small member is confident on most rows (cascade-friendly): a sweep
# of alpha in {1e-4, 1e-2} x seed in {1, 2, 3} per size, keeping the trio whose ensemble
# beats its best member by the widest margin on the held-out split.
DIGITS_MEMBERS = [
    ("digits_small", (16,), 1e-4, 2),
    ("digits_medium", (64,), 1e-2, 3),
    ("digits_large", (256, 128), 1e-4, 3),
]


def flops_per_row(clf):
    return sum(2 * w.shape[0] * w.shape[1] for w in clf.coefs_)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True,
                    help="repository folder: a new one (e.g. /tmp/digits) to compare with models/")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace existing weights in --out (never needed to check reproducibility)")
    args = ap.parse_args(argv)

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    import warnings
    from sklearn.exceptions import ConvergenceWarning
    warnings.filterwarnings("ignore", category=ConvergenceWarning)

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y)

    clfs = {}
    for name, hidden, alpha, seed in DIGITS_MEMBERS:
        clf = MLPClassifier(hidden_layer_sizes=hidden, activation="relu", alpha=alpha,
                            max_iter=400, random_state=seed)
        clf.fit(x_tr, y_tr)
        clfs[name] = clf
        # classes=(): no names, so model.toml stays as committed (digests unchanged).
        export_sklearn_mlp(clf, os.path.join(args.out, name), version=1, classes=(),
                           overwrite=args.overwrite,
                           max_batch=64, max_queue_delay_us=100, queue_rows_max=4096)
    names = [m[0] for m in DIGITS_MEMBERS]
    # Merged: other entries of an existing ensembles.toml (digits_cascade) are kept.
    merge_ensembles(os.path.join(args.out, "ensembles.toml"),
                    {"digits": (names, "mean", None)})

    with open(os.path.join(args.out, "digits_holdout.csv"), "w") as f:
        f.write(",".join([f"x{i}" for i in range(64)] + ["label"]) + "\n")
        for row, label in zip(x_te, y_te):
            # x/16 for integer pixels is an exact binary fraction; %g prints it exactly.
            f.write(",".join(f"{v:g}" for v in row) + f",{label}\n")

    probs = {n: forward_f16(clfs[n], x_te) for n in names}
    ens = np.mean([probs[n] for n in names], axis=0)
    print(f"held-out: {len(y_te)} rows (test_size={TEST_SIZE}, random_state={SPLIT_SEED}, stratified)")
    print("| model | hidden | FLOPs/row | held-out accuracy |")
    print("|---|---|---:|---:|")
    for name, hidden, _, _ in DIGITS_MEMBERS:
        acc = (probs[name].argmax(1) == y_te).mean() * 100
        print(f"| {name} | {'-'.join(map(str, hidden))} | {flops_per_row(clfs[name])} | {acc:.2f}% |")
    total = sum(flops_per_row(clfs[n]) for n in names)
    acc_ens = (ens.argmax(1) == y_te).mean() * 100
    print(f"| digits (mean of the three) | | {total} | {acc_ens:.2f}% |")

    # Cheapest-first cascade: stop at the first prefix whose mean has max prob >= threshold.
    print()
    print("cascade (cheapest first, stop when the running mean's top probability >= t):")
    print("| t | accuracy | mean FLOPs/row | saved |")
    print("|---:|---:|---:|---:|")
    cost = np.cumsum([flops_per_row(clfs[n]) for n in names])
    for t in (0.9, 0.95, 0.99):
        correct, flops = 0, 0
        for r in range(len(y_te)):
            for k in range(len(names)):
                p = np.mean([probs[n][r] for n in names[:k + 1]], axis=0)
                if p.max() >= t or k == len(names) - 1:
                    correct += p.argmax() == y_te[r]
                    flops += cost[k]
                    break
        print(f"| {t} | {correct / len(y_te) * 100:.2f}% | {flops / len(y_te):.0f} | "
              f"{(1 - flops / len(y_te) / total) * 100:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
