"""The one setting that turns TriAttention on in vLLM: ``additional_config={"triattn": {...}}``.

``LLM(model, additional_config={"triattn": {"budget": 256, "stats": "stats.safetensors"}})`` or
``vllm serve MODEL --additional-config '{"triattn": {"budget": 256}}'``. Without the ``triattn`` key the plugin does
nothing. :func:`parse_settings` validates the dict in the process that builds the engine's config and raises
:class:`SettingsError` with one line. The values are checked by :class:`~triattn_compile.config.TriAttentionConfig`,
the same dataclass ``optimize()`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from triattn_compile.config import BUDGET, DIVIDE_LENGTH, TriAttentionConfig, prompt_limit

SETTINGS_KEY = "triattn"  # the key of VllmConfig.additional_config (--additional-config JSON)


class SettingsError(ValueError):
    """A ``triattn`` setting vLLM cannot be started with (one-line message)."""


@dataclass(frozen=True)
class VllmSettings:
    """TriAttention's settings for a vLLM engine.

    Attributes:
        budget: tokens kept per KV head after each compaction.
        divide_length: decode steps between compactions.
        per_layer: one keep set per (layer, KV head) instead of one per KV head shared by all layers.
        stats: a statistics file made by ``triattn calibrate`` on this model's HF checkpoint; it is validated
            against the layout found in vLLM's graph when the engine compiles. ``None``: calibrated online, from
            every query the engine serves (pooled over requests, from the first step on).
        protect_prompt: keep the whole prompt and count it in the budget.
    """

    budget: int = BUDGET
    divide_length: int = DIVIDE_LENGTH
    per_layer: bool = False
    stats: str | None = None
    protect_prompt: bool = True


KEYS = tuple(f.name for f in fields(VllmSettings))


def parse_settings(additional_config: object) -> VllmSettings | None:
    """The :class:`VllmSettings` in ``additional_config["triattn"]``, or ``None`` where the key is absent (off).

    Raises:
        SettingsError: not a dict, an unknown key, a bad value, or a stats file that does not exist.
    """
    if not isinstance(additional_config, dict) or SETTINGS_KEY not in additional_config:
        return None
    raw = additional_config[SETTINGS_KEY]
    where = f"additional_config[{SETTINGS_KEY!r}]"
    if not isinstance(raw, dict):
        raise SettingsError(f"{where} must be a JSON object such as {{\"budget\": 256}}, got {raw!r}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise SettingsError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(KEYS)}")
    for name in ("per_layer", "protect_prompt"):
        if name in raw and not isinstance(raw[name], bool):
            raise SettingsError(f"{where}: {name} must be true or false, got {raw[name]!r}")
    if raw.get("stats") is not None and not isinstance(raw["stats"], str):
        raise SettingsError(f"{where}: stats must be the path of a `triattn calibrate` file, got {raw['stats']!r}")
    settings = VllmSettings(**raw)
    try:
        TriAttentionConfig(budget=settings.budget, divide_length=settings.divide_length, per_layer=settings.per_layer,
                           stats=settings.stats, protect_prompt=settings.protect_prompt)
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None
    if settings.stats is not None and not Path(settings.stats).is_file():
        raise SettingsError(f"{where}: stats file {settings.stats} does not exist; make it with `triattn calibrate "
                            "--model <this model's HF folder>`")
    return settings


ALL_WINDOWED = ("TriAttention in vLLM: every attention layer of this model is a sliding-window layer, whose cache "
                "vLLM already bounds to its window; serve it without the triattn setting")


def prompt_too_long(length: int, settings: VllmSettings, block_size: int) -> str | None:
    """The one-line refusal of a prompt of ``length`` tokens under ``settings``, or ``None`` where it fits."""
    limit = prompt_limit(settings.budget, settings.divide_length, settings.protect_prompt)
    if length <= limit:
        return None
    if settings.protect_prompt:
        what, why = "the budget", "the prompt is always kept"
    else:
        what, why = "budget + divide_length", "the cache holds no more before its first compaction"
    need = -(-(length - limit + settings.budget) // block_size) * block_size
    return (f"TriAttention: prompt of {length} tokens is longer than {what} {limit} ({why}); raise "
            f"additional_config['{SETTINGS_KEY}']['budget'] to at least {need} or shorten the prompt")
