"""Rotary-embedding forms, recognised by the arithmetic they perform on the graph.

Each form is a row of :data:`ROTARY_FORMS`: a matcher that, given the node that produces a rotated tensor
(``x_post``), returns a :class:`RotaryMatch` (the pre-RoPE tensor, the cos/sin nodes, the pairing and the rotary
width) or ``None``. Adding a form means adding a row.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx import Node


@dataclass
class RotaryMatch:
    """``post = RoPE(pre)`` with angles from ``cos``/``sin``; ``rotary_dim`` leading dims of the last axis rotate."""

    pre: Node
    post: Node
    cos: Node
    sin: Node
    pairing: str
    rotary_dim: int
    form: str


def _is(node: object, *targets) -> bool:
    return isinstance(node, Node) and node.op in ("call_function", "call_method") and node.target in targets


_ADD = (operator.add, torch.add, "add")
_MUL = (operator.mul, torch.mul, "mul")
_NEG = (operator.neg, torch.neg, "neg")
_CAT = (torch.cat, "cat")


def fake_value(node: Node):
    """The (fake) tensor a traced node produces, as recorded by Dynamo or by AOT tracing."""
    return node.meta.get("example_value", node.meta.get("val"))


def _last_dim(node: Node) -> int | None:
    val = fake_value(node)
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) else None


def _slice_last(node: object) -> tuple[Node, int | None, int | None] | None:
    """``x[..., a:b]`` -> ``(x, a, b)``."""
    if not _is(node, operator.getitem):
        return None
    base, idx = node.args
    if isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice):
        if idx[1].step in (None, 1):
            return base, idx[1].start, idx[1].stop
    return None


def _rotate_half_of(node: object) -> Node | None:
    """``cat((-x[..., h:], x[..., :h]), -1)`` -> ``x``."""
    if not _is(node, *_CAT):
        return None
    parts = node.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not _is(parts[0], *_NEG):
        return None
    hi, lo = _slice_last(parts[0].args[0]), _slice_last(parts[1])
    if hi is None or lo is None or hi[0] is not lo[0]:
        return None
    half = _last_dim(lo[0])
    if half is None or half % 2 or lo[1] not in (None, 0) or lo[2] != half // 2 or hi[1] != half // 2:
        return None
    return lo[0]


def _mul_pairs(node: Node) -> list[tuple[Node, Node]]:
    """Both orderings of a binary mul's operands."""
    a, b = node.args[0], node.args[1]
    return [(a, b), (b, a)] if isinstance(a, Node) and isinstance(b, Node) else []


def match_rotate_half(post: Node) -> RotaryMatch | None:
    """``x * cos + rotate_half(x) * sin`` (Llama, Qwen, Mistral, ...)."""
    if not _is(post, *_ADD) or len(post.args) < 2 or not all(_is(a, *_MUL) for a in post.args[:2]):
        return None
    for m1, m2 in ((post.args[0], post.args[1]), (post.args[1], post.args[0])):
        for x, cos in _mul_pairs(m1):
            for rot, sin in _mul_pairs(m2):
                if _rotate_half_of(rot) is x:
                    return RotaryMatch(x, post, cos, sin, "half", _last_dim(x), "rotate_half")
    return None


def match_partial(post: Node) -> RotaryMatch | None:
    """``cat((rope(x[..., :r]), x[..., r:]), -1)``: only the first ``r`` dims rotate (GPT-NeoX, Phi, ...)."""
    if not _is(post, *_CAT):
        return None
    parts = post.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    inner = match_full(parts[0])
    rot_src, rest = _slice_last(inner.pre) if inner else None, _slice_last(parts[1])
    if inner is None or rot_src is None or rest is None or rot_src[0] is not rest[0]:
        return None
    return RotaryMatch(rot_src[0], post, inner.cos, inner.sin, inner.pairing, inner.rotary_dim, "partial")


FULL_FORMS: list[Callable[[Node], RotaryMatch | None]] = [match_rotate_half]
ROTARY_FORMS: list[Callable[[Node], RotaryMatch | None]] = [*FULL_FORMS, match_partial]


def match_full(post: Node) -> RotaryMatch | None:
    for form in FULL_FORMS:
        if (m := form(post)) is not None:
            return m
    return None


def match_rotary(post: Node) -> RotaryMatch | None:
    """The first form of :data:`ROTARY_FORMS` that explains ``post``, else ``None``."""
    for form in ROTARY_FORMS:
        if (m := form(post)) is not None:
            return m
    return None
