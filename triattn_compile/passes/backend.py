"""The Dynamo backend that runs the TriAttention pass, then Inductor.

Dynamo hands us the whole decoder as one FX graph (with ``nn_module_stack`` and ``scaled_dot_product_attention``
still visible, PLATFORM-NOTES §2). We match the sites, rewrite, and compile the result with ``compile_fx``. The
state the new ops need (statistics, frequencies, slot positions) is appended as extra inputs on every call.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

from torch._dynamo.utils import counters
from torch._guards import detect_fake_mode
from torch.fx import GraphModule

from triattn_compile.calibration.stats import TENSOR_NAMES
from triattn_compile.passes.match import find_attention_sites
from triattn_compile.passes.rewrite import (
    add_inputs,
    grouped_attention,
    insert_advance,
    insert_attention_accumulate,
    insert_capture,
    insert_positions,
    insert_query_record,
    mask_to_occupied_slots,
)

log = logging.getLogger(__name__)


class TriAttentionBackend:
    """``torch.compile(backend=...)`` callable bound to one :class:`~triattn_compile.api.TriAttentionState`."""

    def __init__(self, state, mode: str):
        assert mode in ("discover", "calibrate", "compress")
        self.state = state
        self.mode = mode

    def __call__(self, gm: GraphModule, example_inputs: list) -> Callable:
        state = self.state
        # Dynamo keeps using its own graph after this call: rewrite a copy
        gm = GraphModule(gm, copy.deepcopy(gm.graph))
        sites = find_attention_sites(gm.graph, need_cache=self.mode in ("discover", "compress"))
        state.observe(gm, sites, example_inputs)
        counters["triattn"]["sites"] += len(sites)
        if self.mode == "discover":
            return gm.forward
        capture = self.mode == "calibrate" or state.online
        names = list(TENSOR_NAMES)  # the statistics, in QueryStats.tensors() order
        if self.mode == "compress":
            names += state.cache_input_names()
        extra = dict(zip(names, add_inputs(gm.graph, names)))
        stats = [extra[n] for n in TENSOR_NAMES]
        ctrl = state.find_ctrl(gm, example_inputs) if self.mode == "compress" else None
        if capture:
            insert_capture(gm.graph, sites, stats, ctrl)
            counters["triattn"]["capture"] += len(sites)
        if self.mode == "compress":
            insert_positions(gm.graph, sites, ctrl, extra["slot_pos"])
            masks = [mask_to_occupied_slots(gm.graph, site, ctrl, extra["slot_pos"], state.windows[site.layer])
                     for site in sites]
            counters["triattn"]["grouped"] += sum(site.attn.target is grouped_attention for site in sites)
            if "queries" in extra:
                insert_query_record(gm.graph, sites, extra["queries"])
            if "attention" in extra:
                insert_attention_accumulate(gm.graph, sites, extra["attention"], masks)
            insert_advance(gm.graph, sites, ctrl)
            counters["triattn"]["compress"] += 1
        gm.graph.lint()
        gm.recompile()
        extra_values: Callable[[], list] = state.extra_inputs if self.mode == "compress" else state.stats_inputs
        if state.config.compiler == "eager":
            compiled = gm.forward
        else:
            from torch._inductor.compile_fx import compile_fx

            # the extra inputs have no Dynamo source: fakify them with static shapes (a guard on a dynamic size of
            # theirs, e.g. slot_pos broadcast against the batch in the mask, could not be expressed)
            fake_mode = detect_fake_mode(example_inputs)
            extra_fakes = [fake_mode.from_tensor(t, static_shapes=True) if fake_mode else t for t in extra_values()]
            compiled = compile_fx(gm, [*example_inputs, *extra_fakes])
        log.debug("triattn %s graph: %d sites rewritten", self.mode, len(sites))

        def run(*args):
            return compiled(*args, *extra_values())

        return run
