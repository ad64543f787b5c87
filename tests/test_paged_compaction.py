"""vLLM's paged-cache side of compaction, without vLLM: the schedule in blocks and the in-place move of kept tokens
(``triattn_compile/vllm/paged.py``, ``compaction.py``; they import only torch). The engine tests are in
``tests_vllm/`` (there the block layout is probed with vLLM's own cache-write op)."""

from __future__ import annotations

import itertools

import pytest
import torch

from triattn_compile.vllm.compaction import BlockLayout, fill_holes, move_kept, request_tokens
from triattn_compile.vllm.paged import PagedSchedule

SIZE, DIM = 4, 5
# keys dim-major (cell d * SIZE + t holds token t, dim d: what vLLM's AVX2 kernel does), values token-major
DIM_MAJOR = BlockLayout(torch.arange(SIZE * DIM).view(DIM, SIZE).t().flatten(), None, SIZE, DIM)


def cell(paged: torch.Tensor, block: int, head: int, kind: int, token: int) -> torch.Tensor:
    order = DIM_MAJOR.key if kind == 0 else torch.arange(SIZE * DIM)
    return paged[block, head, kind, order.view(SIZE, DIM)[token]]


def test_request_tokens_reads_each_token_where_the_layout_puts_it():
    torch.manual_seed(0)
    paged = [torch.randn(10, 3, 2, SIZE * DIM) for _ in range(2)]  # per layer [blocks, Hkv, K/V region, cells]
    blocks = torch.tensor([7, 2, 9])  # the request's blocks, in token order: 12 tokens
    for kind in range(2):
        tokens = request_tokens(paged, blocks, DIM_MAJOR, kind)  # [L, Hkv, 12, D]
        for layer, h, t in itertools.product(range(2), range(3), range(12)):
            assert torch.equal(tokens[layer, h, t], cell(paged[layer], blocks[t // SIZE], h, kind, t % SIZE))


@pytest.mark.parametrize("shared", [True, False])
def test_move_kept_puts_each_heads_kept_tokens_in_the_leading_slots(shared: bool):
    """After the move, the first 8 slots of every (layer, KV head) hold exactly its kept tokens, each once, and the
    slots a kept token already had before the budget are not touched."""
    torch.manual_seed(0)
    paged = [torch.randn(10, 3, 2, SIZE * DIM) for _ in range(2)]
    blocks = torch.tensor([7, 2, 9])
    sets = 1 if shared else 2  # one keep set for both layers, or one each
    keep = torch.stack([torch.stack([torch.randperm(12)[:8].sort().values for _ in range(3)])
                        for _ in range(sets)])  # [X, Hkv, B = 8]: 2 kept blocks
    before = [p.clone() for p in paged]
    movers, holes = fill_holes(keep, 12, 8)
    move_kept(paged, blocks, DIM_MAJOR, movers, holes, sets)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[blocks[:2]] = False
    moved = {(int(x), int(h), int(slot)): int(src) for (x, h, slot), (_, _, src) in zip(holes, movers)}
    for layer, h in itertools.product(range(2), range(3)):
        kept = keep[layer % sets, h].tolist()
        now = []
        for slot in range(8):
            source = moved.get((layer % sets, h, slot), slot)
            assert source in kept and (source == slot or slot not in kept)
            for kind in range(2):
                assert torch.equal(cell(paged[layer], blocks[slot // SIZE], h, kind, slot % SIZE),
                                   cell(before[layer], blocks[source // SIZE], h, kind, source % SIZE))
            now.append(source)
        assert sorted(now) == kept
        assert torch.equal(paged[layer][untouched], before[layer][untouched])


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


def test_layouts_the_paged_compaction_refuses_at_discovery():
    """A model whose every layer is a sliding-window layer is refused in one line when vLLM's graph is discovered
    (engine start): vLLM already bounds that cache, and nothing is left to score. Full-attention layouts pass, and so
    do mixed ones (Gemma-2: the sliding-window layers are left to vLLM, the policy scores the others)."""
    import transformers as T
    from conftest import tiny_llama

    import triattn_compile as tc
    from triattn_compile.vllm.compaction import check_supported

    check_supported(tc.discover(tiny_llama()))
    torch.manual_seed(0)
    small = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    mixed = tc.discover(T.Gemma2ForCausalLM(T.Gemma2Config(**small, sliding_window=32)).eval(), budget=256)
    assert (mixed.windowed_layers, mixed.scored_layers) == ([0], [1])
    check_supported(mixed)
    config = T.MistralConfig(**small, sliding_window=32)
    with pytest.raises(ValueError, match="every attention layer of this model is a sliding-window layer") as info:
        check_supported(tc.discover(T.MistralForCausalLM(config).eval(), budget=256))
    assert "\n" not in str(info.value)
