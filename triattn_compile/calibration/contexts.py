"""How offline calibration cuts its text into forward passes, and the report of what it did.

The paper's calibration tool (TRIATTENTION.md §2 (b)) runs one forward pass over the whole text, so every query sees
all the tokens before it. :func:`plan_contexts` keeps that: each document is one continuous context, unless it is
longer than the model's context length, when it becomes consecutive contexts of that length (documents are never
joined). A context may be run in several forward passes of ``memory_chunk`` tokens that carry the KV cache, which
gives the same queries as one pass (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Context:
    """One continuous context: ``ids`` ``[n]`` of document ``document``, starting at its token ``start``."""

    document: int
    start: int
    ids: torch.Tensor


@dataclass(frozen=True)
class CalibrationReport:
    """What :func:`~triattn_compile.calibrate` did (also ``QueryStats.report``; the CLI prints :meth:`describe`).

    Attributes:
        tokens: queries captured per head (every token of every document).
        documents: documents given.
        contexts: continuous contexts run (a document longer than ``context_length`` spans several).
        split_documents: documents longer than ``context_length``, run as consecutive contexts.
        context_length: the most tokens one context holds (each query sees at most this many).
        longest_context: tokens of the longest context run.
        forward_passes: forward calls of the model.
        tokens_per_pass: the most tokens one forward call took.
        cache_carried: whether passes within a context carried the KV cache (``memory_chunk`` shorter than a context).
    """

    tokens: int
    documents: int
    contexts: int
    split_documents: int
    context_length: int
    longest_context: int
    forward_passes: int
    tokens_per_pass: int
    cache_carried: bool

    def describe(self) -> str:
        """One line: tokens, documents, contexts and what one forward pass held."""
        docs = f"{self.documents} document" + ("s" if self.documents != 1 else "")
        line = f"{self.tokens} tokens from {docs} in {self.contexts} continuous context"
        line += ("s" if self.contexts != 1 else "") + f" (longest {self.longest_context} tokens"
        if self.split_documents:
            line += (f"; {self.split_documents} document(s) longer than the {self.context_length}-token context "
                     "split into consecutive contexts")
        line += f"), {self.forward_passes} forward pass" + ("es" if self.forward_passes != 1 else "")
        if self.cache_carried:
            line += f" of at most {self.tokens_per_pass} tokens carrying each context's KV cache (= one pass each)"
        else:
            line += ", one per context"
        return line

    def as_dict(self) -> dict:
        return asdict(self)


def as_documents(input_ids: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``input_ids`` as a list of 1-D integer id tensors: one document (``[N]`` or ``[1, N]``) or a sequence of them.

    Raises:
        ValueError: (one line) anything else, an empty document, or fewer than 2 tokens in all.
    """
    single = isinstance(input_ids, torch.Tensor)
    given = [input_ids] if single else list(input_ids)
    if not given:
        raise ValueError("calibrate() got no documents: pass token ids [N] or a list of them, one per document")
    documents = []
    for i, doc in enumerate(given):
        name = "input_ids" if single else f"document {i}"
        doc = torch.as_tensor(doc)
        if doc.dim() == 2 and doc.shape[0] == 1:
            doc = doc[0]
        if doc.dim() == 0:
            raise ValueError(f"{name} is a single token id: pass a document as a tensor of ids, "
                             "torch.tensor(ids) for one, a list of them for several")
        if doc.dim() != 1:
            raise ValueError(f"{name} has shape {tuple(doc.shape)}: pass one document as ids [N] (or [1, N]) and "
                             "several as a list of 1-D tensors (a padded batch would calibrate on its padding)")
        if doc.is_floating_point() or doc.is_complex() or doc.dtype == torch.bool:
            raise ValueError(f"{name} has dtype {doc.dtype}: pass integer token ids (tokenizer(text).input_ids)")
        if doc.numel() == 0:
            raise ValueError(f"{name} is empty: drop it, or give it some text")
        documents.append(doc)
    if sum(d.numel() for d in documents) < 2:
        raise ValueError("calibration needs at least 2 tokens of text")
    return documents


def plan_contexts(documents: list[torch.Tensor], context_length: int) -> tuple[list[Context], int]:
    """The continuous contexts of ``documents`` (each whole, or consecutive ``context_length``-token windows if
    longer) and how many documents were split."""
    contexts, split = [], 0
    for i, doc in enumerate(documents):
        split += doc.numel() > context_length
        contexts += [Context(i, s, doc[s : s + context_length]) for s in range(0, doc.numel(), context_length)]
    return contexts, split


def context_length_of(model: torch.nn.Module, context_length: int | None) -> int:
    """``context_length``, checked against the model's ``max_position_embeddings``; that when ``None``."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    limit = limit if isinstance(limit, int) and limit > 0 else None
    if context_length is None:
        if limit is None:
            raise ValueError(f"{type(model).__name__} has no config.max_position_embeddings: pass "
                             "context_length=<the model's context in tokens> (each document is run as one context "
                             "of at most that many tokens)")
        return limit
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length={context_length!r}: give a positive number of tokens (default: the "
                         "model's max_position_embeddings)")
    if limit is not None and context_length > limit:
        raise ValueError(f"context_length={context_length} exceeds the model's context ({limit} tokens, "
                         f"max_position_embeddings): use at most {limit}")
    return context_length
