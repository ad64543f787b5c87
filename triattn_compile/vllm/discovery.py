"""Discovery on the FX graph vLLM compiles: the project's site matching (``passes/match.py``, vLLM's attention and
paged-cache ops as sites), RoPE frequencies (``passes/frequencies.py``) and ``Layout`` (``passes/discover.py``), plus
what only vLLM's graph has: each layer's name in vLLM's forward context.

Entry point: :func:`discover_vllm` ``(gm, example_inputs, hf_config) -> VllmLayout``. vLLM's RoPE gathers cos/sin
from a precomputed ``cos_sin_cache`` input by the ``positions`` input, so ω is read by evaluating the cos/sin nodes at
positions ``0 .. N - 1`` (every integer input upstream of them replaced by that range) and fitting ω over all of
them, which recovers the float32 ``inv_freq`` to ~1e-9 relative.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from triattn_compile.passes.discover import LayerLayout, Layout, discover_layout
from triattn_compile.passes.frequencies import _ancestors
from triattn_compile.passes.match import VLLM_ATTENTION, AttentionSite, PatternNotFound, find_attention_sites
from triattn_compile.passes.rotary import fake_value
from triattn_compile.vllm.statsfile import OMEGA_RTOL

PROBE_POSITIONS = 1024  # positions the cos/sin tables are evaluated at (capped by the model's max positions)


@dataclass(frozen=True)
class VllmLayout:
    """What discovery found in vLLM's graph.

    Attributes:
        layout: the project's :class:`Layout` (rotary form, pairing, ω, heads, head_dim, cached key/value widths).
        layer_names: per attention site, the ``layer_name`` vLLM's attention and cache-write ops take: the key of
            the layer's ``Attention`` module (and of its paged KV tensor) in vLLM's forward context.
    """

    layout: Layout
    layer_names: tuple[str, ...]
    table_dtype: str = "float32"  # dtype of the cos/sin the graph rotates with: what ω was read from

    @property
    def omega_rtol(self) -> float:
        """How closely ω read off the graph can match the true ``inv_freq``: ``OMEGA_RTOL``, or the cos/sin dtype's
        resolution where that is coarser (a bfloat16 table: angles, and so ω of the slowest bands, to ~2⁻⁹ relative)."""
        return max(OMEGA_RTOL, torch.finfo(getattr(torch, self.table_dtype)).eps)

    def as_dict(self) -> dict:
        """A JSON-able summary (what tests compare with the HF discovery of the same checkpoint)."""
        lay = self.layout
        return {
            "describe": lay.describe(), "num_layers": lay.num_layers, "num_heads": lay.num_heads,
            "num_kv_heads": lay.num_kv_heads, "head_dim": lay.head_dim, "attention_scaling": lay.attention_scaling,
            "omega": lay.omega.tolist(), "table_dtype": self.table_dtype, "signature": lay.signature.__dict__,
            "layers": [
                {"index": layer.index, "layer_name": name, "module": layer.module, "rotary_form": layer.rotary_form,
                 "pairing": layer.pairing, "key_pairing": layer.key_pairing, "rotary_dim": layer.rotary_dim,
                 "rotary_start": layer.rotary_start, "attention": layer.attention, "window": layer.window,
                 "key_dim": layer.key_dim, "value_dim": layer.value_dim, "latent": layer.latent}
                for layer, name in zip(lay.layers, self.layer_names)
            ],
        }


def layout_from_dict(found: dict) -> VllmLayout:
    """The :class:`VllmLayout` that :meth:`VllmLayout.as_dict` wrote (e.g. a worker's report, in another process)."""
    keep = {f.name for f in dataclasses.fields(LayerLayout)}
    layers = tuple(LayerLayout(**{k: v for k, v in layer.items() if k in keep}) for layer in found["layers"])
    layout = Layout(layers=layers, num_heads=found["num_heads"], num_kv_heads=found["num_kv_heads"],
                    head_dim=found["head_dim"], attention_scaling=found["attention_scaling"],
                    omega=torch.tensor(found["omega"], dtype=torch.float64))
    return VllmLayout(layout, tuple(layer["layer_name"] for layer in found["layers"]),
                      found.get("table_dtype", "float32"))


def _inputs_by_node(gm: GraphModule, example_inputs: list) -> dict[Node, object]:
    return dict(zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs))


def _layer_name(site: AttentionSite, inputs: dict[Node, object]) -> str:
    """The layer-name argument of the site's attention op: a constant, or an input whose value is the name."""
    attn = site.attn
    arg = attn.args[4] if len(attn.args) > 4 else attn.kwargs.get("layer_name")
    value = inputs.get(arg, arg) if isinstance(arg, Node) else arg
    value = getattr(value, "value", value)  # vllm.utils.torch_utils.LayerName: an opaque input wrapping the string
    if not isinstance(value, str):
        raise PatternNotFound(f"attention site {site.layer} ({site.module}): the layer_name of {VLLM_ATTENTION} is "
                              f"{type(value).__name__}, not a string")
    return value


def _probe_positions(gm: GraphModule, sites: list[AttentionSite], inputs: dict[Node, object],
                     count: int) -> dict[Node, torch.Tensor] | None:
    """``{input: arange(count)}`` for each integer positions input the sites' cos/sin tables are computed from: 1-D
    (vLLM's own models) or ``[1, ..., 1, T]`` (``position_ids`` of models vLLM runs through its transformers
    backend), the range shaped alike. ``None`` where there is none (the cos/sin are then read at the example
    inputs' positions, or ω from an ``inv_freq`` input: ``frequencies.rotary_frequencies``)."""
    upstream = _ancestors([n for s in sites if s.query.rotary_dim for n in (s.query.cos, s.query.sin)])
    found = {
        node: torch.arange(count, dtype=value.dtype, device=value.device).view(*[1] * (value.dim() - 1), count)
        for node, value in inputs.items()
        if node in upstream and isinstance(value, torch.Tensor) and value.dim() >= 1
        and not value.is_floating_point() and value.dtype != torch.bool and all(n == 1 for n in value.shape[:-1])
    }
    return found or None


def discover_vllm(gm: GraphModule, example_inputs: list, hf_config: object = None,
                  budget: int | None = None) -> VllmLayout:
    """The :class:`VllmLayout` of vLLM's compiled model graph ``gm``.

    Args:
        gm: the Dynamo graph vLLM hands its compile backend (``triattn_compile/vllm/backend.py``).
        example_inputs: its real inputs on the first call (the RoPE table among them).
        hf_config: the model's transformers config (``model_config.hf_config``), for sliding windows.
        budget: a sliding window must fit it (``None``: not checked).
    Raises:
        PatternNotFound: one line naming the layer and the pattern that was not recognised.
    """
    sites = find_attention_sites(gm.graph, need_cache=True)
    other = [s for s in sites if s.form != "vllm"]
    if other:
        raise PatternNotFound(f"attention site {other[0].layer} ({other[0].module}): {other[0].form} attention in "
                              f"vLLM's graph; expected {VLLM_ATTENTION}")
    inputs = _inputs_by_node(gm, example_inputs)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    count = min(PROBE_POSITIONS, int(getattr(text, "max_position_embeddings", None) or PROBE_POSITIONS))
    layout = discover_layout(gm, sites, example_inputs, config=hf_config, budget=budget,
                             positions=_probe_positions(gm, sites, inputs, count))
    rotated = next(s for s in sites if s.query.rotary_dim)
    table = fake_value(rotated.query.cos)
    dtype = str(table.dtype).removeprefix("torch.") if isinstance(table, torch.Tensor) else "float32"
    return VllmLayout(layout, tuple(_layer_name(s, inputs) for s in sites), dtype)
