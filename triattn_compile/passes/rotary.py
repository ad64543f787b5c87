"""Rotary-embedding forms, recognised by the arithmetic they perform on the graph.

Each form is a row of :data:`ROTARY_FORMS`: a matcher that, given the node that produces a rotated tensor
(``x_post``), returns a :class:`RotaryMatch` (the pre-RoPE tensor, the cos/sin nodes, the pairing and the rotary
width) or ``None``. Adding a form means adding a row.

* rotate-half (pairing "half"; Llama, Qwen, Mistral): ``x*cos + cat(-x[..., h:], x[..., :h])*sin``.
* rotate-every-two (pairing "interleaved"; GPT-J, Cohere, GLM):
  ``x*cos + stack(-x[..., 1::2], x[..., ::2], -1).flatten(-2)*sin``.
* complex (pairing "interleaved"; Meta reference, gpt-fast):
  ``view_as_real(view_as_complex(x.reshape(..., -1, 2)) * freqs_cis).flatten(-2)``.
* pair members written out, ``cat(x1*cos - x2*sin, x2*cos + x1*sin)`` with cos/sin one column per band: the halves
  ``x1, x2 = chunk(x, 2, -1)`` (gpt-oss, vLLM neox style; pairing "half"), or ``x1, x2 = x[..., ::2], x[..., 1::2]``
  ("de-interleave", DeepSeek-V2/V3's ``rope_interleave``): the query statistics pair ``interleaved``, the rotated
  keys ``half``; with strided members put back by ``stack((o1, o2), -1).flatten(-2)`` (vLLM GPT-J style),
  interleaved in and out.
* real-pair stack (pairing "interleaved" in and out; gpt-fast upstream, torchtune ``RotaryPositionalEmbeddings``):
  ``p = x.reshape(..., F, 2)``, ``stack((p0*c - p1*s, p1*c + p0*s), -1).flatten(-2)`` with ``p_i = p[..., i]`` and
  ``c, s = t[..., 0], t[..., 1]`` of one ``[..., F, 2]`` table ``t`` (cos/sin one column per band).
* partial (pairing of the inner form): ``cat(rope(x[..., :r]), x[..., r:])`` (GPT-NeoX, Phi, GLM) or trailing
  rotary dims ``cat(x[..., :p], rope(x[..., p:]))`` (MLA's ``cat(q_nope, rope(q_pe))``); the parts may be slices or
  ``torch.split`` outputs.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx import Node


@dataclass
class RotaryMatch:
    """``post = RoPE(pre)`` with angles from ``cos``/``sin``: dims ``[rotary_start, rotary_start + rotary_dim)`` of the
    last axis rotate, paired as ``pairing`` in ``pre`` and as :attr:`key_pairing` in ``post``."""

    pre: Node
    post: Node
    cos: Node
    sin: Node
    pairing: str
    rotary_dim: int
    form: str
    table: str = "real"  # "real": cos/sin laid out like x; "bands": one column per band [..., F]; "complex": e^{iωt}
    rotary_start: int = 0
    rotated_pairing: str | None = None  # pairing of the rotated output, when it differs from the input's

    @property
    def layout(self) -> tuple[str, str, int, int]:
        """What must agree across layers: pairings in and out, rotary width and first rotary dim."""
        return self.pairing, self.key_pairing, self.rotary_dim, self.rotary_start

    @property
    def key_pairing(self) -> str:
        """Pairing of the rotated tensor (what the cached keys are scored with)."""
        return self.rotated_pairing or self.pairing


def _is(node: object, *targets) -> bool:
    return isinstance(node, Node) and node.op in ("call_function", "call_method") and node.target in targets


_ADD = (operator.add, torch.add, "add")
_MUL = (operator.mul, torch.mul, "mul")
_NEG = (operator.neg, torch.neg, "neg")
_SUB = (operator.sub, torch.sub, "sub")
_CAT = (torch.cat, "cat")
_STACK = (torch.stack, "stack")
_FLATTEN = (torch.flatten, "flatten")
_CASTS = {"float", "to", "type_as", "contiguous"}


def fake_value(node: Node):
    """The (fake) tensor a traced node produces, as recorded by Dynamo or by AOT tracing."""
    return node.meta.get("example_value", node.meta.get("val"))


def _last_dim(node: Node) -> int | None:
    val = fake_value(node)
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) else None


def _last_slice(node: object) -> tuple[Node, slice] | None:
    """``x[..., s]`` or ``x[:, :, :, s]`` (a slice of the last axis only) -> ``(x, s)``."""
    if not _is(node, operator.getitem):
        return None
    base, idx = node.args
    val = fake_value(base)
    if not isinstance(idx, tuple) or not idx or not isinstance(idx[-1], slice) or not isinstance(val, torch.Tensor):
        return None
    lead = idx[:-1]
    full = lambda i: isinstance(i, slice) and i == slice(None)
    if (len(lead) == 1 and lead[0] is Ellipsis) or (len(lead) == val.dim() - 1 and all(map(full, lead))):
        return base, idx[-1]
    return None


def _split_part(node: object) -> tuple[Node, int, int] | None:
    """``torch.split(x, sizes, -1)[i]`` or ``torch.chunk(x, n, -1)[i]`` -> ``(x, start, stop)`` along the last axis."""
    if not _is(node, operator.getitem) or not isinstance(node.args[1], int):
        return None
    split, i = node.args
    if not _is(split, torch.split, "split", torch.chunk, "chunk") or not isinstance(split.args[0], Node):
        return None
    x, sizes = split.args[0], split.args[1] if len(split.args) > 1 else None
    if sizes is None:
        sizes = split.kwargs.get("split_size_or_sections", split.kwargs.get("chunks"))
    dim, ndim, width = _dim_arg(split, 2), fake_value(x).dim(), _last_dim(x)
    if dim % ndim != ndim - 1 or width is None:
        return None
    if split.target in (torch.chunk, "chunk"):
        if not isinstance(sizes, int) or width % sizes:
            return None
        sizes = width // sizes
    if isinstance(sizes, int):
        return x, i * sizes, (i + 1) * sizes
    if isinstance(sizes, (list, tuple)) and all(isinstance(n, int) for n in sizes):
        return x, sum(sizes[:i]), sum(sizes[: i + 1])
    return None


def last_axis_range(node: object) -> tuple[Node, int | None, int | None] | None:
    """``x[..., a:b]`` (or a ``split`` part of the last axis) -> ``(x, a, b)``."""
    found = _last_slice(node)
    if found is not None and found[1].step in (None, 1):
        return found[0], found[1].start, found[1].stop
    return _split_part(node)


def _strided_last(node: object) -> tuple[Node, int] | None:
    """``x[..., o::2]`` -> ``(x, o)`` for o in (0, 1)."""
    found = _last_slice(node)
    if found is None or found[1].step != 2 or found[1].stop is not None or found[1].start not in (None, 0, 1):
        return None
    return found[0], found[1].start or 0


def _dim_arg(node: Node, index: int, default: int = 0) -> int:
    return node.args[index] if len(node.args) > index else node.kwargs.get("dim", default)


def _flattens_last_two(node: Node) -> bool:
    """``y.flatten(-2)`` (or ``flatten(y, ndim - 2)``, ``flatten(-2, -1)``): merges the last two axes only."""
    ndim = fake_value(node.args[0]).dim()
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start % ndim == ndim - 2 and end % ndim == ndim - 1


def _rotate_every_two_of(node: object) -> Node | None:
    """``stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)`` -> ``x``."""
    if not _is(node, *_FLATTEN) or not _flattens_last_two(node):
        return None
    stack = node.args[0]
    if not _is(stack, *_STACK) or _dim_arg(stack, 1) not in (-1, fake_value(stack).dim() - 1):
        return None
    parts = stack.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not _is(parts[0], *_NEG):
        return None
    odd, even = _strided_last(parts[0].args[0]), _strided_last(parts[1])
    if odd is None or even is None or odd[0] is not even[0] or (odd[1], even[1]) != (1, 0):
        return None
    return even[0]


def _rotate_half_of(node: object) -> Node | None:
    """``cat((-x[..., h:], x[..., :h]), -1)`` -> ``x``."""
    if not _is(node, *_CAT):
        return None
    parts = node.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not _is(parts[0], *_NEG):
        return None
    hi, lo = last_axis_range(parts[0].args[0]), last_axis_range(parts[1])
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
    """``x * cos + rotate(x) * sin`` with ``rotate`` = rotate-half (Llama, Qwen, Mistral, ...: pairing "half") or
    rotate-every-two (GPT-J, Cohere, GLM: pairing "interleaved")."""
    if not _is(post, *_ADD) or len(post.args) < 2 or not all(_is(a, *_MUL) for a in post.args[:2]):
        return None
    for m1, m2 in ((post.args[0], post.args[1]), (post.args[1], post.args[0])):
        for x, cos in _mul_pairs(m1):
            x = _strip_casts(x)  # x.float() * cos + rotate(x).float() * sin (Ernie 4.5: RoPE in float32)
            for rot, sin in _mul_pairs(m2):
                if _strip_casts(_rotate_half_of(_strip_casts(rot))) is x:
                    return RotaryMatch(x, post, cos, sin, "half", _last_dim(x), "rotate_half")
                if _strip_casts(_rotate_every_two_of(_strip_casts(rot))) is x:
                    return RotaryMatch(x, post, cos, sin, "interleaved", _last_dim(x), "rotate_every_two")
    return None


def _strip_casts(node: object) -> object:
    while _is(node, *_CASTS) and node.op == "call_method":
        node = node.args[0]
    return node


def _pairs_of(pairs: object) -> Node | None:
    """``x.reshape(..., D/2, 2)`` (or ``view``; casts either side): the pairs ``(2f, 2f + 1)`` of ``x``'s last axis
    -> ``x``."""
    pairs = _strip_casts(pairs)
    if not _is(pairs, "reshape", "view", torch.reshape):
        return None
    x = _strip_casts(pairs.args[0])
    shape, x_shape = fake_value(pairs).shape, fake_value(x).shape
    if tuple(shape[:-2]) == tuple(x_shape[:-1]) and shape[-1] == 2 and 2 * shape[-2] == x_shape[-1]:
        return x
    return None


def _merges_pairs(post: Node, x: Node) -> bool:
    """``post`` puts a ``[..., F, 2]`` result back into ``x``'s shape, pair after pair: ``flatten(-2)`` or a
    ``reshape``/``view`` to that shape."""
    if not _is(post, *_FLATTEN, "reshape", "view") or (_is(post, *_FLATTEN) and not _flattens_last_two(post)):
        return False
    shape, x_shape = fake_value(post.args[0]).shape, fake_value(x).shape
    return tuple(fake_value(post).shape) == tuple(x_shape) and tuple(shape[:-2]) == tuple(x_shape[:-1])


def match_complex(post: Node) -> RotaryMatch | None:
    """``view_as_real(view_as_complex(x.reshape(..., F, 2)) * freqs_cis).flatten(-2)`` (Meta reference, gpt-fast):
    interleaved pairs, ``freqs_cis = e^{iωt}`` complex ``[..., F]``."""
    if not _is(post, *_FLATTEN, "reshape", "view"):
        return None
    real = post.args[0]
    if not _is(real, torch.view_as_real) or not _is(real.args[0], *_MUL):
        return None
    for z, freqs in _mul_pairs(real.args[0]):
        if not _is(z, torch.view_as_complex):
            continue
        x = _pairs_of(z.args[0])
        if x is not None and _merges_pairs(post, x):
            return RotaryMatch(x, post, freqs, freqs, "interleaved", _last_dim(x), "complex", table="complex")
    return None


def _pair_member(node: object) -> tuple[Node, int] | None:
    """``t[..., i]`` (or ``t[:, :, :, i]``, ``t.select(-1, i)``, ``t.unbind(-1)[i]``) of a tensor ``t`` whose last
    axis holds a pair -> ``(t, i)``, i in (0, 1)."""
    if _is(node, operator.getitem) and _is(node.args[0], torch.unbind, "unbind"):
        base, i = node.args[0].args[0], node.args[1]
        if not isinstance(base, Node) or _dim_arg(node.args[0], 1) not in (-1, fake_value(base).dim() - 1):
            return None
    elif _is(node, operator.getitem) and isinstance(node.args[1], tuple) and node.args[1]:
        base, idx = node.args
        i, lead = idx[-1], idx[:-1]
        full = lambda j: isinstance(j, slice) and j == slice(None)
        if not isinstance(base, Node) or not isinstance(fake_value(base), torch.Tensor):
            return None
        if not ((len(lead) == 1 and lead[0] is Ellipsis) or (len(lead) == fake_value(base).dim() - 1
                                                             and all(map(full, lead)))):
            return None
    elif _is(node, torch.select, "select"):
        base, dim, i = (*node.args, None, None)[:3]
        if not isinstance(base, Node) or not isinstance(dim, int) or dim not in (-1, fake_value(base).dim() - 1):
            return None
    else:
        return None
    if not isinstance(base, Node) or isinstance(i, bool) or not isinstance(i, int) or _last_dim(base) != 2:
        return None
    return (base, i % 2) if -2 <= i < 2 else None


def _is_product(node: object, a: tuple[Node, int], b: tuple[Node, int]) -> bool:
    """Whether ``node`` is ``u * v`` (either order) with ``u``, ``v`` the pair members ``a``, ``b``."""
    return _is(node, *_MUL) and any(_pair_member(u) == a and _pair_member(v) == b for u, v in _mul_pairs(node))


def match_real_pairs(post: Node) -> RotaryMatch | None:
    """``stack((p0*c - p1*s, p1*c + p0*s), -1).flatten(-2)`` with ``p_i = x.reshape(..., F, 2)[..., i]`` and
    ``c, s = t[..., 0], t[..., 1]`` of one ``[..., F, 2]`` table (gpt-fast upstream, torchtune): the complex product
    written out on real pairs; interleaved pairs in and out, cos/sin one column per band."""
    if not _is(post, *_FLATTEN, "reshape", "view"):
        return None
    stack = post.args[0]
    if not _is(stack, *_STACK) or _dim_arg(stack, 1) not in (-1, fake_value(stack).dim() - 1):
        return None
    parts = stack.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    real, imag = parts
    if not _is(real, *_SUB) or not _is(imag, *_ADD) or not all(_is(a, *_MUL) for a in (*real.args, *imag.args)):
        return None
    for u, cos in _mul_pairs(real.args[0]):  # real = p0 * c - p1 * s
        for v, sin in _mul_pairs(real.args[1]):
            p0, p1, c, s = map(_pair_member, (u, v, cos, sin))
            if None in (p0, p1, c, s) or p0 != (p0[0], 0) or p1 != (p0[0], 1) or c != (c[0], 0) or s != (c[0], 1):
                continue
            t1, t2 = imag.args[:2]  # imag = p1 * c + p0 * s
            if not ((_is_product(t1, p1, c) and _is_product(t2, p0, s))
                    or (_is_product(t2, p1, c) and _is_product(t1, p0, s))):
                continue
            x = _pairs_of(p0[0])
            if x is not None and _merges_pairs(post, x):
                return RotaryMatch(x, post, cos, sin, "interleaved", _last_dim(x), "real-pair stack", table="bands")
    return None



def _product(node: object, x: Node, table: Node | None) -> Node | None:
    """``x * t`` (either order) -> ``t`` (checked equal to ``table`` when given)."""
    if not _is(node, *_MUL):
        return None
    for a, t in _mul_pairs(node):
        if a is x and (table is None or t is table):
            return t
    return None


def _pair_source(x1: Node, x2: Node) -> tuple[Node, str] | None:
    """``(x, pairing)`` when ``x1, x2`` are the two members of every pair of ``x``: ``x[..., ::2], x[..., 1::2]``
    (interleaved) or the two halves of its last axis (slices, ``split`` or ``chunk``: half)."""
    even, odd = _strided_last(x1), _strided_last(x2)
    if even is not None and odd is not None and even[0] is odd[0] and (even[1], odd[1]) == (0, 1):
        return even[0], "interleaved"
    lo, hi = last_axis_range(x1), last_axis_range(x2)
    if lo is None or hi is None or lo[0] is not hi[0]:
        return None
    width = _last_dim(lo[0])
    if width and lo[1] in (None, 0) and lo[2] == hi[1] == width // 2 and hi[2] in (None, width):
        return lo[0], "half"
    return None


def match_pair_halves(post: Node) -> RotaryMatch | None:
    """``cat((x1*cos - x2*sin, x2*cos + x1*sin), -1)``, cos/sin one column per band, written out per pair member:
    with ``x1, x2 = x[..., ::2], x[..., 1::2]`` (DeepSeek ``rope_interleave``: interleaved pairs in, rotate-half
    layout out) or with the two halves of ``x`` (gpt-oss, vLLM's neox style: ``torch.chunk(x, 2, -1)``; pairing half
    in and out). The members may also be put back pair after pair, ``stack((o1, o2), -1).flatten(-2)`` (vLLM's GPT-J
    style: interleaved in and out)."""
    stacked = _is(post, *_FLATTEN) and _flattens_last_two(post) and _is(post.args[0], *_STACK) and _dim_arg(
        post.args[0], 1) in (-1, fake_value(post.args[0]).dim() - 1)
    if stacked:
        parts = post.args[0].args[0]
    elif _is(post, *_CAT) and _dim_arg(post, 1) in (-1, fake_value(post).dim() - 1):
        parts = post.args[0]
    else:
        return None
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    real, imag = parts
    if not _is(real, *_SUB) or not _is(imag, *_ADD) or not all(isinstance(a, Node) for a in (*real.args, *imag.args)):
        return None
    for x1, cos in _mul_pairs(real.args[0]):
        for x2, sin in _mul_pairs(real.args[1]):
            found = _pair_source(x1, x2)
            terms = imag.args[:2]
            if found and any(_product(a, x2, cos) for a in terms) and any(_product(a, x1, sin) for a in terms):
                x, pairing = found
                if stacked and pairing != "interleaved":
                    continue
                form = ("rotate-every-two (pairs)" if stacked else "de-interleave" if pairing == "interleaved"
                        else "rotate-half (halves)")
                return RotaryMatch(x, post, cos, sin, pairing, _last_dim(x), form, table="bands",
                                   rotated_pairing="interleaved" if stacked else "half")
    return None


def match_partial(post: Node) -> RotaryMatch | None:
    """``cat((rope(x[..., :r]), x[..., r:]), -1)`` (leading rotary dims: GPT-NeoX, Phi, ...) or
    ``cat((x[..., :p], rope(x[..., p:])), -1)`` (trailing: MLA's ``cat(q_nope, rope(q_pe))``)."""
    if not _is(post, *_CAT):
        return None
    parts = post.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    for at in (0, 1):  # which part is rotated
        inner = match_full(_strip_casts(parts[at]))
        rot_src = last_axis_range(_strip_casts(inner.pre)) if inner else None
        rest = last_axis_range(_strip_casts(parts[1 - at]))
        if rot_src is None or rest is None or rot_src[0] is not rest[0]:
            continue
        width = _last_dim(rot_src[0])
        (r0, r1), (p0, p1) = ((a or 0, width if b is None else b) for a, b in (rot_src[1:], rest[1:]))
        tiles = (r0, r1, p0, p1) == ((0, inner.rotary_dim, inner.rotary_dim, width) if at == 0
                                     else (width - inner.rotary_dim, width, 0, width - inner.rotary_dim))
        if tiles and r1 - r0 == inner.rotary_dim:
            # vLLM always writes cat((rope(x[..., :r]), x[..., r:])), with an empty pass part when r is the width
            form = inner.form if r1 - r0 == width else "partial" if at == 0 else f"trailing partial {inner.form}"
            return RotaryMatch(rot_src[0], post, inner.cos, inner.sin, inner.pairing, inner.rotary_dim, form,
                               table=inner.table, rotary_start=r0, rotated_pairing=inner.rotated_pairing)
    return None


FULL_FORMS: list[Callable[[Node], RotaryMatch | None]] = [
    match_rotate_half, match_complex, match_pair_halves, match_real_pairs,
]
ROTARY_FORMS: list[Callable[[Node], RotaryMatch | None]] = [*FULL_FORMS, match_partial]
ROTARY_FORM_NAMES = (
    "rotate-half", "rotate-every-two", "complex freqs_cis", "pair members (halves or de-interleave)",
    "real-pair stack (cos/sin table [..., F, 2])", "partial (leading or trailing dims)",
    "none (NoPE: a plain projection)"
)


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
