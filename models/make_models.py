"""Make the small models in this folder, deterministically (seed 0).

    python models/make_models.py

- digits_cnn.onnx: a CNN with BatchNormalization (plain, depthwise and pointwise Conv, Gemm)
  trained on scikit-learn's bundled 8x8 digits; digits_eval.npz / digits_eval_labels.npy
  hold its held-out split (input "image", and the labels); digits_calib.npz holds 128
  training images for calibration, disjoint from the held-out split.
- convtranspose_bn.onnx, matmul_bn.onnx, subgraph_const.onnx: tiny graphs for the passes
  (a grouped ConvTranspose+BN; MatMul(+Add)+BN, one BN that cannot fold; Constant weights
  inside If branches).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
SEED = 0


def digits_split():
    """(x_train, x_eval, y_train, y_eval), images standardized by the training set's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_eval, y_train, y_eval = train_test_split(x, digits.target, test_size=500, random_state=SEED, stratify=digits.target)
    mean, std = float(x_train.mean()), float(x_train.std())
    return (x_train - mean) / std, (x_eval - mean) / std, y_train, y_eval


def digits_calib() -> None:
    x_train = digits_split()[0]
    np.savez(HERE / "digits_calib.npz", image=x_train[np.random.default_rng(SEED).permutation(len(x_train))[:128]])


def digits_cnn() -> None:
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    x_train, x_eval, y_train, y_eval = digits_split()

    def block(cin, cout, k, groups=1):
        return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.BatchNorm2d(cout), nn.ReLU()]

    model = nn.Sequential(
        *block(1, 16, 3), *block(16, 16, 3, groups=16), *block(16, 32, 1), nn.MaxPool2d(2),
        *block(32, 32, 3), nn.Flatten(), nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    for _ in range(30):
        perm = torch.randperm(len(xt))
        model.train()
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_eval)).argmax(1).numpy() == y_eval).mean()
    print(f"digits CNN held-out accuracy: {acc:.4f}")
    path = HERE / "digits_cnn.onnx"
    torch.onnx.export(
        model, (torch.from_numpy(x_eval[:2]),), str(path), dynamo=False, opset_version=13,
        input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
    )
    np.savez(HERE / "digits_eval.npz", image=x_eval)
    np.save(HERE / "digits_eval_labels.npy", y_eval.astype(np.int64))


def _bn(name: str, inp: str, out: str, c: int, rng) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    params = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), f"{name}_gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), f"{name}_beta"),
        numpy_helper.from_array(rng.normal(0, 0.2, c).astype(np.float32), f"{name}_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, c).astype(np.float32), f"{name}_var"),
    ]
    node = helper.make_node("BatchNormalization", [inp] + [p.name for p in params], [out], name=name, epsilon=1e-5)
    return node, params


def _save(graph: onnx.GraphProto, name: str, opset: int = 13) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnxcomp-models")
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, HERE / name)


def convtranspose_bn() -> None:
    rng = np.random.default_rng(SEED)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "deconv_w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, 6).astype(np.float32), "deconv_b")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (4, 6, 3, 3)).astype(np.float32), "conv_w")
    bn, params = _bn("bn", "deconv_out", "bn_out", 6, rng)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "deconv_w", "deconv_b"], ["deconv_out"], name="deconv", group=2, strides=[2, 2]),
        bn,
        helper.make_node("Relu", ["bn_out"], ["relu_out"], name="relu"),
        helper.make_node("Conv", ["relu_out", "conv_w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "convtranspose_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 11, 11])],
        [w, b, w2, *params],
    )
    _save(graph, "convtranspose_bn.onnx")


def matmul_bn() -> None:
    rng = np.random.default_rng(SEED + 1)
    w1 = numpy_helper.from_array(rng.normal(0, 0.2, (32, 64)).astype(np.float32), "fc1_w")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, 64).astype(np.float32), "fc1_b")
    w2 = numpy_helper.from_array(rng.normal(0, 0.2, (64, 48)).astype(np.float32), "fc2_w")
    bn1, p1 = _bn("bn1", "fc1_out", "bn1_out", 64, rng)
    bn2, p2 = _bn("bn2", "fc2_out", "bn2_out", 48, rng)
    bn3, p3 = _bn("bn3_after_relu", "relu2_out", "y", 48, rng)
    nodes = [
        helper.make_node("MatMul", ["x", "fc1_w"], ["fc1_mm"], name="fc1"),
        helper.make_node("Add", ["fc1_mm", "fc1_b"], ["fc1_out"], name="fc1_bias"),
        bn1,
        helper.make_node("Relu", ["bn1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("MatMul", ["relu1_out", "fc2_w"], ["fc2_out"], name="fc2"),
        bn2,
        helper.make_node("Relu", ["bn2_out"], ["relu2_out"], name="relu2"),
        bn3,
    ]
    graph = helper.make_graph(
        nodes, "matmul_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 48])],
        [w1, b1, w2, *p1, *p2, *p3],
    )
    _save(graph, "matmul_bn.onnx")


def subgraph_const() -> None:
    rng = np.random.default_rng(SEED + 2)

    def branch(name: str) -> onnx.GraphProto:
        w = rng.normal(0, 0.2, (24, 16)).astype(np.float32)
        nodes = [
            helper.make_node("Constant", [], [f"{name}_w"], name=f"{name}_const", value=numpy_helper.from_array(w)),
            helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_matmul"),
        ]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", 16])])

    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))]
    graph = helper.make_graph(
        nodes, "subgraph_const",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
    )
    _save(graph, "subgraph_const.onnx")


if __name__ == "__main__":
    convtranspose_bn()
    matmul_bn()
    subgraph_const()
    digits_cnn()
    digits_calib()
