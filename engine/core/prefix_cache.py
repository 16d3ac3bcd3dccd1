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

Eviction order (`eviction_order`): superseded units first (a longer cached unit of the same
token history extends them, so the next turn of that conversation does not need them), then
leaves, then shared units (prompts with different continuations — several sessions — used
them, like a common system prompt); least recently used first within a class. The index also
knows checkpoints that live in a lower tier (host memory, disk: `OffloadedCheckpoint`).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

from engine.core.cache_layout import CachePool

_DIGEST_BYTES = 16
TIERS = ("device", "host", "disk")  # where a checkpoint's data lives


class MissReason(str, Enum):
    """Why prompt tokens were not served from a checkpoint (counted per token)."""

    DISABLED = "disabled"  # prefix caching is off
    COLD = "cold"  # not seen before (less than a page shared beyond any hit)
    PARTIAL_UNIT = "partial_unit"  # a cached prefix shares these tokens, but no whole unit covers them
    EVICTED = "evicted"  # a matching, longer unit existed and was evicted


class UnitKind(str, Enum):
    """A checkpoint's eviction class, cheapest to lose first."""

    SUPERSEDED = "superseded"  # a longer cached unit of the same token history extends it
    LEAF = "leaf"  # nothing cached extends it
    SHARED = "shared"  # prompts with different continuations used it (several sessions)


# Distinct next tokens after a unit (its creator's and its hits') that make it shared.
SHARED_CONTINUATIONS = 2
_EVICTION_RANK = {UnitKind.SUPERSEDED: 0, UnitKind.LEAF: 1, UnitKind.SHARED: 2}


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

    def matches(self, token_ids: Sequence[int], max_tokens: int) -> bool:
        """The prompt's first num_tokens tokens are this key's (given the anchor matched)."""
        if self.num_tokens > max_tokens:
            return False
        start = self.num_tokens - len(self.tail)
        return tuple(token_ids[start : self.num_tokens]) == self.tail


@dataclass
class Checkpoint:
    """Everything needed to resume a sequence exactly at `num_tokens` (U).

    Per block pool (c4, c128): `full_blocks` before U are shared (one reference each) and
    `tail_blocks` holds a private copy of the partially filled last block, if there is one.
    The window ring and the compressor state are private snapshots; `state_slot` is None
    for a model without compressed layers. `continuations` holds the distinct tokens that
    followed U in the prompts that created or hit it (at most SHARED_CONTINUATIONS);
    `extends` the live shorter checkpoints of the same history at insertion.
    """

    key: CheckpointKey
    window_slot: int
    state_slot: int | None
    full_blocks: dict[CachePool, list[int]] = field(default_factory=dict)
    tail_blocks: dict[CachePool, int] = field(default_factory=dict)
    last_used: float = 0.0
    continuations: set[int] = field(default_factory=set)
    extends: list[Checkpoint] = field(default_factory=list)
    num_extensions: int = 0  # live checkpoints whose `extends` name this one

    @property
    def num_tokens(self) -> int:
        return self.key.num_tokens

    @property
    def kind(self) -> UnitKind:
        if len(self.continuations) >= SHARED_CONTINUATIONS:
            return UnitKind.SHARED
        return UnitKind.SUPERSEDED if self.num_extensions else UnitKind.LEAF

    def note_continuation(self, token: int | None) -> None:
        if token is not None and len(self.continuations) < SHARED_CONTINUATIONS:
            self.continuations.add(token)

    def held_units(self) -> list[tuple[CachePool, int]]:
        """Every (pool, unit id) this checkpoint holds one reference to."""
        units = [(CachePool.WINDOW, self.window_slot)]
        if self.state_slot is not None:
            units.append((CachePool.STATE, self.state_slot))
        for pool, blocks in self.full_blocks.items():
            units += [(pool, block) for block in blocks]
        units += list(self.tail_blocks.items())
        return units


@dataclass(frozen=True)
class OffloadedCheckpoint:
    """A checkpoint whose data lives in a lower tier ("host" memory or "disk"), not on device."""

    key: CheckpointKey
    tier: str
    nbytes: int


class KeyIndex:
    """Values by CheckpointKey, found by anchor: which keys a prompt starts with."""

    def __init__(self) -> None:
        self._by_anchor: dict[bytes, dict[CheckpointKey, object]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: CheckpointKey) -> bool:
        return key in self._by_anchor.get(key.anchor, ())

    def add(self, key: CheckpointKey, value) -> None:
        group = self._by_anchor.setdefault(key.anchor, {})
        self._size += key not in group
        group[key] = value

    def discard(self, key: CheckpointKey) -> None:
        group = self._by_anchor.get(key.anchor)
        if group is None or key not in group:
            return
        del group[key]
        self._size -= 1
        if not group:
            del self._by_anchor[key.anchor]

    def get(self, key: CheckpointKey):
        return self._by_anchor.get(key.anchor, {}).get(key)

    def has_anchor(self, anchor: bytes) -> bool:
        return anchor in self._by_anchor

    def values(self) -> Iterator:
        for group in self._by_anchor.values():
            yield from group.values()

    def at_anchor(self, anchor: bytes):
        return self._by_anchor.get(anchor, {}).items()

    def matches(self, token_ids: Sequence[int], chain: HashChain, max_tokens: int) -> Iterator[tuple]:
        """(key, value) of every key the prompt's first max_tokens tokens contain, longest
        anchor first. `chain` must cover the prompt's whole pages up to max_tokens."""
        top = min(max_tokens // chain.page_size, chain.num_pages)
        for pages in range(top, -1, -1):
            for key, value in list(self.at_anchor(chain.value(pages))):
                if key.matches(token_ids, max_tokens):
                    yield key, value

    def longest(self, token_ids: Sequence[int], chain: HashChain, max_tokens: int):
        """(key, value) of the longest matching key, or None (stops at the first anchor, from
        the longest down, that holds a match: shorter anchors only hold shorter keys)."""
        top = min(max_tokens // chain.page_size, chain.num_pages)
        for pages in range(top, -1, -1):
            best = None
            for key, value in self.at_anchor(chain.value(pages)):
                if key.matches(token_ids, max_tokens) and (best is None or key.num_tokens > best[0].num_tokens):
                    best = (key, value)
            if best is not None:
                return best
        return None


class PrefixCache:
    """Checkpoint index by anchor, LRU order, eviction classes, miss diagnosis and counters."""

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
        self._live = KeyIndex()
        self._evicted: OrderedDict[CheckpointKey, None] = OrderedDict()
        self._evicted_index = KeyIndex()
        self._offloaded = KeyIndex()  # CheckpointKey -> OffloadedCheckpoint
        self._tier_totals = {tier: [0, 0] for tier in TIERS[1:]}  # tier -> [checkpoints, bytes]
        # Chain values of pages some checkpoint covered, and (page value, first token of the
        # next page) continuations: they tell `partial_unit` from `cold`. Bounded LRU sets.
        self._known_pages: OrderedDict[bytes, None] = OrderedDict()
        self._continuations: OrderedDict[tuple[bytes, int], None] = OrderedDict()
        self.query_tokens = 0
        self.hit_tokens = 0
        self.hit_tokens_by_tier = {tier: 0 for tier in TIERS}
        self.miss_tokens_by_reason = {reason.value: 0 for reason in MissReason}
        # (the pool that ran short, or "reset"; the victim's UnitKind) -> evictions from device
        self.evictions: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: CheckpointKey) -> bool:
        return key in self._lru

    @property
    def num_evictions(self) -> int:
        return sum(self.evictions.values())

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

    def eviction_order(self) -> list[Checkpoint]:
        """All checkpoints, the first to evict first: superseded, leaf, shared; LRU within."""
        return sorted(self._lru.values(), key=lambda c: _EVICTION_RANK[c.kind])

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
        found = self._live.longest(token_ids, chain, min(max_tokens, len(token_ids)))
        if found is not None:
            return found[1], None
        return None, self.uncached_reason(token_ids, chain, 0, max_tokens)

    def lookup_offloaded(
        self, token_ids: Sequence[int], chain: HashChain, max_tokens: int, longer_than: int
    ) -> OffloadedCheckpoint | None:
        """The longest lower-tier checkpoint the prompt matches, if longer than `longer_than`
        (the device hit). `chain` must cover the prompt (as after `lookup`)."""
        if not self.enabled or not len(self._offloaded):
            return None
        found = self._offloaded.longest(token_ids, chain, min(max_tokens, len(token_ids)))
        return found[1] if found is not None and found[0].num_tokens > longer_than else None

    def miss_split(
        self, token_ids: Sequence[int], chain: HashChain, num_hit_tokens: int, max_tokens: int,
        num_query_tokens: int,
    ) -> dict[MissReason, int]:
        """Why each query token after the first `num_hit_tokens` was not served: up to the
        longest evicted unit the prompt matches, `evicted`; then up to what cached prefixes
        share with it, `partial_unit`; the rest `cold`. Sums to the missed tokens.
        `chain` must already cover the prompt's whole pages (as after `lookup`)."""
        missed = num_query_tokens - num_hit_tokens
        if not self.enabled:
            return {MissReason.DISABLED: missed}
        max_tokens = min(max_tokens, len(token_ids))
        evicted_end = num_hit_tokens
        found = self._evicted_index.longest(token_ids, chain, max_tokens)
        if found is not None:
            evicted_end = max(evicted_end, found[0].num_tokens)
        shared = self._shared_prefix_bound(token_ids, chain)
        # Sharing less than a page (say, only a BOS token) does not count as a partial match.
        partial_end = max(evicted_end, min(shared, num_query_tokens)) if shared >= self.hash_page else evicted_end
        split = {
            MissReason.EVICTED: evicted_end - num_hit_tokens,
            MissReason.PARTIAL_UNIT: partial_end - evicted_end,
            MissReason.COLD: num_query_tokens - partial_end,
        }
        return {reason: n for reason, n in split.items() if n > 0}

    def uncached_reason(
        self, token_ids: Sequence[int], chain: HashChain, num_hit_tokens: int, max_tokens: int
    ) -> MissReason:
        """The main reason the tokens after the first `num_hit_tokens` (0 = a miss) were not
        served: evicted, else partial_unit, else cold (`miss_split`'s first non-empty part)."""
        split = self.miss_split(token_ids, chain, num_hit_tokens, max_tokens, len(token_ids))
        for reason in (MissReason.DISABLED, MissReason.EVICTED, MissReason.PARTIAL_UNIT):
            if split.get(reason):
                return reason
        return MissReason.COLD

    def _shared_prefix_bound(self, token_ids: Sequence[int], chain: HashChain) -> int:
        """A lower bound on how many leading tokens some cached prefix shares: the deepest
        known page, plus one if a cached prefix also continues with the prompt's next token.
        (A prompt may run past max_tokens here, e.g. a re-sent prompt whose only unit is the
        whole prompt.)"""
        pages = chain.num_pages
        while pages and not (chain.value(pages) in self._known_pages or self._live.has_anchor(chain.value(pages))):
            pages -= 1
        shared = pages * self.hash_page
        if shared < len(token_ids):
            anchor, following = chain.value(pages), token_ids[shared]
            if (anchor, following) in self._continuations or any(
                key.tail[:1] == (following,) for key, _ in self._live.at_anchor(anchor)
            ):
                shared += 1
        return shared

    # ---- membership -------------------------------------------------------------------------

    def insert(
        self, checkpoint: Checkpoint, chain: HashChain, now: float, token_ids: Sequence[int] | None = None
    ) -> None:
        """Make a checkpoint visible to lookups; `chain` must cover its anchor pages. With the
        history's `token_ids`, the live shorter checkpoints it extends become superseded and
        the token after U counts as its first continuation."""
        key = checkpoint.key
        if key in self._lru:
            raise ValueError("a checkpoint with this key already exists")
        checkpoint.last_used = now
        if token_ids is not None:
            checkpoint.extends = [c for k, c in self._live.matches(token_ids, chain, key.num_tokens - 1)]
            for ancestor in checkpoint.extends:
                ancestor.num_extensions += 1
            if key.num_tokens < len(token_ids):
                checkpoint.note_continuation(token_ids[key.num_tokens])
        self._lru[key] = checkpoint
        self._live.add(key, checkpoint)
        self._forget_evicted(key)
        self._note_pages(chain, key.num_tokens // self.hash_page)

    def touch(self, checkpoint: Checkpoint, now: float, continuation: int | None = None) -> None:
        """Mark a checkpoint as just used (moves it to the back of the LRU order); the hitting
        prompt's token after U is one more continuation."""
        checkpoint.last_used = now
        checkpoint.note_continuation(continuation)
        self._lru.move_to_end(checkpoint.key)

    def remove(self, checkpoint: Checkpoint, evicted: bool, short_pool: str = "reset") -> None:
        """Drop a checkpoint from the index. An eviction is counted under the pool that ran
        short (or "reset") and the checkpoint's kind, and its key is remembered."""
        key = checkpoint.key
        if evicted:
            counter = (short_pool, checkpoint.kind.value)
            self.evictions[counter] = self.evictions.get(counter, 0) + 1
            self._remember_evicted(key)
        del self._lru[key]
        self._live.discard(key)
        for ancestor in checkpoint.extends:
            if self._lru.get(ancestor.key) is ancestor:
                ancestor.num_extensions -= 1
        checkpoint.extends = []

    # ---- lower tiers --------------------------------------------------------------------------

    def add_offloaded(self, entry: OffloadedCheckpoint) -> None:
        """A lower tier holds this checkpoint (replaces what was known of the key)."""
        self.remove_offloaded(entry.key, evicted=False)
        self._offloaded.add(entry.key, entry)
        self._tier_totals[entry.tier][0] += 1
        self._tier_totals[entry.tier][1] += entry.nbytes
        self._forget_evicted(entry.key)

    def remove_offloaded(self, key: CheckpointKey, evicted: bool = True) -> None:
        """The lower tier lost this checkpoint; an eviction is remembered for miss reasons."""
        entry = self._offloaded.get(key)
        if entry is None:
            return
        self._offloaded.discard(key)
        self._tier_totals[entry.tier][0] -= 1
        self._tier_totals[entry.tier][1] -= entry.nbytes
        if evicted and key not in self._lru:
            self._remember_evicted(key)

    def offloaded(self) -> list[OffloadedCheckpoint]:
        return list(self._offloaded.values())

    def _remember_evicted(self, key: CheckpointKey) -> None:
        if self._max_evicted == 0:
            return
        self._evicted[key] = None
        self._evicted_index.add(key, None)
        while len(self._evicted) > self._max_evicted:
            old, _ = self._evicted.popitem(last=False)
            self._evicted_index.discard(old)

    def _forget_evicted(self, key: CheckpointKey) -> None:
        if key in self._evicted:
            del self._evicted[key]
            self._evicted_index.discard(key)

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

    def record_lookup(
        self, num_query_tokens: int, num_hit_tokens: int, misses: dict[MissReason, int], tier: str = "device"
    ) -> None:
        """Count one admitted prompt: its hit tokens (served from `tier`) and its missed
        tokens by reason (`miss_split`), so hits plus misses add up to the queried tokens."""
        if sum(misses.values()) != num_query_tokens - num_hit_tokens:
            raise ValueError("misses must add up to the query tokens that were not hits")
        self.query_tokens += num_query_tokens
        self.hit_tokens += num_hit_tokens
        self.hit_tokens_by_tier[tier] += num_hit_tokens
        for reason, tokens in misses.items():
            self.miss_tokens_by_reason[MissReason(reason).value] += tokens

    def counters(self) -> dict:
        """Token and eviction counters plus per-tier totals; cheap enough for every step."""
        return {
            "num_checkpoints": len(self._lru),
            "checkpoints_by_tier": {"device": len(self._lru), **{t: n for t, (n, _) in self._tier_totals.items()}},
            "offloaded_bytes": {tier: nbytes for tier, (_, nbytes) in self._tier_totals.items()},
            "num_evictions": self.num_evictions,
            "evictions": dict(self.evictions),
            "query_tokens": self.query_tokens,
            "hit_tokens": self.hit_tokens,
            "hit_tokens_by_tier": dict(self.hit_tokens_by_tier),
            "miss_tokens": self.query_tokens - self.hit_tokens,
            "miss_tokens_by_reason": dict(self.miss_tokens_by_reason),
        }

    def stats(self) -> dict:
        """`counters` plus the checkpoints by eviction class (walks every checkpoint)."""
        kinds = {kind.value: 0 for kind in UnitKind}
        for checkpoint in self._lru.values():
            kinds[checkpoint.kind.value] += 1
        return {**self.counters(), "checkpoints_by_kind": kinds}

    def check_integrity(self) -> None:
        """The anchor index and the LRU order name the same checkpoints; extension counts
        match the live checkpoints that extend each one."""
        indexed = list(self._live.values())
        if len(indexed) != len(self._lru) or any(self._lru.get(c.key) is not c for c in indexed):
            raise AssertionError("prefix cache: anchor index and LRU order disagree")
        for key in self._lru:
            if key in self._evicted:
                raise AssertionError("prefix cache: a live key is also marked evicted")
        extensions = {id(c): 0 for c in indexed}
        for checkpoint in indexed:
            for ancestor in checkpoint.extends:
                if id(ancestor) in extensions:
                    extensions[id(ancestor)] += 1
        if any(c.num_extensions != extensions[id(c)] for c in indexed):
            raise AssertionError("prefix cache: a checkpoint's extension count is off")
