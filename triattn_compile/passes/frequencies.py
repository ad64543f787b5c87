"""Read the RoPE angular frequencies ω_f and the attention scaling s of a matched rotary site.

ω comes from the graph: the 1-D float input of width ``rotary_dim / 2`` that the cos/sin tables are computed from
(``inv_freq``, with any llama3/YaRN/longrope scaling already folded in). s comes from evaluating the cos/sin nodes
on the example inputs: ``s = sqrt(cos² + sin²)``.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule, Interpreter, Node

from triattn_compile.passes.match import AttentionSite

log = logging.getLogger(__name__)


def _ancestors(nodes: list[Node]) -> set[Node]:
    seen, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def evaluate(gm: GraphModule, targets: list[Node], example_inputs: list) -> list:
    """Run only the part of ``gm`` that ``targets`` depend on (pure ops only) and return their values."""
    needed = _ancestors(targets)
    interp = Interpreter(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    env = {n: v for n, v in zip(placeholders, example_inputs) if n in needed}
    interp.env = env
    for node in gm.graph.nodes:
        if node in needed and node not in env:
            env[node] = interp.run_node(node)
    return [env[t] for t in targets]


def rotary_frequencies(
    gm: GraphModule, site: AttentionSite, example_inputs: list, fallback: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """``(omega [F] float64, attention_scaling)`` of one site."""
    bands = site.query.rotary_dim // 2
    upstream = _ancestors([site.query.cos])
    placeholders = zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs)
    found = [
        v for n, v in placeholders
        if n in upstream and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 1
        and v.numel() == bands
    ]
    if len(found) == 1:
        omega = found[0].detach().double().cpu()
    elif fallback is not None and fallback.numel() == bands:
        log.debug("site %d: no frequency input in the graph; using the model's rotary module inv_freq", site.layer)
        omega = fallback.detach().double().cpu()
    else:
        raise ValueError(f"attention site {site.layer} ({site.module}): cannot find the RoPE frequencies in the graph")
    cos, sin = evaluate(gm, [site.query.cos, site.query.sin], example_inputs)
    scale = float(torch.sqrt(cos.double() ** 2 + sin.double() ** 2).mean())
    return omega, scale
