"""Prefix-cache index: chained token hashes, checkpoints ("cache units") and their LRU order.

Pure Python (no torch). This module decides *which* checkpoint a prompt may resume from and
why a lookup missed; it owns no cache memory. `KVCacheManager` allocates, shares and frees
the slots and blocks a `Checkpoint` names.

Hashing: token ids are cut into pages of G tokens; page k's chain value is
blake2b(value(k-1) ‖ page k), and value(0) is seeded with the request's `cache_salt`, so
different salts never share anything. A checkpoint at U tokens is keyed by its *anchor* (the
chain value after floor(U/G) pages) plus the U mod G tail tokens it ends with:

    tokens  |--page 1--|--page 2--|--page 3--|tail|
                                             ^anchor = value(3)   U = 3G + len(tail)

A lookup walks the prompt's anchors from the longest down and takes the longest checkpoint
whose U tokens are exactly the prompt's first U tokens (DeepSeek's rule: a unit must be
matched completely; a partial match is a miss).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from engine.core.cache_layout import CachePool

_DIGEST_BYTES = 16


class MissReason(str, Enum):
    """Why a prompt resumed from no checkpoint."""

    DISABLED = "disabled"  # prefix caching is off
    COLD = "cold"  # not seen before (less than a page shared beyond any hit)
    PARTIAL_UNIT = "partial_unit"  # a page-aligned prefix is cached, but no whole unit covers it
    EVICTED = "evicted"  # a matching, longer unit existed and was evicted


class HashChain:
    """Chained page hashes of one growing token sequence under one salt."""

    def __init__(self, salt: str, page_size: int) -> None:
        if not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        self.salt = salt
        self.page_size = page_size
        root = hashlib.blake2b(b"dsv4-prefix\x00" + salt.encode("utf-8"), digest_size=_DIGEST_BYTES)
        self._values = [root.digest()]
        self._first_tokens: list[int] = []  # first token of each page, for continuation checks
        self._pack = struct.Struct(f"<{page_size}I").pack

    @property
    def num_pages(self) -> int:
        return len(self._values) - 1

    def value(self, num_pages: int) -> bytes:
        """Chain value after `num_pages` pages (0 = the salted root)."""
        return self._values[num_pages]

    def first_token(self, page: int) -> int:
        """The first token of page `page` (1-based, like `value`)."""
        return self._first_tokens[page - 1]

    def extend(self, token_ids: Sequence[int]) -> None:
        """Hash whole pages that directly follow the pages hashed so far."""
        size = self.page_size
        if len(token_ids) % size:
            raise ValueError(f"token_ids must be whole pages of {size}, got {len(token_ids)} ids")
        for start in range(0, len(token_ids), size):
            try:
                page = self._pack(*token_ids[start : start + size])
            except struct.error:
                raise ValueError("token ids must be ints in [0, 2**32)") from None
            digest = hashlib.blake2b(self._values[-1], digest_size=_DIGEST_BYTES)
            digest.update(page)
            self._values.append(digest.digest())
            self._first_tokens.append(token_ids[start])

    def extend_to(self, token_ids: Sequence[int], num_tokens: int) -> None:
        """Hash every whole page of token_ids[:num_tokens] not hashed yet."""
        target = min(num_tokens, len(token_ids)) // self.page_size
        if target > self.num_pages:
            self.extend(token_ids[self.num_pages * self.page_size : target * self.page_size])


@dataclass(frozen=True)
class CheckpointKey:
    """Names the exact first `num_tokens` tokens (under one salt)."""

    num_tokens: int
    anchor: bytes
    tail: tuple[int, ...]


@dataclass
class Checkpoint:
    """Everything needed to resume a sequence exactly at `num_tokens` (U).

    Per block pool (c4, c128): `full_blocks` before U are shared (one reference each) and
    `tail_blocks` holds a private copy of the partially filled last block, if there is one.
    The window ring and the compressor state are private snapshots; `state_slot` is None
    for a model without compressed layers.
    """

    key: CheckpointKey
    window_slot: int
    state_slot: int | None
    full_blocks: dict[CachePool, list[int]] = field(default_factory=dict)
    tail_blocks: dict[CachePool, int] = field(default_factory=dict)
    last_used: float = 0.0

    @property
    def num_tokens(self) -> int:
        return self.key.num_tokens

    def held_units(self) -> list[tuple[CachePool, int]]:
        """Every (pool, unit id) this checkpoint holds one reference to."""
        units = [(CachePool.WINDOW, self.window_slot)]
        if self.state_slot is not None:
            units.append((CachePool.STATE, self.state_slot))
        for pool, blocks in self.full_blocks.items():
            units += [(pool, block) for block in blocks]
        units += list(self.tail_blocks.items())
        return units


class PrefixCache:
    """Checkpoint index by anchor, LRU order, miss diagnosis and token counters."""

    def __init__(
        self,
        hash_page: int,
        enabled: bool = True,
        max_evicted_keys: int = 4096,
        max_known_pages: int = 65536,
    ) -> None:
        if not isinstance(hash_page, int) or hash_page <= 0:
            raise ValueError(f"hash_page must be a positive int, got {hash_page!r}")
        if max_evicted_keys < 0 or max_known_pages < 0:
            raise ValueError("max_evicted_keys and max_known_pages must be >= 0")
        self.hash_page = hash_page
        self.enabled = enabled
        self._max_evicted = max_evicted_keys
        self._max_known = max_known_pages
        self._lru: OrderedDict[CheckpointKey, Checkpoint] = OrderedDict()  # oldest first
        self._by_anchor: dict[bytes, list[Checkpoint]] = {}
        self._evicted: OrderedDict[CheckpointKey, None] = OrderedDict()
        self._evicted_by_anchor: dict[bytes, set[CheckpointKey]] = {}
        # Chain values of pages some checkpoint covered, and (page value, first token of the
        # next page) continuations: they tell `partial_unit` from `cold`. Bounded LRU sets.
        self._known_pages: OrderedDict[bytes, None] = OrderedDict()
        self._continuations: OrderedDict[tuple[bytes, int], None] = OrderedDict()
        self.query_tokens = 0
        self.hit_tokens = 0
        self.miss_tokens_by_reason = {reason.value: 0 for reason in MissReason}
        self.num_evictions = 0

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: CheckpointKey) -> bool:
        return key in self._lru

    def new_chain(self, salt: str) -> HashChain:
        return HashChain(salt, self.hash_page)

    def make_key(self, chain: HashChain, num_tokens: int, tail: Sequence[int]) -> CheckpointKey:
        """Key of the first num_tokens tokens; `tail` is tokens [floor(U/G)·G, U)."""
        pages = num_tokens // self.hash_page
        if chain.num_pages < pages:
            raise ValueError(f"chain covers {chain.num_pages} pages, key needs {pages}")
        if len(tail) != num_tokens - pages * self.hash_page:
            raise ValueError(f"tail must hold {num_tokens - pages * self.hash_page} tokens")
        return CheckpointKey(num_tokens, chain.value(pages), tuple(tail))

    def checkpoints(self) -> list[Checkpoint]:
        """All checkpoints, least recently used first."""
        return list(self._lru.values())

    # ---- lookup ---------------------------------------------------------------------------

    def lookup(
        self,
        token_ids: Sequence[int],
        salt: str,
        max_tokens: int,
        chain: HashChain | None = None,
    ) -> tuple[Checkpoint | None, MissReason | None]:
        """Longest checkpoint with U <= max_tokens whose U tokens equal token_ids[:U].

        `chain` (the prompt's hash chain, extended here as needed) avoids rehashing.
        Returns (checkpoint, None) on a hit and (None, reason) on a miss. Counters are not
        touched; the caller records the lookup once the admission succeeds.
        """
        if not self.enabled:
            return None, MissReason.DISABLED
        if chain is None:
            chain = self.new_chain(salt)
        elif chain.salt != salt:
            raise ValueError("chain was built for a different salt")
        chain.extend_to(token_ids, len(token_ids))
        max_tokens = min(max_tokens, len(token_ids))
        top = min(max_tokens // self.hash_page, chain.num_pages)
        for pages in range(top, -1, -1):
            candidates = self._by_anchor.get(chain.value(pages))
            if not candidates:
                continue
            matching = [c for c in candidates if self._matches(c.key, token_ids, max_tokens)]
            if matching:
                return max(matching, key=lambda c: c.num_tokens), None
        return None, self.uncached_reason(token_ids, chain, 0, max_tokens)

    def uncached_reason(
        self, token_ids: Sequence[int], chain: HashChain, num_hit_tokens: int, max_tokens: int
    ) -> MissReason:
        """Why the tokens after the first `num_hit_tokens` (0 = a miss) were not served.

        `chain` must already cover the prompt's whole pages (as after `lookup`)."""
        if not self.enabled:
            return MissReason.DISABLED
        max_tokens = min(max_tokens, len(token_ids))
        for pages in range(min(max_tokens // self.hash_page, chain.num_pages), -1, -1):
            for key in self._evicted_by_anchor.get(chain.value(pages), ()):
                if key.num_tokens > num_hit_tokens and self._matches(key, token_ids, max_tokens):
                    return MissReason.EVICTED
        shared = self._shared_prefix_bound(token_ids, chain)
        # Sharing less than a page (say, only a BOS token) does not count as a partial match.
        if shared >= self.hash_page and shared > num_hit_tokens:
            return MissReason.PARTIAL_UNIT
        return MissReason.COLD

    def _matches(self, key: CheckpointKey, token_ids: Sequence[int], max_tokens: int) -> bool:
        if key.num_tokens > max_tokens:
            return False
        start = key.num_tokens - len(key.tail)
        return tuple(token_ids[start : key.num_tokens]) == key.tail

    def _shared_prefix_bound(self, token_ids: Sequence[int], chain: HashChain) -> int:
        """A lower bound on how many leading tokens some cached prefix shares: the deepest
        known page, plus one if a cached prefix also continues with the prompt's next token.
        (A prompt may run past max_tokens here, e.g. a re-sent prompt whose only unit is the
        whole prompt.)"""
        pages = chain.num_pages
        while pages and not (chain.value(pages) in self._known_pages or chain.value(pages) in self._by_anchor):
            pages -= 1
        shared = pages * self.hash_page
        if shared < len(token_ids):
            anchor, following = chain.value(pages), token_ids[shared]
            if (anchor, following) in self._continuations or any(
                c.key.tail[:1] == (following,) for c in self._by_anchor.get(anchor, ())
            ):
                shared += 1
        return shared

    # ---- membership -------------------------------------------------------------------------

    def insert(self, checkpoint: Checkpoint, chain: HashChain, now: float) -> None:
        """Make a checkpoint visible to lookups; `chain` must cover its anchor pages."""
        key = checkpoint.key
        if key in self._lru:
            raise ValueError("a checkpoint with this key already exists")
        checkpoint.last_used = now
        self._lru[key] = checkpoint
        self._by_anchor.setdefault(key.anchor, []).append(checkpoint)
        self._forget_evicted(key)
        self._note_pages(chain, key.num_tokens // self.hash_page)

    def touch(self, checkpoint: Checkpoint, now: float) -> None:
        """Mark a checkpoint as just used (moves it to the back of the LRU order)."""
        checkpoint.last_used = now
        self._lru.move_to_end(checkpoint.key)

    def remove(self, checkpoint: Checkpoint, evicted: bool) -> None:
        """Drop a checkpoint from the index; remember its key when it was evicted."""
        key = checkpoint.key
        del self._lru[key]
        siblings = self._by_anchor[key.anchor]
        siblings.remove(checkpoint)
        if not siblings:
            del self._by_anchor[key.anchor]
        if evicted:
            self.num_evictions += 1
            self._remember_evicted(key)

    def _remember_evicted(self, key: CheckpointKey) -> None:
        if self._max_evicted == 0:
            return
        self._evicted[key] = None
        self._evicted_by_anchor.setdefault(key.anchor, set()).add(key)
        while len(self._evicted) > self._max_evicted:
            old, _ = self._evicted.popitem(last=False)
            self._drop_evicted_anchor(old)

    def _forget_evicted(self, key: CheckpointKey) -> None:
        if key in self._evicted:
            del self._evicted[key]
            self._drop_evicted_anchor(key)

    def _drop_evicted_anchor(self, key: CheckpointKey) -> None:
        keys = self._evicted_by_anchor[key.anchor]
        keys.discard(key)
        if not keys:
            del self._evicted_by_anchor[key.anchor]

    def _note_pages(self, chain: HashChain, num_pages: int) -> None:
        """Remember pages 1..num_pages; stops at the first page already known, since a chain
        value implies its whole prefix and that prefix was noted with it."""
        if self._max_known == 0:
            return
        first_new = num_pages
        while first_new >= 1 and chain.value(first_new) not in self._known_pages:
            first_new -= 1
        for pages in range(first_new + 1, num_pages + 1):
            self._known_pages[chain.value(pages)] = None
            self._continuations[(chain.value(pages - 1), chain.first_token(pages))] = None
        for known in (self._known_pages, self._continuations):
            while len(known) > self._max_known:
                known.popitem(last=False)

    # ---- counters ---------------------------------------------------------------------------

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int, reason: MissReason) -> None:
        """Count one admitted prompt: its hit tokens, and the rest under `reason`
        (`uncached_reason`), so hits plus all misses add up to the queried tokens."""
        self.query_tokens += num_query_tokens
        self.hit_tokens += num_hit_tokens
        self.miss_tokens_by_reason[MissReason(reason).value] += num_query_tokens - num_hit_tokens

    def stats(self) -> dict:
        return {
            "num_checkpoints": len(self._lru),
            "num_evictions": self.num_evictions,
            "query_tokens": self.query_tokens,
            "hit_tokens": self.hit_tokens,
            "miss_tokens": self.query_tokens - self.hit_tokens,
            "miss_tokens_by_reason": dict(self.miss_tokens_by_reason),
        }

    def check_integrity(self) -> None:
        """The anchor index and the LRU order name the same checkpoints."""
        indexed = [c for group in self._by_anchor.values() for c in group]
        if len(indexed) != len(self._lru) or any(self._lru.get(c.key) is not c for c in indexed):
            raise AssertionError("prefix cache: anchor index and LRU order disagree")
        for key in self._lru:
            if key in self._evicted:
                raise AssertionError("prefix cache: a live key is also marked evicted")
