"""The tensors a compiled step needs beyond the model's own inputs, passed to it explicitly.

``optimize`` compiles :func:`isolated_step`, not the model's forward: a function of ``(forward, inputs, args,
kwargs)`` whose first act is ``triattn::step_inputs(inputs)``, a marker that Dynamo traces like any op, so the
step's extra tensors (the compressed cache's counters and slot positions, the query statistics, the policies'
observations) become ordinary graph inputs, with sources and guards, for every call. The backend takes them off the
marker by name (:func:`take_step_inputs`) and erases it before Inductor sees the graph.

Each call of :func:`isolated_step` returns a function with a code object of its own, so Dynamo's cache entries and
its automatic-dynamic bookkeeping for one optimized model never mix with another's, nor with functions the user
compiled, and optimize/calibrate never clear Dynamo's caches.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable

import torch
from torch.fx import Graph, Node


@torch.library.custom_op("triattn::step_inputs", mutates_args=("inputs",))
def step_inputs(inputs: list[torch.Tensor]) -> None:
    """Marks ``inputs`` as the step's extra tensors (erased by the backend; a no-op if it ever runs)."""


@step_inputs.register_fake
def _(inputs) -> None:
    return None


def _step(forward, inputs, args, kwargs):
    if inputs:
        torch.ops.triattn.step_inputs(inputs)
    return forward(*args, **kwargs)


_ids = itertools.count()


def isolated_step() -> Callable:
    """A fresh copy of ``step(forward, inputs: list[Tensor], args, kwargs)`` with a code object of its own."""
    code = _step.__code__.replace(co_name=f"triattn_step_{next(_ids)}")
    return types.FunctionType(code, _step.__globals__, code.co_name)


def take_step_inputs(graph: Graph, names: list[str]) -> dict[str, Node]:
    """The placeholders marked by ``triattn::step_inputs``, by ``names`` (in the order they were passed); the marker
    is erased. ``{}`` when the step passed none."""
    marker = (torch.ops.triattn.step_inputs, torch.ops.triattn.step_inputs.default)
    marks = [n for n in graph.nodes if n.op == "call_function" and n.target in marker]
    if not marks:
        if names:
            raise RuntimeError("the traced step has no triattn::step_inputs marker")  # an internal error
        return {}
    (mark,) = marks
    nodes = list(mark.args[0])
    if len(nodes) != len(names):
        raise RuntimeError(f"step inputs {names} do not match the marker's {len(nodes)} tensors")
    graph.erase_node(mark)
    return dict(zip(names, nodes))
