"""The engine side of TriAttention in vLLM: a scheduler that gives compacted requests' dropped blocks back to vLLM's
block pool.

:class:`TriAttentionScheduler` is vLLM's ``Scheduler`` (the plugin sets ``scheduler_config.scheduler_cls``) with
one addition before each ``schedule()``: for every running request, the logical blocks that the compactions already
run by the worker dropped (:meth:`~triattn_compile.vllm.paged.PagedSchedule.freeable_blocks`) are replaced by the
null block in the request's block list and freed, as vLLM's sliding-window manager does for blocks that left its
window. A compaction's blocks are freed on the step after the one that gathered from them, so they are never written
by another request before being read. Finished and aborted requests free the rest through vLLM's own path. A prompt
longer than the budget is refused (the prompt is protected, as on the HF path): a ``ValueError`` from
``add_request``, which reaches the caller with the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and
stops the engine-core process otherwise.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

from triattn_compile.vllm.paged import PagedSchedule
from triattn_compile.vllm.settings import parse_settings


class TriAttentionScheduler(Scheduler):
    """vLLM's scheduler, freeing the blocks compaction dropped."""

    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        settings = parse_settings(vllm_config.additional_config)
        self.triattn = PagedSchedule(settings.budget, settings.divide_length, vllm_config.cache_config.block_size)
        self.triattn_freed_blocks = 0

    def free_compacted_blocks(self) -> int:
        """Free the dropped blocks of every running request; returns how many were freed."""
        pool = self.kv_cache_manager.block_pool
        before = pool.get_num_free_blocks()
        for request in self.running:
            first, last = self.triattn.freeable_blocks(request.num_computed_tokens)
            if last > first:
                for manager in self.kv_cache_manager.coordinator.single_type_managers:
                    manager._remove_blocks_in_range(request.request_id, first, last)
        freed = pool.get_num_free_blocks() - before
        self.triattn_freed_blocks += freed
        return freed

    def add_request(self, request) -> None:
        """Refuse a prompt longer than the budget: the prompt is protected, so it must fit in the kept tokens."""
        length, bs = request.num_prompt_tokens, self.triattn.block_size
        if length > self.triattn.budget:
            raise ValueError(f"TriAttention: prompt of {length} tokens is longer than the budget "
                             f"{self.triattn.budget} (the prompt is always kept); raise additional_config['triattn']"
                             f"['budget'] to at least {-(-length // bs) * bs} or shorten the prompt")
        super().add_request(request)

    def schedule(self, *args, **kwargs):
        self.free_compacted_blocks()
        return super().schedule(*args, **kwargs)
