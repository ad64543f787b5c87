"""User-facing configuration of TriAttention compression."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# the paper's defaults (TRIATTENTION.md §1.7), declared once
BUDGET = 2048  # tokens kept per KV head
DIVIDE_LENGTH = 128  # decode steps between compactions
MAX_OFFSET = 65536  # future offsets 1, 2, 4, ..., 65536 (17)
NOISE = 1e-6  # tie-break noise on the z-scores


@dataclass
class TriAttentionConfig:
    """Settings of :func:`triattn_compile.optimize` (defaults follow the paper's HF runs, TRIATTENTION.md §1.7).

    Args:
        budget: tokens kept per KV head after each compaction (B). The cache holds at most ``budget + divide_length``.
        divide_length: decode steps between compactions (128).
        protect_prompt: keep the whole prompt and count it in the budget (paper default). When False the prompt
            competes with generated tokens, and may be longer than the cache: it is fed in pieces (``pieces.py``).
        per_layer: one keep set per (layer, KV head) instead of one per KV head shared by all layers; ``None``
            (default): the policy's own default (shared for ``"triattention"``, per layer for the variants chosen
            that way, e.g. ``"triattention-persistent"``).
        stats: path of a calibration file (``triattn calibrate``); ``None`` calibrates online from live queries.
        max_offset: largest future offset (offsets are 1, 2, 4, ..., max_offset).
        noise: tie-break noise added to z-scores; seed: its seed.
        compiler: ``"inductor"`` (default) or ``"eager"`` (run the rewritten graph without Inductor; for tests).
        policy: which tokens to keep: ``"triattention"`` (default), another name in
            :data:`triattn_compile.policies.POLICIES` (the baselines), or a :class:`~triattn_compile.policies.Policy`.
        layer_budgets: tokens kept per KV head in each attention layer, instead of ``budget`` in all of them (memory:
            their mean + ``divide_length`` slots per KV head). ``budget`` is then their mean, rounded down. Every
            layer shares a ring of ``min(layer_budgets) + divide_length`` slots for new tokens; a layer's kept tokens
            beyond that minimum sit in slots of its own (``cache.py``). The policy scores the layers of each budget
            on their own (a keep set shared across layers is shared by the layers of one budget).
    """

    budget: int | None = None  # None: BUDGET, or the mean of layer_budgets
    divide_length: int = DIVIDE_LENGTH
    protect_prompt: bool = True
    per_layer: bool | None = None
    stats: str | Path | None = None
    max_offset: int = MAX_OFFSET
    noise: float = NOISE
    seed: int = 0
    compiler: str = "inductor"
    policy: object = "triattention"
    layer_budgets: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.layer_budgets is not None:
            budgets = tuple(self.layer_budgets)
            if not budgets or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in budgets):
                raise ValueError(f"layer_budgets must be positive ints, one per attention layer, got {budgets!r}")
            mean = sum(budgets) // len(budgets)
            if self.budget not in (None, mean):
                raise ValueError(f"budget={self.budget} and layer_budgets (mean {mean}) disagree: give one of them")
            self.layer_budgets, self.budget = budgets, mean
        elif self.budget is None:
            self.budget = BUDGET
        for name in ("budget", "divide_length", "max_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.shared_budget < self.divide_length:
            which = "budget" if self.layer_budgets is None else "every layer's budget"
            raise ValueError(
                f"{which} ({self.shared_budget}) must be at least divide_length ({self.divide_length}): "
                f"use budgets >= {self.divide_length}"
            )
        if self.compiler not in ("inductor", "eager"):
            raise ValueError(f"compiler must be 'inductor' or 'eager', got {self.compiler!r}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")

    @property
    def shared_budget(self) -> int:
        """Tokens every layer keeps in its ring: ``budget``, or the smallest of ``layer_budgets``."""
        return self.budget if self.layer_budgets is None else min(self.layer_budgets)

    def check_prompt(self, length: int) -> None:
        """Refuse, in one line, a protected prompt longer than the (shared) budget (:func:`prompt_limit`, as in the
        vLLM plugin; an unprotected one has no limit here, it is fed in pieces)."""
        budget = self.shared_budget
        if self.protect_prompt and length > prompt_limit(budget, self.divide_length, True):
            raise ValueError(f"prompt of {length} tokens does not fit budget {budget} with prompt protection (the "
                             f"prompt is always kept; decode tokens compete for the rest of the budget): use budget >= "
                             f"{length} or protect_prompt=False")


def prompt_limit(budget: int, divide_length: int, protect_prompt: bool) -> int:
    """The longest prompt a sequence may have in one piece: a protected prompt is kept whole, so it must fit in the
    ``budget`` kept tokens (decode tokens compete for ``budget - prompt``, as in the paper's runs); an unprotected
    one is scored like any token, and the cache holds at most ``budget + divide_length`` tokens before its first
    compaction (the vLLM plugin's limit; the HF path feeds a longer one in pieces)."""
    return budget if protect_prompt else budget + divide_length
