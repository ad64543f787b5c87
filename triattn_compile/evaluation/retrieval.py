"""Fact-recall probe: a few "secret code" facts at the start, real filler text, then one question per fact.

Scored under teacher forcing: a fact is recalled when the top-1 prediction is right for every digit of its code
given the question and the preceding digits (exactly what greedy decoding would produce for that answer).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from triattn_compile.evaluation.nll import Forced

NAMES = ("amber", "cobalt", "violet", "granite", "saffron", "willow", "harbor", "falcon", "juniper", "copper")


@dataclass
class Probe:
    ids: torch.Tensor  # [N]
    answers: list[tuple[int, int]]  # token spans [start, end) of each answer in ids
    facts: list[tuple[str, str]]


def build_probe(tokenizer, filler: torch.Tensor, facts: int, seed: int, multiple: int = 1) -> Probe:
    """Facts, then ``filler`` ``[M]`` token ids, then the questions; codes are 6 random digits (seeded).

    The filler is cut so that the probe's length is a multiple of ``multiple`` (whole chunks: one compiled shape).
    """
    rng = random.Random(seed)
    probe = _assemble(tokenizer, filler, facts, rng)
    cut = probe.ids.numel() % multiple
    if cut:
        probe = _assemble(tokenizer, filler[: filler.numel() - cut], facts, random.Random(seed))
    return probe


def _assemble(tokenizer, filler: torch.Tensor, facts: int, rng: random.Random) -> Probe:
    pairs = [(name, "".join(rng.choice("0123456789") for _ in range(6))) for name in rng.sample(NAMES, facts)]
    head = "Remember these facts.\n" + "".join(f"The secret code of the {n} vault is {c}.\n" for n, c in pairs) + "\n"
    parts = [tokenizer(head, return_tensors="pt").input_ids[0], filler]
    pos = parts[0].numel() + filler.numel()
    answers = []
    for name, code in rng.sample(pairs, len(pairs)):
        q = tokenizer(f"\n\nQuestion: what is the secret code of the {name} vault?\nAnswer: The secret code of the "
                      f"{name} vault is", return_tensors="pt").input_ids[0]
        a = tokenizer(f" {code}.", return_tensors="pt").input_ids[0]
        answers.append((pos + q.numel(), pos + q.numel() + a.numel() - 1))  # the digits, not the final "."
        parts += [q, a]
        pos += q.numel() + a.numel()
    return Probe(torch.cat(parts), answers, pairs)


def recall(forced: Forced, probe: Probe) -> float:
    """Fraction of facts whose answer tokens are all top-1 predictions (``pred[t - 1]`` predicts ``ids[t]``)."""
    hits = [bool((forced.pred[s - 1 : e - 1] == probe.ids[s:e]).all()) for s, e in probe.answers]
    return sum(hits) / len(hits)
