"""The compile backend the plugin gives vLLM: discovery on vLLM's graph, then vLLM's own backend, unchanged.

On CPU vLLM 0.32 compiles the whole model once (``CompilationMode.DYNAMO_TRACE_ONCE``) with the stock ``inductor``
(or ``eager`` under ``VLLM_CPU_CI_ENV=1``) backend; a backend named by qualified name in
``compilation_config.backend`` is called instead, with the Dynamo graph and its real inputs. Inductor's
``pre_grad_custom_pass`` sees the same graph but not its inputs, and the RoPE table that ω is read from is one of
them. ``backend.inductor`` and ``backend.eager`` (:class:`DiscoveryBackend`) run
:func:`~triattn_compile.vllm.discovery.discover_vllm`, keep the result for this process (:func:`discovered`) and
hand the graph on: unchanged when a statistics file is set (validated and loaded here), else with the HF pass's
query capture (``passes/rewrite.py``) on each layer's pre-RoPE query, adding every query the engine serves to
running sums (online calibration; :func:`start_serving` drops what vLLM's start-up dummy run added).
"""

from __future__ import annotations

import copy
import logging

from torch.fx import GraphModule

from triattn_compile.calibration.stats import TENSOR_NAMES, QueryStats
from triattn_compile.passes.match import find_attention_sites
from triattn_compile.passes.rewrite import insert_capture
from triattn_compile.vllm.compaction import check_supported
from triattn_compile.vllm.discovery import VllmLayout, discover_vllm
from triattn_compile.vllm.settings import VllmSettings, parse_settings
from triattn_compile.vllm.statsfile import load_for_layout

log = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger, which vLLM configures

_FOUND: dict[str, object] = {}  # this process's discovery: "layout" -> VllmLayout, "stats" -> QueryStats | None,
# "online" -> the stats are running sums the graph adds to, "serving" -> a real step has begun


def discovered() -> tuple[VllmLayout | None, QueryStats | None]:
    """What the last compile in this process found: ``(layout, stats)`` (``(None, None)`` before any)."""
    return _FOUND.get("layout"), _FOUND.get("stats")


def calibrating_online() -> bool:
    """The statistics are calibrated online from the served queries (no statistics file was set)."""
    return bool(_FOUND.get("online"))


def start_serving() -> None:
    """Called before each real step's attention metadata is built: the first time, empty the online statistics,
    which hold only the queries of vLLM's start-up dummy run (it builds no attention metadata, so this is not
    called for it)."""
    if _FOUND.get("serving"):
        return
    _FOUND["serving"] = True
    stats = _FOUND.get("stats")
    if _FOUND.get("online") and stats is not None:
        for tensor in stats.tensors():
            tensor.zero_()  # in place: the compiled graph holds these tensors


def with_capture(gm: GraphModule, stats: QueryStats) -> GraphModule:
    """A copy of vLLM's graph ``gm`` that adds each layer's pre-RoPE queries to ``stats`` (registered as buffers
    of the copy, the same tensors: Inductor keeps the in-place sums as mutations of lifted inputs)."""
    gm = GraphModule(gm, copy.deepcopy(gm.graph))  # Dynamo keeps using its own graph
    sites = find_attention_sites(gm.graph, need_cache=True)
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    nodes = []
    for name, tensor in zip(TENSOR_NAMES, stats.tensors()):
        gm.register_buffer(f"triattn_{name}", tensor)
        with gm.graph.inserting_before(first):
            nodes.append(gm.graph.get_attr(f"triattn_{name}"))
    insert_capture(gm.graph, sites, nodes)
    gm.recompile()
    return gm


class DiscoveryBackend:
    """A Dynamo backend bound to one engine's config: discovery, then ``delegate`` (``"inductor"`` or ``"eager"``).

    vLLM resolves ``compilation_config.backend`` by qualified name when it builds the model's compile wrapper, with
    the engine's config current (``compilation/wrapper.py``); the graph is compiled later, on the first forward, when
    it may not be. So the module attribute ``inductor`` (``eager``) is made on lookup (``__getattr__`` below) and
    keeps that config."""

    def __init__(self, delegate: str, vllm_config: object):
        self.delegate, self.vllm_config = delegate, vllm_config
        self.__name__ = f"triattn_{delegate}"  # torch.compile names its wrapper after the backend

    def _discover(self, gm: GraphModule, example_inputs: list) -> None:
        config = self.vllm_config
        settings = parse_settings(config.additional_config) or VllmSettings()
        hf_config = config.model_config.hf_config if config.model_config is not None else None
        # sliding-window layers are left to vLLM (check_supported), so their width is not checked against the budget
        found = discover_vllm(gm, example_inputs, hf_config, budget=None)
        check_supported(found.layout)  # at engine start, not at the first compaction
        if settings.stats:
            stats = load_for_layout(settings.stats, found.layout, found.omega_rtol)
            said = f"; statistics {settings.stats} ({stats.tokens()} tokens) match"
        else:
            earlier = _FOUND.get("stats") if _FOUND.get("online") else None  # a recompile keeps the running sums
            same = earlier is not None and earlier.signature == found.layout.signature
            stats = earlier if same else QueryStats(found.layout.signature)
            stats.omega = found.layout.omega
            said = "; no statistics file: calibrating online from the served queries"
        _FOUND.update(layout=found, stats=stats, online=not settings.stats)
        log.info("TriAttention: %s%s", found.layout.describe(), said)

    def __call__(self, gm: GraphModule, example_inputs: list):
        self._discover(gm, example_inputs)
        if calibrating_online():
            gm = with_capture(gm, _FOUND["stats"])
        if self.delegate == "eager":  # vLLM's CPU backend under VLLM_CPU_CI_ENV=1: Dynamo's stock eager
            from torch._dynamo.backends.debugging import eager

            return eager(gm, example_inputs)
        import torch

        # Inductor with vLLM's inductor_compile_config, through the wrapper torch.compile(backend="inductor",
        # options=...) uses (under AOT compile its result is serializable, as the stock backend's)
        options = dict(self.vllm_config.compilation_config.inductor_compile_config)
        options.pop("guard_filter_fn", None)  # a torch.compile option, not an Inductor config entry
        return torch._TorchCompileInductorWrapper(None, options, False)(gm, example_inputs)


BACKENDS = {"inductor": f"{__name__}.inductor", "eager": f"{__name__}.eager"}


def __getattr__(name: str) -> DiscoveryBackend:
    """``inductor`` / ``eager``: a :class:`DiscoveryBackend` for the engine whose config is current."""
    if name in BACKENDS:
        from vllm.config import get_current_vllm_config

        return DiscoveryBackend(name, get_current_vllm_config())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
