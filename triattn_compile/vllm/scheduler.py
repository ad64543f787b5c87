"""The engine side of TriAttention in vLLM: a scheduler that gives compacted requests' dropped blocks back to vLLM's
block pool.

:class:`TriAttentionScheduler` is vLLM's ``Scheduler`` (the plugin sets ``scheduler_config.scheduler_cls``) with
one addition before each ``schedule()``: for every running request, the logical blocks that the compactions already
run by the worker dropped (:meth:`~triattn_compile.vllm.paged.PagedSchedule.freeable_blocks`) are replaced by the
null block in the request's block list and freed, as vLLM's sliding-window manager does for blocks that left its
window. Only the full-attention KV cache groups are compacted; in a model with sliding-window layers, vLLM's hybrid
KV cache manager gives those their own groups, which its sliding-window manager keeps to the window. A compaction's
blocks are freed on the step after the one that gathered from them, so they are never written by another request
before being read. Since a request never holds more than
:attr:`~triattn_compile.vllm.paged.PagedSchedule.peak_blocks` in a compacted group (and :meth:`window_peak` in a
sliding-window one), admission is capped at the number of requests whose peaks fit in the pool together: a running
request is never preempted (its recompute would be a prefill longer than the budget). Finished and aborted requests
free the rest through vLLM's own path. A prompt longer than the settings allow (``config.prompt_limit``) is refused
before it reaches the engine, by the front end's prompt check (``plugin.py``); ``add_request`` refuses it again for
clients that bypass that front end.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import SlidingWindowSpec

from triattn_compile.vllm.paged import PagedSchedule
from triattn_compile.vllm.settings import ALL_WINDOWED, parse_settings, prompt_too_long


class TriAttentionScheduler(Scheduler):
    """vLLM's scheduler, freeing the blocks compaction dropped."""

    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        settings = self.triattn_settings = parse_settings(vllm_config.additional_config)
        self.triattn = PagedSchedule(settings.budget, settings.divide_length, vllm_config.cache_config.block_size)
        self.triattn_freed_blocks = 0
        managers = self.kv_cache_manager.coordinator.single_type_managers
        # the full-attention groups are compacted; vLLM frees what leaves a sliding-window group's window itself
        self.triattn_compacted = [m for m in managers if not isinstance(m.kv_cache_spec, SlidingWindowSpec)]
        if not self.triattn_compacted:
            raise ValueError(ALL_WINDOWED)
        peak = sum(self.triattn.peak_blocks if m in self.triattn_compacted
                   else self.window_peak(m.sliding_window + m.extra_retained_tokens) for m in managers)
        usable = self.kv_cache_manager.block_pool.num_gpu_blocks - 1  # block 0 is the null block
        self.max_num_active_reqs = max(1, min(self.max_num_active_reqs, usable // peak))

    def window_peak(self, window: int) -> int:
        """Most blocks a request holds in a sliding-window group: a prefill of up to ``budget + divide_length``
        tokens, or the window plus the step's block, plus one block straddling the window's start."""
        size = self.triattn.block_size
        return max(-(-self.triattn.capacity // size), -(-window // size) + 1) + 1

    def free_compacted_blocks(self) -> int:
        """Free the dropped blocks of every running request; returns how many were freed."""
        pool = self.kv_cache_manager.block_pool
        before = pool.get_num_free_blocks()
        for request in self.running:
            first, last = self.triattn.freeable_blocks(request.num_computed_tokens)
            if last > first:
                for manager in self.triattn_compacted:
                    manager._remove_blocks_in_range(request.request_id, first, last)
        freed = pool.get_num_free_blocks() - before
        self.triattn_freed_blocks += freed
        return freed

    def add_request(self, request) -> None:
        """Refuse a prompt longer than the settings allow (the front end refuses it first: ``plugin.py``)."""
        message = prompt_too_long(request.num_prompt_tokens, self.triattn_settings, self.triattn.block_size)
        if message:
            raise ValueError(message)
        super().add_request(request)

    def schedule(self, *args, **kwargs):
        self.free_compacted_blocks()
        return super().schedule(*args, **kwargs)
