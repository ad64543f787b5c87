"""Find attention sites in a Dynamo graph by dataflow, never by module or class name.

Anchor on each attention node (``scaled_dot_product_attention``); follow its query back through layout ops to the
rotated query and match the rotary form there (``rotary.py``); follow its key/value back through ``repeat_kv``
(index/expand/reshape) to the cache buffer and the ``index_copy_`` that writes the new token into it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from triattn_compile.passes.rotary import RotaryMatch, match_rotary

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_LAYOUT_METHODS = {"contiguous", "to", "clone", "view", "reshape", "expand", "float", "type_as", "transpose"}
_LAYOUT_FUNCS = {torch.reshape, torch.transpose, operator.getitem}


class PatternNotFound(ValueError):
    """The pass could not recognise a pattern it needs at some attention site (one-line message)."""


@dataclass
class AttentionSite:
    """One attention layer of the traced model, as the rewrite sees it."""

    layer: int
    module: str
    attn: Node
    query: RotaryMatch
    head_axis: int  # axis of the heads in query.pre (head_dim is last)
    key_source: Node  # the attention's key before repeat_kv: [B, Hkv, S, D]
    key: RotaryMatch | None = None
    key_buffer: Node | None = None
    value_buffer: Node | None = None
    write_slots: Node | None = None  # [T] slots the new tokens were written to


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
        elif node.target not in ("contiguous", "to", "clone", "float", "type_as"):
            # a reshape/expand/index changes the layout in ways we do not track: stop at the last safe point
            return node, head_axis
        node = node.args[0]
    return node, head_axis


def _walk_to_buffer(node: Node) -> Node:
    """From an attention key/value argument back through repeat_kv to the tensor that holds the cache."""
    while _is_layout(node):
        node = node.args[0]
    return node


def _cache_write(buffer: Node) -> Node | None:
    """The ``buffer.index_copy_(2, slots, new)`` that writes the current tokens into ``buffer``."""
    if _is(buffer, "index_copy_"):
        return buffer
    for user in buffer.users:
        if _is(user, "index_copy_") and user.args[0] is buffer:
            return user
    return None


def _is(node: object, *targets) -> bool:
    return isinstance(node, Node) and node.op in ("call_function", "call_method") and node.target in targets


def _arg(node: Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def find_attention_sites(graph: Graph, need_cache: bool) -> list[AttentionSite]:
    """All attention sites in graph order (= layer order).

    Args:
        need_cache: also locate each site's compressed-cache buffers and write (compression mode).
    Raises:
        PatternNotFound: a site whose rotary embedding (or cache write) is not recognised, or no site at all.
    """
    sites = []
    for node in graph.nodes:
        if not _is(node, *SDPA_TARGETS):
            continue
        where = f"attention site {len(sites)} ({module_of(node)})"
        q_post, head_axis = _walk_layout(_arg(node, 0, "query"), head_axis=1)
        query = match_rotary(q_post)
        if query is None:
            raise PatternNotFound(
                f"{where}: no rotary embedding recognised on the query (node {q_post.name}); "
                "supported forms: rotate-half, partial rotary"
            )
        key_source = _walk_to_buffer(_arg(node, 1, "key"))
        site = AttentionSite(len(sites), module_of(node), node, query, head_axis, key_source)
        if need_cache:
            site.key_buffer = key_source
            site.value_buffer = _walk_to_buffer(_arg(node, 2, "value"))
            kw, vw = _cache_write(site.key_buffer), _cache_write(site.value_buffer)
            if kw is None or vw is None:
                raise PatternNotFound(
                    f"{where}: keys/values do not come from the compressed cache; the model must pass "
                    "`past_key_values` to its attention layers"
                )
            site.key_buffer, site.value_buffer = kw.args[0], vw.args[0]
            site.write_slots = kw.args[2]
            site.key = match_rotary(_walk_layout(kw.args[3], head_axis=1)[0])
            if site.key is None or site.key.pairing != query.pairing or site.key.rotary_dim != query.rotary_dim:
                raise PatternNotFound(f"{where}: the cached key is not rotated like the query ({kw.args[3].name})")
        sites.append(site)
    if not sites:
        raise PatternNotFound(
            "no attention node found in the traced model: expected scaled_dot_product_attention "
            "(load the model with attn_implementation='sdpa')"
        )
    return sites
