"""A vLLM graph whose attention sites cannot be matched gets a one-line error naming the layer and the pattern."""

from __future__ import annotations

import operator

import pytest
import torch
import vllm.model_executor.layers.attention.attention  # noqa: F401  (registers torch.ops.vllm.*)
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph

from triattn_compile.passes.match import PatternNotFound, find_attention_sites


def _fill(out: torch.Tensor, x: torch.Tensor) -> None:  # stands for an out-variant projection (vLLM's onednn_mm)
    out.copy_(x.repeat(1, out.shape[-1] // x.shape[-1]))


def _rotary_in_place(q: torch.Tensor, k: torch.Tensor) -> None:  # stands for vLLM's rotary custom op (custom ops on)
    pass


def _graph(rotate: bool, projected: str = "") -> Graph:
    """``qkv -> split -> view [T, H, D] -> (RoPE, as vLLM's neox forward_static, or none) -> unified_kv_cache_update
    -> unified_attention_with_output``, with fake tensor metadata as Dynamo records it. ``projected``: q, k, v are
    inputs (""), or slices of one buffer an out-variant projection fills (``"out"``, vLLM's CPU linear layers), which
    an in-place op also reads (``"in-place"``)."""
    T, H, Hkv, D = 3, 4, 2, 16
    graph, fake = Graph(), FakeTensorMode()

    def node(op, target, args, like, kwargs=None):
        n = graph.create_node(op, target, args, kwargs or {})
        n.meta["example_value"] = like
        n.meta["nn_module_stack"] = {"attn": ("model.layers.0.self_attn.attn", object)}
        return n

    with fake:
        x = {name: torch.empty(*shape) for name, shape in
             {"q": (T, H, D), "k": (T, Hkv, D), "v": (T, Hkv, D), "cos": (T, 1, D // 2)}.items()}
    if projected:
        with fake:
            fused, hidden = torch.empty(T, (H + 2 * Hkv) * D), torch.empty(T, D)
            parts = [torch.empty(T, n * D) for n in (H, Hkv, Hkv)]
        h = node("placeholder", "hidden", (), hidden)
        out = node("call_function", torch.empty, ((T, (H + 2 * Hkv) * D),), fused)
        node("call_function", _fill, (out, h), None)
        split = node("call_method", "split", (out, [H * D, Hkv * D, Hkv * D]), None, {"dim": -1})
        slices = [node("call_function", operator.getitem, (split, i), part) for i, part in enumerate(parts)]
        if projected == "in-place":
            node("call_function", _rotary_in_place, (slices[0], slices[1]), None)
        q, k, v = (node("call_method", "view", (t, -1, n, D), x[name])
                   for t, n, name in zip(slices, (H, Hkv, Hkv), "qkv"))
    else:
        q, k, v = (node("placeholder", name, (), x[name]) for name in "qkv")
    name = node("placeholder", "layer_name", (), None)
    if rotate:
        cos, sin = node("placeholder", "cos", (), x["cos"]), node("placeholder", "sin", (), x["cos"])

        def rope(t, like):
            with fake:
                half = torch.empty(*like.shape[:-1], D // 2)
            chunk = node("call_function", torch.chunk, (t, 2), None, {"dim": -1})
            x1, x2 = (node("call_function", operator.getitem, (chunk, i), half) for i in (0, 1))
            mul = lambda a, b: node("call_function", operator.mul, (a, b), half)
            o1 = node("call_function", operator.sub, (mul(x1, cos), mul(x2, sin)), half)
            o2 = node("call_function", operator.add, (mul(x2, cos), mul(x1, sin)), half)
            return node("call_function", torch.cat, ((o1, o2),), like, {"dim": -1})

        q, k = rope(q, x["q"]), rope(k, x["k"])
    dep = node("call_function", torch.ops.vllm.unified_kv_cache_update, (k, v, name), None)
    out = node("placeholder", "out", (), x["q"])
    attn = node("call_function", torch.ops.vllm.unified_attention_with_output, (q, k, v, out, name), None,
                {"kv_cache_dummy_dep": dep})
    graph.output((attn,))
    return graph


def test_rotated_graph_is_matched():
    (site,) = find_attention_sites(_graph(rotate=True), need_cache=True)
    assert (site.form, site.query.pairing, site.query.rotary_dim, site.key.pairing) == ("vllm", "half", 16, "half")
    assert site.kv_dims == (16, 16)


def test_unrotated_graph_names_layer_and_pattern():
    with pytest.raises(PatternNotFound) as info:
        find_attention_sites(_graph(rotate=False), need_cache=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("attention site 0 (model.layers.0.self_attn.attn): no rotary embedding recognised on "
                              "the query of vllm.unified_attention_with_output"), message
    assert "rotate-half" in message


def test_slices_of_a_projection_are_a_nope_layer():
    """Cohere-2's global layer in vLLM: q and k are slices of the fused projection's output buffer, reshaped into
    heads, with no rotary embedding: a NoPE site."""
    (site,) = find_attention_sites(_graph(rotate=False, projected="out"), need_cache=True)
    assert (site.query.rotary_dim, site.key.rotary_dim, site.query.form) == (0, 0, "none (NoPE)")


def test_slices_read_by_another_op_are_not_nope():
    """Another op reading the query slice on its way (as vLLM's in-place rotary custom op does with custom ops on)
    means the query may be rotated: refused, not taken for NoPE."""
    with pytest.raises(PatternNotFound, match="no rotary embedding recognised on the query"):
        find_attention_sites(_graph(rotate=False, projected="in-place"), need_cache=True)
