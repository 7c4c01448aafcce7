#!/usr/bin/env python3
"""beast CPU backend vs ONNX Runtime (one thread) on the bench_ens ensemble.

Builds the three bench models (bench_a, bench_b, bench_c) as ONNX graphs
(MatMul + Add + Relu ..., Softmax at the end) from the very FP16 weights the
Rust side uses (dumped by `examples/dump_bench_weights.rs`, converted to f32
here), runs them one after another on the same input with ONNX Runtime
(intra_op 1, inter_op 1, sequential), then runs
`examples/backend_throughput.rs`, both pinned to the same core, and prints
batch, beast rows/s, ORT rows/s and the ratio.

Usage (from the repository root, after `python3 -m venv .venv &&
.venv/bin/pip install onnxruntime numpy onnx`):

    .venv/bin/python perf/ort_compare.py [--core 1] [--secs 6] [--rounds 3] [--batches 1,8,32,128]
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

MODELS = ["bench_a", "bench_b", "bench_c"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "perf", "out")

DTYPES = {"F16": np.float16, "F32": np.float32}


def read_safetensors(path):
    """The format is tiny: u64 LE header length, JSON header, raw data."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        arr = np.frombuffer(data[lo:hi], dtype=DTYPES[info["dtype"]])
        tensors[name] = arr.reshape(info["shape"])
    return tensors


def onnx_model(name, tensors):
    n_layers = len([k for k in tensors if k.endswith(".weight")])
    nodes, inits = [], []
    cur = "x"
    in_dim = tensors["layers.0.weight"].shape[0]
    for i in range(n_layers):
        w = tensors[f"layers.{i}.weight"].astype(np.float32)  # exact: f16 -> f32
        b = tensors[f"layers.{i}.bias"].astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"mm{i}"]))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"]))
        cur = f"add{i}"
        if i < n_layers - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"relu{i}"]))
            cur = f"relu{i}"
    out_dim = tensors[f"layers.{n_layers - 1}.weight"].shape[1]
    nodes.append(helper.make_node("Softmax", [cur], ["y"], axis=-1))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def best_rows_per_s(fn, rows, secs):
    """Best of three trials of secs/3 each (the one least disturbed by
    neighbours), by wall time and by this thread's CPU time. With one
    intra-op thread ORT computes on the calling thread, so its thread CPU
    time is the compute time."""
    for _ in range(10):
        fn()
    best = best_cpu = 0.0
    for _ in range(3):
        start, cpu_start = time.perf_counter(), time.thread_time()
        iters = 0
        while time.perf_counter() - start < secs / 3:
            for _ in range(8):
                fn()
            iters += 8
        best = max(best, iters * rows / (time.perf_counter() - start))
        best_cpu = max(best_cpu, iters * rows / (time.thread_time() - cpu_start))
    return best, best_cpu


def run_beast(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res, kernel = {}, "?"
    for line in out.splitlines():
        f = line.split()
        if f[0] == "kernel":
            kernel = f[1]
        elif f[0] == "batch":
            res[int(f[1])] = (float(f[3]), float(f[7]))
    return res, kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--core", type=int, default=1)
    ap.add_argument("--secs", type=float, default=6.0, help="seconds per batch size and side, over all rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--portable", action="store_true", help="measure beast's portable kernel")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    subprocess.run(["cargo", "build", "--release", "--examples"], cwd=ROOT, check=True)
    models_dir = os.path.join(OUT, "models")
    subprocess.run(
        [os.path.join(ROOT, "target", "release", "examples", "dump_bench_weights"), models_dir],
        check=True,
        stdout=subprocess.DEVNULL,
    )

    # ORT on the same core as beast: pin this process (beast: taskset).
    os.sched_setaffinity(0, {args.core})
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = []
    for name in MODELS:
        tensors = read_safetensors(os.path.join(models_dir, name, "1", "weights.safetensors"))
        m = onnx_model(name, tensors)
        sessions.append(ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]))

    cmd = ["taskset", "-c", str(args.core),
           os.path.join(ROOT, "target", "release", "examples", "backend_throughput"),
           "--secs", str(args.secs / args.rounds), "--batches", ",".join(map(str, batches))]
    if args.portable:
        cmd.append("--portable")

    # Rounds alternate beast and ORT so both see the same neighbours; each
    # side keeps its best round.
    rng = np.random.default_rng(0)
    inputs = {rows: rng.uniform(-1, 1, size=(rows, 256)).astype(np.float32) for rows in batches}
    beast = {rows: (0.0, 0.0) for rows in batches}
    ortr = {rows: (0.0, 0.0) for rows in batches}
    kernel = "?"
    for _ in range(args.rounds):
        res, kernel = run_beast(cmd)
        for rows in batches:
            beast[rows] = tuple(map(max, beast[rows], res[rows]))
        for rows in batches:
            feeds = {"x": inputs[rows]}

            def run():
                for s in sessions:
                    s.run(["y"], feeds)

            y = sessions[0].run(["y"], feeds)[0]
            assert np.allclose(y.sum(axis=1), 1.0, atol=1e-4), "ORT softmax rows must sum to 1"
            ortr[rows] = tuple(map(max, ortr[rows], best_rows_per_s(run, rows, args.secs / args.rounds)))

    print(f"bench_ens (bench_a + bench_b + bench_c), core {args.core}, beast kernel {kernel}, "
          f"onnxruntime {ort.__version__} (1 thread), {args.rounds} rounds")
    print(f"{'batch':>6} {'beast rows/s':>13} {'ORT rows/s':>11} {'ratio':>6}"
          f" {'beast rows/cpu-s':>17} {'ORT rows/cpu-s':>15} {'ratio':>6}")
    for rows in batches:
        (b, bc), (o, oc) = beast[rows], ortr[rows]
        print(f"{rows:>6} {b:>13.0f} {o:>11.0f} {b / o:>6.2f} {bc:>17.0f} {oc:>15.0f} {bc / oc:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
