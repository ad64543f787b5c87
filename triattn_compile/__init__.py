"""triattn_compile: TriAttention KV-cache compression for any RoPE decoder, as a torch.compile graph pass."""

# importing the op modules registers the triattn:: custom ops
from triattn_compile.api import cache_occupancy, calibrate, current_cache, optimize, query_stats, restore
from triattn_compile.cache import CompressedCache
from triattn_compile.calibration.stats import QueryStats, RotarySignature, StatsError
from triattn_compile.config import TriAttentionConfig
from triattn_compile.kernels import compact as _compact  # noqa: F401
from triattn_compile.kernels import observe as _observe  # noqa: F401
from triattn_compile.passes.match import PatternNotFound
from triattn_compile.policies import POLICIES, Policy

__all__ = [
    "CompressedCache",
    "POLICIES",
    "PatternNotFound",
    "Policy",
    "QueryStats",
    "RotarySignature",
    "StatsError",
    "TriAttentionConfig",
    "cache_occupancy",
    "calibrate",
    "current_cache",
    "optimize",
    "query_stats",
    "restore",
]
