"""Decoders that keep their own KV cache: buffers of the model written by position (gpt-fast's ``KVCache``,
torchtune's ``KVCache``), found in the graph and taken over.

Such a model writes each layer's new keys and values with ``buffer[:, :, index] = new`` (or
``buffer.index_copy_(2, index, new)``), ``index`` being the tokens' absolute positions (an input of the model, or a
counter buffer of its own), and attends over the whole buffer; or (Meta's reference, LitGPT) it writes
``buffer[:b, start:start + T] = new`` into a ``[B, S, H, D]`` buffer at a Python-int ``start``, or ``index_copy_``
into a leading slice of the buffer, and attends over a leading slice of it (:func:`read_whole_cache`).
:func:`own_cache_buffers` finds, per attention site, the real tensors of those buffers and of the tensor the write
index is read from (Dynamo's graph arguments), so ``optimize`` can put the compressed cache's tensors in their place.
:func:`retarget_writes` then makes each write go to the compressed cache's next slots instead of the positions: RoPE
keeps the model's absolute positions, the attention mask is the rewrite's (occupied slots), and compaction gathers
the model's (now compressed) buffers in place.

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
from triattn_compile.passes.match import (
    _WRITES,
    AttentionSite,
    PatternNotFound,
    _is,
    _leading_slice,
    appended_tokens,
    module_of,
    write_position,
)
from triattn_compile.passes.rewrite import erase_unused_indexing
from triattn_compile.passes.rotary import fake_value


@dataclass(frozen=True)
class OwnCache:
    """The model's own cache, as the graph shows it: per layer its key and value buffers, the axis of the positions
    in them (2: ``[B, Hkv, S, D]``, 1: ``[B, S, Hkv, D]``), and the tensor whose first element is the position the
    step writes first, or that position itself where the model writes ``buffer[:b, start:start + T]`` with a Python
    int ``start`` (a new sequence starts at 0). A cache grown by ``torch.cat`` (``grown``) has neither: the
    compressed cache takes its place."""

    buffers: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    positions: torch.Tensor | int | None = None
    axis: int = 2
    grown: bool = False


def _write(site: AttentionSite, buffer: Node) -> Node:
    return next(u for u in buffer.users if _writes(u) and u.args[0] is buffer)


def _writes(node: Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in (operator.setitem, "index_copy_")


def _index(write: Node) -> tuple[int, Node | slice]:
    """``(axis, positions)`` of ``buffer[:, :, positions] = new``, ``buffer.index_copy_(axis, positions, new)`` or
    ``buffer[:b, start:start + T] = new``: a tensor of positions, or a slice."""
    where = f"attention site ({module_of(write)}), cache write {write.name}"
    axis, index = write_position(write)
    if write.target in (operator.setitem, "index_copy_") and axis in (1, 2) and (
            isinstance(index, Node) or (isinstance(index, slice) and index.step in (None, 1)
                                        and isinstance(index.start, (Node, int)))):
        return axis, index
    raise PatternNotFound(f"{where}: expected buffer[:, :, positions] = new, buffer.index_copy_(2, positions, new) "
                          "or buffer[:b, start:start + T] = new into a [B, H, S, D] or [B, S, H, D] buffer")


def _storage(node: Node) -> torch.Tensor | None:
    """The real tensor a cache write writes into: the placeholder it is (through leading slices ``buffer[:b]`` and
    casts that change nothing, ``buffer.to(x)`` of the same dtype)."""
    while node.op != "placeholder":
        same = _is(node, "to", "type_as", "contiguous", "float") and (
            fake_value(node).dtype == fake_value(node.args[0]).dtype)
        if not (same or _leading_slice(node)):
            return None
        node = node.args[0]
    return _real(node)


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
        pair = tuple(_storage(b) for b in (site.key_buffer, site.value_buffer))
        if any(t is None for t in pair):
            raise PatternNotFound(f"attention site {site.layer} ({site.module}): its KV cache buffer is computed in "
                                  "the step, not a tensor the model holds")
        buffers.append(pair)
    axis, index = _index(_write(sites[0], sites[0].key_buffer))
    if isinstance(index, slice):  # buffer[:b, start:start + T] = new
        start = 0 if index.start is None else index.start
        value = _real(start) if isinstance(start, Node) else start
        if not isinstance(value, int):
            raise PatternNotFound(f"attention site 0 ({sites[0].module}): the cache write starts at {start}, neither "
                                  "an int argument of the model nor a constant")
        return OwnCache(tuple(buffers), value, axis)
    source = _position_input(index)
    if source is None or _real(source) is None:
        raise PatternNotFound(f"attention site 0 ({sites[0].module}): the cache write position {index.name} is not "
                              "an input of the step (or a leading slice of one)")
    return OwnCache(tuple(buffers), _real(source), axis)


def next_slots(ctrl: torch.Tensor, new: torch.Tensor, capacity: int, axis: int = -2) -> torch.Tensor:
    """``[T]`` slots for the step's ``new`` ``[B, H, T, D]`` (``axis`` 1: ``[B, T, H, D]``) tokens (traced into the
    graph; one row schedule)."""
    return write_slots(ctrl, new.shape[axis], capacity)[0]


def retarget_writes(graph: Graph, sites: list[AttentionSite], ctrl: Node, capacity: int) -> None:
    """Make every site's cache writes go to the compressed cache's next slots (``cache.write_slots``; every row on
    the same schedule: no padding), and record those slots as the site's ``write_slots``."""
    first = _write(sites[0], sites[0].key_buffer)
    sources = set()
    with graph.inserting_before(first):
        slots = graph.call_function(next_slots, (ctrl, first.args[-1], capacity, _index(first)[0]))  # [T]
    for site in sites:
        for buffer in (site.key_buffer, site.value_buffer):
            write = _write(site, buffer)
            axis, index = _index(write)
            if write.target is operator.setitem:  # the positions entry of the index becomes the slots
                entries = list(write.args[1]) if isinstance(write.args[1], tuple) else [write.args[1]]
                if Ellipsis in entries:
                    at = entries.index(Ellipsis)
                    entries[at:at + 1] = [slice(None)] * (fake_value(write.args[0]).dim() - len(entries) + 1)
                entries[axis] = slots
                write.update_arg(1, tuple(entries))
            else:
                write.update_arg(2, slots)
            if isinstance(index, slice):
                sources.update(i for i in (index.start,) if isinstance(i, Node) and i.op == "placeholder")
                for bound in (index.start, index.stop):
                    if isinstance(bound, Node):
                        _erase_if_unused(graph, bound)
            else:
                sources.add(_position_input(index))
                erase_unused_indexing(graph, index)
        site.write_slots = slots
    _drop_position_checks(graph, sources - {None})


def read_whole_cache(graph: Graph, sites: list[AttentionSite]) -> None:
    """Where a site's attention reads a leading slice of its cache along the positions (``site.reads``: Meta's
    reference attends to ``cache[:b, :start + T]``, LitGPT to ``cache[..., :input_pos_maxp1, :]``), it reads the
    whole cache instead: every slot of the compressed cache, which the rewritten mask restricts to the occupied
    ones. The operand is rebuilt from the buffer the site writes as ``[B, Hkv, C, D]`` (transposed from
    ``[B, S, Hkv, D]``), its KV heads repeated to the operand's heads (query head ``h`` reads KV head ``h // G``, as
    repeat_kv) and cast to the operand's dtype; the slice and the ops that shaped it (sized by the position) go."""
    for site in sites:
        if site.reads is None:
            continue
        for operand, buffer in zip(site.reads, (site.key_buffer, site.value_buffer)):
            write = _write(site, buffer)
            source = write if write.target in ("index_copy_",) else buffer  # index_copy_ returns the buffer
            want, have = fake_value(operand), fake_value(buffer)
            kv_heads = int(have.shape[3 - site.cache_axis])
            with graph.inserting_before(operand.next):
                whole = source if site.cache_axis == 2 else graph.call_method("transpose", (source, 1, 2))
                if int(want.shape[1]) != kv_heads:
                    whole = graph.call_method("repeat_interleave", (whole, int(want.shape[1]) // kv_heads), {"dim": 1})
                if want.dtype != have.dtype:
                    whole = graph.call_method("to", (whole, want.dtype))
            operand.replace_all_uses_with(whole)
            _erase_dead(graph, operand)
        site.reads = None


def _erase_dead(graph: Graph, node: Node) -> None:
    """Erase ``node`` and then its inputs, as long as nothing reads them and they write nothing."""
    if node.users or node.op not in ("call_function", "call_method") or _is(node, *_WRITES) or (
            node.op == "call_method" and node.target.endswith("_")):
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for i in inputs:
        _erase_dead(graph, i)


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
