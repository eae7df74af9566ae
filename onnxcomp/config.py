"""Typed options of a compression run, validated once where they are made."""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass

from onnxcomp.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
ACTIVATION_BITS = (8,)
ACTIVATION_METHODS = ("minmax", "percentile", "mse")
RANGE_OBJECTIVES = ("mse", "output", "sequential")
TARGETS = ("onnxruntime", "portable")


class Granularity(str, enum.Enum):
    """How many weights share one scale."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    BLOCK = "block"
    AUTO = "auto"  # per layer kind and bit width: see QuantConfig.layer_granularity


# Layers that take blocks along their reduction where the default picks for them.
BLOCKED_BY_DEFAULT = ("MatMul", "Gemm", "Gather")


@dataclass(frozen=True)
class QuantConfig:
    """Options of the weight quantization pass (and of the passes it needs first)."""

    bits: int = 8
    granularity: Granularity = Granularity.AUTO
    block_size: int = 32
    asymmetric: bool = False
    exclude: str | None = None
    min_elements: int = 0
    keep_first_last_bits: int | None = None
    gather_bits: int | None = None  # embedding tables (Gather); None: the same as bits
    act_bits: int | None = None  # None: activations stay float
    act_calib: str = "minmax"
    percentile: float = 99.99
    act_min_depth: int = 16  # layers summing fewer products keep float activations
    range_search: bool = False
    range_scope: str = "channel"  # "channel" (per scale group) or "layer" (one ratio per layer, as REQuant)
    # "mse" (weights), "output" (tr ΔWᵀHΔW on calibration data) or "sequential" (layers in
    # order, each against the unquantized model's output on the inputs it really receives)
    range_objective: str = "mse"
    range_min: float = 0.2
    sqrt: bool = False  # quantize sign(w)·√|w| and decode y·|y| (implies a range search)
    bias_correction: bool = False  # subtract E[x]·ΔW from each layer's bias (needs calibration data)
    magr: bool = False
    magr_alpha: float | None = None  # None: 1e-3 per channel, 1e-4 per block (the paper's)
    magr_iters: int = 200
    rounding: str = "nearest"  # "nearest" or "optq" (error-compensating, needs layer statistics)
    optq_damp: float = 0.01  # added to H's diagonal, as a fraction of its mean
    optq_act_order: bool = False  # round the most used inputs first
    smooth: bool = True  # with act_bits: migrate activation outliers into the weights
    smooth_alpha: float | None = None  # None: chosen per input from a grid
    # "onnxruntime": the graph a plain onnxruntime session runs fastest (its contrib ops where
    # they pay); "portable": standard ONNX operators only.
    target: str = "onnxruntime"
    # "integer": DequantizeLinear's zero points; "float": real-valued ones, so each block's
    # levels span exactly its [min, max] (blockwise MatMul at 2-4 bits, as MatMulNBits)
    zero_point: str = "integer"
    # MatMulNBits written with --target onnxruntime compute in float (0) or with int8
    # activations (4); None: see nbits_accuracy
    accuracy_level: int | None = None
    # Bits chosen per layer (by name) before any graph is touched, as the bit allocator
    # decides them: (layer, bits) pairs, 0 for a layer kept float; layers not named follow
    # the options above.
    bits_plan: tuple[tuple[str, int], ...] = ()
    # Block sizes chosen per layer (by name) in the same way, for layers the granularity puts
    # in blocks; the others take block_size.
    block_plan: tuple[tuple[str, int], ...] = ()
    # Rate-aware rounding: each code minimizes its squared error (in squared steps) plus
    # rate_lambda times the bits the entropy coder spends on it; 0 rounds to nearest.
    rate_lambda: float = 0.0

    def __post_init__(self) -> None:
        for field in ("bits_plan", "block_plan"):
            plan = getattr(self, field)
            plan = plan.items() if isinstance(plan, dict) else plan
            object.__setattr__(self, field, tuple(sorted((str(name), int(value)) for name, value in plan)))
        for name, bits in self.bits_plan:
            if bits != 0 and bits not in SUPPORTED_BITS:
                raise ConfigError(f"the bit plan gives layer {name!r} {bits} bits; choose 0 (float) or one of "
                                  f"{', '.join(map(str, SUPPORTED_BITS))}")
        for name, size in self.block_plan:
            if size < 2 or size & (size - 1):
                raise ConfigError(f"the block plan gives layer {name!r} blocks of {size}; choose a power of two >= 2")
        try:
            object.__setattr__(self, "granularity", Granularity(self.granularity))
        except ValueError:
            choices = ", ".join(g.value for g in Granularity)
            raise ConfigError(f"--granularity {self.granularity} is not supported; choose one of {choices}") from None
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(
                f"--bits {self.bits} is not supported; choose one of "
                f"{', '.join(map(str, SUPPORTED_BITS))}"
            )
        for option, value in (("--keep-first-last-bits", self.keep_first_last_bits), ("--gather-bits", self.gather_bits)):
            if value is not None and value not in SUPPORTED_BITS:
                raise ConfigError(f"{option} {value} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.granularity in (Granularity.BLOCK, Granularity.AUTO):
            size = self.block_size
            if size < 2 or size & (size - 1):
                raise ConfigError(
                    f"--block-size {size} is not a power of two >= 2; onnxruntime's blockwise "
                    "kernels need one (for example 32, 64 or 128)"
                )
        if self.act_bits is not None and self.act_bits not in ACTIVATION_BITS:
            raise ConfigError(
                f"--act-bits {self.act_bits} is not supported; choose 8 (onnxruntime's integer kernels take 8-bit activations)"
            )
        if self.act_calib not in ACTIVATION_METHODS:
            raise ConfigError(f"--act-calib {self.act_calib} is not supported; choose one of {', '.join(ACTIVATION_METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"--percentile {self.percentile} must be in (50, 100], for example 99.99")
        if self.range_scope not in ("channel", "layer"):
            raise ConfigError(f"--range-scope {self.range_scope} is not supported; choose channel or layer")
        if self.range_objective not in RANGE_OBJECTIVES:
            raise ConfigError(f"--range-objective {self.range_objective} is not supported; choose {', '.join(RANGE_OBJECTIVES)}")
        if not 0.0 < self.range_min < 1.0:
            raise ConfigError(f"--range-min {self.range_min} must be in (0, 1), for example 0.2")
        if self.magr_alpha is not None and not 0 < self.magr_alpha < math.inf:
            raise ConfigError(f"--magr-alpha {self.magr_alpha} must be positive and finite, for example 1e-3")
        if self.magr_iters < 1:
            raise ConfigError(f"--magr-iters {self.magr_iters} must be at least 1")
        if self.rounding not in ("nearest", "optq"):
            raise ConfigError(f"--rounding {self.rounding} is not supported; choose nearest or optq")
        if not 0.0 < self.optq_damp < 1.0:
            raise ConfigError(f"--optq-damp {self.optq_damp} must be in (0, 1), for example 0.01")
        if self.rounding == "optq" and self.sqrt:
            raise ConfigError(
                "--rounding optq does not combine with --sqrt: OPTQ's error compensation assumes a linear decode; "
                "drop one of them"
            )
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"--smooth-alpha {self.smooth_alpha} must be in [0, 1]")
        if self.zero_point not in ("integer", "float"):
            raise ConfigError(f"--zero-point {self.zero_point} is not supported; choose integer or float")
        if self.zero_point == "float":
            needed = [("--granularity block", self.granularity in (Granularity.BLOCK, Granularity.AUTO)),
                      ("--asymmetric", self.asymmetric),
                      ("--target onnxruntime", self.target == "onnxruntime")]
            missing = [flag for flag, ok in needed if not ok]
            if missing or self.range_search or self.sqrt:
                extra = ["no --range-search or --sqrt"] if self.range_search or self.sqrt else []
                raise ConfigError(f"--zero-point float needs {', '.join(missing + extra)} (its grids span each block's own "
                                  "range, written as onnxruntime's MatMulNBits)")
        if not 0.0 <= self.rate_lambda < math.inf:
            raise ConfigError(f"--rate-lambda {self.rate_lambda} must be 0 or more and finite, for example 0.05")
        if self.rate_lambda and self.sqrt:
            raise ConfigError("--rate-lambda does not combine with --sqrt (its codes are not on a uniform grid); drop one")
        if self.accuracy_level not in (None, 0, 4):
            raise ConfigError(f"--accuracy-level {self.accuracy_level} is not supported; choose 0 (float) or 4 (int8 activations)")
        if self.target not in TARGETS:
            raise ConfigError(f"--target {self.target} is not supported; choose one of {', '.join(TARGETS)}")
        if self.min_elements < 0:
            raise ConfigError(f"--min-elements {self.min_elements} is negative; use 0 or more")
        if self.exclude is not None:
            try:
                re.compile(self.exclude)
            except re.error as err:
                raise ConfigError(f"--exclude {self.exclude!r} is not a valid regular expression: {err}") from None

    def as_dict(self) -> dict:
        """Every option by name, values as plain JSON/TOML types."""
        plain = {f.name: (v.value if isinstance(v, enum.Enum) else v) for f in dataclasses.fields(self)
                 for v in (getattr(self, f.name),)}
        return {**plain, "bits_plan": dict(self.bits_plan), "block_plan": dict(self.block_plan)}

    def layer_granularity(self, op_type: str, bits: int) -> Granularity:
        """The granularity a layer gets. The default (auto) follows the zoo's measurements:
        at 2-4 bits, blocks for MatMul, Gemm and embedding tables (MiniLM at 4 bits: cosine
        0.967 in blocks of 32 against 0.904 per channel; a CTC recognizer keeps its accuracy
        in blocks and loses it per channel), per channel for convolutions and recurrent
        layers; at 8 bits per channel everywhere (within noise of FP32, smallest)."""
        if self.granularity is not Granularity.AUTO:
            return self.granularity
        return Granularity.BLOCK if bits <= 4 and op_type in BLOCKED_BY_DEFAULT else Granularity.CHANNEL

    def nbits_accuracy(self, bits: int) -> int:
        """The accuracy level of a MatMulNBits holding `bits`-bit codes. By default float
        compute (the QDQ graph's numbers), except 8-bit layers in a model of 4 bits or fewer
        (the embedding table tied to the logits at --gather-bits 8): there int8 activations
        cost less than the other weights' rounding (SmolLM2 perplexity 36.53 against 36.52)
        and run the layer twice as fast; at --bits 8 they would cost the most (next-token
        agreement 0.939 against 0.95 and more)."""
        if self.accuracy_level is not None:
            return self.accuracy_level
        return 4 if bits == 8 and self.bits <= 4 else 0

    def layer_bits(self, name: str, op_type: str, edge: bool) -> int:
        """A layer's bit width: the plan's where it names the layer (0: kept float), else
        --keep-first-last-bits for the first and last layers, --gather-bits for embedding
        tables, --bits for the rest."""
        planned = dict(self.bits_plan).get(name)
        if planned is not None:
            return planned
        if edge and self.keep_first_last_bits:
            return self.keep_first_last_bits
        if op_type == "Gather" and self.gather_bits:
            return self.gather_bits
        return self.bits

    def layer_block_size(self, name: str) -> int:
        """A blockwise layer's block size: the block plan's where it names the layer, else --block-size."""
        return dict(self.block_plan).get(name, self.block_size)

    @property
    def all_bits(self) -> tuple[int, ...]:
        """Every bit width the output model will hold."""
        extra = tuple(b for b in (self.keep_first_last_bits, self.gather_bits) if b is not None)
        return (self.bits, *extra, *(b for _, b in self.bits_plan if b))

    @property
    def required_opset(self) -> int:
        """The lowest default-domain opset whose DequantizeLinear takes what we emit."""
        if min(self.all_bits) <= 2:
            return 25
        if min(self.all_bits) <= 4 or self.granularity is Granularity.BLOCK:
            return 21  # (the default's blocks come at 4 bits or fewer only)
        return 13
