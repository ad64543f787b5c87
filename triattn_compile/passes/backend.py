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
from torch.fx import GraphModule

from triattn_compile.passes.match import find_attention_sites
from triattn_compile.passes.rewrite import add_inputs, insert_capture, insert_compress, mask_to_occupied_slots

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
        names = ["sum_re", "sum_im", "sum_abs", "count"]
        if self.mode == "compress":
            names += ["slot_pos", "omega"]
        extra = add_inputs(gm.graph, names)
        if capture:
            insert_capture(gm.graph, sites, extra[:4])
            counters["triattn"]["capture"] += len(sites)
        if self.mode == "compress":
            ctrl = state.find_ctrl(gm, example_inputs)
            for site in sites:
                mask_to_occupied_slots(gm.graph, site, state.capacity)
            insert_compress(gm.graph, sites, ctrl, extra[4], extra[:4], extra[5], state.compress_options())
            counters["triattn"]["compress"] += 1
        gm.graph.lint()
        gm.recompile()
        extra_values: Callable[[], list] = state.extra_inputs if self.mode == "compress" else state.stats_inputs
        if state.config.compiler == "eager":
            compiled = gm.forward
        else:
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(gm, [*example_inputs, *extra_values()])
        log.debug("triattn %s graph: %d sites rewritten", self.mode, len(sites))

        def run(*args):
            return compiled(*args, *extra_values())

        return run
