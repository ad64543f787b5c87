"""triattn_compile: TriAttention KV-cache compression for any RoPE decoder, as a torch.compile graph pass."""

from triattn_compile.api import (
    cache_occupancy,
    calibrate,
    current_cache,
    discover,
    inspect,
    is_optimized,
    optimize,
    query_stats,
    restore,
)
from triattn_compile.cache import CompressedCache
from triattn_compile.calibration.stats import QueryStats, RotarySignature, StatsError
from triattn_compile.config import TriAttentionConfig
from triattn_compile.passes.discover import LayerLayout, Layout
from triattn_compile.passes.match import PatternNotFound
from triattn_compile.policies import POLICIES, Policy
from triattn_compile.schedule import Compressor

__all__ = [
    "CompressedCache",
    "Compressor",
    "LayerLayout",
    "Layout",
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
    "discover",
    "inspect",
    "is_optimized",
    "optimize",
    "query_stats",
    "restore",
]
