"""A plain-PyTorch decoder in the style of gpt-fast (pytorch-labs/gpt-fast ``model.py``): its own modules, its own
KV cache (``KVCache.update(input_pos, k, v)`` writing at absolute positions), complex ``freqs_cis`` applied with
``view_as_complex`` as in Meta's reference, ``repeat_interleave`` for GQA, SDPA with an explicit mask.

:class:`CompressedCacheAdapter` is what ``triattn_compile.optimize`` needs from a model that is not a transformers
model, and nothing more:

1. ``.config.get_text_config().num_hidden_layers`` (optimize sizes the compressed cache from it);
2. a ``forward(input_ids, past_key_values, position_ids, use_cache)`` that writes each layer's new keys/values with
   ``past_key_values.update(k, v, layer_idx)``. gpt-fast writes at ``input_pos`` (slot = position); compression
   breaks that identity (after a compaction the next slot is not the next position), so the adapter swaps each
   layer's ``KVCache`` for a view that writes to the compressed cache's next slots, keeps ``input_pos`` for RoPE
   (positions stay absolute), and masks in slot space.

The model's blocks, attention and rotary code are used unchanged.

``ModelArgs(latent_rank=R)`` swaps in :class:`LatentAttention`, multi-head latent attention written the plain way
(slices instead of ``split``, ``torch.cat`` to assemble the key, complex RoPE on the trailing dims): the cache holds
the latent and the rotated ``k_pe``, as DeepSeek's does, through the same ``update(k, v)`` contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig


@dataclass
class ModelArgs:
    vocab_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_local_heads: int = 2
    dim: int = 64
    intermediate_size: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    block_size: int = 4096
    latent_rank: int = 0  # > 0: multi-head latent attention with this latent width (LatentAttention)
    nope_dim: int = 16  # LatentAttention: non-rotary dims of a query/key head (the head's rotary dims: head_dim)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


def precompute_freqs_cis(seq_len: int, n_elem: int, base: float = 10000.0) -> torch.Tensor:
    """``[seq_len, n_elem / 2]`` complex64: e^{i t ω_f}."""
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2)[: (n_elem // 2)].float() / n_elem))
    t = torch.arange(seq_len, device=freqs.device)
    return torch.polar(torch.ones(seq_len, n_elem // 2), torch.outer(t, freqs).float())


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # x: [B, S, H, D], freqs_cis: [S, D / 2] complex
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, x_.size(1), 1, x_.size(3))
    return torch.view_as_real(x_ * freqs_cis).flatten(3).type_as(x)


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, max_seq_length: int, n_heads: int, head_dim: int, dtype=torch.float32):
        super().__init__()
        shape = (max_batch_size, n_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype))

    def update(self, input_pos: torch.Tensor, k_val: torch.Tensor, v_val: torch.Tensor):
        # input_pos: [S], k_val: [B, H, S, D]
        self.k_cache[:, :, input_pos] = k_val
        self.v_cache[:, :, input_pos] = v_val
        return self.k_cache, self.v_cache


class LatentKVCache(nn.Module):
    """MLA's cache: the latent ``[B, 1, T, R]`` and the rotated ``k_pe`` ``[B, 1, T, rope]``."""

    def __init__(self, max_batch_size: int, max_seq_length: int, rank: int, rope: int, dtype=torch.float32):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(max_batch_size, 1, max_seq_length, rank, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(max_batch_size, 1, max_seq_length, rope, dtype=dtype))

    update = KVCache.update


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        total_head_dim = (config.n_head + 2 * config.n_local_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, total_head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.n_head, self.n_local_heads, self.head_dim, self.dim = (
            config.n_head, config.n_local_heads, config.head_dim, config.dim
        )

    def forward(self, x, freqs_cis, mask, input_pos):
        bsz, seqlen, _ = x.shape
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q = apply_rotary_emb(q, freqs_cis)
        k = apply_rotary_emb(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        k = k.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(bsz, seqlen, self.dim))


class LatentAttention(nn.Module):
    """MLA: per token a latent ``c`` and one rotated ``k_pe`` are cached; head h's key is ``[W_UK,h c ; k_pe]``."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head, self.nope, self.rope, self.dim = config.n_head, config.nope_dim, config.head_dim, config.dim
        self.wq = nn.Linear(config.dim, self.n_head * (self.nope + self.rope), bias=False)
        self.wkv_a = nn.Linear(config.dim, config.latent_rank + self.rope, bias=False)
        self.wk_b = nn.Linear(config.latent_rank, self.n_head * self.nope, bias=False)
        self.wv_b = nn.Linear(config.latent_rank, self.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, freqs_cis, mask, input_pos):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_head, self.nope + self.rope)
        q = torch.cat([q[..., : self.nope], apply_rotary_emb(q[..., self.nope :], freqs_cis)], dim=-1)
        kv = self.wkv_a(x)
        latent = kv[..., : -self.rope]  # [B, S, R]
        k_pe = apply_rotary_emb(kv[..., -self.rope :].view(bsz, seqlen, 1, self.rope), freqs_cis)
        latent, k_pe = latent[:, None], k_pe.transpose(1, 2)  # [B, 1, S, R], [B, 1, S, rope]
        if self.kv_cache is not None:
            latent, k_pe = self.kv_cache.update(input_pos, latent, k_pe)
        length = latent.shape[2]
        k_nope = self.wk_b(latent[:, 0]).view(bsz, length, self.n_head, self.nope).transpose(1, 2)
        v = self.wv_b(latent[:, 0]).view(bsz, length, self.n_head, -1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe.expand(-1, self.n_head, -1, -1)], dim=-1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(bsz, seqlen, self.dim))


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = LatentAttention(config) if config.latent_rank else Attention(config)
        self.feed_forward = FeedForward(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, input_pos, freqs_cis, mask):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(config.block_size, config.head_dim, config.rope_base))
        self.causal_mask: torch.Tensor | None = None

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        c = self.config
        for b in self.layers:
            b.attention.kv_cache = (LatentKVCache(max_batch_size, max_seq_length, c.latent_rank, c.head_dim)
                                    if c.latent_rank else KVCache(max_batch_size, max_seq_length, c.n_local_heads,
                                                                  c.head_dim))
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool))

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        mask = self.causal_mask[None, None, input_pos]
        freqs_cis = self.freqs_cis[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, input_pos, freqs_cis, mask)
        return self.output(self.norm(x))


class _CacheLayerView(nn.Module):
    """gpt-fast's ``KVCache.update`` contract, writing to layer ``i`` of the cache the adapter's forward received."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.cache = None

    def update(self, input_pos, k_val, v_val):
        return self.cache.update(k_val, v_val, self.layer_idx)


class CompressedCacheAdapter(nn.Module):
    """The smallest wrapper that lets ``optimize`` drive a gpt-fast-style :class:`Transformer` (module docstring)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.config = PretrainedConfig(num_hidden_layers=len(model.layers))
        for i, block in enumerate(model.layers):
            block.attention.kv_cache = _CacheLayerView(i)

    def forward(self, input_ids, past_key_values, position_ids, use_cache: bool = True, **unused):
        m, length = self.model, input_ids.shape[1]
        input_pos = position_ids[0]  # absolute positions, for RoPE
        for block in m.layers:
            block.attention.kv_cache.cache = past_key_values
        layer0 = past_key_values.layers[0]
        # slot space: the new tokens go to the next free slots; each sees the occupied slots up to its own
        slots = past_key_values.ctrl[0] + torch.arange(length, device=input_ids.device)
        mask = torch.arange(layer0.get_max_length(), device=input_ids.device) <= slots[:, None]
        freqs_cis = m.freqs_cis[input_pos]
        x = m.tok_embeddings(input_ids)
        for block in m.layers:
            x = block(x, input_pos, freqs_cis, mask)
        return m.output(m.norm(x))
