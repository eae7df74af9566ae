"""Every zoo model × bit width × {round-to-nearest, onnxcomp's best configuration}, beside
onnxruntime's own quantizers, side by side in one run.

    python benchmarks/zoo.py                                  # every model, 8/4/3/2 bits
    python benchmarks/zoo.py --models smollm2 --bits 4 --json docs/benchmarks/zoo_smollm2.json

Per row: the QDQ file's size and the .onnxc container's, the task metric against the model's
own FP32 outputs on evaluation data disjoint from the calibration data (SmolLM2: perplexity,
next-token agreement and KL on the GPL's text; EfficientNet-Lite0 and the digits CNN: top-1
agreement; MiniLM: embedding cosine), compression wall time and peak memory (each
compression in a fresh process, VmHWM), and latency in a plain onnxruntime session relative
to FP32 (all sessions of a model timed in turn in this run, default session options, so
MatMulNBits runs at onnxruntime's default accuracy level 4). onnxruntime: quantize_dynamic
(int8), and its MatMulNBits quantizer (RTN, HQQ at 4 bits, GPTQ at 4 bits as shipped, block
sizes 32 and 128). Prints one table per model, writes the rows as JSON and a PNG per model of
the metric against size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "benchmarks")]
import zoo  # noqa: E402
from compare import Entry, _ort_job  # noqa: E402
from timing import interleaved_latency_ms  # noqa: E402

# onnxcomp's best configuration per model family, found on the zoo (README: zoo table).
TRANSFORMER_BEST = {"granularity": "block", "block_size": 32, "asymmetric": True, "rounding": "optq", "gather_bits": 8}
CNN_BEST = {"asymmetric": True, "rounding": "optq", "bias_correction": True}
BEST = {"minilm": TRANSFORMER_BEST, "smollm2": TRANSFORMER_BEST, "efficientnet": CNN_BEST, "digits": CNN_BEST}
# Real-valued zero points (MatMulNBits), round to nearest, no calibration: at 2-4 bits.
FLOAT_ZERO = {"granularity": "block", "block_size": 32, "asymmetric": True, "zero_point": "float", "gather_bits": 8}
PRIMARY = {"lm": "perplexity", "classes": "top1", "embedding": "cosine"}
EVAL_BATCH = {"lm": 2, "classes": 32, "embedding": 16}


def _peak_mb() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024


def _onnxcomp_job(source: str, target: str, options: dict, calib: str | None) -> tuple[float, float]:
    """One compression in this (fresh) process: (seconds, peak MB)."""
    from onnxcomp import QuantConfig, compress_file
    from onnxcomp.calibration.analysis import Calibration

    start = time.perf_counter()
    compress_file(source, target, QuantConfig(**options), calibration=Calibration(calib) if calib else None)
    return time.perf_counter() - start, _peak_mb()


def _ort_measured(*args) -> tuple[float, float]:
    """One onnxruntime quantization in this (fresh) process: (seconds, peak MB)."""
    import logging

    logging.disable(logging.INFO)  # its quantizer logs every node it skips
    return _ort_job(*args), _peak_mb()


def _in_fresh_process(entry: Entry, function, *args) -> bool:
    """Run `function` in a fresh process, setting entry.seconds and entry.peak_mb; a crash
    or an exception is the entry's failure, recorded as its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            entry.seconds, entry.peak_mb = pool.submit(function, *args).result()
            return True
        except BrokenProcessPool:
            entry.failure = "crashed (process died)"
        except Exception as err:
            entry.failure = f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"
    return False


def onnxcomp_rows(key: str, model: zoo.ZooModel, bits_list: list[int], tmp: Path) -> list[Entry]:
    from onnxcomp.container.format import pack

    rows = []
    for bits in bits_list:
        methods = [("rtn", {}, False), ("best", BEST[key], True)]
        if key in ("minilm", "smollm2") and bits <= 4:
            methods.append(("float-zp", FLOAT_ZERO, False))  # with OPTQ: within noise of these (README)
        for method, options, calibrated in methods:
            if method == "best" and bits == 8 and key != "efficientnet":
                continue  # 8-bit round-to-nearest is already within noise of FP32 there
            entry = Entry("onnxcomp", method if method == "rtn" else _describe(options), bits)
            out = tmp / f"onnxcomp_{method.replace(' ', '_')}_{bits}.onnx"
            print(f"{key}: onnxcomp {entry.method} {bits}-bit ...", file=sys.stderr, flush=True)
            calib = str(model.calib) if calibrated else None
            if _in_fresh_process(entry, _onnxcomp_job, str(model.path), str(out), {"bits": bits, **options}, calib):
                entry.path, entry.size = str(out), out.stat().st_size
                entry.coded = len(pack(out.read_bytes()))
            rows.append(entry)
    return rows


def _describe(options: dict) -> str:
    parts = [f"b{options['block_size']}" if options.get("granularity") == "block" else "channel",
             "asym" if options.get("asymmetric") else "sym", options.get("rounding", "nearest")]
    if options.get("zero_point") == "float":
        parts.insert(2, "float-zp")
    if options.get("bias_correction"):
        parts.append("bias-corr")
    if "gather_bits" in options:
        parts.append(f"emb{options['gather_bits']}")
    return " ".join(parts)


def ort_rows(key: str, model: zoo.ZooModel, bits_list: list[int], tmp: Path) -> list[Entry]:
    rows = []
    jobs = [("quantize_dynamic", 8, 0)] * (8 in bits_list)
    for block in (32, 128):
        jobs += [("rtn", b, block) for b in bits_list if b in (8, 4, 2)] + [("hqq", 4, block)] * (4 in bits_list)
        jobs += [("gptq", 4, block)] * (4 in bits_list and key != "digits")
    for kind, bits, block in jobs:
        print(f"{key}: onnxruntime {kind} b{block} {bits}-bit ...", file=sys.stderr, flush=True)
        entry = Entry("onnxruntime", kind if kind == "quantize_dynamic" else f"{kind} b{block}", bits)
        out = tmp / f"ort_{kind}_{block}_{bits}.onnx"
        if _in_fresh_process(entry, _ort_measured, kind, str(model.path), str(out), bits, block, str(model.calib)):
            entry.path, entry.size = str(out), out.stat().st_size
        rows.append(entry)
    return rows


def score(model: zoo.ZooModel, feeds: dict, reference: np.ndarray, path: str) -> dict:
    import onnxruntime as ort

    outputs = zoo.run_batched(ort.InferenceSession(path, providers=["CPUExecutionProvider"]), feeds, EVAL_BATCH[model.metric])
    if model.metric == "lm":
        return zoo.language_model_metrics(reference, outputs, feeds["input_ids"])
    if model.metric == "classes":
        return zoo.classification_metrics(reference, outputs)
    return zoo.embedding_metrics(reference, outputs)


def evaluate(key: str, model: zoo.ZooModel, rows: list[Entry], repeats: int) -> Entry:
    import onnxruntime as ort

    feeds = dict(np.load(model.eval))
    reference = zoo.run_batched(ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"]), feeds,
                                EVAL_BATCH[model.metric])
    fp32 = Entry("fp32", "original", None, str(model.path), model.path.stat().st_size)
    fp32.metrics = score(model, feeds, reference, str(model.path))
    done = [r for r in rows if r.path and not r.failure]
    for row in done:
        print(f"{key}: scoring {row.tool} {row.method} {row.bits}-bit ...", file=sys.stderr, flush=True)
        try:
            row.metrics = score(model, feeds, reference, row.path)
        except Exception as err:  # a file its own tool made that onnxruntime cannot run
            row.failure, row.path = f"fails in onnxruntime: {str(err).splitlines()[0][-80:]}", None
    timed = [r for r in done if r.path]
    sample = {k: v[: EVAL_BATCH[model.metric]] for k, v in feeds.items()}
    latencies = interleaved_latency_ms([model.path] + [Path(r.path) for r in timed], sample, repeats)
    fp32.latency_ms, fp32.latency_x = latencies[0], 1.0
    for row, latency in zip(timed, latencies[1:]):
        row.latency_ms, row.latency_x = latency, latency / latencies[0]
    return fp32


def table(key: str, rows: list[Entry]) -> str:
    metric_keys = list(rows[0].metrics)
    head = f"{'tool':12} {'method':34} {'bits':>4} {'MB':>8} {'.onnxc MB':>9} " + " ".join(f"{k:>10}" for k in metric_keys)
    lines = [f"## {zoo.MODELS[key].name}", head + f" {'comp. s':>8} {'peak MB':>8} {'x fp32':>7}  failure"]
    for r in rows:
        metrics = " ".join(f"{r.metrics[k]:10.4f}" if getattr(r, "metrics", None) else f"{'-':>10}" for k in metric_keys)
        cells = [f"{r.tool:12} {r.method[:34]:34} {r.bits or '':>4}", f"{r.size / 1e6:8.3f}" if r.size else f"{'-':>8}",
                 f"{r.coded / 1e6:9.3f}" if getattr(r, "coded", None) else f"{'-':>9}", metrics,
                 f"{r.seconds:8.1f}" if r.seconds is not None else f"{'-':>8}",
                 f"{r.peak_mb:8.0f}" if r.peak_mb else f"{'-':>8}",
                 f"{r.latency_x:7.2f}" if getattr(r, "latency_x", None) else f"{'-':>7}", f" {r.failure or ''}"]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def markdown(key: str, rows: list[Entry]) -> str:
    """The model's rows as a Markdown table (docs/zoo.md)."""
    metric_keys = list(rows[0].metrics)
    lines = [f"### {zoo.MODELS[key].name}", "", "| tool | method | bits | MB | .onnxc MB | " + " | ".join(metric_keys)
             + " | compress s | peak MB | latency × FP32 |", "|" + "---|" * (8 + len(metric_keys))]
    for r in rows:
        if r.failure:
            lines.append(f"| {r.tool} | {r.method} | {r.bits or '–'} | " + " | ".join(["–"] * (5 + len(metric_keys)))
                         + f" failed: {r.failure[:70]} |")
            continue
        metrics = [f"{r.metrics[k]:.4g}" if getattr(r, "metrics", None) else "–" for k in metric_keys]
        coded = getattr(r, "coded", None)
        cells = [r.tool, r.method, str(r.bits or "–"), f"{r.size / 1e6:.3g}" if r.size else "–",
                 f"{coded / 1e6:.3g}" if coded else "–", *metrics, f"{r.seconds:.0f}" if r.seconds is not None else "–",
                 f"{r.peak_mb:.0f}" if r.peak_mb else "–", f"{r.latency_x:.2f}" if getattr(r, "latency_x", None) else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _entry(row: dict) -> Entry:
    entry = Entry(**{k: v for k, v in row.items() if k in Entry.__dataclass_fields__})
    entry.metrics, entry.coded, entry.latency_x = row.get("metrics"), row.get("coded"), row.get("latency_x")
    return entry


def _kept_rows(old: list[dict], tools: list[str]) -> list[Entry]:
    """Rows of an earlier run for the tools this run skips, their latency still relative to
    that run's FP32."""
    base = old[0]["latency_ms"]
    kept = []
    for row in old:
        if row["tool"] in tools or row["tool"] == "fp32":
            continue
        entry = _entry(row)
        entry.latency_x = row.get("latency_x") or (row["latency_ms"] / base if row["latency_ms"] and base else None)
        kept.append(entry)
    return kept


def plot(key: str, rows: list[Entry], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = PRIMARY[zoo.MODELS[key].metric]
    figure, axes = plt.subplots(figsize=(9, 5.5))
    styles = {"onnxcomp": ("tab:blue", "o"), "onnxcomp .onnxc": ("tab:green", "s"), "onnxruntime": ("tab:orange", "^")}
    for row in rows[1:]:
        if not getattr(row, "metrics", None):
            continue
        points = [("onnxcomp" if row.tool == "onnxcomp" else row.tool, row.size)]
        if getattr(row, "coded", None):
            points.append(("onnxcomp .onnxc", row.coded))
        for tool, size in points:
            colour, marker = styles[tool]
            axes.scatter(size / 1e6, row.metrics[primary], c=colour, marker=marker, label=tool)
            axes.annotate(f"{row.bits}b {row.method}", (size / 1e6, row.metrics[primary]), fontsize=6,
                          xytext=(3, 3), textcoords="offset points")
    axes.axhline(rows[0].metrics[primary], color="grey", linestyle="--", linewidth=0.8, label="FP32")
    axes.set_xscale("log")
    axes.set_xlabel("file size, MB (log)")
    axes.set_ylabel(primary + (" (lower is better)" if primary == "perplexity" else " against FP32"))
    if primary == "perplexity":
        axes.set_yscale("log")
    axes.set_title(f"{zoo.MODELS[key].name}: {primary} against size")
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes.legend(unique.values(), unique.keys(), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2,efficientnet,digits")
    parser.add_argument("--bits", default="8,4,3,2")
    parser.add_argument("--repeats", type=int, default=10, help="latency runs per session")
    parser.add_argument("--json", type=Path, default=None, help="write every row as JSON here")
    parser.add_argument("--plots", type=Path, default=None, help="folder for one PNG per model")
    parser.add_argument("--tools", default="onnxruntime,onnxcomp", help="whose rows to run (FP32 always)")
    parser.add_argument("--keep", type=Path, default=None, help="an earlier --json: its rows for the tools not run")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables as Markdown here")
    args = parser.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]
    results = {}
    for key in args.models.split(","):
        model = zoo.ensure(key)
        with tempfile.TemporaryDirectory() as tmp:
            tools = args.tools.split(",")
            rows = ((ort_rows(key, model, bits_list, Path(tmp)) if "onnxruntime" in tools else [])
                    + (onnxcomp_rows(key, model, bits_list, Path(tmp)) if "onnxcomp" in tools else []))
            rows.insert(0, evaluate(key, model, rows, args.repeats))
        if args.keep and key in (kept := json.loads(args.keep.read_text())):
            rows[1:1] = _kept_rows(kept[key], tools)
        for row in rows:
            row.path = None
        print(table(key, rows), flush=True)
        results[key] = [asdict(r) | {k: getattr(r, k, None) for k in ("metrics", "coded", "latency_x")} for r in rows]
        if args.plots:
            args.plots.mkdir(parents=True, exist_ok=True)
            plot(key, rows, args.plots / f"zoo_{key}.png")
        if args.markdown:
            args.markdown.write_text("\n\n".join(markdown(k, [_entry(r) for r in v]) for k, v in results.items()) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
