"""Fixed-size KV blocks: allocation, reference counts, prefix caching by hash chain, LRU eviction.

A full block is identified by hash(parent block's hash, its token ids): equal hashes mean equal
prefixes, so a new request whose prompt starts like a cached one reuses those blocks. Free blocks
with a hash stay findable until they are needed for something else (LRU order); free blocks
without one are handed out first since nothing is lost by reusing them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from kestrel.request import Request


def hash_block(parent: bytes | None, tokens: bytes) -> bytes:
    """Collision-resistant chain hash of a block's token ids (int64 bytes): a crafted prompt
    cannot alias another user's blocks."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(tokens)
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash → block id
        self.hits = 0
        self.queries = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (never-used, freed, or evictable cached)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def find_cached(self, hashes: list[bytes]) -> list[int]:
        """Longest run of leading block hashes present in the cache."""
        found: list[int] = []
        for h in hashes:
            bid = self.cached.get(h)
            if bid is None:
                break
            found.append(bid)
        return found

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks, pulling idle ones out of the free queue."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.ref_cnt == 0:
                del self.free_queue[bid]
            blk.ref_cnt += 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} KV blocks, only {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            bid, _ = self.free_queue.popitem(last=False)
            blk = self.blocks[bid]
            if blk.block_hash is not None:  # evict: its contents are about to be overwritten
                if self.cached.get(blk.block_hash) == bid:
                    del self.cached[blk.block_hash]
                blk.block_hash = None
            blk.ref_cnt = 1
            out.append(bid)
        return out

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference each; tail blocks first so a prefix's head outlives its tail."""
        for bid in reversed(block_ids):
            blk = self.blocks[bid]
            if blk.ref_cnt <= 0:
                raise RuntimeError(f"double free of KV block {bid}")
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                self.free_queue[bid] = None
                if blk.block_hash is None:
                    self.free_queue.move_to_end(bid, last=False)

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Register a now-full block; a duplicate of an already cached prefix stays private."""
        blk = self.blocks[block_id]
        if blk.block_hash is not None or block_hash in self.cached:
            return
        blk.block_hash = block_hash
        self.cached[block_hash] = block_id

    def reset_prefix_cache(self) -> None:
        for blk in self.blocks:
            blk.block_hash = None
        self.cached.clear()

    def check_invariants(self, expect_idle: bool = False) -> None:
        """Every block is either referenced or in the free queue, exactly once; no leak when idle."""
        refs = sum(1 for b in self.blocks if b.ref_cnt > 0)
        if refs + len(self.free_queue) != self.num_blocks:
            raise AssertionError(f"block accounting broken: {refs} referenced + "
                                 f"{len(self.free_queue)} free != {self.num_blocks}")
        if any(b.ref_cnt < 0 for b in self.blocks):
            raise AssertionError("negative reference count")
        for h, bid in self.cached.items():
            if self.blocks[bid].block_hash != h:
                raise AssertionError(f"cache map points at block {bid} with another hash")
        if expect_idle and refs:
            held = [b.block_id for b in self.blocks if b.ref_cnt > 0][:10]
            raise AssertionError(f"KV blocks leaked while idle: {refs} held, e.g. {held}")


class KVCacheManager:
    """Per-request view of the pool: prefix lookup, slot allocation, caching, freeing."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self._hashes: dict[str, list[bytes]] = {}
        self._num_cached: dict[str, int] = {}  # leading blocks of a request already registered
        self._pending: dict[str, tuple[Request, int]] = {}  # allocated, to register (flush)

    def block_hashes(self, req: Request, upto: int | None = None) -> list[bytes]:
        """Hashes of (at least) the request's first ``upto`` full blocks (default: all), each
        computed once, when first asked for."""
        hashes = self._hashes.setdefault(req.request_id, [])
        bs = self.block_size
        first, last = len(hashes), req.num_tokens // bs
        if upto is not None:
            last = min(last, upto)
        if last > first:  # one conversion to bytes, then a hash per block: a 4k prompt costs
            # ~0.6 ms (a list slice per block: 1.0; a call per token: 3)
            ids = np.asarray(req.token_ids_slice(first * bs, last * bs), dtype=np.int64)
            raw, step = ids.tobytes(), bs * ids.itemsize
            for i in range(0, len(raw), step):
                hashes.append(hash_block(hashes[-1] if hashes else None, raw[i: i + step]))
        return hashes

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks covering the request's prefix, leaving at least one token to compute."""
        if not self.pool.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return []
        self.flush()  # blocks allocated earlier in this schedule are found, as before
        # Hashed in doubling batches up to the first miss: hashing all of a fresh 128k prompt
        # here took 10.8 ms (8,192 blocks, 2-core CPU) before its first chunk could launch;
        # its blocks are now hashed chunk by chunk as they are registered (_register_later).
        n = (req.num_tokens - 1) // self.block_size
        found: list[int] = []
        step = 16
        while len(found) < n:
            upto = min(n, len(found) + step)
            found += self.pool.find_cached(self.block_hashes(req, upto)[len(found):upto])
            if len(found) < upto:
                break
            step *= 2
        self.pool.queries += req.num_tokens
        self.pool.hits += len(found) * self.block_size
        return found

    def allocate_slots(self, req: Request, num_new: int, computed: list[int] | None = None) -> bool:
        """Make room for ``num_new`` more tokens after the computed ones; False if the pool is short.

        ``computed`` are prefix-cache hits for a request being admitted (not yet in its table).
        """
        bs = self.block_size
        if not computed and req.num_computed_tokens + num_new <= len(req.block_ids) * bs:
            # decode's usual case: the new tokens fit the blocks the request holds; only a
            # block that just filled up needs registering in the prefix cache
            total = req.num_computed_tokens + num_new
            if (self.pool.enable_prefix_caching
                    and total // bs > self._num_cached.get(req.request_id, 0)):
                self._register_later(req, total)
            return True
        computed = computed or []
        num_computed = req.num_computed_tokens + len(computed) * self.block_size
        needed = -(-(num_computed + num_new) // self.block_size)
        new = needed - len(req.block_ids) - len(computed)
        idle_hits = sum(1 for b in computed if self.pool.blocks[b].ref_cnt == 0)
        if new > self.pool.num_free - idle_hits:
            return False
        self.pool.touch(computed)
        req.block_ids.extend(computed)
        if new > 0:
            req.block_ids.extend(self.pool.allocate(new))
        if self.pool.enable_prefix_caching:
            self._register_later(req, num_computed + num_new)
        return True

    def computed_up_to(self, req: Request, num_tokens: int) -> None:
        """The request's cache is valid only up to ``num_tokens`` (speculative decoding rejected
        guesses whose K/V the step wrote): register no block past it in the prefix cache."""
        if self.pool.enable_prefix_caching:
            self._register_later(req, num_tokens)

    def _register_later(self, req: Request, num_tokens: int) -> None:
        """Register the request's full blocks up to ``num_tokens`` in the prefix cache at the
        next ``flush`` (the next schedule, a lookup, or the request's freeing): hashing a 4k
        chunk's blocks (0.34 ms on a 2-core CPU) then runs while its step is on the GPU
        instead of before its launch."""
        self._pending[req.request_id] = (req, num_tokens)

    def flush(self) -> None:
        """Register every block allocated since the last flush."""
        for req, num_tokens in self._pending.values():
            self._register(req, num_tokens)
        self._pending.clear()

    def _register(self, req: Request, num_tokens: int) -> None:
        end = num_tokens // self.block_size
        hashes = self.block_hashes(req, end)
        end = min(end, len(hashes))
        for i in range(self._num_cached.get(req.request_id, 0), end):
            self.pool.cache_block(req.block_ids[i], hashes[i])
        self._num_cached[req.request_id] = end

    def free(self, req: Request) -> None:
        pending = self._pending.pop(req.request_id, None)
        if pending is not None:  # its blocks stay findable once freed, as registered ones do
            self._register(*pending)
        self.pool.free(req.block_ids)
        req.block_ids = []
        self._num_cached.pop(req.request_id, None)

    def forget(self, req: Request) -> None:
        """Drop per-request bookkeeping once the request is finished for good."""
        self._hashes.pop(req.request_id, None)
