"""onnxcomp against onnxruntime's own quantizers, side by side on one model, one calibration
set and one evaluation set.

    python benchmarks/compare.py --model build/zoo/minilm/minilm.onnx --calib build/zoo/minilm/calib.npz \\
        --eval build/zoo/minilm/eval.npz --plot minilm_frontier.png
    python benchmarks/compare.py --model models/digits_cnn.onnx --calib models/digits_calib.npz \\
        --eval models/digits_eval.npz --labels models/digits_eval_labels.npy

onnxruntime: quantize_dynamic (int8 per channel), and the MatMulNBits quantizer with RTN
(its default), HQQ and GPTQ at block sizes 32 and 128, with RTN also quantizing the
embedding tables (Gather). Each runs in its own process, so a crash is recorded as a failure.
onnxcomp: round-to-nearest, range search, MagR, OPTQ, MagR+OPTQ per channel, MagR+OPTQ per
block of 128 and 32 (asymmetric at 2 bits), and at 4 bits OPTQ per block of 128 with 3-bit
embedding tables; each also entropy-coded (.onnxc, which decodes to the same model). MagR
runs once per granularity (its result does not depend on the bit width) and its time is
added to every row that uses it.

For each: file size, mean cosine of the first output to FP32 on the evaluation set (and
accuracy with --labels), compression wall time, median latency (all sessions timed in turn
in this one run) and peak resident memory of a process that opens a session and runs the
evaluation set once. Sessions run at MatMulNBits accuracy level 0 (float compute), so no tool
gains or loses from activation quantization it did not ask for. Prints one table, writes it as
JSON, and draws fidelity against file size as a PNG.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier_plot import draw_frontier  # noqa: E402
from timing import interleaved_latency_ms  # noqa: E402

ACCURACY_LEVEL = 0


@dataclass
class Entry:
    tool: str
    method: str
    bits: int | None
    path: str | None = None
    size: int | None = None
    seconds: float | None = None
    cosine: float | None = None
    accuracy: float | None = None
    latency_ms: float | None = None
    peak_mb: float | None = None
    failure: str | None = None


def _batches(path: Path, batch: int = 16):
    data = dict(np.load(path))
    count = len(next(iter(data.values())))
    return [{k: v[i : i + batch] for k, v in data.items()} for i in range(0, count, batch)]


def _ort_job(kind: str, model: str, output: str, bits: int, block: int, calib: str) -> float:
    """One onnxruntime quantization (in a child process); its wall time."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_dynamic
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(_batches(Path(calib)))

        def get_next(self):
            return next(self.feeds, None)

    start = time.perf_counter()
    if kind == "quantize_dynamic":
        quantize_dynamic(model, output, per_channel=True, weight_type=QuantType.QInt8)
        return time.perf_counter() - start
    configs = {
        "rtn": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits),
        "rtn+emb": lambda: nbits.DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=True, bits=bits, op_types_to_quantize=("MatMul", "Gather"),
            quant_axes=(("MatMul", 0), ("Gather", 1))),
        "hqq": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=bits),
        "gptq": lambda: nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=block),
    }
    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(model), bits=bits, block_size=block, is_symmetric=True,
                                           algo_config=configs[kind]())
    quantizer.process()
    quantizer.model.save_model_to_file(output, use_external_data_format=False)
    seconds = time.perf_counter() - start
    if not any(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in onnx.load(output).graph.node):
        raise RuntimeError("quantized nothing (no MatMul with a constant weight)")
    return seconds


def run_ort(entry: Entry, model: Path, calib: Path, block: int, kind: str, out: Path) -> Entry:
    entry.path = str(out)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            entry.seconds = pool.submit(_ort_job, kind, str(model), str(out), entry.bits, block, str(calib)).result()
        except BrokenProcessPool:
            entry.failure, entry.path = "crashed (process died)", None
        except Exception as err:  # the quantizer's own error, recorded as its result
            entry.failure, entry.path = f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}", None
    return entry


def ort_entries(model: Path, calib: Path, bits_list: list[int], tmp: Path, gptq: bool) -> list[Entry]:
    entries = []
    if 8 in bits_list:
        entries.append(run_ort(Entry("onnxruntime", "quantize_dynamic", 8), model, calib, 0, "quantize_dynamic", tmp / "ort_dyn.onnx"))
    for block in (32, 128):
        for bits in bits_list:
            kinds = ["rtn", "hqq"] + (["rtn+emb"] + (["gptq"] if gptq else []) if bits == 4 else [])
            for kind in kinds:
                entry = Entry("onnxruntime", f"{kind} b{block}", bits)
                if bits == 3:
                    entry.failure = "3 bits not offered"
                    entries.append(entry)
                    continue
                print(f"onnxruntime {kind} block {block} {bits}-bit ...", file=sys.stderr, flush=True)
                entries.append(run_ort(entry, model, calib, block, kind, tmp / f"ort_{kind}_{block}_{bits}.onnx"))
    return entries


def onnxcomp_configs(bits: int) -> dict[str, dict]:
    channel = {
        "rtn": {},
        "range search": {"range_search": True},
        "magr": {"magr": True},
        "optq": {"rounding": "optq"},
        "magr+optq": {"magr": True, "rounding": "optq"},
    }
    blocks = {f"magr+optq b{b}": {"magr": True, "rounding": "optq", "granularity": "block", "block_size": b} for b in (128, 32)}
    if bits == 2:
        blocks = {name + " asym": {**options, "asymmetric": True} for name, options in blocks.items()}
    if bits == 4:
        blocks["optq b128 gather3"] = {"rounding": "optq", "granularity": "block", "block_size": 128, "gather_bits": 3}
    return {name: {"bits": bits, **options} for name, options in (channel | blocks).items()}


def magr_model(model: Path, calib: Path, options: dict, tmp: Path, cache: dict) -> tuple[Path, float]:
    """The model with MagR applied (bit width does not enter MagR; granularity does), made
    once per granularity and reused across bit widths; its time is added to each row's."""
    from onnxcomp import QuantConfig
    from onnxcomp.calibration.analysis import Calibration
    from onnxcomp.modelio import load_model, save_model
    from onnxcomp.passes.fold_bn import FoldBatchNormPass
    from onnxcomp.passes.magr import MagrPass
    from onnxcomp.passes.normalize import NormalizePass
    from onnxcomp.report import Report

    key = (options.get("granularity", "channel"), options.get("block_size", 32))
    if key not in cache:
        start = time.perf_counter()
        config, report = QuantConfig(magr=True, granularity=key[0], block_size=key[1]), Report()
        ir_model = load_model(model)
        for pass_ in (NormalizePass(13, report), FoldBatchNormPass(report), MagrPass(config, Calibration(calib), report)):
            ir_model = pass_(ir_model).model
        path = tmp / f"magr_{key[0]}_{key[1]}.onnx"
        save_model(ir_model, path)
        cache[key] = (path, time.perf_counter() - start)
    return cache[key]


def onnxcomp_entries(model: Path, calib: Path, bits_list: list[int], tmp: Path) -> list[Entry]:
    from onnxcomp import QuantConfig, compress_file
    from onnxcomp.calibration.analysis import Calibration
    from onnxcomp.container.format import pack

    entries, cache = [], {}
    for bits in bits_list:
        for name, options in onnxcomp_configs(bits).items():
            print(f"onnxcomp {name} {bits}-bit ...", file=sys.stderr, flush=True)
            source, seconds = model, 0.0
            if options.pop("magr", False):
                source, seconds = magr_model(model, calib, options, tmp, cache)
            out = tmp / f"onnxcomp_{name.replace(' ', '_').replace('+', '_')}_{bits}.onnx"
            start = time.perf_counter()
            compress_file(source, out, QuantConfig(**options), calibration=Calibration(calib))
            seconds += time.perf_counter() - start
            entries.append(Entry("onnxcomp", name, bits, str(out), out.stat().st_size, seconds))
            start = time.perf_counter()
            coded = len(pack(out.read_bytes()))
            entries.append(Entry("onnxcomp .onnxc", name, bits, str(out), coded, seconds + time.perf_counter() - start))
    return entries


PEAK_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "{level}")
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
session.run(None, dict(np.load(sys.argv[2])))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec.
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024)
"""


def peak_memory_mb(path: str, feeds: Path) -> float:
    script = PEAK_SCRIPT.format(level=ACCURACY_LEVEL)
    result = subprocess.run([sys.executable, "-c", script, path, str(feeds)], capture_output=True, text=True, check=True)
    return float(result.stdout.strip())


def evaluate(entries: list[Entry], model: Path, eval_path: Path, labels: np.ndarray | None, repeats: int) -> None:
    from onnxcomp.runtime import make_session, run

    feeds = dict(np.load(eval_path))
    reference = next(iter(run(make_session(model, ACCURACY_LEVEL), feeds).values()))
    done = [e for e in entries if e.path and not e.failure]
    unique = sorted({e.path for e in done})
    for path in list(unique):  # one measurement per file: the .onnxc rows decode to the same model
        try:
            out = next(iter(run(make_session(path, ACCURACY_LEVEL), feeds).values()))
        except Exception as err:  # a file its own tool made that onnxruntime cannot run: a failure
            message = str(err).split("Status Message:")[-1].strip().splitlines()[0][-90:]
            for e in done:
                if e.path == path:
                    e.failure, e.path = f"fails in onnxruntime: {message}", None
            unique.remove(path)
            continue
        a, b = reference.reshape(len(reference), -1), out.reshape(len(out), -1)
        cosine = float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))
        accuracy = None if labels is None else float(np.mean(out.argmax(-1) == labels))
        peak = peak_memory_mb(path, eval_path)
        for e in done:
            if e.path == path:
                e.cosine, e.accuracy, e.peak_mb = cosine, accuracy, peak
                e.size = e.size or Path(path).stat().st_size
    print(f"timing {len(unique) + 1} sessions in turn ...", file=sys.stderr, flush=True)
    latencies = interleaved_latency_ms([model] + [Path(p) for p in unique], feeds, repeats)
    by_path = dict(zip(unique, latencies[1:]))
    for e in done:
        if e.path:
            e.latency_ms = by_path[e.path]
    fp32 = Entry("fp32", "original", None, str(model), model.stat().st_size, 0.0, 1.0,
                 None if labels is None else float(np.mean(reference.argmax(-1) == labels)), latencies[0],
                 peak_memory_mb(str(model), eval_path))
    entries.insert(0, fp32)


def table(entries: list[Entry]) -> str:
    rows = [f"{'tool':16} {'method':22} {'bits':>4} {'kB':>9} {'cosine':>8} {'acc':>6} {'compress s':>10} "
            f"{'ms':>7} {'x fp32':>6} {'peak MB':>8}  failure"]
    fp32_ms = entries[0].latency_ms or 1.0
    for e in entries:
        def fmt(value, spec):
            width = int(re.match(r"\D*(\d+)", spec).group(1))
            return format(value, spec) if value is not None else "-".rjust(width)
        rows.append(
            f"{e.tool:16} {e.method:22} {fmt(e.bits, '>4')} {fmt(None if e.size is None else e.size / 1e3, '9,.1f')} "
            f"{fmt(e.cosine, '8.4f')} {fmt(e.accuracy, '6.3f')} {fmt(e.seconds, '10.1f')} {fmt(e.latency_ms, '7.2f')} "
            f"{fmt(None if e.latency_ms is None else e.latency_ms / fp32_ms, '6.2f')} {fmt(e.peak_mb, '8.0f')}  {e.failure or ''}"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calib", type=Path, required=True, help=".npz of calibration inputs (first axis: samples)")
    parser.add_argument("--eval", type=Path, required=True, help=".npz of evaluation inputs")
    parser.add_argument("--labels", type=Path, default=None, help=".npy of class labels: adds accuracy")
    parser.add_argument("--bits", default="8,4,3,2", help="comma-separated bit widths (default 8,4,3,2)")
    parser.add_argument("--no-gptq", action="store_true", help="skip onnxruntime's GPTQ (minutes on a large model)")
    parser.add_argument("--repeats", type=int, default=20, help="latency runs per session (default 20)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of fidelity against file size (default: none)")
    args = parser.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]
    labels = None if args.labels is None else np.load(args.labels)
    with tempfile.TemporaryDirectory() as tmp:
        entries = ort_entries(args.model, args.calib, bits_list, Path(tmp), gptq=not args.no_gptq)
        entries += onnxcomp_entries(args.model, args.calib, bits_list, Path(tmp))
        try:
            evaluate(entries, args.model, args.eval, labels, args.repeats)
        except Exception:
            traceback.print_exc()
            raise
        for e in entries:
            e.path = None if e.tool != "fp32" else e.path
    print(table(entries))
    if args.json:
        args.json.write_text(json.dumps([asdict(e) for e in entries], indent=1))
    if args.plot:
        draw_frontier([e for e in entries if e.cosine is not None and e.tool != "fp32"], args.plot,
                      title=f"{args.model.name}: fidelity against file size")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
