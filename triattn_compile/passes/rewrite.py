"""The TriAttention rewrite of a traced decoder graph.

Guarantees: while the sequence fits in the cache, the rewritten graph computes exactly what the original computes
over the occupied slots; it adds (1) ``triattn::capture_queries`` on each site's pre-RoPE query when calibrating,
(2) an attention mask over the occupied slots of the compressed cache (slot ``s`` is visible to the query written
at slot ``t`` iff ``s <= t``), and (3) one ``triattn::compress`` call after the last attention node.
New state enters as extra graph inputs appended after the existing placeholders.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from triattn_compile.passes.match import AttentionSite
from triattn_compile.passes.rotary import fake_value


def add_inputs(graph: Graph, names: list[str]) -> list[Node]:
    """Append placeholders (the backend passes their values after Dynamo's own inputs)."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    nodes = []
    for name in names:
        with graph.inserting_after(last):
            last = graph.placeholder(f"triattn_{name}")
        nodes.append(last)
    return nodes


def insert_capture(graph: Graph, sites: list[AttentionSite], stats: list[Node]) -> None:
    """Feed each site's pre-RoPE query to ``triattn::capture_queries``."""
    for site in sites:
        with graph.inserting_after(site.query.pre):
            graph.call_function(
                torch.ops.triattn.capture_queries.default,
                (site.query.pre, *stats, site.layer, site.head_axis, site.query.pairing, site.query.rotary_dim),
            )


def mask_to_occupied_slots(graph: Graph, site: AttentionSite, capacity: int) -> None:
    """Replace the site's attention mask with ``slot <= write_slot`` over the cache's ``capacity`` slots."""
    with graph.inserting_before(site.attn):
        slots = graph.call_function(torch.arange, (capacity,), {"device": fake_value(site.key_buffer).device})
        query_slots = graph.call_function(operator.getitem, (site.write_slots, (slice(None), None)))
        mask = graph.call_function(operator.le, (slots, query_slots))  # [T, C] bool
    args = list(site.attn.args)
    kwargs = dict(site.attn.kwargs)
    if len(args) > 3:
        args[3] = mask
    else:
        kwargs["attn_mask"] = mask
    if len(args) > 5:
        args[5] = False
    kwargs["is_causal"] = False
    site.attn.args, site.attn.kwargs = tuple(args), kwargs


def insert_compress(
    graph: Graph,
    sites: list[AttentionSite],
    ctrl: Node,
    slot_pos: Node,
    stats: list[Node],
    omega: Node,
    options: tuple,
) -> Node:
    """Append ``triattn::compress`` after the last attention node (all layers have written the new tokens)."""
    keys = [s.key_buffer for s in sites]
    values = [s.value_buffer for s in sites]
    with graph.inserting_after(sites[-1].attn):
        return graph.call_function(
            torch.ops.triattn.compress.default,
            (ctrl, slot_pos, keys, values, sites[0].write_slots, *stats, omega, *options),
        )


