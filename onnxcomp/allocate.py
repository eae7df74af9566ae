"""The bit allocator: per layer, the bit width (or float) that keeps the model's outputs
closest to FP32 within a size budget.

Each layer's options are measured points (size in bytes, end-to-end loss 1 − cosine when
that layer alone is quantized: `onnxcomp sensitivity`); the predicted loss of a plan is the
sum over its layers, to first order. Only the lower convex hull of a layer's points can be
the best choice at some exchange rate between bytes and loss (a Lagrange multiplier), so the
search walks each layer up its hull, always taking the step that buys the most loss per
byte that still fits: optimal for the relaxed problem, and within one step of the
optimum of the discrete one, which a fill with the options off the hulls then narrows.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxcomp.errors import ConfigError
from onnxcomp.sensitivity import SensitivityTable

FLOAT = 0  # the bit width that stands for "kept float" in a plan


@dataclass(frozen=True)
class Choice:
    bits: int  # FLOAT: the weight stays as stored
    size: int  # bytes
    loss: float  # predicted end-to-end loss of this layer at these bits (0 in float)
    block_size: int | None = None  # its blocks, where blockwise


def choices(table: SensitivityTable, coded: bool = False) -> dict[str, list[Choice]]:
    """Each measured layer's options, from the sensitivity table (and float); sizes as
    stored in an .onnx file, or with `coded` as the container's coder stores them."""
    found = {}
    for layer in table.layers:
        options = [Choice(p.bits, p.coded_size if coded else p.size, max(0.0, 1.0 - p.cosine), p.block_size)
                   for p in layer.points]
        options.append(Choice(FLOAT, layer.float_size, 0.0))
        found[layer.name] = options
    return found


def hull(options: list[Choice]) -> list[Choice]:
    """The options on the lower convex hull of (size, loss), smallest first: the only ones a
    budget can make best. Dominated points (larger and no better) are dropped."""
    frontier: list[Choice] = []
    for option in sorted(options, key=lambda c: (c.size, c.loss)):
        if frontier and option.loss >= frontier[-1].loss:
            continue  # larger and no better
        while len(frontier) >= 2:
            a, b = frontier[-2], frontier[-1]
            # b lies on or above the segment a → option: not on the hull
            if (b.loss - a.loss) * (option.size - a.size) >= (option.loss - a.loss) * (b.size - a.size):
                frontier.pop()
            else:
                break
        frontier.append(option)
    return frontier


def allocate(options: dict[str, list[Choice]], budget: float) -> dict[str, Choice]:
    """The choice per layer with the least total loss whose sizes add up to at most
    `budget` bytes (greedy on the hulls, then any smaller step that still fits)."""
    hulls = {name: hull(layer_options) for name, layer_options in options.items()}
    plan = {name: steps[0] for name, steps in hulls.items()}
    used = sum(choice.size for choice in plan.values())
    if used > budget:
        raise ConfigError(f"the budget of {budget:,.0f} bytes for the layers is below the smallest plan "
                          f"({used:,} bytes, every layer at its fewest bits); raise it")
    position = {name: 0 for name in hulls}
    while True:
        best, best_rate = None, 0.0
        for name, steps in hulls.items():
            index = position[name]
            if index + 1 >= len(steps):
                continue
            here, there = steps[index], steps[index + 1]
            extra = there.size - here.size
            if used + extra > budget:
                continue
            rate = (here.loss - there.loss) / max(extra, 1)
            if best is None or rate > best_rate:
                best, best_rate = name, rate
        if best is None:
            return _fill(options, plan, budget - used)
        position[best] += 1
        step = hulls[best][position[best]]
        used += step.size - plan[best].size
        plan[best] = step


def _fill(options: dict[str, list[Choice]], plan: dict[str, Choice], room: float) -> dict[str, Choice]:
    """Spend what the hull steps leave: any option off the hulls that lowers the loss and
    fits, the most loss per byte first."""
    while True:
        best, best_rate = None, 0.0
        for name, layer_options in options.items():
            here = plan[name]
            for option in layer_options:
                extra = option.size - here.size
                if option.loss < here.loss and extra <= room:
                    rate = (here.loss - option.loss) / max(extra, 1)
                    if best is None or rate > best_rate:
                        best, best_rate = (name, option), rate
        if best is None:
            return plan
        name, option = best
        room -= option.size - plan[name].size
        plan[name] = option


def totals(plan: dict[str, Choice]) -> tuple[int, float]:
    """(bytes, predicted loss) of a plan."""
    return sum(c.size for c in plan.values()), sum(c.loss for c in plan.values())
