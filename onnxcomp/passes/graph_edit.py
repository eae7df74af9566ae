"""Graph edits the passes share: names no value has yet, new initializers, one node put in
another's place."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


class NameAllocator:
    """Hands out value names not yet used in the model."""

    def __init__(self, graph: ir.Graph):
        self.taken = {v.name for node in ir.traversal.RecursiveGraphIterator(graph) for v in (*node.inputs, *node.outputs) if v is not None}
        self.taken |= set(graph.initializers) | {v.name for v in graph.inputs}

    def fresh(self, base: str) -> str:
        name, n = base, 1
        while name in self.taken:
            name, n = f"{base}_{n}", n + 1
        self.taken.add(name)
        return name


def add_initializer(graph: ir.Graph, names: NameAllocator, base: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """A new initializer holding `array` (stored as `dtype` when given), under a fresh name."""
    name = names.fresh(base)
    tensor = ir.Tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def replace_node(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put `new` where `old` is: its first output takes over the old one's uses, type, shape
    and name (a graph output keeps its name), and `old` is removed."""
    out, previous = new.outputs[0], old.outputs[0]
    out.type, out.shape = previous.type, previous.shape
    graph.insert_before(old, new)
    ir.convenience.replace_all_uses_with(previous, out, replace_graph_outputs=True)
    name, previous.name = previous.name, None
    graph.remove(old, safe=True)
    out.name = name
