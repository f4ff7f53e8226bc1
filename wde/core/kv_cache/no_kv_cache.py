"""The KVCacheManager of encoders: they keep nothing between steps, so there are no blocks to manage."""
from wde.core.kv_cache.kv_cache_manager import KVCacheManager


class NoKVCacheManager(KVCacheManager):
    @classmethod
    def from_engine(cls, engine) -> "NoKVCacheManager":
        return cls(engine.config, num_blocks=0)
