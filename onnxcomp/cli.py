"""The `onnxcomp` command line: every flag maps to one config field and states its default."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import click

from onnxcomp.cli_help import SectionedCommand
from onnxcomp.config import Granularity, QuantConfig
from onnxcomp.errors import ConfigError, OnnxcompError


def _fail(message: str, status: int = 2):
    click.echo(f"onnxcomp: error: {message}", err=True)
    if status == 130:  # interrupted: everything is cleaned up by now; a signal landing in the
        sys.stdout.flush()  # interpreter's shutdown must not turn the status into another
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def _terminate(signum, frame):
    """SIGTERM unwinds like Ctrl-C, so temporary files are removed on the way out."""
    raise KeyboardInterrupt


def _one_line_errors(func):
    """Every failure as one line, `onnxcomp: error: ...`, exit status 2 (130 when interrupted).

    The project's errors say what to do; the operating system's (a full disk, a read-only
    folder) name the file; anything else is a bug in onnxcomp, said as such
    (ONNXCOMP_TRACEBACK=1 shows the traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return func(*args, **kwargs)
        except OnnxcompError as err:
            _fail(str(err))
        except KeyboardInterrupt:
            _fail("interrupted; no output was left half-written", 130)
        except BrokenPipeError:  # the reader stopped early (| head): end quietly, as cat does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + signal.SIGPIPE)
        except MemoryError:
            _fail("out of memory; use fewer --calib-samples or a smaller --calib-batch, or a machine with more memory")
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            _fail(f"{where}{err.strerror or err}; check that the folder exists, is writable and has free space")
        except Exception as err:
            if os.environ.get("ONNXCOMP_TRACEBACK"):
                raise
            _fail(f"internal error ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                  "this is a bug in onnxcomp: rerun with ONNXCOMP_TRACEBACK=1 and report the traceback")
        finally:
            signal.signal(signal.SIGTERM, previous)  # past the command, a signal ends the process as usual

    return wrapper


class _OneLineGroup(click.Group):
    """Click's usage errors (a missing argument, a value of the wrong type) as one line too."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            return super().main(args, prog_name or "onnxcomp", standalone_mode=False, **extra)
        except click.ClickException as err:
            command = f" {err.ctx.command_path.split(' ', 1)[1]}" if getattr(err, "ctx", None) and " " in err.ctx.command_path else ""
            _fail(f"{err.format_message().rstrip('.')}; see onnxcomp{command} --help", 2)
        except (click.Abort, KeyboardInterrupt):  # also one that lands between a command and its clean-up
            _fail("interrupted; no output was left half-written", 130)


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="onnxcomp")
@click.option("-v", "--verbose", is_flag=True, default=False,
              help="Also print debug events (each pass and its time, calibration sessions, the allocator's trials).")
def main(verbose: bool) -> None:
    """Compress ONNX models: quantized weights that stock onnxruntime runs."""
    import logging

    root = logging.getLogger("onnxcomp")  # set on every call: in one process (tests, notebooks) runs differ
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("onnxcomp: debug: %(name)s: %(message)s"))
        root.addHandler(handler)


def _calibration_options(func):
    """The options that say where calibration data comes from and how it is read."""
    options = [
        click.option("--calib", default=None,
                     help="Calibration inputs: an .npz keyed by input name (first axis = samples), a folder of "
                          ".npy/.npz files or of images, or 'none' to refuse synthetic inputs. Default: synthetic "
                          "inputs from the input types, with a warning, for passes that need data."),
        click.option("--calib-samples", type=int, default=128, help="Use at most this many calibration samples."),
        click.option("--calib-batch", type=int, default=16, help="Samples per onnxruntime run during calibration."),
        click.option("--calib-positions", type=int, default=4096,
                     help="A convolution's Gram matrix is estimated from at most this many output positions per "
                          "sample, drawn at random with a fixed seed (0: every position); bounds the time on large images."),
        click.option("--image-size", type=int, nargs=2, default=None, metavar="H W",
                     help="Resize calibration images to H x W. Default: the model input's fixed size."),
        click.option("--mean", default="0", help="Per-channel mean subtracted from images scaled to [0, 1], comma-separated."),
        click.option("--std", default="1", help="Per-channel std dividing images after the mean, comma-separated."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", help="Image tensor layout the model expects."),
        click.option("--tokenizer", type=click.Path(dir_okay=False), default=None,
                     help="With --calib FILE.txt (one sample per line): the model's tokenizer.json, to tokenize the text."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _calib_options(calib_samples, calib_batch, calib_positions, image_size, mean, std, layout, tokenizer=None):
    from onnxcomp.calibration.sources import CalibOptions

    def floats(text: str, option: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise ConfigError(f"{option} {text!r} is not a comma-separated list of numbers") from None

    return CalibOptions(
        samples=calib_samples, batch=calib_batch, positions=calib_positions, tokenizer=tokenizer,
        image_size=tuple(image_size) if image_size else None,
        mean=floats(mean, "--mean"), std=floats(std, "--std"), layout=layout,
    )


def _compress_and_pack(source: Path, target: Path, config, calibration, progress: bool, check: bool):
    """Compress to a temporary QDQ model beside the target, then pack it into `target`."""
    import tempfile

    from onnxcomp.container.files import pack_file
    from onnxcomp.modelio import check_output_path
    from onnxcomp.pipeline import compress_file

    check_output_path(target, source)
    with tempfile.TemporaryDirectory(dir=target.resolve().parent, prefix=".onnxcomp-") as tmp:
        qdq = Path(tmp) / (source.stem + ".onnx")
        report = compress_file(source, qdq, config, calibration=calibration, progress=progress, check=check)
        _, packed = pack_file(qdq, target)
    report.totals["container size"] = packed
    report.totals["container ratio"] = round(packed / report.totals["file size before"], 4)
    return report


def _budget(options: dict):
    """The bit allocator's target, or None when no budget option is given."""
    given = [options[k] for k in ("target_bits", "target_size", "min_fidelity")]
    if all(value is None for value in given):
        for flag, key in (("--eval", "eval_inputs"), ("--sensitivity", "sensitivity_table")):
            if options[key] is not None:
                raise ConfigError(f"{flag} is for a budget (--target-size, --target-bits or --min-fidelity); give one, "
                                  f"or drop {flag}")
        return None
    from onnxcomp.budget import Budget, parse_size

    def integers(option: str) -> tuple[int, ...]:
        text = options[option.lstrip("-").replace("-", "_")]
        try:
            return tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
        except ValueError:
            raise ConfigError(f"{option} {text!r} is not a comma-separated list of integers") from None

    size = None if options["target_size"] is None else parse_size(options["target_size"])
    return Budget(options["target_bits"], size, options["min_fidelity"], options["eval_inputs"], integers("--alloc-bits"),
                  integers("--alloc-blocks"), coded=options["entropy_code"], sensitivity=options["sensitivity_table"])


def _load_config(ctx: click.Context, path: str | None) -> None:
    """--config: the file's options become the command's defaults (flags given still win)."""
    if path is None:
        return
    from onnxcomp import runconfig

    try:
        options = runconfig.read(path, {p.name for p in ctx.command.params})
    except OnnxcompError as err:
        _fail(str(err))
    ctx.default_map = {**(ctx.default_map or {}), **options}


def _check_container_name(target: Path, what: str) -> None:
    """A container under an .onnx name would be handed to onnxruntime, which cannot open it."""
    if target.suffix != ".onnxc":
        raise ConfigError(
            f"{what} writes an .onnxc container, which onnxruntime cannot open, but the output is named {target.name!r}; "
            "name it *.onnxc (or drop the option for a plain .onnx model)"
        )


def _show_warnings(message, category, filename, lineno, file=None, line=None):
    click.echo(f"onnxcomp: warning: {message}", err=True)


COMPRESS_SECTIONS = {
    "Weights": ("bits", "granularity", "block_size", "asymmetric", "zero_point", "accuracy_level", "gather_bits", "keep_first_last_bits", "exclude",
                "min_elements"),
    "Calibration data": ("calib", "calib_samples", "calib_batch", "calib_positions", "image_size", "mean", "std", "layout",
                         "tokenizer", "device"),
    "MagR (magnitude reduction before rounding)": ("magr", "magr_alpha", "magr_iters"),
    "Range search (REQuant clipping)": ("range_search", "range_scope", "range_objective", "range_min", "sqrt"),
    "Rounding": ("rounding", "rate_lambda", "optq_damp", "optq_act_order", "bias_correction"),
    "Activations (W8A8 integer kernels)": ("act_bits", "act_calib", "percentile", "act_min_depth", "no_smooth",
                                           "smooth_alpha"),
    "Bit allocation (bits per layer under a budget)": ("target_bits", "target_size", "min_fidelity", "eval_inputs",
                                                        "alloc_bits", "alloc_blocks", "sensitivity_table"),
    "Output": ("output", "target", "entropy_code", "report_json", "no_check", "quiet", "config_file", "dump_config", "help"),
}
COMPRESS_EXAMPLES = (
    "onnxcomp compress model.onnx --bits 8 -o model.q8.onnx",
    "onnxcomp compress model.onnx --bits 4 --granularity block --block-size 32 --asymmetric --rounding optq "
    "--calib calib.npz -o model.q4.onnx",
    "onnxcomp compress model.onnx --bits 8 --act-bits 8 --calib images/ --image-size 224 224 -o model.w8a8.onnx",
    "onnxcomp compress model.onnx --bits 2 --granularity block --asymmetric --magr --rounding optq --calib calib.npz "
    "--entropy-code -o model.onnxc",
    "onnxcomp compress model.onnx --target-size 10MB --entropy-code --rounding optq --calib calib.npz -o model.onnxc",
)


@main.command(cls=SectionedCommand, sections=COMPRESS_SECTIONS, examples=COMPRESS_EXAMPLES)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output path. Default: MODEL with .q<BITS>.onnx in place of .onnx.")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="8",
              help="Weight bit width (3-bit codes are stored as int4).")
@click.option("--granularity", type=click.Choice([g.value for g in Granularity]), default="auto",
              help="One scale per tensor, per output channel, or per block along the reduction axis; auto: at 2-4 "
                   "bits blocks for MatMul, Gemm and embedding tables and per channel for convolutions, at 8 bits "
                   "per channel (what the zoo measures best).")
@click.option("--block-size", type=int, default=32,
              help="Elements per block with --granularity block or auto (a power of two).")
@click.option("--asymmetric", is_flag=True, default=False, help="Unsigned codes with a zero point instead of a symmetric grid.")
@click.option("--zero-point", type=click.Choice(["integer", "float"]), default="integer",
              help="With --asymmetric and blocks: integer zero points (DequantizeLinear), or real-valued ones so each "
                   "block's levels span exactly its range (MatMul layers at 2-4 bits, as onnxruntime's MatMulNBits; "
                   "the other layers keep integer ones).")
@click.option("--accuracy-level", type=click.Choice(["0", "4"]), default=None,
              help="With --target onnxruntime: the MatMulNBits nodes written compute in float (0) or quantize their "
                   "input to int8 (4, faster at 8 bits, less exact). Default: 0, except 8-bit layers in a model of "
                   "4 bits or fewer (a tied embedding at --gather-bits 8), which get 4.")
@click.option("--exclude", default=None, help="Regular expression on node names: matching layers stay in float.")
@click.option("--min-elements", type=int, default=0, help="Weights with fewer elements stay in float.")
@click.option("--keep-first-last-bits", type=int, default=None,
              help="Bit width for the first and last quantizable layers (REQuant keeps them at 8). Default: same as --bits.")
@click.option("--gather-bits", type=int, default=None,
              help="Bit width for embedding tables (Gather over a constant table), which often tolerate fewer bits "
                   "than the layers. Default: same as --bits.")
@click.option("--range-search", is_flag=True, default=False,
              help="Search each scale's clipping ratio α in [--range-min, 1] by golden section (REQuant) instead of using the full range.")
@click.option("--range-scope", type=click.Choice(["channel", "layer"]), default="channel",
              help="One α per scale group (channel or block), or one per layer as in the REQuant paper.")
@click.option("--range-objective", type=click.Choice(["mse", "output", "sequential"]), default="mse",
              help="What α minimizes: mse, the weights' squared error; output, the layer-output error on the calibration "
                   "data; sequential, layer by layer in graph order, the error of each layer's output, given the inputs "
                   "the layers already quantized produce, against the unquantized model's (runs the model once per "
                   "distinct layer input). output and sequential use --calib data (synthetic inputs, with a warning, without it).")
@click.option("--range-min", type=float, default=0.2, help="Smallest clipping ratio the search considers.")
@click.option("--sqrt", is_flag=True, default=False,
              help="Quantize sign(w)·sqrt|w| (finer steps for small weights) and decode y·|y| with Abs and Mul; implies a range search.")
@click.option("--bias-correction", is_flag=True, default=False,
              help="Subtract each layer's mean output shift E[x]·ΔW, measured on --calib data, from its bias.")
@click.option("--magr", is_flag=True, default=False,
              help="Before rounding, shrink each layer's largest weights while keeping its outputs on the calibration data (MagR).")
@click.option("--magr-alpha", type=float, default=None,
              help="MagR's ℓ∞ penalty. Default: 1e-3 per channel, 1e-4 with --granularity block.")
@click.option("--magr-iters", type=int, default=200, help="MagR's proximal gradient iterations (it stops early when converged).")
@click.option("--rounding", type=click.Choice(["nearest", "optq"]), default="nearest",
              help="Round to nearest, or OPTQ (GPTQ): round the reduction axis in order and spread each rounding "
                   "error over the inputs not yet rounded, through the calibration Gram matrix.")
@click.option("--rate-lambda", type=float, default=0.0,
              help="Rate-aware rounding: each code minimizes its squared error (in squared steps) plus this times the "
                   "bits the entropy coder spends on it, so codes move to more frequent levels (smaller .onnxc); 0 "
                   "rounds as --rounding says.")
@click.option("--optq-damp", type=float, default=0.01, help="OPTQ's dampening of H, as a fraction of its mean diagonal.")
@click.option("--optq-act-order", is_flag=True, default=False,
              help="OPTQ rounds the most used inputs (largest H diagonal) first; blocks then keep scales from the original weights.")
@click.option("--act-bits", type=int, default=None,
              help="Quantize the inputs of quantized layers to this many bits (8: uint8 QDQ that onnxruntime fuses "
                   "into integer kernels). Default: activations stay float.")
@click.option("--act-calib", type=click.Choice(["minmax", "percentile", "mse"]), default="minmax",
              help="How activation ranges are chosen from the calibration histogram.")
@click.option("--percentile", type=float, default=99.99, help="With --act-calib percentile: the share of values kept in range.")
@click.option("--act-min-depth", type=int, default=16,
              help="With --act-bits: layers summing fewer products per output (first convs, depthwise convs) stay float.")
@click.option("--no-smooth", is_flag=True, default=False,
              help="With --act-bits: do not migrate activation outlier channels into the weights (smoothing).")
@click.option("--smooth-alpha", type=float, default=None,
              help="Smoothing strength in [0, 1]. Default: chosen per layer input by predicted output noise.")
@_calibration_options
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
              help="Where calibration (onnxruntime's CUDA provider) and the MagR and OPTQ solvers (torch) run.")
@click.option("--target", type=click.Choice(["onnxruntime", "portable"]), default="onnxruntime",
              help="The runtime the graph is written for: onnxruntime (its contrib operators where they run faster, "
                   "e.g. GatherBlockQuantized for 4-bit embedding tables) or portable (standard ONNX operators only).")
@click.option("--entropy-code", is_flag=True, default=False,
              help="Write an .onnxc container (integer weights ANS-coded; `onnxcomp unpack` gives the QDQ model back).")
@click.option("--target-bits", type=float, default=None,
              help="Choose each layer's bits (or float) for this average of stored bits per weight (codes, scales, zero "
                   "points) over the layers, where the measured end-to-end loss is least (see onnxcomp sensitivity).")
@click.option("--target-size", default=None, metavar="SIZE",
              help="Choose each layer's bits for an output file of at most this size (bytes, or 9.5MB, 20MiB; the "
                   "container with --entropy-code), within 2% below it where the layers' choices allow.")
@click.option("--min-fidelity", type=float, default=None,
              help="Choose the smallest file whose lowest output cosine to FP32 on --eval inputs is at least this.")
@click.option("--eval", "eval_inputs", type=click.Path(dir_okay=False), default=None,
              help="With --min-fidelity: evaluation inputs (.npz keyed by input name), apart from the calibration data.")
@click.option("--alloc-bits", default="2,3,4,8", metavar="LIST", help="The bit widths the allocator may give a layer, besides float.")
@click.option("--alloc-blocks", default="", metavar="LIST", show_default=False,
              help="Block sizes the allocator may give a layer in blocks, besides --block-size (for example 128,256: "
                   "fewer scales, fewer bytes). Default: --block-size only.")
@click.option("--sensitivity", "sensitivity_table", type=click.Path(dir_okay=False), default=None,
              help="With a budget: the layers' points from `onnxcomp sensitivity --json` (same grid and rounding "
                   "options) instead of measuring them again; --alloc-bits and --alloc-blocks are then what it holds.")
@click.option("--report-json", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON here.")
@click.option("--no-check", is_flag=True, default=False,
              help="Skip the end-to-end check (the output against the input on a few calibration samples, with a "
                   "warning below cosine 0.9).")
@click.option("-q", "--quiet", is_flag=True, default=False, help="Print no table and no progress bar.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, is_eager=True, expose_value=False,
              callback=lambda ctx, param, value: _load_config(ctx, value),
              help="Take the options from this TOML file (the flags' names: block-size = 32); flags given on the "
                   "command line win.")
@click.option("--dump-config", is_flag=True, default=False,
              help="Print every option of this run as TOML for --config, and stop.")
@_one_line_errors
def compress(model, **options):
    """Quantize MODEL's weights (and with --act-bits its activations) and write a QDQ model
    that onnxruntime runs."""
    options["bits"] = int(options["bits"])
    if options["accuracy_level"] is not None:
        options["accuracy_level"] = int(options["accuracy_level"])
    if options.pop("dump_config"):
        from onnxcomp import runconfig

        click.echo(runconfig.dump(click.get_current_context().params), nl=False)
        return
    from onnxcomp.calibration.analysis import Calibration
    from onnxcomp.modelio import check_free_space, check_outputs, write_text_atomic
    from onnxcomp.pipeline import compress_file

    fields = {f.name for f in dataclasses.fields(QuantConfig)}  # flags named as the config's fields
    config = QuantConfig(**{k: v for k, v in options.items() if k in fields}, smooth=not options["no_smooth"])
    calib_options = _calib_options(*(options[k] for k in ("calib_samples", "calib_batch", "calib_positions", "image_size",
                                                          "mean", "std", "layout", "tokenizer")))
    quiet, check, entropy_code, report_json = options["quiet"], not options["no_check"], options["entropy_code"], options["report_json"]
    calibration = Calibration(options["calib"], calib_options, device=options["device"], progress=not quiet)
    source = Path(model)
    target = Path(options["output"]) if options["output"] else source.with_suffix(".onnxc" if entropy_code else f".q{config.bits}.onnx")
    if entropy_code:
        _check_container_name(target, "--entropy-code")
    check_outputs(source, target, report_json)  # before any work: no output may be an input
    if source.is_file():
        check_free_space(target.resolve().parent, source.stat().st_size * max(config.bits, 4) // 16, "the output")
    warnings.showwarning = _show_warnings

    def write(config, path: Path) -> tuple:
        if entropy_code:
            report = _compress_and_pack(source, path, config, calibration, progress=not quiet, check=check)
            return report, report.totals["container size"]
        report = compress_file(source, path, config, calibration=calibration, progress=not quiet, check=check)
        return report, report.totals["file size after"]

    budget = _budget(options)
    if budget is None:
        report, _ = write(config, target)
    else:
        from onnxcomp.budget import compress_within

        report = compress_within(source, target, budget, config, calibration, write, progress=not quiet)
    if report_json:
        write_text_atomic(report_json, report.to_json())
    if not quiet:
        click.echo(report.to_table())
        click.echo(f"wrote {target}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of a table.")
@_one_line_errors
def inspect(model, as_json):
    """Per-layer weight statistics of MODEL: shape, min, max, std, max/std, kurtosis. For an
    .onnxc container: per coded tensor, bits per weight stored against the symbols' entropy."""
    from onnxcomp.inspect import model_stats, provenance, provenance_line, stats_table
    from onnxcomp.modelio import load_model

    if Path(model).suffix == ".onnxc":
        from onnxcomp.container.files import container_table

        click.echo(container_table(model, as_json))
        return

    loaded = load_model(model)
    stats, made = model_stats(loaded), provenance(loaded)
    if as_json:
        click.echo(json.dumps({"layers": [asdict(s) for s in stats], "made": made}, indent=2))
        return
    click.echo(stats_table(stats))
    if made is not None:
        click.echo(provenance_line(made))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Output path. Default: MODEL with .onnxc in place of .onnx.")
@_one_line_errors
def pack(model, output):
    """Entropy-code MODEL's integer weights into an .onnxc container (lossless: unpack gives the same bytes)."""
    from onnxcomp.container.files import pack_file

    target = Path(output) if output else Path(model).with_suffix(".onnxc")
    _check_container_name(target, "pack")
    before, after = pack_file(model, target)
    click.echo(f"wrote {target}: {after:,} bytes ({after / before:.3f} of {before:,})")


@main.command()
@click.argument("container", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Output path. Default: CONTAINER with .onnx in place of .onnxc.")
@_one_line_errors
def unpack(container, output):
    """Decode an .onnxc container back into the exact ONNX file it was packed from."""
    from onnxcomp.container.files import unpack_file

    target = Path(output) if output else Path(container).with_suffix(".onnx")
    unpack_file(container, target)
    click.echo(f"wrote {target}")


@main.command("calib-info")
@click.argument("model", type=click.Path(dir_okay=False))
@_calibration_options
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of a table.")
@_one_line_errors
def calib_info(model, calib, calib_samples, calib_batch, calib_positions, image_size, mean, std, layout, tokenizer, as_json):
    """What the calibration set for MODEL holds, per input: dtype, samples, shapes, value ranges.
    Checks it against the model's inputs without running the model."""
    from onnxcomp.calibration.analysis import Calibration
    from onnxcomp.calibration.info import summarize, summary_table
    from onnxcomp.modelio import load_model

    warnings.showwarning = _show_warnings
    calibration = Calibration(calib, _calib_options(calib_samples, calib_batch, calib_positions, image_size, mean, std, layout,
                                                    tokenizer))
    dataset = calibration.dataset(load_model(model), "calib-info")
    summaries = summarize(dataset)
    if as_json:
        rows = [{k: v for k, v in asdict(s).items() if not k.startswith("_")} for s in summaries]
        click.echo(json.dumps({"source": dataset.label, "inputs": rows}, indent=2))
    else:
        click.echo(summary_table(dataset, summaries))


SENSITIVITY_EXAMPLES = (
    "onnxcomp sensitivity model.onnx --calib calib.npz",
    "onnxcomp sensitivity model.onnx --calib calib.npz --bits 2,4 --granularity block --json s.json --plot s.png",
)


@main.command(examples=SENSITIVITY_EXAMPLES, cls=SectionedCommand, sections={})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--bits", "bits_list", default="2,3,4,8", help="Bit widths to measure each layer at, comma-separated.")
@click.option("--granularity", type=click.Choice([g.value for g in Granularity]), default="auto",
              help="The grid's scale layout, as in compress.")
@click.option("--block-size", type=int, default=32, help="Elements per block, as in compress.")
@click.option("--asymmetric", is_flag=True, default=False, help="Unsigned codes with a zero point, as in compress.")
@click.option("--exclude", default=None, help="Regular expression on node names: layers left out of the table.")
@click.option("--rounding", type=click.Choice(["nearest", "optq"]), default="nearest", help="Rounding, as in compress.")
@click.option("--rate-lambda", type=float, default=0.0, help="Rate-aware rounding's λ, as in compress.")
@_calibration_options
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="onnxruntime execution provider.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the table as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw the table as a PNG here (needs matplotlib).")
@click.option("-q", "--quiet", is_flag=True, default=False, help="Print no table and no progress bar.")
@_one_line_errors
def sensitivity(model, bits_list, granularity, block_size, asymmetric, exclude, rounding, rate_lambda, device, json_path,
                plot_path, quiet, **calib):
    """For every layer of MODEL and each bit width: the end-to-end effect on the outputs of
    quantizing that layer alone (rounded as --rounding says; 1 − cosine to FP32, KL for outputs
    named *logits*), beside the layer-wise estimate tr(ΔWᵀHΔW)/tr(WᵀHW). On --calib data
    (synthetic inputs with a warning without it); --calib-samples is 32 here unless given."""
    from onnxcomp.calibration.analysis import Calibration
    from onnxcomp.modelio import check_outputs, load_model, write_text_atomic
    from onnxcomp.sensitivity import measure_sensitivity, plot

    try:
        bits = tuple(sorted({int(b) for b in bits_list.split(",")}))
    except ValueError:
        raise ConfigError(f"--bits {bits_list!r} is not a comma-separated list of bit widths (2, 3, 4, 8)") from None
    if not bits or not set(bits) <= {2, 3, 4, 8}:
        raise ConfigError(f"--bits {bits_list!r}: each bit width must be 2, 3, 4 or 8")
    ctx = click.get_current_context()
    if ctx.get_parameter_source("calib_samples") is click.core.ParameterSource.DEFAULT:
        calib["calib_samples"] = 32  # one run per layer and bit width: a smaller default than compress's
    config = QuantConfig(bits=min(bits), granularity=granularity, block_size=block_size, asymmetric=asymmetric,
                         exclude=exclude, rounding=rounding, rate_lambda=rate_lambda)
    check_outputs(model, json_path, plot_path)
    warnings.showwarning = _show_warnings
    calibration = Calibration(calib.pop("calib"), _calib_options(**calib), device=device, progress=not quiet)
    table = measure_sensitivity(load_model(model), config, calibration, bits, progress=not quiet)
    if json_path:
        write_text_atomic(json_path, json.dumps(table.to_dict(), indent=2))
    if plot_path:
        plot(table, plot_path)
    if not quiet:
        click.echo(table.to_table())


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
@click.option("--baseline", type=click.Path(dir_okay=False), default=None,
              help="A JSON of the fidelity an earlier run reached: exit 1 when any output's cosine falls below it by "
                   "more than --margin (a CI gate for models exported on every commit).")
@click.option("--margin", type=float, default=0.001, help="With --baseline: how far below the recorded cosine fails.")
@click.option("--update-baseline", is_flag=True, default=False, help="With --baseline: record this run's fidelity there.")
@_one_line_errors
def verify(reference, candidate, inputs, min_cosine, accuracy_level, device, as_json, baseline, margin, update_baseline):
    """Run REFERENCE and CANDIDATE on the same inputs; per output: cosine, SNR (dB), max abs error."""
    from onnxcomp.fidelity import verify as run_verify

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
    failures = []
    if min_cosine is not None:
        failures += [f"{r.name}: cosine {r.cosine:.6f} below {min_cosine} (--min-cosine)" for r in results if r.cosine < min_cosine]
    if baseline and update_baseline:
        from onnxcomp.modelio import write_text_atomic

        write_text_atomic(baseline, json.dumps({"inputs": source, "outputs": {r.name: asdict(r) for r in results}}, indent=2))
    elif baseline:
        failures += _below_baseline(results, baseline, margin)
    for failure in failures:
        click.echo(f"onnxcomp: verify failed: {failure}", err=True)
    if failures:
        sys.exit(1)


def _below_baseline(results, path: str, margin: float) -> list[str]:
    """One line per output whose cosine fell more than `margin` below the recorded one."""
    try:
        recorded = json.loads(Path(path).read_text())["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"--baseline {path}: not a baseline onnxcomp wrote; record one with --update-baseline") from None
    lines = []
    for r in results:
        if r.name not in recorded:
            lines.append(f"{r.name}: not in the baseline {path}; record it again with --update-baseline")
        elif r.cosine < recorded[r.name]["cosine"] - margin:
            lines.append(f"{r.name}: cosine {r.cosine:.6f}, the baseline reached {recorded[r.name]['cosine']:.6f} "
                         f"(margin {margin})")
    return lines


if __name__ == "__main__":
    main()
