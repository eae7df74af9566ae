"""The `onnxcomp` command line: every flag maps to one config field and states its default."""

from __future__ import annotations

import functools
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import click

from onnxcomp.config import Granularity, QuantConfig
from onnxcomp.errors import OnnxcompError


def _one_line_errors(func):
    """Turn the project's errors into `onnxcomp: error: ...` and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except OnnxcompError as err:
            click.echo(f"onnxcomp: error: {err}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="onnxcomp")
def main() -> None:
    """Compress ONNX models: quantized weights that stock onnxruntime runs."""


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output path. Default: MODEL with .q<BITS>.onnx in place of .onnx.")
@click.option("--bits", type=int, default=8, help="Weight bit width: 2, 3 (stored as int4), 4 or 8.")
@click.option("--granularity", type=click.Choice([g.value for g in Granularity]), default="channel",
              help="One scale per tensor, per output channel, or per block along the reduction axis.")
@click.option("--block-size", type=int, default=32, help="Elements per block with --granularity block (a power of two).")
@click.option("--asymmetric", is_flag=True, default=False, help="Unsigned codes with a zero point instead of a symmetric grid.")
@click.option("--exclude", default=None, help="Regular expression on node names: matching layers stay in float.")
@click.option("--min-elements", type=int, default=0, help="Weights with fewer elements stay in float.")
@click.option("--keep-first-last-bits", type=int, default=None,
              help="Bit width for the first and last quantizable layers (REQuant keeps them at 8). Default: same as --bits.")
@click.option("--report-json", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON here.")
@click.option("-q", "--quiet", is_flag=True, default=False, help="Print no table and no progress bar.")
@_one_line_errors
def compress(model, output, bits, granularity, block_size, asymmetric, exclude, min_elements, keep_first_last_bits, report_json, quiet):
    """Quantize MODEL's weights and write a QDQ model that onnxruntime runs."""
    from onnxcomp.pipeline import compress_file

    config = QuantConfig(
        bits=bits, granularity=Granularity(granularity), block_size=block_size, asymmetric=asymmetric,
        exclude=exclude, min_elements=min_elements, keep_first_last_bits=keep_first_last_bits,
    )
    source = Path(model)
    target = Path(output) if output else source.with_suffix(f".q{bits}.onnx")
    report = compress_file(source, target, config, progress=not quiet)
    if report_json:
        Path(report_json).write_text(report.to_json())
    if not quiet:
        click.echo(report.to_table())
        click.echo(f"wrote {target}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of a table.")
@_one_line_errors
def inspect(model, as_json):
    """Per-layer weight statistics of MODEL: shape, min, max, std, max/std, kurtosis."""
    from onnxcomp.inspect import model_stats, stats_table
    from onnxcomp.modelio import load_model

    stats = model_stats(load_model(model))
    click.echo(json.dumps([asdict(s) for s in stats], indent=2) if as_json else stats_table(stats))


@main.command()
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--inputs", type=click.Path(dir_okay=False), default=None,
              help=".npz whose keys are the model's input names. Default: synthetic inputs from the input types.")
@click.option("--min-cosine", type=float, default=None, help="Exit with status 1 if any output's mean cosine is below this.")
@click.option("--accuracy-level", type=click.Choice(["0", "4"]), default=None,
              help="onnxruntime MatMulNBits accuracy level: 0 float compute, 4 int8 activations. Default: onnxruntime's (4).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="onnxruntime execution provider.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of a table.")
@_one_line_errors
def verify(reference, candidate, inputs, min_cosine, accuracy_level, device, as_json):
    """Run REFERENCE and CANDIDATE on the same inputs; per output: cosine, SNR (dB), max abs error."""
    from onnxcomp.verify import verify as run_verify

    level = None if accuracy_level is None else int(accuracy_level)
    results, source = run_verify(reference, candidate, inputs, level, device)
    if as_json:
        click.echo(json.dumps({"inputs": source, "outputs": [asdict(r) for r in results]}, indent=2))
    else:
        click.echo(f"inputs: {source}; MatMulNBits accuracy level: {accuracy_level or 'default (4)'}")
        width = max(len(r.name) for r in results)
        click.echo(f"{'output'.ljust(width)}  cosine     SNR dB   max abs err")
        for r in results:
            snr = "inf" if math.isinf(r.snr_db) else f"{r.snr_db:.2f}"
            click.echo(f"{r.name.ljust(width)}  {r.cosine:.6f}  {snr:>7}  {r.max_abs_error:.4g}")
    if min_cosine is not None:
        failing = [r for r in results if r.cosine < min_cosine]
        if failing:
            names = ", ".join(f"{r.name} ({r.cosine:.6f})" for r in failing)
            click.echo(f"onnxcomp: verify failed: cosine below {min_cosine} for {names}", err=True)
            sys.exit(1)


if __name__ == "__main__":
    main()
