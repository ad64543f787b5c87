"""Decoders that keep their own KV cache: buffers of the model written by position (gpt-fast's ``KVCache``,
torchtune's ``KVCache``), found in the graph and taken over.

Such a model writes each layer's new keys and values with ``buffer[:, :, index] = new`` (or
``buffer.index_copy_(2, index, new)``), ``index`` being the tokens' absolute positions (an input of the model, or a
counter buffer of its own), and attends over the whole buffer. :func:`own_cache_buffers` finds, per attention site,
the real tensors of those buffers and of the tensor the write index is read from (Dynamo's graph arguments), so
``optimize`` can put the compressed cache's tensors in their place. :func:`retarget_writes` then makes each write go
to the compressed cache's next slots instead of the positions: RoPE keeps the model's absolute positions, the
attention mask is the rewrite's (occupied slots), and compaction gathers the model's (now compressed) buffers in
place.

A decoder whose cache grows by ``torch.cat([cache, new], dim=2)`` and is returned to the caller (who passes it back)
has no buffers to take over: :func:`write_appended` writes its new tokens into the compressed cache's own buffers
and returns :func:`stand_in` tensors in place of the grown cache.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from triattn_compile.cache import write_slots
from triattn_compile.passes.match import AttentionSite, PatternNotFound, appended_tokens, module_of
from triattn_compile.passes.rewrite import erase_unused_indexing


@dataclass(frozen=True)
class OwnCache:
    """The model's own cache, as the graph shows it: per layer its key and value buffers, and the tensor whose first
    element is the position the step writes first (a new sequence starts at 0). A cache grown by ``torch.cat``
    (``grown``) has neither: the compressed cache takes its place."""

    buffers: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    positions: torch.Tensor | None = None
    grown: bool = False


def _write(site: AttentionSite, buffer: Node) -> Node:
    return next(u for u in buffer.users if _writes(u) and u.args[0] is buffer)


def _writes(node: Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in (operator.setitem, "index_copy_")


def _index(write: Node) -> Node:
    """The position index of ``buffer[:, :, index] = new`` or ``buffer.index_copy_(2, index, new)``."""
    where = f"attention site ({module_of(write)}), cache write {write.name}"
    if write.target is operator.setitem:
        idx = write.args[1]
        if (isinstance(idx, tuple) and len(idx) == 3 and all(i == slice(None) for i in idx[:2])
                and isinstance(idx[2], Node)):
            return idx[2]
    elif write.args[1] in (2, -2) and isinstance(write.args[2], Node):
        return write.args[2]
    raise PatternNotFound(f"{where}: expected buffer[:, :, positions] = new or buffer.index_copy_(2, positions, new) "
                          "into a [B, H, S, D] buffer")


def _real(node: Node) -> torch.Tensor | None:
    """The real tensor Dynamo lifted as this placeholder (``None`` for other nodes)."""
    arg = node.meta.get("grapharg") if node.op == "placeholder" else None
    return getattr(arg, "example", None)


def _position_input(index: Node) -> Node | None:
    """The placeholder ``index`` reads its first element from: itself, or a leading slice ``p[:T]`` of it (through
    casts)."""
    node = index
    while node.op != "placeholder":
        if node.op == "call_method" and node.target in ("to", "long", "int", "contiguous"):
            node = node.args[0]
        elif (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice)
              and node.args[1].start in (None, 0) and node.args[1].step in (None, 1)):
            node = node.args[0]
        else:
            return None
    return node


def own_cache_buffers(sites: list[AttentionSite]) -> OwnCache:
    """Each site's own key/value buffers and the tensor the first write position is read from.

    Raises:
        PatternNotFound: a buffer that is not an input of the graph, or a write index computed otherwise.
    """
    grown = [site.appended is not None for site in sites]
    if all(grown):
        return OwnCache(grown=True)
    if any(grown):
        raise PatternNotFound(f"attention site {grown.index(True)}: some layers grow their cache by torch.cat, "
                              "others write it in place; one kind of cache per model is supported")
    buffers = []
    for site in sites:
        pair = tuple(_real(b) for b in (site.key_buffer, site.value_buffer))
        if any(t is None for t in pair):
            raise PatternNotFound(f"attention site {site.layer} ({site.module}): its KV cache buffer is computed in "
                                  "the step, not a tensor the model holds")
        buffers.append(pair)
    index = _index(_write(sites[0], sites[0].key_buffer))
    source = _position_input(index)
    if source is None or _real(source) is None:
        raise PatternNotFound(f"attention site 0 ({sites[0].module}): the cache write position {index.name} is not "
                              "an input of the step (or a leading slice of one)")
    return OwnCache(tuple(buffers), _real(source))


def next_slots(ctrl: torch.Tensor, new: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[T]`` slots for the step's ``new`` ``[B, H, T, D]`` tokens (traced into the graph; one row schedule)."""
    return write_slots(ctrl, new.shape[-2], capacity)[0]


def retarget_writes(graph: Graph, sites: list[AttentionSite], ctrl: Node, capacity: int) -> None:
    """Make every site's cache writes go to the compressed cache's next slots (``cache.write_slots``; every row on
    the same schedule: no padding), and record those slots as the site's ``write_slots``."""
    first = _write(sites[0], sites[0].key_buffer)
    sources = set()
    with graph.inserting_before(first):
        slots = graph.call_function(next_slots, (ctrl, first.args[-1], capacity))  # [T]
    for site in sites:
        for buffer in (site.key_buffer, site.value_buffer):
            write = _write(site, buffer)
            index = _index(write)
            sources.add(_position_input(index))
            write.replace_input_with(index, slots)
            erase_unused_indexing(graph, index)
        site.write_slots = slots
    _drop_position_checks(graph, sources - {None})


_ASSERTS = (torch._assert_async, torch._assert, torch.ops.aten._assert_async.msg)


def stand_in(token: torch.Tensor, cache: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """What a grown cache ``cat([cache, new], dim=-2)`` would be, shaped like it but holding no memory: ``token``
    (0-d) expanded. The model keeps it and passes it back; shapes it computes from it stay right."""
    length = new.shape[2] + (cache.shape[2] if cache is not None else 0)
    return token.expand(new.shape[0], new.shape[1], length, new.shape[3])


def write_appended(graph: Graph, sites: list[AttentionSite], buffers: list[tuple[Node, Node]], token: Node,
                   ctrl: Node, capacity: int) -> None:
    """A model whose cache grows by ``torch.cat`` (``site.appended``): its new keys and values are written into the
    compressed cache's ``buffers`` (graph inputs, per site) at the next slots and its attention reads those buffers;
    the grown cache the step returns becomes a :func:`stand_in` of ``token``, and the one passed back is not read."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    first = min((appended_tokens(grown) for site in sites for grown in site.appended), key=order.get)
    with graph.inserting_after(first):
        slots = graph.call_function(next_slots, (ctrl, first, capacity))  # [T]
    order[slots] = order[first] + 0.5
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    for site, pair in zip(sites, buffers):
        for grown, buffer in zip(site.appended, pair):
            tokens = appended_tokens(grown)
            with graph.inserting_after(max(tokens, slots, key=order.get)):
                write = graph.call_method("index_copy_", (buffer, 2, slots, tokens))
            with graph.inserting_before(output):
                cache = grown.args[0][0] if grown is not tokens else None
                returned = graph.call_function(stand_in, (token, cache, tokens))
            grown.replace_all_uses_with(returned, delete_user_cb=lambda user: user is output)
            kept = (write, slots, returned)
            grown.replace_all_uses_with(write, delete_user_cb=lambda user, kept=kept: user not in kept)
            if grown is not tokens:
                graph.erase_node(grown)
        site.key_source, (site.key_buffer, site.value_buffer), site.write_slots = pair[0], pair, slots


def _drop_position_checks(graph: Graph, sources: set[Node]) -> None:
    """Erase the model's checks of its own write positions against its buffer length (torchtune:
    ``assert cache_pos[0] + T <= k_cache.shape[2]``): the compressed slots replace those positions, which keep
    growing past the buffer."""
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in _ASSERTS]:
        frontier, seen = list(node.all_input_nodes), set()
        while frontier:
            n = frontier.pop()
            if n in sources:
                inputs = node.all_input_nodes
                graph.erase_node(node)
                for i in inputs:
                    _erase_if_unused(graph, i)
                break
            if n not in seen:
                seen.add(n)
                frontier.extend(n.all_input_nodes)


def _erase_if_unused(graph: Graph, node: Node) -> None:
    """Erase ``node`` and its inputs once nothing reads them (pure arithmetic on the positions)."""
    if node.users or node.op != "call_function" or node.target in _ASSERTS:
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for i in inputs:
        _erase_if_unused(graph, i)
