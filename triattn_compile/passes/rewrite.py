"""The TriAttention rewrite of a traced decoder graph.

Guarantees: while the sequence fits in the cache, the rewritten graph computes exactly what the original computes
over the occupied slots; it adds (1) ``capture_queries`` on each site's pre-RoPE query when calibrating,
(2) ``triattn::record_positions`` before the first attention node and an attention mask ``[B, H, T, C]`` over the
compressed cache by position (slot ``s`` of row ``b`` is visible to the row's query at position ``q`` iff
``0 <= slot_pos[b, s] <= q``, and always to the query written there), so padding is never seen and each row of a
batch attends to its own slots, (3) one ``triattn::advance`` call before the graph's output, and (4) when the
eviction policy needs live queries, ops that record them (``triattn::record_queries``,
``triattn::accumulate_attention``, ``kernels/observe.py``).
New state enters as graph inputs the step marks (``passes/step_inputs.py``).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from triattn_compile.cache import query_positions
from triattn_compile.calibration.capture import capture_queries
from triattn_compile.kernels.cache_ops import ADVANCE, RECORD_POSITIONS
from triattn_compile.kernels.observe import ACCUMULATE_ATTENTION, RECORD_QUERIES
from triattn_compile.passes.match import MATMUL_TARGETS, AttentionSite, _is, computes_scores, walk_to_buffer
from triattn_compile.passes.rotary import fake_value


def insert_capture(graph: Graph, sites: list[AttentionSite], stats: list[Node], ctrl: Node | None = None) -> None:
    """Feed each site's pre-RoPE query to :func:`~triattn_compile.calibration.capture.capture_queries` (with the
    compressed cache's counters ``ctrl``, which leave out left-padding tokens)."""
    for site in sites:
        with graph.inserting_after(site.query.pre):
            graph.call_function(
                capture_queries,
                (site.query.pre, *stats, site.layer, site.head_axis, site.query.pairing, site.query.rotary_dim,
                 site.query.rotary_start, ctrl),
            )


def occupied_slots(ctrl: torch.Tensor, slot_pos: torch.Tensor, slots: torch.Tensor, layer: int,
                   window: int = 0, width: int | None = None) -> torch.Tensor:
    """``[B, Hkv, T, C]`` bool: what each query of the step sees in layer ``layer`` (traced into the graph).

    ``slot_pos`` already holds the step's positions (``triattn::record_positions``); a row's query ``t`` is at
    position ``fed + t - pad``; a padding query (negative position) sees only its own slot. A sliding-window layer
    (``window > 0``) sees only positions ``> q - window``, as the model's own mask. ``width``: the layer's slots
    (``C``), where layers differ (per-layer budgets: ``slot_pos`` is as wide as the widest).
    """
    slot_pos = slot_pos[layer, ..., :width]  # [B, Hkv, C]
    slots = slots.expand(slot_pos.shape[0], -1) if slots.dim() == 1 else slots  # [B, T]
    query_pos = query_positions(ctrl, slots.shape[-1])  # [B, T]
    pos = slot_pos[:, :, None, :]  # [B, Hkv, 1, C]
    visible = (pos >= 0) & (pos <= query_pos[:, None, :, None])
    if window:
        visible &= pos > query_pos[:, None, :, None] - window
    own = torch.arange(slot_pos.shape[-1], device=slots.device) == slots[:, None, :, None]  # [B, 1, T, C]
    return visible | own


def distant_slots(visible: torch.Tensor, ctrl: torch.Tensor, slot_pos: torch.Tensor, slots: torch.Tensor,
                  layer: int, min_distance: int) -> torch.Tensor:
    """``[B, Hkv, T, C]`` bool: the slots of ``visible`` (:func:`occupied_slots`) at least ``min_distance`` (>= 1)
    positions before each query of the step (traced into the graph): what a distance-filtered attention sum counts
    (``triattn::accumulate_attention``'s ``counted``). A query's own slot and padding are never counted."""
    slot_pos = slot_pos[layer, ..., : visible.shape[-1]]  # [B, Hkv, C]
    query_pos = query_positions(ctrl, slots.shape[-1])  # [B, T]
    return visible & (slot_pos[:, :, None, :] <= query_pos[:, None, :, None] - min_distance)


def expand_heads(mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, Hkv, T, C]`` -> ``[B, H, T, C]``, query head ``h`` reading KV head ``h // (H / Hkv)`` (as repeat_kv)."""
    b, hkv, t, c = mask.shape
    return mask[:, :, None].expand(b, hkv, num_heads // hkv, t, c).reshape(b, num_heads, t, c)


def insert_positions(graph: Graph, sites: list[AttentionSite], ctrl: Node, slot_pos: Node) -> None:
    """``triattn::record_positions`` before the first attention (every mask reads the step's positions)."""
    with graph.inserting_before(_attention_start(sites[0])):
        graph.call_function(RECORD_POSITIONS, (ctrl, slot_pos, sites[0].write_slots))


def mask_to_occupied_slots(graph: Graph, site: AttentionSite, ctrl: Node, slot_pos: Node, window: int = 0) -> Node:
    """Replace the site's attention mask with :func:`occupied_slots` (expanded to the query heads); returns the
    ``[B, Hkv, T, C]`` mask node.

    SDPA: the mask argument is replaced and ``is_causal`` cleared. Eager form: the model's ``scores + mask`` (or,
    without one, the softmax input) becomes ``scores.masked_fill(~mask, -inf)`` for all its readers (every row sees
    its own slot).
    """
    heads = int(fake_value(_query_operand(site)).shape[1])
    start = _attention_start(site)
    width = _cache_width(site, slot_pos)
    with graph.inserting_before(start):
        kv_mask = graph.call_function(occupied_slots, (ctrl, slot_pos, site.write_slots, site.layer, window, width))
        mask = graph.call_function(expand_heads, (kv_mask, heads))  # [B, H, T, C] bool
    if site.form == "eager":
        # every reader of the masked scores (the softmax, and e.g. a sink's logsumexp) reads the new mask instead
        masked_node = site.mask_add or site.attn.args[0]
        if site.mask_add is None and fake_value(masked_node).shape != fake_value(start).shape:
            masked_node = start  # the softmax also sees extra (sink) columns: mask the scores matmul itself
        scores = masked_node
        if site.mask_add is not None:
            scores = next(a for a in site.mask_add.args[:2] if a is not _mask_operand(site.mask_add))
        with graph.inserting_before(start):
            hidden = graph.call_function(torch.logical_not, (mask,))
        with graph.inserting_after(masked_node):
            masked = graph.call_method("masked_fill", (scores, hidden, float("-inf")))
        masked_node.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)
        if site.mask_add is not None:
            graph.erase_node(site.mask_add)
            site.mask_add = None
        return kv_mask
    if _grouped(site):
        _group_queries(graph, site, kv_mask)
        return kv_mask
    old = _sdpa_operands(site)[3]
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
    erase_unused_indexing(graph, old)
    return kv_mask


def _cache_width(site: AttentionSite, slot_pos: Node) -> int | None:
    """The slots of the site's cache buffer where it is narrower than ``slot_pos`` (a layer of a smaller budget),
    else ``None`` (all of ``slot_pos``)."""
    buffer = fake_value(site.key_buffer) if site.key_buffer is not None else None
    if not isinstance(buffer, torch.Tensor) or buffer.dim() != 4:
        return None
    width = int(buffer.shape[site.cache_axis])
    return width if width < int(fake_value(slot_pos).shape[-1]) else None


_INDEXING = {operator.getitem, "view", "reshape", "expand", "to", "contiguous", "unsqueeze", "bool", torch.index_select,
             "index_select"}


def erase_unused_indexing(graph: Graph, node: object) -> None:
    """Erase ``node`` and the indexing/view ops it came from once nothing reads them (a model's own causal mask,
    ``mask[None, None, positions]``, would otherwise still index a table by absolute position)."""
    while isinstance(node, Node) and not node.users and node.op in ("call_function", "call_method") and (
            node.target in _INDEXING):
        inputs = node.all_input_nodes
        graph.erase_node(node)
        node = inputs[0] if inputs else None


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                      dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """SDPA of ``query`` ``[B, H, T, D]`` over the cache's own ``key``/``value`` ``[B, Hkv, C, D]`` (``mask``
    ``[B, Hkv, T, C]``): the G = H / Hkv query heads of each KV head are folded into the query length, so the
    cache is read once per KV head and never repeated (query head ``h`` reads KV head ``h // G``, as repeat_kv)."""
    b, h, t, d = query.shape
    hkv, c = key.shape[1], key.shape[2]
    g = h // hkv
    q = query.reshape(b, hkv, g * t, d)
    m = mask[:, :, None].expand(b, hkv, g, t, c).reshape(b, hkv, g * t, c)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=m, dropout_p=dropout_p,
                                                           scale=scale)
    return out.reshape(b, h, t, value.shape[-1])


def _sdpa_operands(site: AttentionSite) -> list:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    args = dict(zip(names, site.attn.args))
    return [args.get(n, site.attn.kwargs.get(n)) for n in names]


def _grouped(site: AttentionSite) -> bool:
    """Whether the site's SDPA can read the cache buffers directly (:func:`grouped_attention`): its key and value
    walk back (through repeat_kv) to ``[B, Hkv, C, D]`` tensors whose Hkv divides the query heads."""
    if site.latent is not None or site.cache_axis != 2:  # the key is assembled from the cache, or laid out
        return False  # [B, S, Hkv, D]
    query_node, key_node, value_node = _sdpa_operands(site)[:3]
    query, key = fake_value(query_node), fake_value(key_node)
    k, v = fake_value(site.key_source), fake_value(walk_to_buffer(value_node))
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (query, key, k, v)):
        return False
    return (k.shape[1] == v.shape[1] and query.shape[1] % k.shape[1] == 0 and k.shape[2] == key.shape[2]
            and k.shape[:3] == v.shape[:3] and k.shape[0] == query.shape[0])


def _group_queries(graph: Graph, site: AttentionSite, kv_mask: Node) -> None:
    """Replace the site's SDPA node with :func:`grouped_attention` over the un-repeated cache tensors."""
    query, _, value, _, dropout_p, _, scale, _ = _sdpa_operands(site)
    with graph.inserting_before(site.attn):
        node = graph.call_function(
            grouped_attention, (query, site.key_source, walk_to_buffer(value), kv_mask),
            {"dropout_p": dropout_p or 0.0, "scale": scale},
        )
    node.meta = dict(site.attn.meta)
    old_mask = _sdpa_operands(site)[3]
    site.attn.replace_all_uses_with(node)
    graph.erase_node(site.attn)
    site.attn = node
    erase_unused_indexing(graph, old_mask)


def _mask_operand(add: Node) -> Node:
    """The operand of ``scores + mask`` that is not computed by a matmul (the mask)."""
    for a in add.args[:2]:
        if not computes_scores(a):
            return a
    raise ValueError(f"cannot tell the mask from the scores in {add.name}")


def insert_advance(graph: Graph, sites: list[AttentionSite], ctrl: Node) -> Node:
    """Insert ``triattn::advance`` just before the graph's output: after every layer has written and read the new
    tokens (an eager-form site's anchor is its softmax, before its ``matmul(probs, v)`` reads the values)."""
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        return graph.call_function(ADVANCE, (ctrl, sites[0].write_slots))


def _scores_matmul(site: AttentionSite) -> Node:
    """The eager form's ``matmul(q, kᵀ)``: back from the softmax through casts, scaling, soft-capping and the mask."""
    node = site.softmax.args[0]
    while not _is(node, *MATMUL_TARGETS):
        node = next(a for a in node.all_input_nodes if computes_scores(a))
    return node


def _attention_start(site: AttentionSite) -> Node:
    """The first node of the site's attention that the rewrite changes (its mask is built before it)."""
    return _scores_matmul(site) if site.form == "eager" else site.attn


def _query_operand(site: AttentionSite) -> Node:
    """The attention's post-RoPE query ``[B, H, T, D]``: SDPA's first argument, or ``q`` of the eager form's
    ``matmul(q, kᵀ)`` (whose softmax takes the scores, not the query)."""
    return _scores_matmul(site).args[0] if site.form == "eager" else site.attn.args[0]


def insert_query_record(graph: Graph, sites: list[AttentionSite], ring: Node) -> None:
    """Keep each layer's last W post-RoPE queries (the attention's query input, ``[B, H, T, D]``) in ``ring``."""
    for site in sites:
        with graph.inserting_before(site.attn):
            graph.call_function(RECORD_QUERIES, (_query_operand(site), ring, site.layer))


def insert_attention_accumulate(graph: Graph, sites: list[AttentionSite], acc: Node, masks: list[Node],
                                distant: Node | None = None, ctrl: Node | None = None, slot_pos: Node | None = None,
                                min_distance: int = 0) -> None:
    """Add each step's attention probabilities per slot (summed over the step's queries and each GQA group) over the
    slots each query sees (``masks``: the ``[B, Hkv, T, C]`` nodes of :func:`mask_to_occupied_slots`); with
    ``distant``, also the share paid to keys at least ``min_distance`` positions before the query
    (:func:`distant_slots`) into ``distant``."""
    if distant is not None and min_distance < 1:
        raise ValueError(f"a distance-filtered attention sum needs min_distance >= 1, got {min_distance}")
    for site, visible in zip(sites, masks):
        scale = site.attn.kwargs.get("scale")
        with graph.inserting_before(site.attn):
            keys = site.key_buffer  # [B, Hkv, C, D]; a cache laid out [B, C, Hkv, D] is read transposed
            if site.cache_axis == 1:
                keys = graph.call_method("transpose", (keys, 1, 2))
            args = (_query_operand(site), keys, acc, visible, site.layer, scale)
            if distant is not None:
                counted = graph.call_function(distant_slots, (visible, ctrl, slot_pos, site.write_slots, site.layer,
                                                              min_distance))
                args = (*args, distant, counted)
            graph.call_function(ACCUMULATE_ATTENTION, args)
