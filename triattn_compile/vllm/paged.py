"""Where a compressed request's tokens live in vLLM's paged cache: one pure function of its absolute length, shared
by the scheduler (which frees blocks) and the worker (which compacts and points attention at the kept blocks).

A request keeps vLLM's absolute view: ``num_computed_tokens``, RoPE positions and the slot of each new token
(``block_table[p // bs]``) are unchanged. What changes is which logical blocks hold live tokens. With the prompt
protected (``prompt <= budget``) the HF path compacts exactly when the cache holds
``budget + divide_length·k`` tokens (k = 1, 2, ...), whatever the prompt length, so here a compaction happens at the
start of the step that writes absolute position ``c = budget + divide_length·k``: the kept ``budget`` tokens are
gathered into logical blocks ``[0, budget / bs)``, blocks ``[budget / bs, c / bs)`` are dropped (the scheduler frees
them one step later, once the gather has read them), and attention reads the kept blocks followed by the blocks from
``c / bs`` on. ``budget`` and ``divide_length`` must be multiples of the block size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedSchedule:
    """The compaction schedule of one engine, in blocks.

    Attributes:
        budget: tokens kept per KV head after a compaction (B).
        divide_length: decode steps between compactions.
        block_size: tokens per block of vLLM's paged cache.
    """

    budget: int
    divide_length: int
    block_size: int

    def __post_init__(self) -> None:
        for name in ("budget", "divide_length"):
            if getattr(self, name) % self.block_size:
                raise ValueError(f"{name} {getattr(self, name)} is not a multiple of vLLM's block size "
                                 f"{self.block_size}; use a multiple (or set vLLM's block_size to divide it)")

    @property
    def capacity(self) -> int:
        """Most tokens a request's cache holds: ``budget + divide_length``."""
        return self.budget + self.divide_length

    @property
    def kept_blocks(self) -> int:
        return self.budget // self.block_size

    @property
    def peak_blocks(self) -> int:
        """Most blocks a request holds at once (prompt protected): ``capacity / block_size`` before a compaction,
        plus the block the compacting step writes into while the dropped ones wait to be freed on the next step."""
        return self.capacity // self.block_size + 1

    def last_compaction(self, position: int) -> int:
        """Absolute length at the latest compaction done by the time position ``position`` is written (a multiple
        of the block size), or 0 before the first."""
        if position < self.capacity:
            return 0
        return self.budget + (position - self.budget) // self.divide_length * self.divide_length

    def compacts_at(self, position: int) -> bool:
        """The step writing ``position`` starts with a compaction."""
        return position >= self.capacity and (position - self.budget) % self.divide_length == 0

    def live_blocks(self, row: torch.Tensor, length: int) -> torch.Tensor:
        """Block ids attention reads for a request of ``length`` tokens (the current one included) whose block table
        row is ``row``: the kept blocks, then those from the last compaction on."""
        last = self.last_compaction(length - 1)
        if not last:
            return row[: -(-length // self.block_size)]
        return torch.cat([row[: self.kept_blocks], row[last // self.block_size: -(-length // self.block_size)]])

    def live_length(self, length: int) -> int:
        """Tokens attention reads for a request of ``length`` tokens (the current one included)."""
        last = self.last_compaction(length - 1)
        return length - last + self.budget if last else length

    def freeable_blocks(self, computed: int) -> tuple[int, int]:
        """Logical block range ``[first, last)`` a request with ``computed`` tokens written may give back: the blocks
        dropped by every compaction whose step has run (``c <= computed - 1``)."""
        last = self.last_compaction(computed - 1)
        return (self.kept_blocks, last // self.block_size) if last else (0, 0)
