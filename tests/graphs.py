"""Small graphs in the shapes real exporters write, from onnx.parser text plus seeded weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def parsed(text: str, weights: dict[str, tuple[int, ...] | np.ndarray], seed: int = 0) -> onnx.ModelProto:
    """The model of `text` with `weights` as initializers (a shape gets seeded normal values)."""
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(text)
    for name, value in weights.items():
        array = value if isinstance(value, np.ndarray) else (rng.normal(size=value) * 0.3).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    onnx.checker.check_model(model, full_check=True)
    return model


# A decoder block as optimum and onnxruntime-genai export it: a KV cache in and out,
# attention_mask over past + new tokens, and the embedding table tied to the logits
# MatMul through a Transpose.
DECODER = """
<ir_version: 8, opset_import: ["" : 17]>
decoder (int64[batch, sequence] input_ids, float[batch, total_sequence] attention_mask,
         float[batch, 2, past_sequence, 8] past_key, float[batch, 2, past_sequence, 8] past_value)
    => (float[batch, sequence, 32] logits, float[batch, 2, total_sequence, 8] present_key,
        float[batch, 2, total_sequence, 8] present_value) {
    h = Gather(embed, input_ids)
    heads = Constant<value = int64[4] {0, 0, 2, 8}>()
    width = Constant<value = int64[3] {0, 0, 16}>()
    q2 = MatMul(h, wq)
    k2 = MatMul(h, wk)
    v2 = MatMul(h, wv)
    q3 = Reshape(q2, heads)
    k3 = Reshape(k2, heads)
    v3 = Reshape(v2, heads)
    q = Transpose<perm = [0, 2, 1, 3]>(q3)
    k = Transpose<perm = [0, 2, 1, 3]>(k3)
    v = Transpose<perm = [0, 2, 1, 3]>(v3)
    present_key = Concat<axis = 2>(past_key, k)
    present_value = Concat<axis = 2>(past_value, v)
    key_t = Transpose<perm = [0, 1, 3, 2]>(present_key)
    scores = MatMul(q, key_t)
    axes = Constant<value = int64[2] {1, 2}>()
    one = Constant<value = float {1.0}>()
    big = Constant<value = float {-10000.0}>()
    masked = Sub(one, attention_mask)
    scaled = Mul(masked, big)
    bias = Unsqueeze(scaled, axes)
    biased = Add(scores, bias)
    attention = Softmax<axis = -1>(biased)
    mixed = MatMul(attention, present_value)
    mixed_t = Transpose<perm = [0, 2, 1, 3]>(mixed)
    context = Reshape(mixed_t, width)
    out = MatMul(context, wo)
    embed_t = Transpose<perm = [1, 0]>(embed)
    logits = MatMul(out, embed_t)
}
"""


def decoder() -> onnx.ModelProto:
    return parsed(DECODER, {"embed": (32, 16), "wq": (16, 16), "wk": (16, 16), "wv": (16, 16), "wo": (16, 16)})


def decoder_feeds(batch: int = 2, past: int = 3, new: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, 32, size=(batch, new)),
        "attention_mask": np.ones((batch, past + new), np.float32),
        "past_key": rng.normal(size=(batch, 2, past, 8)).astype(np.float32),
        "past_value": rng.normal(size=(batch, 2, past, 8)).astype(np.float32),
    }


# Conv → BatchNorm → Conv → BatchNorm at opset 11 with weights in Constant nodes, as in
# MobileNet-style classifiers: the second fold rewrites the node that consumed the first.
CONV_BN_CHAIN = """
<ir_version: 6, opset_import: ["" : 11]>
chain (float[1, 3, 8, 8] x) => (float[1, 8, 8, 8] y) {
    w1 = Constant<value = float[8, 3, 3, 3] {%s}>()
    w2 = Constant<value = float[8, 8, 1, 1] {%s}>()
    c1 = Conv<pads = [1, 1, 1, 1]>(x, w1)
    b1 = BatchNormalization(c1, g1, beta1, m1, v1)
    c2 = Conv(b1, w2)
    y = BatchNormalization(c2, g2, beta2, m2, v2)
}
"""


def conv_bn_chain(variance: float = 1.0) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    w1, w2 = (", ".join(f"{v:.4f}" for v in rng.normal(size=n)) for n in (8 * 27, 64))
    stats = {}
    for i in ("1", "2"):
        stats.update({
            "g" + i: rng.uniform(0.5, 1.5, 8).astype(np.float32),
            "beta" + i: rng.normal(size=8).astype(np.float32),
            "m" + i: rng.normal(size=8).astype(np.float32),
            "v" + i: (rng.uniform(0.5, 2.0, 8) * variance).astype(np.float32),
        })
    return parsed(CONV_BN_CHAIN % (w1, w2), stats)


# A layer whose output gets a −inf mask from a constant no layer multiplies (as JAX exports it).
MASKED = """
<ir_version: 8, opset_import: ["" : 17]>
masked (float[N, 16] x) => (float[N, 8] y) {
    h = MatMul(x, w)
    y = Add(h, mask)
}
"""


def masked() -> onnx.ModelProto:
    mask = np.zeros(8, np.float32)
    mask[3] = -np.inf
    return parsed(MASKED, {"w": (16, 8), "mask": mask})
