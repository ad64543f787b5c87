"""Read the RoPE angular frequencies ω_f and the attention scaling s of a matched rotary site.

ω comes from the graph, in this order: (1) the 1-D float input of width ``rotary_dim / 2`` that the cos/sin tables
are computed from (``inv_freq``, with any llama3/YaRN/longrope scaling already folded in); (2) the angles of the
cos/sin (or complex ``freqs_cis``) values themselves on the discovery probe, whose positions are ``{0, 1}``: the
angle at position 1 is ω (models that gather from a precomputed table, GPT-J, gpt-fast); (3) the ``fallback``
(the model's ``inv_freq`` buffer, or the ω found on an earlier graph), logged at debug level. s comes from
evaluating the cos/sin nodes on the example inputs: ``s = sqrt(cos² + sin²)`` (``|freqs_cis|`` for complex tables).
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule, Interpreter, Node

from triattn_compile.passes.match import AttentionSite, PatternNotFound

log = logging.getLogger(__name__)


def _ancestors(nodes: list[Node], given: dict | None = None) -> set[Node]:
    seen, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            if n not in (given or {}):
                stack.extend(n.all_input_nodes)
    return seen


def evaluate(gm: GraphModule, targets: list[Node], example_inputs: list, given: dict | None = None) -> list:
    """Run only the part of ``gm`` that ``targets`` depend on (pure ops only) and return their values; ``given``
    (node -> value) replaces nodes, whose own inputs are then not computed."""
    needed = _ancestors(targets, given)
    interp = Interpreter(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    env = {n: v for n, v in zip(placeholders, example_inputs) if n in needed}
    env.update(given or {})
    interp.env = env
    for node in gm.graph.nodes:
        if node in needed and node not in env:
            env[node] = interp.run_node(node)
    return [env[t] for t in targets]


def _bands(table: torch.Tensor, pairing: str, layout: str, bands: int) -> torch.Tensor:
    """The per-band columns of a cos/sin table ``[..., C]`` laid out like the rotated tensor (or one per band)."""
    if layout in ("complex", "bands"):
        return table[..., :bands]
    return table[..., :bands] if pairing == "half" else table[..., 0 : 2 * bands : 2]


def fit_consecutive(rows: torch.Tensor, tolerance: float = 0.05) -> torch.Tensor | None:
    """Least-squares ω ``[F]`` from the angles ``rows [T, F]`` of the consecutive positions ``0 .. T - 1`` (each band
    unwrapped step by step, so ω must stay below π), or ``None`` if some row is further than ``tolerance`` radians
    from ``t ω``. Averaging over many positions recovers ω to ~1e-9 relative from float32 tables and ~1e-7 from
    bfloat16 ones, where the angle at position 1 alone is good to a few ulps of the table's dtype."""
    if len(rows) < 3:
        return None
    steps = torch.remainder(rows[1:] - rows[:-1] + torch.pi, 2 * torch.pi) - torch.pi  # [T - 1, F]
    unwrapped = torch.cat([rows[:1], rows[:1] + torch.cumsum(steps, 0)])
    t = torch.arange(len(rows), dtype=torch.float64)[:, None]
    omega = (t * unwrapped).sum(0) / (t * t).sum()
    if not bool((omega > 0).all()) or float((unwrapped - t * omega).abs().max()) > tolerance:
        return None
    return omega


def omega_from_probe(cos: torch.Tensor, sin: torch.Tensor, pairing: str, layout: str, bands: int, fit: bool = False):
    """ω ``[F]`` from cos/sin values taken at positions {0, 1} only (rows must be 0 or one ω row), or at the
    consecutive positions ``0, 1, ..., T - 1`` in order (row t at angle ``t ω`` mod 2π: a model's first call on its
    prompt); else ``None``. ``fit``: the positions are known to be ``0 .. T - 1``; ω is fitted over all of them
    (:func:`fit_consecutive`)."""
    angle = torch.atan2(sin.double(), cos.double()) if layout != "complex" else torch.angle(cos.to(torch.complex128))
    rows = _bands(angle, pairing, layout, bands).reshape(-1, bands)
    if fit:
        return fit_consecutive(rows)
    omega = rows[rows.abs().sum(-1).argmax()]
    zero = rows.abs().amax(-1) < 1e-6
    same = (rows - omega).abs().amax(-1) < 1e-5 * max(1.0, float(omega.abs().max()))
    if bool(zero.any()) and bool((zero | same).all()) and bool((omega > 0).all()):
        return omega
    if len(rows) > 2 and bool(zero[0]) and bool((rows[1] > 0).all()):
        omega = rows[1]
        expected = torch.arange(len(rows), dtype=torch.float64)[:, None] * omega  # [T, F]
        turn = torch.remainder(rows - expected + torch.pi, 2 * torch.pi) - torch.pi  # angle difference, wrapped
        if bool((turn.abs() < 1e-4 * torch.arange(1, len(rows) + 1, dtype=torch.float64)[:, None]).all()):
            return omega
    return None


def rotary_frequencies(
    gm: GraphModule, site: AttentionSite, example_inputs: list, fallback: torch.Tensor | None = None,
    positions: dict[Node, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float]:
    """``(omega [F] float64, attention_scaling)`` of one site. ``positions``: placeholders to evaluate the cos/sin
    tables at instead of the example inputs, with the positions ``0 .. T - 1`` (ω is then fitted over all of them)."""
    bands = site.query.rotary_dim // 2
    upstream = _ancestors([site.query.cos])
    placeholders = zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs)
    found = [
        v for n, v in placeholders
        if n in upstream and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 1
        and v.numel() == bands
    ]
    cos, sin = evaluate(gm, [site.query.cos, site.query.sin], example_inputs, positions)
    layout = site.query.table
    probe = None if len(found) == 1 else omega_from_probe(cos, sin, site.query.pairing, layout, bands,
                                                          fit=positions is not None)
    if len(found) == 1:
        omega = found[0].detach().double().cpu()
    elif probe is not None:
        log.debug("site %d: RoPE frequencies read from the cos/sin angles at positions 0 and 1", site.layer)
        omega = probe.cpu()
    elif fallback is not None and fallback.numel() == bands:
        log.debug("site %d: no frequency input in the graph; using the fallback inv_freq", site.layer)
        omega = fallback.detach().double().cpu()
    else:
        raise PatternNotFound(
            f"attention site {site.layer} ({site.module}): cannot find the RoPE frequencies in the graph (no inv_freq "
            "input, and cos/sin not at positions 0, 1, ...); give the model an inv_freq buffer or start at position 0"
        )
    mag = torch.sqrt(cos.double() ** 2 + sin.double() ** 2) if layout != "complex" else cos.abs().double()
    return omega, float(mag.mean())
