"""vLLM's paged-cache side of compaction, without vLLM: the schedule in blocks and the in-place move of kept tokens
(``triattn_compile/vllm/paged.py``, ``compaction.py``; they import only torch). The engine tests are in
``tests_vllm/`` (there the block layout is probed with vLLM's own cache-write op)."""

from __future__ import annotations

import torch

from triattn_compile.vllm.compaction import BlockLayout, move_kept, request_tokens
from triattn_compile.vllm.paged import PagedSchedule

SIZE, DIM = 4, 5
# keys dim-major (cell d * SIZE + t holds token t, dim d: what vLLM's AVX2 kernel does), values token-major
DIM_MAJOR = BlockLayout(torch.arange(SIZE * DIM).view(DIM, SIZE).t().flatten(), None, SIZE, DIM)


def cell(paged: torch.Tensor, block: int, head: int, kind: int, token: int) -> torch.Tensor:
    order = DIM_MAJOR.key if kind == 0 else torch.arange(SIZE * DIM)
    return paged[block, head, kind, order.view(SIZE, DIM)[token]]


def test_move_kept_puts_each_heads_kept_tokens_first_in_order():
    torch.manual_seed(0)
    paged = torch.randn(10, 3, 2, SIZE * DIM)  # [blocks, Hkv, K/V region, cells]
    blocks = torch.tensor([7, 2, 9])  # the request's blocks, in token order: 12 tokens
    keep = torch.stack([torch.randperm(12)[:8].sort().values for _ in range(3)])  # [Hkv, B = 8]: 2 kept blocks
    before = paged.clone()
    tokens = request_tokens(paged, blocks, DIM_MAJOR)  # [Hkv, 12, 2, D]
    for h in range(3):  # token t of the request is block blocks[t // SIZE], slot t % SIZE
        for t in range(12):
            for kind in range(2):
                assert torch.equal(tokens[h, t, kind], cell(before, blocks[t // SIZE], h, kind, t % SIZE))
    move_kept(paged, blocks, tokens, keep, 2, DIM_MAJOR)
    for h in range(3):
        for j, t in enumerate(keep[h].tolist()):
            for kind in range(2):
                assert torch.equal(cell(paged, blocks[j // SIZE], h, kind, j % SIZE),
                                   cell(before, blocks[t // SIZE], h, kind, t % SIZE))
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[blocks[:2]] = False
    assert torch.equal(paged[untouched], before[untouched])


def test_peak_blocks_bounds_what_a_request_holds():
    """The scheduler's order each step: free what compactions already run dropped, then allocate the block of the
    position this step writes."""
    s = PagedSchedule(256, 128, 128)
    held, most = set(), 0
    for position in range(4000):
        held -= set(range(*s.freeable_blocks(position)))
        held.add(position // 128)
        most = max(most, len(held))
    assert most == s.peak_blocks == 4
