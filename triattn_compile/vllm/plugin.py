"""The ``vllm.general_plugins`` entry point: :func:`register` (``triattn = "triattn_compile.vllm:register"``).

vLLM calls it in every process it starts (main, EngineCore, workers). It wraps two vLLM methods, and both do
nothing more than vLLM's own where the engine has no ``triattn`` setting: ``EngineArgs.create_engine_config``, so
that, where the engine's ``additional_config`` has a ``triattn`` key (:mod:`~triattn_compile.vllm.settings`),
the settings are validated in the main process (one-line :class:`SettingsError`) and the compile backend becomes
:mod:`~triattn_compile.vllm.backend` (discovery, then vLLM's own backend), with vLLM's compile cache off
(``VLLM_DISABLE_COMPILE_CACHE=1`` unless set: a cached artifact would skip discovery); and
``InputProcessor._validate_prompt_len``, so that a prompt longer than one piece of the cache (the budget, or budget
+ divide length with ``protect_prompt`` false: ``config.prompt_limit``) is refused like one longer than
``max_model_len`` (``VLLMValidationError``: HTTP 400 when serving) before it reaches the engine. :func:`unregister`
removes both.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from triattn_compile.vllm.settings import SETTINGS_KEY, SettingsError, VllmSettings, parse_settings, prompt_too_long

_WRAPPED = "_triattn_wrapped"


SCHEDULER = "triattn_compile.vllm.scheduler.TriAttentionScheduler"
WORKER_EXTENSION = "triattn_compile.vllm.worker.TriAttentionWorkerExtension"


def switch_on(vllm_config, prefix_caching: bool | None = None) -> None:
    """Validate ``vllm_config.additional_config["triattn"]`` and turn TriAttention on: compilation through the
    discovery backend, the scheduler that frees compacted blocks, the worker extension that puts compaction in front
    of attention (``worker.py``). A config without the key is left as it is.

    Args:
        prefix_caching: what the user asked for (``EngineArgs.enable_prefix_caching``): ``True`` is refused
            (compacted blocks no longer hold the tokens their hashes name), ``None`` (vLLM's default, on) is
            turned off.
    """
    from vllm.config import CompilationMode

    from triattn_compile.vllm.backend import BACKENDS
    from triattn_compile.vllm.paged import PagedSchedule

    settings = parse_settings(vllm_config.additional_config)
    if settings is None:
        return
    compilation = vllm_config.compilation_config
    where = f"additional_config[{SETTINGS_KEY!r}]"
    model_folder = Path(vllm_config.model_config.model).resolve()
    if settings.stats is not None and Path(settings.stats).resolve().parent == model_folder:
        raise SettingsError(f"{where}: the stats file {settings.stats} is in the model's folder, where vLLM would load "
                            "it as weights; move it out of the folder")
    if prefix_caching:
        raise SettingsError(f"{where}: prefix caching cannot be combined with compaction (compacted blocks no "
                            "longer hold the tokens they are cached under); drop enable_prefix_caching")
    if vllm_config.speculative_config is not None:
        raise SettingsError(f"{where}: speculative decoding is not supported with TriAttention; drop it")
    scheduler = vllm_config.scheduler_config
    if scheduler.scheduler_cls not in (None, SCHEDULER):
        raise SettingsError(f"{where}: a custom scheduler_cls ({scheduler.scheduler_cls}) cannot be combined with "
                            "TriAttention's scheduler; drop it")
    try:
        PagedSchedule(settings.budget, settings.divide_length, vllm_config.cache_config.block_size)
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None
    if compilation.mode == CompilationMode.NONE:
        raise SettingsError(f"{where}: TriAttention finds its sites in the graph vLLM compiles, and compilation is off "
                            "(enforce_eager, -O0 or a LoRA config); drop that setting")
    if compilation.mode != CompilationMode.DYNAMO_TRACE_ONCE or compilation.backend not in BACKENDS:
        raise SettingsError(f"{where}: only vLLM's CPU compilation (mode DYNAMO_TRACE_ONCE, backend inductor or "
                            f"eager) is supported so far; this engine uses mode {compilation.mode.name}, backend "
                            f"{compilation.backend!r}")
    # set here, after VllmConfig.__post_init__: named up front, the CPU platform would put back "inductor" and
    # custom ops would be on (vLLM turns them off only for backend "inductor"; docs/vllm.md, known limitations)
    compilation.backend = BACKENDS[compilation.backend]
    parallel = vllm_config.parallel_config
    if parallel.worker_extension_cls not in ("", None, WORKER_EXTENSION):
        raise SettingsError(f"{where}: a worker_extension_cls ({parallel.worker_extension_cls}) cannot be combined "
                            "with TriAttention's; drop it")
    parallel.worker_extension_cls = WORKER_EXTENSION
    scheduler.scheduler_cls = SCHEDULER
    vllm_config.cache_config.enable_prefix_caching = False
    # a compiled artifact loaded from vLLM's compile cache would skip the backend, and with it discovery; the
    # EngineCore and worker processes are started after this and inherit the setting
    os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")


def _create_engine_config(original):
    """``EngineArgs.create_engine_config`` followed by :func:`switch_on`."""

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        asked = self.enable_prefix_caching  # None: vLLM's default (create_engine_config resolves it)
        config = original(self, *args, **kwargs)
        switch_on(config, asked)
        return config

    return create_engine_config


def _validate_prompt_len(original):
    """``InputProcessor._validate_prompt_len`` that also refuses a prompt longer than the budget, with vLLM's
    request-validation error (HTTP 400 when serving), before the request reaches the engine."""

    @functools.wraps(original)
    def validate_prompt_len(self, prompt_len, prompt_type):
        original(self, prompt_len, prompt_type)
        raw = (self.vllm_config.additional_config or {}).get(SETTINGS_KEY)
        if raw is None or prompt_type != "decoder":
            return
        from vllm.exceptions import VLLMValidationError

        # the settings were validated when the engine's config was built; read, not parsed again (no stat per request)
        settings = VllmSettings(**{k: raw[k] for k in ("budget", "divide_length", "protect_prompt") if k in raw})
        message = prompt_too_long(prompt_len, settings, self.vllm_config.cache_config.block_size)
        if message:
            raise VLLMValidationError(message)

    return validate_prompt_len


def _targets():
    """``(class, method name, wrapper factory)`` of every method the plugin wraps."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor

    return [(EngineArgs, "create_engine_config", _create_engine_config),
            (InputProcessor, "_validate_prompt_len", _validate_prompt_len)]


def register() -> None:
    """Install the wrappers (idempotent: vLLM may load plugins more than once per process)."""
    for owner, name, wrap in _targets():
        original = getattr(owner, name)
        if not getattr(original, _WRAPPED, False):
            wrapped = wrap(original)
            setattr(wrapped, _WRAPPED, True)
            setattr(owner, name, wrapped)


def unregister() -> None:
    """Remove the wrappers :func:`register` installed."""
    for owner, name, _ in _targets():
        current = getattr(owner, name)
        if getattr(current, _WRAPPED, False):
            setattr(owner, name, current.__wrapped__)


__all__ = ["SettingsError", "register", "switch_on", "unregister"]
