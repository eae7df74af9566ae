"""The bit allocator: hulls, budgets, and optimality against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxcomp.allocate import FLOAT, Choice, allocate, hull, totals
from onnxcomp.errors import ConfigError


def test_hull_keeps_only_points_some_budget_can_make_best():
    points = [Choice(2, 10, 0.50), Choice(3, 15, 0.45), Choice(4, 20, 0.10), Choice(8, 40, 0.01),
              Choice(FLOAT, 80, 0.0), Choice(5, 30, 0.2)]  # 3 bits lies above the 2 → 4 segment; "5" is dominated
    assert [c.bits for c in hull(points)] == [2, 4, 8, FLOAT]


def test_the_budget_goes_where_it_buys_the_most():
    options = {
        "sensitive": [Choice(2, 100, 0.30), Choice(4, 200, 0.01), Choice(FLOAT, 800, 0.0)],
        "robust": [Choice(2, 100, 0.02), Choice(4, 200, 0.005), Choice(FLOAT, 800, 0.0)],
    }
    plan = allocate(options, 300)
    assert plan["sensitive"].bits == 4 and plan["robust"].bits == 2
    assert allocate(options, 1600) == {"sensitive": options["sensitive"][2], "robust": options["robust"][2]}
    with pytest.raises(ConfigError, match="below the smallest plan"):
        allocate(options, 199)


def _brute_force(options, budget):
    best = None
    for combo in itertools.product(*options.values()):
        size, loss = sum(c.size for c in combo), sum(c.loss for c in combo)
        if size <= budget and (best is None or loss < best):
            best = loss
    return best


@pytest.mark.parametrize("seed", range(30))
def test_random_problems_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    options = {}
    for layer in range(4):
        weights = int(rng.integers(10, 200))
        scale = float(rng.uniform(0.001, 1))
        options[f"l{layer}"] = [Choice(b, weights * b // 8 + 2, scale * 4.0 ** -b * rng.uniform(0.5, 2)) for b in (2, 3, 4, 8)]
        options[f"l{layer}"].append(Choice(FLOAT, weights * 4, 0.0))
    smallest = sum(min(c.size for c in o) for o in options.values())
    largest = sum(max(c.size for c in o) for o in options.values())
    step = max(max(a.loss - b.loss for a, b in zip(hull(o), hull(o)[1:])) for o in options.values())
    for budget in np.linspace(smallest, largest, 12):
        plan = allocate(options, budget)
        size, loss = totals(plan)
        assert size <= budget
        optimum = _brute_force(options, budget)
        assert optimum <= loss + 1e-12 and loss <= optimum + step  # within one hull step of the optimum
        for name, choice in plan.items():  # nothing left that still fits and would help
            for other in hull(options[name]):
                assert not (other.loss < choice.loss and size - choice.size + other.size <= budget)
