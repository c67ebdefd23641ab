"""``memoize``: functools.lru_cache(maxsize=None) without importing functools (and collections behind it),
about 2 ms of every ``sandlock run``'s start-up. Positional, hashable arguments only."""
from __future__ import annotations


def memoize(fn):
    cache: dict = {}
    missing = object()

    def cached(*args):
        hit = cache.get(args, missing)
        if hit is missing:
            hit = cache[args] = fn(*args)
        return hit

    cached.__name__, cached.__qualname__, cached.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    cached.__wrapped__ = fn
    cached.cache_clear = cache.clear
    return cached
