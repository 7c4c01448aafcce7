"""Write the ONNX import test fixtures under tests/fixtures/onnx/.

    python3 tools/onnx_fixtures.py            # needs onnx, onnxruntime, numpy; skl2onnx + scikit-learn and torch optional

For each importable graph: NAME.onnx and NAME.json ({"rows": [...], "outputs":
[...] from onnxruntime, "versions": {...}}). For each graph beast must refuse:
refuse_NAME.onnx and an entry in refusals.json (the text the error must contain).
tests/onnx_import.rs imports each graph, serves it on a real server and compares
the answers with onnxruntime's within FP16 tolerance.
"""

import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "onnx")
RNG = np.random.default_rng(11)
VERSIONS = {"numpy": np.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "python": sys.version.split()[0]}


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def save(name, model, rows, output=None, extra_versions=None):
    onnx.checker.check_model(model)
    path = os.path.join(OUT, name + ".onnx")
    onnx.save_model(model, path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    out = output or out_names[0]
    y = sess.run([out], {inp: rows.astype(np.float32)})[0]
    v = dict(VERSIONS, **(extra_versions or {}))
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump({"rows": rows.astype(np.float32).tolist(), "outputs": y.astype(np.float64).tolist(),
                   "output": out, "versions": v}, f)
        f.write("\n")
    print("wrote", name, rows.shape, "->", y.shape)


def graph_model(nodes, inits, in_width, out_width, opset=20, in_shape=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape or ["N", in_width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_width])
    g = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="beast-fixtures")


def handmade():
    # Gemm (transB, alpha, beta) -> BatchNormalization (folded) -> Relu ->
    # MatMul + Add -> LayerNormalization -> Tanh -> Gemm -> Softmax.
    w0 = RNG.normal(size=(8, 6)) * 0.5  # [out, in]: transB=1
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["h0"], name="gemm0", transB=1, alpha=0.9, beta=0.5),
        helper.make_node("BatchNormalization", ["h0", "bn_g", "bn_b", "bn_m", "bn_v"], ["h1"], name="bn0",
                         epsilon=1e-3),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu0"),
        helper.make_node("MatMul", ["h2", "w1"], ["h3"], name="mm1"),
        helper.make_node("Add", ["h3", "b1"], ["h4"], name="add1"),
        helper.make_node("LayerNormalization", ["h4", "ln_g", "ln_b"], ["h5"], name="ln1", axis=-1, epsilon=1e-5),
        helper.make_node("Tanh", ["h5"], ["h6"], name="tanh1"),
        helper.make_node("Gemm", ["h6", "w2", "b2"], ["h7"], name="gemm2"),
        helper.make_node("Softmax", ["h7"], ["y"], name="softmax", axis=-1),
    ]
    inits = [
        init("w0", w0), init("b0", RNG.normal(size=8) * 0.1),
        init("bn_g", RNG.uniform(0.5, 1.5, 8)), init("bn_b", RNG.normal(size=8) * 0.1),
        init("bn_m", RNG.normal(size=8) * 0.2), init("bn_v", RNG.uniform(0.5, 2.0, 8)),
        init("w1", RNG.normal(size=(8, 5)) * 0.5), init("b1", RNG.normal(size=(1, 5)) * 0.1),
        init("ln_g", RNG.uniform(0.5, 1.5, 5)), init("ln_b", RNG.normal(size=5) * 0.1),
        init("w2", RNG.normal(size=(5, 4))), init("b2", RNG.normal(size=4) * 0.1),
    ]
    save("handmade_mlp", graph_model(nodes, inits, 6, 4), RNG.uniform(-1, 1, (16, 6)))

    # Flatten of a [N, 2, 3] input, Identity, Dropout, Gelu(tanh), Sigmoid output.
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], name="flatten", axis=1),
        helper.make_node("Identity", ["f"], ["f1"], name="ident"),
        helper.make_node("Gemm", ["f1", "w0", "b0"], ["h0"], name="gemm0"),
        helper.make_node("Gelu", ["h0"], ["h1"], name="gelu0", approximate="tanh"),
        helper.make_node("Dropout", ["h1"], ["h2"], name="dropout"),
        helper.make_node("Gemm", ["h2", "w1", "b1"], ["h3"], name="gemm1"),
        helper.make_node("Sigmoid", ["h3"], ["y"], name="sigmoid"),
    ]
    inits = [init("w0", RNG.normal(size=(6, 7)) * 0.6), init("b0", RNG.normal(size=7) * 0.1),
             init("w1", RNG.normal(size=(7, 3)) * 0.6), init("b1", RNG.normal(size=3) * 0.1)]
    m = graph_model(nodes, inits, 6, 3, in_shape=["N", 2, 3])
    save("handmade_gelu_flatten", m, RNG.uniform(-1, 1, (16, 2, 3)))


def refusals():
    out = {}

    def refuse(name, model, must_contain):
        onnx.save_model(model, os.path.join(OUT, "refuse_" + name + ".onnx"))
        out[name] = must_contain

    w = init("w", RNG.normal(size=(4, 3)))
    # An op beast does not run, named with its node.
    refuse("unsupported_op", graph_model([
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Elu", ["h"], ["y"], name="my_elu"),
    ], [w], 4, 3), 'node "my_elu" (Elu): op not supported')
    # Exact GELU: beast computes only the tanh approximation.
    refuse("exact_gelu", graph_model([
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Gelu", ["h"], ["y"], name="gelu_exact"),
    ], [w], 4, 3), 'node "gelu_exact" (Gelu): approximate="none"')
    # A weight that does not fit the input width.
    refuse("wrong_shape", graph_model([
        helper.make_node("Gemm", ["x", "w"], ["h"], name="gemm_bad"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ], [w], 5, 3), 'node "gemm_bad" (Gemm): weight "w" has shape [4, 3]: it takes 4 features, the data has 5')
    # Weights stored in another file.
    m = graph_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [w], 4, 3)
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", "weights.bin"
    refuse("external_data", m, 'initializer "w" is stored outside the .onnx file (external data)')
    # Two data inputs meeting in one node: not a chain.
    x2 = helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 4])
    g = helper.make_graph([helper.make_node("Add", ["x", "x2"], ["h"], name="add_inputs"),
                           helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]), x2],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    refuse("two_inputs", helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), "the graph has 2 inputs")
    with open(os.path.join(OUT, "refusals.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("wrote", len(out), "refusals")


def sklearn():
    try:
        import sklearn
        from skl2onnx import to_onnx
        from sklearn.datasets import load_breast_cancer, load_wine
        from sklearn.neural_network import MLPClassifier, MLPRegressor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        import skl2onnx
    except ImportError as e:
        print("skip scikit-learn fixtures:", e)
        return
    v = {"scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__}
    # wine: 13 features, 3 classes, behind a StandardScaler (folded into the first layer).
    X, y = load_wine(return_X_y=True)
    m = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=0)).fit(X, y)
    o = to_onnx(m, X[:1].astype(np.float32), options={id(m.steps[-1][1]): {"zipmap": False}}, target_opset=17)
    save("sklearn_wine_scaled", o, X[::12], output="probabilities", extra_versions=v)
    # breast_cancer: binary (skl2onnx writes Sigmoid, Sub(1, p), Concat), scaled.
    X, y = load_breast_cancer(return_X_y=True)
    m = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(8,), max_iter=2000, random_state=0)).fit(X, y)
    o = to_onnx(m, X[:1].astype(np.float32), options={id(m.steps[-1][1]): {"zipmap": False}}, target_opset=17)
    save("sklearn_breast_cancer_binary", o, X[::40], output="probabilities", extra_versions=v)
    # A regressor (one target, identity output; skl2onnx ends it with a Reshape to [-1, 1]).
    Xr = RNG.uniform(-1, 1, (200, 5))
    yr = Xr @ RNG.normal(size=5) + np.tanh(Xr[:, 0] * 2)
    m = MLPRegressor(hidden_layer_sizes=(12,), activation="tanh", max_iter=3000, random_state=0).fit(Xr, yr)
    o = to_onnx(m, Xr[:1].astype(np.float32), target_opset=17)
    save("sklearn_regressor", o, Xr[:16], extra_versions=v)


def pytorch():
    try:
        import torch
    except ImportError as e:
        print("skip PyTorch fixture:", e)
        return
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(8, 6), torch.nn.LayerNorm(6), torch.nn.GELU(approximate="tanh"),
        torch.nn.Linear(6, 3), torch.nn.Softmax(dim=-1))
    with torch.no_grad():  # BatchNorm statistics as if trained
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.2, 0.2)
        m[5].weight.uniform_(0.5, 1.5)
        m[5].bias.uniform_(-0.2, 0.2)
    m.eval()
    path = os.path.join(OUT, "pytorch_mlp.onnx")
    x = torch.randn(2, 5)
    torch.onnx.export(m, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=20)
    save("pytorch_mlp", onnx.load(path), RNG.uniform(-2, 2, (16, 5)), extra_versions={"torch": torch.__version__})


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    handmade()
    refusals()
    sklearn()
    pytorch()
