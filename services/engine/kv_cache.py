"""KV block manager: the single owner of KV-cache block ids (pure Python).

Every block id 0..num_blocks-1 is in exactly one of three states:
  * free      -- no contents worth keeping; in ``_free`` (deque, popleft to allocate)
  * evictable -- ref count 0 but carries a prefix hash; in ``_evictable`` (LRU order,
                 oldest first). Still allocatable: evicted on demand.
  * used      -- referenced by >= 1 request block table (ref count > 0).
Prefix caching maps chained block hashes (see ``hash_block``) to block ids so that
requests sharing a prompt prefix share the same physical blocks. The router computes the same
chain (``prefix_block_hashes``) to find which instance holds a prompt's prefix; a worker tells it
with the events this manager records once ``record_prefix_events()`` was called.
"""
from __future__ import annotations

import hashlib
import struct
import itertools
from collections import OrderedDict, deque
from typing import NamedTuple, Sequence

from services.engine.blocks import cdiv


class KVCacheError(RuntimeError):
    """Raised by ``check_integrity`` on corrupted state and on API misuse."""


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained hash of one full block, stable across processes.

    blake2b(digest_size=8) over the parent hash (8 bytes little-endian, 0 for None)
    followed by the token ids packed as little-endian int32.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update((parent_hash or 0).to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return int.from_bytes(h.digest(), "little")


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int | None = None) -> list[int]:
    """The chained hashes of the full blocks of ``token_ids``, first block first (at most
    ``max_blocks``): block i's hash is what an engine with this block size registers once the
    block's tokens are computed. The one definition the engine and the router share."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    out, parent = [], None
    for i in range(n):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


class PrefixEvent(NamedTuple):
    """A change to the set of cached block hashes: ``stored`` True when the hash became
    available for reuse, False when its block was evicted. ``seq`` counts from 1 per manager."""
    seq: int
    stored: bool
    block_hash: int


# Events kept for a reader that has not drained them; past this the oldest are dropped, and the
# reader sees a gap in `seq` and takes a snapshot instead.
MAX_PENDING_PREFIX_EVENTS = 65536


_NEVER_HASHED = 1 << 62          # a request's hashed-block count that no block index reaches


class KVCacheManager:
    """Allocates, shares (prefix caching), caches and frees KV blocks per request."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        """Create a manager with all blocks free. Raises ValueError for non-positive sizes."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._ref = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._tables: dict[str, list[int]] = {}
        self._num_hashed: dict[str, int] = {}          # blocks of the request already hashed
        self._last_hash: dict[str, int | None] = {}    # hash of its last hashed block
        # Off until record_prefix_events(): then every hash registered or evicted is appended here.
        # Written only by the thread that owns this manager; deque appends and pops are atomic, so
        # another thread may drain it (popleft) while that one runs.
        self.prefix_events: deque[PrefixEvent] | None = None
        self._event_seq = itertools.count(1)
        self._last_event_seq = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: truly free + cached-but-unreferenced (evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one request."""
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (used / total)."""
        return self.num_used_blocks / self.num_blocks

    def record_prefix_events(self) -> None:
        """From now on append a PrefixEvent to ``prefix_events`` for every hash registered (by
        cache_blocks) and every hash dropped (eviction, reset_prefix_cache); at most
        MAX_PENDING_PREFIX_EVENTS undrained, oldest dropped first. Idempotent. No events come when
        prefix caching is off (no hash is ever registered)."""
        if self.prefix_events is None:
            self.prefix_events = deque(maxlen=MAX_PENDING_PREFIX_EVENTS)

    def prefix_snapshot(self) -> tuple[int, list[int]]:
        """(seq of the last event recorded so far, every hash cached now, sorted). Call on the
        owning thread: events with a larger seq are the changes after this snapshot."""
        return self._last_event_seq, sorted(self._hash_to_block)

    def _event(self, stored: bool, block_hash: int) -> None:
        if self.prefix_events is not None:
            self._last_event_seq = next(self._event_seq)
            self.prefix_events.append(PrefixEvent(self._last_event_seq, stored, block_hash))

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Extra blocks needed so the request covers ``num_tokens`` slots (0 if covered).

        Ignores possible prefix hits for a request without blocks (upper bound).
        """
        have = len(self._tables.get(request_id, ()))
        return max(0, cdiv(num_tokens, self.block_size) - have)

    def find_cached_prefix(self, token_ids: Sequence[int]) -> int:
        """Read-only: tokens covered by the longest chain of cached full blocks.

        Capped so at least one token of ``token_ids`` is left to compute.
        Returns 0 when prefix caching is off or ``token_ids`` is empty.
        """
        return len(self._match_prefix(token_ids)) * self.block_size

    def block_table(self, request_id: str) -> list[int]:
        """Copy of the request's block ids in order; [] for an unknown request."""
        return list(self._tables.get(request_id, ()))

    def has_request(self, request_id: str) -> bool:
        """True if the request currently holds a block table (possibly empty)."""
        return request_id in self._tables

    def allocate(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> int | None:
        """Make the request's block table cover slots 0..num_tokens-1.

        All-or-nothing: returns None and changes nothing if blocks are insufficient.
        For a request with no blocks yet (new or preempted), the longest cached prefix
        of ``token_ids`` is attached first (ref +1 each) and the number of tokens it
        covers is returned; otherwise returns 0. Never shrinks a table.
        Raises KVCacheError if ``num_tokens`` is negative.
        """
        if num_tokens < 0:
            raise KVCacheError(f"allocate({request_id!r}): negative num_tokens {num_tokens}")
        table = self._tables.get(request_id)
        cached: list[int] = [] if table else self._match_prefix(token_ids)
        have = len(table) if table else len(cached)
        need_new = max(0, cdiv(num_tokens, self.block_size) - have)
        # Attaching an evictable cached block consumes one unit of the free budget.
        budget = self.num_free_blocks - sum(1 for b in cached if self._ref[b] == 0)
        if need_new > budget:
            return None
        if table is None:
            table = self._tables[request_id] = []
            self._num_hashed[request_id] = 0
            self._last_hash[request_id] = None
        num_cached_tokens = 0
        if cached:
            for b in cached:
                if self._ref[b] == 0:
                    del self._evictable[b]
                self._ref[b] += 1
            table.extend(cached)
            self._num_hashed[request_id] = len(cached)
            self._last_hash[request_id] = self._block_hash[cached[-1]]
            num_cached_tokens = len(cached) * self.block_size
        for _ in range(need_new):
            b = self._take_block()
            self._ref[b] = 1
            table.append(b)
        return num_cached_tokens

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register hashes for the request's blocks that are now full of computed tokens.

        Block i is full when (i+1)*block_size <= num_computed_tokens. Idempotent and
        O(new blocks). An existing mapping for the same hash is kept (no duplicate is
        registered; the request keeps its own block). No-op when prefix caching is off
        or the request is unknown. Raises KVCacheError if ``num_computed_tokens``
        exceeds len(token_ids) or the slots covered by the request's table.
        """
        if not self.enable_prefix_caching or request_id not in self._tables:
            return
        table = self._tables[request_id]
        bs = self.block_size
        if num_computed_tokens > min(len(token_ids), len(table) * bs):
            raise KVCacheError(f"cache_blocks({request_id!r}): num_computed_tokens={num_computed_tokens} "
                               f"exceeds token_ids ({len(token_ids)}) or table capacity ({len(table) * bs})")
        start, last = self._num_hashed[request_id], self._last_hash[request_id]
        n_full = num_computed_tokens // bs
        for i in range(start, n_full):
            last = hash_block(last, token_ids[i * bs:(i + 1) * bs])
            b = table[i]
            if self._block_hash[b] is None and last not in self._hash_to_block:
                self._block_hash[b] = last
                self._hash_to_block[last] = b
                self._event(True, last)
        if n_full > start:
            self._num_hashed[request_id], self._last_hash[request_id] = n_full, last

    def exclude_from_prefix_cache(self, request_id: str) -> None:
        """Register no hash for the request's blocks from now on (cache_blocks skips it): their KV
        is not what computing its tokens gives (restored from a lossy copy), so no other request
        may reuse it. Hashes registered before stay. No-op for an unknown request."""
        if request_id in self._num_hashed:
            self._num_hashed[request_id] = _NEVER_HASHED

    def free(self, request_id: str) -> None:
        """Release all blocks of the request (ref -1 each, tail first).

        Blocks reaching ref 0 become evictable (LRU) if hashed, else return to the free
        list. Freeing in reverse order makes tail blocks evicted before head blocks.
        Safe no-op for an unknown request id.
        """
        table = self._tables.pop(request_id, None)
        if table is None:
            return
        del self._num_hashed[request_id], self._last_hash[request_id]
        for b in reversed(table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._block_hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def reset_prefix_cache(self) -> None:
        """Drop hashes of all unreferenced (evictable) blocks, moving them to the free list.

        Hashes of blocks still referenced by requests are kept.
        """
        for b in self._evictable:
            del self._hash_to_block[self._block_hash[b]]
            self._event(False, self._block_hash[b])
            self._block_hash[b] = None
            self._free.append(b)
        self._evictable.clear()

    def check_integrity(self) -> None:
        """Raise KVCacheError describing the first violated invariant, if any."""
        def fail(msg: str) -> None:
            raise KVCacheError(f"KV cache integrity violation: {msg}")

        n = self.num_blocks
        free, evict = list(self._free), list(self._evictable)
        used = [b for b in range(n) if self._ref[b] > 0]
        if len(free) + len(evict) + len(used) != n:
            fail(f"free({len(free)}) + evictable({len(evict)}) + used({len(used)}) != {n}")
        seen: dict[int, str] = {}
        for name, ids in (("free", free), ("evictable", evict), ("used", used)):
            for b in ids:
                if not 0 <= b < n:
                    fail(f"block id {b} out of range in {name}")
                if b in seen:
                    fail(f"block {b} in both {seen[b]} and {name}")
                seen[b] = name
        counts = [0] * n
        for rid, table in self._tables.items():
            if len(set(table)) != len(table):
                fail(f"request {rid!r} table has duplicate blocks {table}")
            for b in table:
                if not 0 <= b < n:
                    fail(f"request {rid!r} holds out-of-range block {b}")
                counts[b] += 1
        for b in range(n):
            if self._ref[b] != counts[b]:
                fail(f"block {b} ref count {self._ref[b]} != {counts[b]} tables holding it")
        for h, b in self._hash_to_block.items():
            if self._block_hash[b] != h:
                fail(f"hash map says {h:#x} -> block {b}, but block hash is {self._block_hash[b]}")
        for b in range(n):
            h = self._block_hash[b]
            if h is not None and self._hash_to_block.get(h) != b:
                fail(f"block {b} has hash {h:#x} not mapped back to it")
            if h is not None and seen.get(b) == "free":
                fail(f"free block {b} still carries hash {h:#x}")
        for b in evict:
            if self._ref[b] != 0 or self._block_hash[b] is None:
                fail(f"evictable block {b} has ref {self._ref[b]} / hash {self._block_hash[b]}")
        if set(self._num_hashed) != set(self._tables) or set(self._last_hash) != set(self._tables):
            fail("per-request hash bookkeeping out of sync with block tables")

    def _match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids of the longest cached full-block chain, leaving >= 1 token."""
        if not self.enable_prefix_caching or not token_ids:
            return []
        bs, out, parent = self.block_size, [], None
        for i in range((len(token_ids) - 1) // bs):     # the same chain as prefix_block_hashes
            parent = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            b = self._hash_to_block.get(parent)
            if b is None:
                break
            out.append(b)
        return out

    def _take_block(self) -> int:
        """Pop a free block, else evict the least-recently-freed cached block."""
        if self._free:
            return self._free.popleft()
        b, _ = self._evictable.popitem(last=False)
        del self._hash_to_block[self._block_hash[b]]
        self._event(False, self._block_hash[b])
        self._block_hash[b] = None
        return b
