"""Find attention sites in a Dynamo graph by dataflow, never by module or class name.

Anchor on each attention node: ``scaled_dot_product_attention``, or the explicit form
``matmul(q, kᵀ) [* scale] [soft-capping] [+ mask] -> softmax -> matmul(·, v)`` (transformers
``attn_implementation="eager"``, GPT-J). Follow its query back through layout ops to the rotated query and match
the rotary form there (``rotary.py``); follow its key/value back through ``repeat_kv`` (index/expand/reshape,
``repeat_interleave``) to the cache buffer and the ``index_copy_`` (or per-row ``scatter_``) that writes the new token
into it.

vLLM's graph (``triattn_compile/vllm/``) has no SDPA: attention is the opaque ``vllm.unified_attention_with_output``
over ``[T, H, D]`` queries and ``[T, Hkv, D]`` keys/values, and the paged-cache write is
``vllm.unified_kv_cache_update(key, value, layer_name)``; these are sites of form ``"vllm"``, whose query and key are
matched through the reshapes around vLLM's RoPE.

A key assembled per head from a rotary part shared by all heads and a projection of a latent (multi-head latent
attention, DeepSeek-V2/V3: ``key = cat(W_UK c_kv, k_pe)``, as a ``cat`` or as ``copy_`` into slices of an empty
tensor) is a :class:`LatentKey`: its cache holds the latent and the rotary part, and ``passes/latent.py`` reads the
projection off the graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from triattn_compile.passes.rotary import ROTARY_FORM_NAMES, RotaryMatch, fake_value, last_axis_range, match_rotary

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
SOFTMAX_TARGETS = (F.softmax, torch.softmax, torch.Tensor.softmax, "softmax")
MATMUL_TARGETS = (torch.matmul, operator.matmul, "matmul", torch.bmm)
_SCALE_TARGETS = (operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div", "__truediv__")
_ADD_TARGETS = (operator.add, operator.iadd, torch.add, "add")  # iadd: `scores += mask`
_DROPOUT = (F.dropout, "dropout")
_SOFTCAP = (torch.tanh, "tanh")  # logit soft-capping, c * tanh(scores / c) (Gemma-2)
_SUB_TARGETS = (operator.sub, torch.sub, "sub")
_REDUCE_MAX = (torch.max, torch.amax, "max", "amax")
VLLM_ATTENTION = "vllm.unified_attention_with_output"  # (query, key, value, output, layer_name, ...)
VLLM_CACHE_WRITE = "vllm.unified_kv_cache_update"  # (key, value, layer_name): writes the paged KV cache


def _reduces(node: Node, source: Node, depth: int = 3) -> bool:
    """Whether ``node`` is a max-reduction of ``source`` (``x.max(-1, keepdim=True).values``, ``amax``)."""
    for _ in range(depth):
        if _is(node, *_REDUCE_MAX) and node.args[0] is source:
            return True
        if not isinstance(node, Node) or not node.all_input_nodes:
            return False
        node = node.all_input_nodes[0]
    return False
_LAYOUT_METHODS = {
    "contiguous", "to", "clone", "view", "reshape", "expand", "float", "type_as", "transpose", "permute",
    "repeat_interleave", "unsqueeze", "flatten",
}
_LAYOUT_FUNCS = {torch.reshape, torch.transpose, torch.permute, torch.repeat_interleave, torch.unsqueeze, torch.flatten,
                 operator.getitem}
_CAST_METHODS = ("contiguous", "to", "clone", "float", "type_as")


class PassError(ValueError):
    """A one-line error raised inside the compiler pass (the model or options cannot be served as asked);
    ``optimize`` re-raises it as is, not wrapped in Dynamo's backend error."""


class PatternNotFound(PassError):
    """The pass could not recognise a pattern it needs at some attention site (one-line message)."""


@dataclass
class LatentKey:
    """A key assembled along its last axis from ``rotary`` (one rotated key per token, broadcast over the heads) at
    the query's rotary dims and ``projection`` (per head, computed from a latent) at the others."""

    rotary: Node  # the rotary part before the broadcast [B, 1, S, r] (with a cache: the cache buffer)
    projection: Node  # the key's other dims [B, H, S, P]
    latent: Node | None = None  # with a cache: the cache buffer the projection is computed from


@dataclass
class AttentionSite:
    """One attention layer of the traced model, as the rewrite sees it."""

    layer: int
    module: str
    attn: Node
    query: RotaryMatch
    head_axis: int  # axis of the heads in query.pre (head_dim is last)
    key_source: Node  # the attention's key before repeat_kv: [B, Hkv, S, D]
    form: str = "sdpa"  # "sdpa" | "eager" (matmul -> softmax -> matmul)
    softmax: Node | None = None  # eager form: the softmax node
    mask_add: Node | None = None  # eager form: the ``scores + mask`` node, if any
    key: RotaryMatch | None = None
    key_buffer: Node | None = None
    value_buffer: Node | None = None
    write_slots: Node | None = None  # [B, T] (or [T]) slots the new tokens were written to
    appended: tuple[Node, Node] | None = None  # a cache grown by torch.cat: the keys, values the step returns
    cache_axis: int = 2  # axis of the positions in the cache buffers: 2 for [B, Hkv, S, D], 1 for [B, S, Hkv, D]
    reads: tuple[Node, Node] | None = None  # the attention's key, value operands where they read a leading slice
    # of the cache along its positions (``cache[:b, :start + T]``): the rewrite makes them read all of it
    latent: LatentKey | None = None  # multi-head latent attention: the cache holds (latent, rotary part)
    kv_dims: tuple[int, int] = (0, 0)  # last dims of the cached keys and values
    paged_write: Node | None = None  # vLLM: the unified_kv_cache_update node that writes this layer's paged cache
    layer_name: Node | None = None  # vLLM: the attention's layer-name input (its key in vLLM's forward context)
    kv_heads: int | None = None  # KV heads, followed from the key operand (what counts where no cache is located)


def module_of(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else "<top level>"


def _is_layout(node: object) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS
    if node.op == "call_function" and node.target in _LAYOUT_FUNCS:
        if node.target is operator.getitem:  # only pure indexing such as x[:, :, None]
            idx = node.args[1]
            idx = idx if isinstance(idx, tuple) else (idx,)
            return all(i is None or i is Ellipsis or i == slice(None) for i in idx)
        return True
    return False


def _walk_layout(node: Node, head_axis: int, ndim: int = 4) -> tuple[Node, int]:
    """Step back through layout ops, tracking where the heads axis goes through transposes."""
    while _is_layout(node):
        if node.target in ("transpose", torch.transpose):
            i, j = (d % ndim for d in node.args[1:3])
            head_axis = j if head_axis == i else i if head_axis == j else head_axis
        elif node.target in ("permute", torch.permute):
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
            head_axis = dims[head_axis] % ndim
        elif node.target not in _CAST_METHODS:
            # a reshape/expand/index changes the layout in ways we do not track: stop at the last safe point
            return node, head_axis
        node = node.args[0]
    return node, head_axis


def _before_repeat_kv(node: Node) -> Node:
    """``x`` of ``repeat_kv(x)``: ``x[:, :, None].expand(...).reshape(B, H, S, D)`` (transformers) or
    ``x.repeat_interleave(n, dim=1)``; else ``node``."""
    while _is(node, *_CAST_METHODS):
        node = node.args[0]
    if _is(node, "reshape", "view", torch.reshape) and _is(node.args[0], "expand"):
        inner = node.args[0].args[0]
        index = inner.args[1] if _is(inner, operator.getitem) else None
        if isinstance(index, tuple) and len(index) > 2 and index[2] is None:
            return inner.args[0]
    if _is(node, "repeat_interleave", torch.repeat_interleave) and _arg(node, 2, "dim") == 1:
        return node.args[0]
    return node


def key_heads(operand: Node) -> int | None:
    """KV heads of an attention's key operand ``[B, H, S, D]``: its head axis followed back through repeat_kv and
    transposes to the key as the model made it (which may be ``[B, S, Hkv, D]``, as GPT-J rotates it); ``None`` where
    that tensor has no recorded shape."""
    node, axis = _walk_layout(_before_repeat_kv(operand), head_axis=1)
    value = fake_value(node)
    return int(value.shape[axis]) if isinstance(value, torch.Tensor) and value.dim() == 4 else None


def walk_to_buffer(node: Node) -> Node:
    """From an attention key/value argument back through repeat_kv to the tensor that holds the cache."""
    while _is_layout(node):
        node = node.args[0]
    return node


_WRITES = ("index_copy_", "scatter_", operator.setitem)


def _cache_write(buffer: Node) -> Node | None:
    """The ``buffer[rows, :, slots] = new`` (or ``buffer[:, :, slots] = new``), ``buffer.index_copy_(2, slots, new)`` or
    ``buffer.scatter_(2, slots[:, None, :, None].expand(...), new)`` that writes the current tokens into ``buffer``."""
    if _is(buffer, *_WRITES):
        return buffer
    for user in buffer.users:
        if _is(user, *_WRITES) and user.args[0] is buffer:
            return user
    return None


def _full(index: object) -> bool:
    return isinstance(index, slice) and index.start is None and index.stop is None and index.step is None


def write_position(write: Node) -> tuple[int, object]:
    """``(axis, positions)`` of a cache write: the buffer axis the new tokens are written along and what indexes it,
    a tensor (``buffer[:, :, positions] = new``, ``index_copy_(axis, positions, new)``, ``scatter_``) or a slice
    (``buffer[:b, start:start + T] = new``): the last entry of a ``setitem`` index that is not a full slice."""
    ndim = fake_value(write.args[0]).dim()
    if write.target is not operator.setitem:
        return write.args[1] % ndim, write.args[2]
    index = write.args[1] if isinstance(write.args[1], tuple) else (write.args[1],)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1:]
    axis = max((i for i, entry in enumerate(index) if not _full(entry)), default=0)
    return axis, index[axis]


def _written(write: Node) -> tuple[Node | None, Node]:
    """``(slots, new tokens)`` of a cache write; slots ``[B, T]`` or ``[T]`` (``None`` for a slice ``start:stop``)."""
    position = write_position(write)[1]
    if write.target is operator.setitem:  # buffer[..., slots] = values
        return (position if isinstance(position, Node) else None), write.args[2]
    return walk_to_buffer(write.args[2]), write.args[3]  # scatter_: back through [:, None, :, None].expand


def _leading_slice(node: object) -> bool:
    """``x[:a, :b]``, ``x[..., :n, :]``: keeps a leading part of some axes (no new axes, no steps)."""
    if not _is(node, operator.getitem):
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return all(i is Ellipsis or (isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1))
               for i in index) and not all(i is Ellipsis or _full(i) for i in index)


def cache_read(operand: Node) -> tuple[Node, bool]:
    """From an attention key/value operand back through repeat_kv (and leading slices) to the cache tensor it reads:
    ``(that tensor, whether the read is a leading slice of it)``, as ``cache[:b, :start + T]`` (Meta's reference) or
    ``cache[..., :input_pos_maxp1, :]`` (LitGPT) attend to the positions written so far. Where no cache write is
    above the operand: ``(walk_to_buffer(operand), False)``."""
    node, sliced = operand, False
    while _cache_write(node) is None:
        if _is_layout(node):
            node = node.args[0]
        elif _leading_slice(node):
            node, sliced = node.args[0], True
        else:
            return walk_to_buffer(operand), False
    return node, sliced


def _is(node: object, *targets) -> bool:
    return isinstance(node, Node) and node.op in ("call_function", "call_method") and node.target in targets


def is_op(node: object, name: str) -> bool:
    """Whether ``node`` calls the custom op ``name`` (``"namespace::op"`` written ``"namespace.op"``), any overload."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    target = str(node.target)
    return target == name or target.startswith(name + ".")


def _walk_to_rotary(node: Node) -> RotaryMatch | None:
    """From a vLLM attention operand (``[T, H, D]``) back through views/reshapes to the first node whose rotary form
    is recognised (vLLM rotates ``[T, H, D]`` and reshapes to ``[T, H * D]`` and back around it), or a NoPE
    operand (:func:`_unrotated_slice`)."""
    start = node
    while isinstance(node, Node):
        found = match_rotary(node)
        if found is not None or not (_is_layout(node) or _is(node, "reshape", "view", torch.reshape)):
            return found or _unrotated_slice(start)
        node = node.args[0]
    return None


_SLICING = ("view", "reshape", torch.reshape, "contiguous", operator.getitem, "split", torch.split, "narrow")


def _unrotated_slice(node: Node) -> RotaryMatch | None:
    """A NoPE layer in vLLM's graph: the operand is a slice of a fused projection's output (``qkv.split``) reshaped
    into heads, and nothing else reads it on the way (an in-place RoPE op would). The projection is a linear op or,
    as vLLM's CPU linear layers run, an out-variant op filling a fresh buffer (``onednn_mm(out, x, bias, weights)``:
    the buffer's one other reader, taking it first, with an input besides it)."""
    path = [node]
    while _is(path[-1], *_SLICING) and isinstance(path[-1].args[0], Node):
        path.append(path[-1].args[0])
    source = path[-1]
    for read, parent in zip(path, path[1:-1]):  # the source's own readers are checked below
        siblings = [u for u in parent.users if u is not read]
        if siblings and not (_is(parent, "split", torch.split) and all(_is(u, operator.getitem) for u in siblings)):
            return None  # another reader of the query on its way (an in-place rotary op)
    if _is(source, *_LINEAR):
        return _nope(node)
    writers = [u for u in source.users if u is not path[-2]] if len(path) > 1 else []
    filled = (_is(source, *_EMPTY) and len(writers) == 1 and writers[0].op == "call_function"
              and writers[0].args[:1] == (source,)
              and any(isinstance(a, Node) and a is not source for a in writers[0].args[1:]))
    return _nope(node) if filled else None


_EMPTY = ("new_empty", "new_zeros", torch.empty, torch.zeros, torch.empty_like, torch.zeros_like)


def _last_axis_parts(node: Node) -> list[tuple[int, int, Node]] | None:
    """``[(start, stop, part)]`` of a tensor assembled along its last axis, covering it: ``cat(parts, -1)``, or an
    empty tensor whose last-axis slices are each filled by one ``copy_``."""
    val = fake_value(node)
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    width, parts = int(val.shape[-1]), []
    if _is(node, torch.cat, "cat") and _arg(node, 1, "dim") in (-1, val.dim() - 1):
        start = 0
        for part in node.args[0]:
            stop = start + int(fake_value(part).shape[-1])
            parts.append((start, stop, part))
            start = stop
    elif _is(node, *_EMPTY):
        for view in node.users:
            found = last_axis_range(view)
            copies = [u for u in view.users if _is(u, "copy_") and u.args[0] is view]
            if found is not None and found[0] is node and len(copies) == 1:
                parts.append((found[1] or 0, width if found[2] is None else found[2], copies[0].args[1]))
    parts.sort(key=lambda p: p[0])
    edges = [0] + [b for _, b, _ in parts]
    if len(parts) < 2 or any(a != e for (a, _, _), e in zip(parts, edges)) or edges[-1] != width:
        return None
    return parts


def _latent_key(key: Node, query: RotaryMatch) -> LatentKey | None:
    """The key as a :class:`LatentKey`: two parts, the one at the query's rotary dims shared by all heads."""
    parts = _last_axis_parts(key)
    if parts is None or len(parts) != 2 or not query.rotary_dim:
        return None
    span = (query.rotary_start, query.rotary_start + query.rotary_dim)
    rotary = [walk_to_buffer(p) for a, b, p in parts if (a, b) == span]
    projection = [p for a, b, p in parts if (a, b) != span]
    if len(rotary) != 1 or int(fake_value(rotary[0]).shape[1]) >= int(fake_value(key).shape[1]):
        return None
    return LatentKey(rotary[0], projection[0])


def _cache_buffer_above(node: Node, depth: int = 12) -> Node | None:
    """The nearest ancestor of ``node`` that a cache write writes into."""
    frontier = [node]
    for _ in range(depth):
        frontier = [i for n in frontier for i in n.all_input_nodes]
        for n in frontier:
            if _cache_write(n) is not None:
                return n
    return None


def _arg(node: Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


_LINEAR = (torch._C._nn.linear, F.linear)


def _nope(node: Node) -> RotaryMatch:
    """``node`` as the operand of a layer without RoPE (pre = post, no rotary dims)."""
    return RotaryMatch(node, node, None, None, "none", 0, "none (NoPE)")


def _unrotated(node: Node) -> RotaryMatch | None:
    """A NoPE layer: the query (or key) is a plain linear projection, reshaped into heads, with no rotary at all."""
    if _is(node, "view", "reshape", torch.reshape) and _is(node.args[0], *_LINEAR):
        return _nope(node)
    return None


def _is_scalar(x: object) -> bool:
    """A Python number, a symbolic one (a config float traced with ``dynamic=True``) or a one-element tensor (a
    softmax scale such as GPT-J's ``scale_attn``)."""
    if not isinstance(x, Node):
        return isinstance(x, (int, float))
    val = fake_value(x)
    return isinstance(val, (torch.SymFloat, torch.SymInt)) or (isinstance(val, torch.Tensor) and val.numel() == 1)


def _eager_attention(softmax: Node) -> tuple[Node, Node, Node, Node | None] | None:
    """``softmax(matmul(q, kᵀ) [*/ scale] [soft-cap] [+ mask | .masked_fill(mask, -inf)] [cat sinks] [- max])`` followed
    by ``matmul(·, v)``
    (after casts, dropout, or dropping the sink columns) -> ``(q, k, v, mask_add)``."""
    node, mask_add = softmax.args[0], None
    while isinstance(node, Node) and not _is(node, *MATMUL_TARGETS):
        if _is(node, *_CAST_METHODS, *_SOFTCAP):
            node = node.args[0]
        elif _is(node, *_SCALE_TARGETS) and isinstance(node.args[0], Node) and _is_scalar(node.args[1]):
            node = node.args[0]
        elif _is(node, *_ADD_TARGETS) and mask_add is None and all(isinstance(a, Node) for a in node.args[:2]):
            scores = [a for a in node.args[:2] if computes_scores(a)]
            if len(scores) != 1:
                return None
            mask_add, node = node, scores[0]
        elif _is(node, "masked_fill", torch.masked_fill) and mask_add is None and computes_scores(node.args[0]):
            mask_add, node = node, node.args[0]  # scores.masked_fill(mask, -inf): replaced like an additive mask
        elif _is(node, *_SUB_TARGETS) and isinstance(node.args[1], Node) and _reduces(node.args[1], node.args[0]):
            node = node.args[0]  # x - max(x): the softmax's own stabilisation
        elif _is(node, torch.cat, "cat") and _arg(node, 1, "dim") == -1 and len(node.args[0]) == 2:
            scores = [a for a in node.args[0] if computes_scores(a)]  # cat(scores, sink logits) (gpt-oss)
            if len(scores) != 1 or node.args[0][0] is not scores[0]:
                return None
            node = scores[0]
        else:
            return None
    if not isinstance(node, Node):
        return None
    q, kt = node.args[:2]
    out, frontier = None, [softmax]  # softmax [-> cast] [-> dropout] -> matmul(probs, v)
    while frontier and out is None:
        probs = frontier.pop()
        for user in probs.users:
            if _is(user, *MATMUL_TARGETS) and user.args[0] is probs:
                out = user
            elif _is(user, *_CAST_METHODS, *_DROPOUT) or (last_axis_range(user) or (None,))[0] is probs:
                frontier.append(user)  # casts, dropout, dropping sink columns (probs[..., :-1])
    if out is None or not _is(kt, "transpose", torch.transpose):
        return None
    return q, kt.args[0], out.args[1], mask_add


def computes_scores(node: Node, depth: int = 6) -> bool:
    """Whether a matmul is among ``node``'s nearest ancestors: the attention scores, as opposed to the mask."""
    frontier = [node]
    for _ in range(depth + 1):
        if any(_is(n, *MATMUL_TARGETS) for n in frontier):
            return True
        frontier = [i for n in frontier for i in n.all_input_nodes]
    return False


def _attention_nodes(graph: Graph):
    """``(anchor, q, k, v, form, softmax, mask_add)`` for every attention computation, in graph order."""
    for node in graph.nodes:
        if _is(node, *SDPA_TARGETS):
            yield node, _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value"), "sdpa", None, None
        elif _is(node, *SOFTMAX_TARGETS) and (found := _eager_attention(node)) is not None:
            q, k, v, mask_add = found
            yield node, q, k, v, "eager", node, mask_add
        elif is_op(node, VLLM_ATTENTION):
            yield node, node.args[0], node.args[1], node.args[2], "vllm", None, None


def _returned(graph: Graph) -> set[Node]:
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    return {n for n in torch.utils._pytree.tree_leaves(output.args) if isinstance(n, Node)}


def appended_tokens(grown: Node) -> Node:
    """The new tokens of a grown cache (``site.appended``): ``new`` of ``cat([cache, new], dim=-2)``, else itself."""
    return grown.args[0][1] if _is(grown, torch.cat, "cat") else grown


def _grown_cache(operand: Node, returned: set[Node], where: str) -> Node:
    """For a model whose cache grows by ``torch.cat``, found from an attention key or value operand: the cache is
    what the step returns (for the caller to pass back). Walking back through repeat_kv, the first returned tensor
    is ``cat([cache, new], dim=-2)``, or the new tokens themselves (the cache was empty)."""
    node, chain = operand, [operand]
    while node not in returned and _is_layout(node):
        node = node.args[0]
        chain.append(node)
    written = next(((n, u) for n in chain for u in n.users
                    if _is(u, *_WRITES) and n in (*u.args[2:], *u.kwargs.values())), None)
    if node not in returned and written is not None:
        raise PatternNotFound(
            f"{where}: the attention reads the new keys/values ({written[0].name}) themselves, not the cache they are "
            f"written into ({written[1].name}); attention must read the cache it writes, in every step (the prompt "
            "too)")
    if node not in returned:
        raise PatternNotFound(
            f"{where}: keys/values are not written in place into a cache, nor returned as a grown cache; the model "
            "must pass its cache (`cache` or `past_key_values`) to its attention layers, write its own KV buffers "
            "by index (buffer[:, :, positions] = new, index_copy_), or return cat([cache, new], dim=-2)")
    if _is(node, torch.cat, "cat"):
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if len(parts) != 2 or dim not in (2, -2):
            raise PatternNotFound(f"{where}: its cache grows by a torch.cat other than cat([cache, new], dim=-2)")
    return node


def find_attention_sites(graph: Graph, need_cache: bool, appended: bool = False) -> list[AttentionSite]:
    """All attention sites in graph order (= layer order).

    Args:
        need_cache: also locate each site's compressed-cache buffers and write (compression mode).
        appended: a site whose keys are not written into a buffer may append them to a cache that grows by
            ``torch.cat`` (or attend to the new tokens alone): ``site.appended`` (``passes/own_cache.py``).
    Raises:
        PatternNotFound: a site whose rotary embedding (or cache write) is not recognised, or no site at all.
    """
    sites, returned = [], _returned(graph) if appended else set()
    for node, q_arg, k_arg, v_arg, form, softmax, mask_add in _attention_nodes(graph):
        where = f"attention site {len(sites)} ({module_of(node)})"
        if form == "vllm":
            sites.append(_vllm_site(len(sites), node, where, need_cache))
            continue
        q_post, head_axis = _walk_layout(q_arg, head_axis=1)
        query = match_rotary(q_post) or _unrotated(q_post)
        if query is None:
            raise PatternNotFound(
                f"{where}: no rotary embedding recognised on the query (node {q_post.name}); "
                f"supported forms: {', '.join(ROTARY_FORM_NAMES)}"
            )
        key_source, key_sliced = cache_read(k_arg)
        latent = None if _cache_write(key_source) else _latent_key(key_source, query)
        site = AttentionSite(
            len(sites), module_of(node), node, query, head_axis, latent.rotary if latent else key_source, form,
            softmax, mask_add, latent=latent, kv_heads=key_heads(k_arg),
        )
        if need_cache:
            value_sliced = False
            if latent is not None:
                latent.latent = _cache_buffer_above(latent.projection)
                kw, vw = _cache_write(latent.latent) if latent.latent else None, _cache_write(latent.rotary)
            else:
                value_source, value_sliced = cache_read(v_arg)
                kw, vw = _cache_write(key_source), _cache_write(value_source)
            if (kw is None or vw is None) and appended and latent is None:
                site.appended = (_grown_cache(k_arg, returned, where), _grown_cache(v_arg, returned, where))
                new_keys, new_values = map(appended_tokens, site.appended)
            elif kw is None or vw is None:
                raise PatternNotFound(
                    f"{where}: keys/values are not written in place into a cache; the model must pass its cache "
                    "(`cache` or `past_key_values`) to its attention layers, write its own KV buffers by index "
                    "(buffer[:, :, positions] = new, index_copy_), or grow them by torch.cat([cache, new], dim=-2)"
                )
            else:
                site.key_buffer, site.value_buffer = kw.args[0], vw.args[0]
                site.write_slots, new_keys = _written(kw)
                new_values = _written(vw)[1]
                site.cache_axis = write_position(kw)[0] if latent is None else 2
                if latent is None and (site.cache_axis not in (1, 2) or fake_value(site.key_buffer).dim() != 4):
                    raise PatternNotFound(f"{where}: its cache is written along axis {site.cache_axis} of a "
                                          f"{fake_value(site.key_buffer).dim()}-D buffer; expected the positions "
                                          "axis of a [B, Hkv, S, D] or [B, S, Hkv, D] buffer")
                if key_sliced or value_sliced:
                    site.reads = (k_arg, v_arg)
            site.kv_dims = (int(fake_value(new_keys).shape[-1]), int(fake_value(new_values).shape[-1]))
            rotated = new_values if latent else new_keys  # a latent cache keeps the rotated key as its "values"
            k_post = _walk_layout(rotated, head_axis=1)[0]
            site.key = match_rotary(k_post) or _unrotated(k_post)
            if site.key is None or site.key.pairing != query.pairing or site.key.rotary_dim != query.rotary_dim:
                raise PatternNotFound(f"{where}: the cached key is not rotated like the query ({k_post.name})")
        sites.append(site)
    if not sites:
        raise PatternNotFound(
            "no attention node found in the traced model: expected scaled_dot_product_attention, "
            "matmul -> softmax -> matmul (load the model with attn_implementation='sdpa' or 'eager') or "
            f"{VLLM_ATTENTION}"
        )
    return sites


def _vllm_site(index: int, attn: Node, where: str, need_cache: bool) -> AttentionSite:
    """A site of vLLM's ``unified_attention_with_output(query [T, H, D], key [T, Hkv, D], value, output, layer_name)``:
    the rotary form is matched on the query and on the key it writes with ``unified_kv_cache_update``."""
    q_arg, k_arg, v_arg = attn.args[:3]
    layer_name = _arg(attn, 4, "layer_name")
    query = _walk_to_rotary(q_arg)
    if query is None:
        raise PatternNotFound(
            f"{where}: no rotary embedding recognised on the query of {VLLM_ATTENTION} (node {q_arg.name}); "
            f"supported forms: {', '.join(ROTARY_FORM_NAMES[:-1])}; start vLLM with custom ops off (the default on "
            "CPU) so that RoPE is traced as plain torch ops"
        )
    site = AttentionSite(index, module_of(attn), attn, query, head_axis=1, key_source=k_arg, form="vllm",
                         layer_name=layer_name if isinstance(layer_name, Node) else None)
    if need_cache:
        dep = attn.kwargs.get("kv_cache_dummy_dep")
        writes = [dep] if is_op(dep, VLLM_CACHE_WRITE) else [
            u for u in k_arg.users if is_op(u, VLLM_CACHE_WRITE) and u.args[0] is k_arg]
        if len(writes) != 1 or writes[0].args[1] is not v_arg:
            raise PatternNotFound(f"{where}: no {VLLM_CACHE_WRITE} writes the key and value this attention reads")
        site.paged_write = writes[0]
        site.kv_dims = (int(fake_value(k_arg).shape[-1]), int(fake_value(v_arg).shape[-1]))
        site.key = _walk_to_rotary(k_arg)
        if site.key is None or site.key.pairing != query.pairing or site.key.rotary_dim != query.rotary_dim:
            raise PatternNotFound(f"{where}: the cached key is not rotated like the query ({k_arg.name})")
    return site
