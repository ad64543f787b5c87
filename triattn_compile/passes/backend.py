"""The Dynamo backend that runs the TriAttention pass, then Inductor.

Dynamo hands us the whole decoder as one FX graph (with ``nn_module_stack`` and ``scaled_dot_product_attention``
still visible, PLATFORM-NOTES §2). The backend finds the sites, records the :class:`~triattn_compile.passes.discover
.Layout` of the first graph it sees (``self.layout``) and checks every later graph against it, rewrites the graph
for its mode and compiles the result with ``compile_fx``. The step's extra tensors arrive as graph inputs marked by
``triattn::step_inputs`` (``passes/step_inputs.py``): the backend holds no per-call state.

Modes: ``"discover"`` (record the layout, run the graph as traced), ``"calibrate"`` (capture every pre-RoPE query
into the statistics), ``"compress"`` (the compressed cache's positions, mask and counters, capture when online).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

import torch
from torch._dynamo.utils import counters
from torch.fx import GraphModule

from triattn_compile.calibration.stats import TENSOR_NAMES
from triattn_compile.passes.discover import Layout, discover_layout
from triattn_compile.passes.match import PatternNotFound, find_attention_sites
from triattn_compile.passes.own_cache import (
    OwnCache,
    own_cache_buffers,
    read_whole_cache,
    retarget_writes,
    write_appended,
)
from triattn_compile.passes.rewrite import (
    grouped_attention,
    insert_advance,
    insert_attention_accumulate,
    insert_capture,
    insert_positions,
    insert_query_record,
    mask_to_occupied_slots,
)
from triattn_compile.passes.rotary import fake_value
from triattn_compile.passes.step_inputs import take_step_inputs

log = logging.getLogger(__name__)

MODES = ("discover", "calibrate", "compress")


class Discovered(Exception):  # noqa: N818 (a signal, not an error)
    """Raised instead of running a graph that was traced only to be discovered (``stop_after_discovery``)."""


class TriAttentionBackend:
    """``torch.compile(backend=...)`` callable for one optimized (or calibrated) model.

    Args:
        mode: one of :data:`MODES`.
        input_names: names of the tensors the step marks with ``triattn::step_inputs``, in order.
        layout: the layout found by discovery (later graphs must agree); ``None`` records the first graph's.
        model_config: the model's config, if any (sliding windows); budget: windows must fit it (``None``: not checked).
        fallback_omega: RoPE frequencies where a graph shows none (the model's ``inv_freq``).
        capture: insert query capture (calibration, or online statistics in compress mode).
        compiler: ``"inductor"`` or ``"eager"`` (run the rewritten graph as is).
        own_cache: the model writes its own KV buffers by position (``passes/own_cache.py``): discovery records
            them (``self.own_cache``), compression retargets their writes to the compressed slots.
        stop_after_discovery: the discovered graph raises :class:`Discovered` instead of running.
        min_distance: with a ``distant_attention`` step input, the attention sum into it counts only keys at least
            this many positions before the query (the policy's ``distant_attention``).
    """

    def __init__(self, mode: str, *, input_names: Sequence[str] = (), layout: Layout | None = None,
                 model_config: object = None, budget: int | None = 0, fallback_omega: torch.Tensor | None = None,
                 capture: bool = False, compiler: str = "inductor", own_cache: bool = False,
                 stop_after_discovery: bool = False, min_distance: int = 0):
        assert mode in MODES
        self.mode, self.input_names, self.layout = mode, list(input_names), layout
        self.model_config, self.budget, self.fallback_omega = model_config, budget, fallback_omega
        self.capture, self.compiler = capture, compiler
        self.own, self.stop_after_discovery = own_cache, stop_after_discovery
        self.own_cache: OwnCache | None = None
        self.min_distance = min_distance

    def _record(self, gm: GraphModule, sites, example_inputs) -> Layout:
        """The graph's layout: recorded if it is the first, else checked against the first."""
        known = self.layout
        layout = discover_layout(
            gm, sites, example_inputs, config=self.model_config, budget=self.budget,
            fallback_omega=known.omega if known is not None else self.fallback_omega,
            latent=known is None and self.mode != "calibrate", known=known,
        )
        if known is None:
            self.layout = layout
        elif not known.same_as(layout):
            raise PatternNotFound(f"a later graph of the model has a different attention layout: {layout}")
        return self.layout

    def __call__(self, gm: GraphModule, example_inputs: list) -> Callable:
        # Dynamo keeps using its own graph after this call: rewrite a copy
        gm = GraphModule(gm, copy.deepcopy(gm.graph))
        extra = take_step_inputs(gm.graph, self.input_names)
        sites = find_attention_sites(gm.graph, need_cache=self.mode != "calibrate", appended=self.own)
        layout = self._record(gm, sites, example_inputs)
        counters["triattn"]["sites"] += len(sites)
        if self.mode == "discover":
            if self.own:
                self.own_cache = own_cache_buffers(sites)
            gm.recompile()
            return _raise_discovered if self.stop_after_discovery else gm.forward
        ctrl = extra.get("ctrl")
        if self.capture:
            insert_capture(gm.graph, sites, [extra[n] for n in TENSOR_NAMES], ctrl)
            counters["triattn"]["capture"] += len(sites)
        if self.mode == "compress":
            capacity = int(fake_value(extra["slot_pos"]).shape[-1])
            if self.own and sites[0].appended:
                buffers = [(extra[f"keys.{s.layer}"], extra[f"values.{s.layer}"]) for s in sites]
                write_appended(gm.graph, sites, buffers, extra["stand_in"], ctrl, capacity)
            elif self.own:
                retarget_writes(gm.graph, sites, ctrl, capacity)
            read_whole_cache(gm.graph, sites)  # attention reading a leading slice of its cache reads all of it
            insert_positions(gm.graph, sites, ctrl, extra["slot_pos"])
            masks = [mask_to_occupied_slots(gm.graph, site, ctrl, extra["slot_pos"], layout.layers[site.layer].window)
                     for site in sites]
            counters["triattn"]["grouped"] += sum(site.attn.target is grouped_attention for site in sites)
            if "queries" in extra:
                insert_query_record(gm.graph, sites, extra["queries"])
            if "attention" in extra:
                insert_attention_accumulate(gm.graph, sites, extra["attention"], masks, extra.get("distant_attention"),
                                            ctrl, extra["slot_pos"], self.min_distance)
            insert_advance(gm.graph, sites, ctrl)
            counters["triattn"]["compress"] += 1
        gm.graph.lint()
        gm.recompile()
        log.debug("triattn %s graph: %d sites rewritten", self.mode, len(sites))
        if self.compiler == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)


def _raise_discovered(*args):
    raise Discovered
