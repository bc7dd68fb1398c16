"""The cache format: reading and validating (reader), writing (writer), its sidecar files
(files: lock, journal) and crash-safe file helpers (durable). Imports run one way:
writer -> reader -> files -> durable."""
from .reader import SCHEMA_VERSION, Cache, CacheMeta, check_key, describe, read_cache, read_meta
from .writer import CacheWriter, create_cache, write_cache

__all__ = ["SCHEMA_VERSION", "Cache", "CacheMeta", "CacheWriter", "check_key", "create_cache",
           "describe", "read_cache", "read_meta", "write_cache"]
