"""Which cache slots and blocks each request and each prefix-cache checkpoint holds.

Pure Python (no torch). Per live request a `BlockTable` names one window slot, one state slot
(None when the model has no compressed layers) and the c4 / c128 blocks of its compressed
entries (entry w lives in block table[w // E], row w % E). Per checkpoint (engine/
prefix_cache.py) the manager holds snapshot slots, tail-block copies and shared references
to full blocks. Every unit's ref count equals its number of holders (`check_integrity`).

The manager never touches tensors: it returns `CacheCopy` operations that the model runner
performs — restores *before* the forward, snapshots *after* it.

Lifecycle of a request:
    lookup_and_admit → (ensure_capacity, checkpoint?, mark_computed)* → finish | free
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.core.block_pool import BlockPool
from engine.core.cache_layout import CSA_RATIO, HCA_RATIO, CacheLayout, CachePool
from engine.core.checkpoint_store import CheckpointStore, StoredCheckpoint, TierEvent
from engine.core.prefix_cache import (Checkpoint, CheckpointKey, HashChain, MissReason, OffloadedCheckpoint,
                                      PrefixCache)
from engine.core.request import Request

BLOCK_POOLS = (CachePool.C4, CachePool.C128)  # pools that grow with the sequence


@dataclass(frozen=True)
class CacheCopy:
    """Copy unit `src` onto unit `dst` of one pool (whole slot or whole block)."""

    pool: CachePool
    src: int
    dst: int


@dataclass(frozen=True)
class CheckpointExport:
    """Read a checkpoint's units out of device memory (run before the next forward: the units
    are already free and will be overwritten after it). `units`: pool -> ids, checkpoint order."""

    key: CheckpointKey
    units: dict[str, list[int]]


@dataclass(frozen=True)
class CheckpointImport:
    """Write a lower-tier checkpoint into a request's fresh units (before its first forward)."""

    stored: StoredCheckpoint
    units: dict[str, list[int]]


def _unit_lists(units: list[tuple[CachePool, int]]) -> dict[str, list[int]]:
    """(pool, id) pairs -> pool name -> ids, keeping their order."""
    lists: dict[str, list[int]] = {}
    for pool, unit in units:
        lists.setdefault(pool.value, []).append(unit)
    return lists


@dataclass
class BlockTable:
    """The cache units one live request writes to. Lists only grow while it runs."""

    window_slot: int
    state_slot: int | None
    c4_blocks: list[int] = field(default_factory=list)
    c128_blocks: list[int] = field(default_factory=list)

    def copy(self) -> BlockTable:
        return BlockTable(self.window_slot, self.state_slot, list(self.c4_blocks), list(self.c128_blocks))

    def blocks(self, pool: CachePool) -> list[int]:
        """The (mutable) block list of one block pool."""
        return self.c4_blocks if pool is CachePool.C4 else self.c128_blocks

    def units(self) -> list[tuple[CachePool, int]]:
        held = [(CachePool.WINDOW, self.window_slot)]
        if self.state_slot is not None:
            held.append((CachePool.STATE, self.state_slot))
        held += [(CachePool.C4, b) for b in self.c4_blocks]
        held += [(CachePool.C128, b) for b in self.c128_blocks]
        return held


@dataclass
class AdmitResult:
    """Outcome of admitting a request: its table, the restores to run before its first
    forward, and the prefix-cache verdict: the hit length, the reason for a miss (None on a
    hit), and why each query token after the hit was not served (`PrefixCache.miss_split`)."""

    block_table: BlockTable
    copies: list[CacheCopy]
    num_cached_tokens: int
    miss_reason: MissReason | None
    misses: dict[MissReason, int]
    tier: str = "device"  # where the hit's checkpoint was: device, host or disk


@dataclass(frozen=True)
class PoolUsage:
    """Units of one pool: held by live requests, held only by checkpoints, free."""

    total: int
    live: int
    cached: int
    free: int

    @property
    def usage(self) -> float:
        return (self.live + self.cached) / self.total if self.total else 0.0


@dataclass(frozen=True)
class CacheUsage:
    pools: dict[str, PoolUsage]
    used_fraction: float  # bytes held by anyone / all bytes
    live_fraction: float  # bytes held by live requests / all bytes
    checkpoint_bytes: dict[str, int]  # pool -> bytes of units only checkpoints hold

    def as_dict(self) -> dict:
        return {
            "used_fraction": self.used_fraction,
            "live_fraction": self.live_fraction,
            "checkpoint_bytes": dict(self.checkpoint_bytes),
            "pools": {
                name: {"total": p.total, "live": p.live, "cached": p.cached, "free": p.free}
                for name, p in self.pools.items()
            },
        }


class KVCacheManager:
    """Allocates, shares and frees cache units for requests and checkpoints."""

    def __init__(
        self,
        layout: CacheLayout,
        num_window_slots: int,
        num_state_slots: int,
        num_c4_blocks: int,
        num_c128_blocks: int,
        enable_prefix_cache: bool = True,
        unit_interval: int = 2048,
        hash_page: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layout = layout
        self.enable_prefix_cache = enable_prefix_cache
        self.unit_interval = unit_interval
        self.hash_page = hash_page
        self._clock = clock
        self._validate_granularity()
        requested = {
            CachePool.WINDOW: ("num_window_slots", num_window_slots),
            CachePool.STATE: ("num_state_slots", num_state_slots),
            CachePool.C4: ("num_c4_blocks", num_c4_blocks),
            CachePool.C128: ("num_c128_blocks", num_c128_blocks),
        }
        self.pools: dict[CachePool, BlockPool] = {}
        for pool, (name, count) in requested.items():
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(f"{name} must be a non-negative int, got {count!r}")
            if not layout.pool_is_used(pool):
                count = 0  # the model has no layer of this kind; the pool is never needed
            elif count == 0:
                raise ValueError(f"{name} must be >= 1 for this model, got 0")
            self.pools[pool] = BlockPool(pool.value, count)
        self._unit_bytes = {pool: layout.unit_bytes(pool) for pool in self.pools}  # usage() reads it every step
        self.prefix_cache = PrefixCache(hash_page, enabled=enable_prefix_cache)
        self._tables: dict[str, BlockTable] = {}
        # Per pool: how many live tables hold each unit, and how many units at least one does.
        # Kept as tables gain and lose units so `usage` (read every step) is O(pools), not
        # O(blocks held).
        self._live_refs: dict[CachePool, list[int]] = {pool: [0] * p.num_blocks for pool, p in self.pools.items()}
        self._num_live: dict[CachePool, int] = dict.fromkeys(CachePool, 0)
        # Block-pool geometry as plain ints for ensure_capacity's per-step fast path: tokens
        # per block (0 = the model has no layer of that kind, so the pool never grows).
        self._c4_block_tokens = layout.c4_block_tokens if layout.csa_layers else 0
        self._c128_block_tokens = layout.c128_block_tokens if layout.hca_layers else 0
        self._chains: dict[str, HashChain] = {}
        self._num_registered: dict[str, dict[CachePool, int]] = {}  # full blocks hashed so far
        # Chains of prompts whose admission failed: the head of the queue retries every step.
        self._parked_chains: dict[str, HashChain] = {}
        # Snapshots scheduled this step; invisible to lookups until their copies have run.
        self._pending: list[tuple[Checkpoint, HashChain, Request]] = []
        self._pending_keys: set[CheckpointKey] = set()
        self.load_failures: dict[str, int] = {}  # why lower-tier checkpoints could not be loaded
        # Lower tiers (host memory, disk): see attach_store.
        self.store: CheckpointStore | None = None
        self._loading: dict[str, CheckpointKey] = {}  # request id -> checkpoint read from disk for it
        self._exports: list[CheckpointExport] = []
        self._imports: dict[str, CheckpointImport] = {}  # by request id (dropped if it is freed first)

    def _validate_granularity(self) -> None:
        page = self.hash_page
        if not isinstance(page, int) or page <= 0:
            raise ValueError(f"hash_page must be a positive int, got {page!r}")
        if not isinstance(self.unit_interval, int) or self.unit_interval <= 0 or self.unit_interval % page:
            raise ValueError(
                f"unit_interval must be a positive multiple of hash_page={page}, got {self.unit_interval!r}"
            )
        for name in ("c4_block_tokens", "c128_block_tokens"):
            if getattr(self.layout, name) % page:
                raise ValueError(
                    f"layout.{name}={getattr(self.layout, name)} must be a multiple of hash_page={page}"
                )

    @classmethod
    def from_budget(
        cls,
        layout: CacheLayout,
        budget_bytes: int,
        max_num_seqs: int,
        snapshot_fraction: float = 0.25,
        enable_prefix_cache: bool = True,
        unit_interval: int = 2048,
        hash_page: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> KVCacheManager:
        """Split a byte budget across the four pools.

        Policy:
        1. Every one of `max_num_seqs` live sequences gets a window slot, a state slot and one
           c4 + one c128 block for its partially filled tail (ValueError if that alone does
           not fit).
        2. With prefix caching on, `snapshot_fraction` of the budget buys checkpoint
           snapshots: a window slot, a state slot and one tail block of each kind apiece.
        3. The rest becomes c4 and c128 blocks in the ratio of their per-token growth, so both
           pools run out at the same sequence length.
        Pools of layer kinds the model lacks get nothing.
        """
        if not isinstance(budget_bytes, (int, float)) or budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes!r}")
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an int >= 1, got {max_num_seqs!r}")
        if not 0 <= snapshot_fraction < 1:
            raise ValueError(f"snapshot_fraction must be in [0, 1), got {snapshot_fraction!r}")
        per_seq = sum(layout.unit_bytes(p) for p in CachePool if layout.pool_is_used(p))
        live_bytes = max_num_seqs * per_seq
        if budget_bytes < live_bytes:
            raise ValueError(
                f"budget_bytes={int(budget_bytes)} cannot hold max_num_seqs={max_num_seqs} live "
                f"sequences ({per_seq} bytes each, {live_bytes} total)"
            )
        num_snapshots = 0
        if enable_prefix_cache:
            num_snapshots = int(min(snapshot_fraction * budget_bytes, budget_bytes - live_bytes) // per_seq)
        rest = budget_bytes - live_bytes - num_snapshots * per_seq
        growth = layout.bytes_per_token()
        tokens = rest / growth if growth else 0.0
        slots = max_num_seqs + num_snapshots
        return cls(
            layout,
            num_window_slots=slots,
            num_state_slots=slots if layout.has_compressed_layers else 0,
            num_c4_blocks=slots + int(tokens // layout.c4_block_tokens) if layout.csa_layers else 0,
            num_c128_blocks=slots + int(tokens // layout.c128_block_tokens) if layout.hca_layers else 0,
            enable_prefix_cache=enable_prefix_cache,
            unit_interval=unit_interval,
            hash_page=hash_page,
            clock=clock,
        )

    # ---- sizes ----------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        return sum(p.num_blocks * self.layout.unit_bytes(k) for k, p in self.pools.items())

    @property
    def max_num_tokens(self) -> float:
        """Longest sequence that fits when it has the whole cache to itself."""
        return self.layout.max_tokens_for_blocks(
            self.pools[CachePool.C4].num_blocks, self.pools[CachePool.C128].num_blocks
        )

    def can_fit_alone(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_num_tokens

    def block_table(self, request_id: str) -> BlockTable:
        """A copy of a live request's table (the runner keeps its own mirror)."""
        return self.live_table(request_id).copy()

    def live_table(self, request_id: str) -> BlockTable:
        """The request's table itself, not a copy: O(1) per step where a copy is O(blocks).
        Its block lists only grow while the request stays admitted (`ensure_capacity`
        appends); a freed, preempted or readmitted request gets a new table object. Readers
        must not modify it."""
        table = self._tables.get(request_id)
        if table is None:
            raise ValueError(f"request_id {request_id!r} holds no cache")
        return table

    # ---- admission ------------------------------------------------------------------------

    def lookup_and_admit(self, request: Request) -> AdmitResult | None:
        """Give a request its live slots, resuming from the longest matching checkpoint.

        On a device hit the full blocks are shared, the tail blocks and the window/state slots
        are fresh copies (the returned restores). A longer checkpoint in a lower tier is
        imported instead: fresh units for all of it, written by the `CheckpointImport` that
        `take_transfers` hands out; if it is still being read from disk the request waits
        (None, `is_loading`). `num_computed_tokens` becomes the hit length. Returns None,
        changing nothing, when the slots cannot be found even after evicting checkpoints.
        Prefix counters are left to `record_admission`.
        """
        request_id = request.request_id
        if request_id in self._tables:
            raise ValueError(f"request_id {request_id!r} is already admitted")
        chain: HashChain | None = None
        token_ids, max_tokens = request.all_token_ids, request.num_tokens - 1
        hit, reason = None, MissReason.DISABLED
        stored, tier = None, "device"
        if self.enable_prefix_cache:
            chain = self._parked_chains.pop(request_id, None) or self.prefix_cache.new_chain(request.cache_salt)
            hit, reason = self.prefix_cache.lookup(token_ids, request.cache_salt, max_tokens, chain)
            offloaded = self.prefix_cache.lookup_offloaded(token_ids, chain, max_tokens,
                                                           hit.num_tokens if hit is not None else 0)
            if offloaded is not None:
                stored = self.store.get(offloaded.key)
                if stored is None and self.store.is_loading(offloaded.key):
                    self._parked_chains[request_id] = chain
                    self._loading[request_id] = offloaded.key
                    return None
                tier = "disk" if self._loading.pop(request_id, None) == offloaded.key else offloaded.tier
        if stored is not None:
            return self._admit_from_store(request, chain, stored, tier)
        needs = {CachePool.WINDOW: 1, CachePool.STATE: int(self._has_state)}
        if hit is not None:
            needs.update({pool: 1 for pool in hit.tail_blocks})
        if not self._make_room(needs, protect=hit):
            if chain is not None:
                self._parked_chains[request_id] = chain
            return None

        table = BlockTable(self.pools[CachePool.WINDOW].allocate(), self._allocate_state())
        copies: list[CacheCopy] = []
        if hit is not None:
            copies.append(CacheCopy(CachePool.WINDOW, hit.window_slot, table.window_slot))
            if table.state_slot is not None:
                copies.append(CacheCopy(CachePool.STATE, hit.state_slot, table.state_slot))
            for pool in BLOCK_POOLS:
                blocks = table.blocks(pool)
                for block in hit.full_blocks.get(pool, ()):
                    self.pools[pool].incref(block)
                    blocks.append(block)
                if pool in hit.tail_blocks:
                    blocks.append(self.pools[pool].allocate())
                    copies.append(CacheCopy(pool, hit.tail_blocks[pool], blocks[-1]))
            self.prefix_cache.touch(hit, self._clock(), token_ids[hit.num_tokens])
        return self._admitted(request, table, chain, copies, hit.num_tokens if hit is not None else 0, reason, tier)

    def _admit_from_store(self, request: Request, chain: HashChain, stored: StoredCheckpoint,
                          tier: str) -> AdmitResult | None:
        """Fresh units for a lower-tier checkpoint's whole prefix; its data is imported into them."""
        num_tokens = stored.key.num_tokens
        split = self.layout.block_split(num_tokens)
        needs = {CachePool.WINDOW: 1, CachePool.STATE: int(self._has_state)}
        needs.update({pool: split[pool].num_blocks for pool in BLOCK_POOLS})
        if stored.units != {pool.value: n for pool, n in needs.items() if n}:
            # Not this layout's unit counts (same fingerprint, so a damaged record): a miss.
            self._drop_offloaded(stored.key, "corrupt")
            self._parked_chains[request.request_id] = chain
            return self.lookup_and_admit(request)
        if not self._make_room(needs):
            self._parked_chains[request.request_id] = chain
            return None
        table = BlockTable(self.pools[CachePool.WINDOW].allocate(), self._allocate_state())
        for pool in BLOCK_POOLS:
            table.blocks(pool).extend(self.pools[pool].allocate() for _ in range(split[pool].num_blocks))
        self._imports[request.request_id] = CheckpointImport(stored, _unit_lists(table.units()))
        return self._admitted(request, table, chain, [], num_tokens, None, tier)

    def _admitted(self, request: Request, table: BlockTable, chain: HashChain | None, copies: list[CacheCopy],
                  num_hit: int, reason: MissReason | None, tier: str) -> AdmitResult:
        request.num_computed_tokens = num_hit
        self._tables[request.request_id] = table
        self._count_live(table.units(), 1)
        if chain is None:
            misses = {MissReason.DISABLED: request.num_tokens}
        else:
            misses = self.prefix_cache.miss_split(request.all_token_ids, chain, num_hit, request.num_tokens - 1,
                                                  request.num_tokens)
            self._chains[request.request_id] = chain
            self._num_registered[request.request_id] = dict.fromkeys(BLOCK_POOLS, 0)
            self.mark_computed(request)
        return AdmitResult(table.copy(), copies, num_hit, reason, misses, tier)

    def has_pending_loads(self) -> bool:
        return any(self.store.is_loading(key) for key in self._loading.values()) if self.store else False

    def is_loading(self, request: Request) -> bool:
        """The request waits for its checkpoint to be read from disk (retry it later)."""
        key = self._loading.get(request.request_id)
        return key is not None and self.store is not None and self.store.is_loading(key)

    def record_admission(self, request: Request, result: AdmitResult) -> None:
        """Count an admission in the prefix-cache token counters."""
        self.prefix_cache.record_lookup(request.num_tokens, result.num_cached_tokens, result.misses, result.tier)

    def ensure_capacity(self, request: Request, num_new_tokens: int) -> bool:
        """Give the request blocks for every compressed entry completed by its next
        `num_new_tokens` tokens ((start+n)//4 c4 entries, (start+n)//128 c128 entries).
        Evicts checkpoints if needed; returns False, allocating nothing, if still short."""
        if num_new_tokens.__class__ is not int or num_new_tokens < 0:
            if not isinstance(num_new_tokens, int) or isinstance(num_new_tokens, bool) or num_new_tokens < 0:
                raise ValueError(f"num_new_tokens must be a non-negative int, got {num_new_tokens!r}")
        table = self._tables.get(request.request_id)
        if table is None:
            raise ValueError(f"request {request.request_id!r} is not admitted")
        c4_need, c128_need = self._blocks_missing(table, request.num_computed_tokens + num_new_tokens)
        if c4_need <= 0 and c128_need <= 0:
            return True
        needs = {CachePool.C4: max(0, c4_need), CachePool.C128: max(0, c128_need)}
        if not self._make_room(needs):
            return False
        for pool, num_missing in needs.items():
            new = [self.pools[pool].allocate() for _ in range(num_missing)]
            table.blocks(pool).extend(new)
            self._count_live([(pool, block) for block in new], 1)
        return True

    def tables_with_room(self, requests, num_new_tokens: int) -> list[BlockTable | None]:
        """Per request, its live table if it already holds the blocks for ``num_new_tokens`` more
        tokens (``ensure_capacity`` would allocate nothing), else None. Allocates nothing: the
        scheduler's decode fast path, one call for every running sequence of a step."""
        get, missing, tables = self._tables.get, self._blocks_missing, []
        for request in requests:
            table = get(request.request_id)
            if table is not None:
                c4_need, c128_need = missing(table, request.num_computed_tokens + num_new_tokens)
                if c4_need > 0 or c128_need > 0:
                    table = None
            tables.append(table)
        return tables

    def _blocks_missing(self, table: BlockTable, end: int) -> tuple[int, int]:
        """(c4, c128) blocks ``table`` lacks for the entries of its first ``end`` tokens (<= 0:
        none). O(1): a block of T tokens holds T // ratio entries, so the entries of n tokens fill
        ceil(n // ratio / (T // ratio)) = ceil((n - n % ratio) / T) blocks; most steps cross no
        block boundary and touch no pool."""
        c4_tokens, c128_tokens = self._c4_block_tokens, self._c128_block_tokens
        c4_need = -(-(end - end % CSA_RATIO) // c4_tokens) - len(table.c4_blocks) if c4_tokens else 0
        c128_need = -(-(end - end % HCA_RATIO) // c128_tokens) - len(table.c128_blocks) if c128_tokens else 0
        return c4_need, c128_need

    # ---- checkpoints ----------------------------------------------------------------------

    def checkpoint(self, request: Request, num_tokens: int) -> list[CacheCopy]:
        """Plan a checkpoint at `num_tokens`, the position the request's scheduled chunk
        reaches. Returns the snapshot copies to run AFTER that forward; the checkpoint becomes
        visible at `commit_checkpoints`. Returns [] when caching is off, the key exists, or no
        room can be made (a checkpoint never displaces live requests)."""
        if not self.enable_prefix_cache:
            return []
        table = self._table(request)
        if not isinstance(num_tokens, int) or not 0 < num_tokens <= request.num_tokens:
            raise ValueError(f"num_tokens must be in [1, {request.num_tokens}], got {num_tokens!r}")
        split = self.layout.block_split(num_tokens)
        if any(len(table.blocks(pool)) < split[pool].num_blocks for pool in BLOCK_POOLS):
            raise ValueError(f"request {request.request_id!r} has no blocks for {num_tokens} tokens; "
                             "call ensure_capacity first")
        chain = self._chain_upto(request, num_tokens)
        key = self._key_for(request, chain, num_tokens)
        if key in self.prefix_cache or key in self._pending_keys:
            return []
        needs = {CachePool.WINDOW: 1, CachePool.STATE: int(self._has_state)}
        needs.update({pool: int(split[pool].has_tail) for pool in BLOCK_POOLS})
        if not self._make_room(needs):
            return []

        checkpoint = Checkpoint(key, self.pools[CachePool.WINDOW].allocate(), self._allocate_state())
        copies = [CacheCopy(CachePool.WINDOW, table.window_slot, checkpoint.window_slot)]
        if checkpoint.state_slot is not None:
            copies.append(CacheCopy(CachePool.STATE, table.state_slot, checkpoint.state_slot))
        for pool in BLOCK_POOLS:
            blocks, num_full = table.blocks(pool), split[pool].num_full
            checkpoint.full_blocks[pool] = self._share_full_blocks(pool, blocks, num_full, chain)
            if split[pool].has_tail:
                checkpoint.tail_blocks[pool] = self.pools[pool].allocate()
                copies.append(CacheCopy(pool, blocks[num_full], checkpoint.tail_blocks[pool]))
        self._pending.append((checkpoint, chain, request))
        self._pending_keys.add(key)
        return copies

    def commit_checkpoints(self) -> None:
        """The step's snapshot copies have run: make its checkpoints visible to lookups."""
        now = self._clock()
        for checkpoint, chain, request in self._pending:
            self.prefix_cache.insert(checkpoint, chain, now, request.all_token_ids)
        self._pending.clear()
        self._pending_keys.clear()

    def discard_pending_checkpoints(self) -> None:
        """Drop checkpoints whose snapshot copies never ran (a step that was not completed)."""
        for checkpoint, _, _ in self._pending:
            self._release(checkpoint.held_units())
        self._pending.clear()
        self._pending_keys.clear()

    def mark_computed(self, request: Request) -> None:
        """Register the request's newly completed full blocks under their content hash."""
        request_id = request.request_id
        if not self.enable_prefix_cache or request_id not in self._tables:
            return
        table = self._tables[request_id]
        done = self._num_registered[request_id]
        # Fast path, O(1): no block became full since the last call (most decode steps).
        computed = request.num_computed_tokens
        if (not self._c4_block_tokens or computed // self._c4_block_tokens <= done[CachePool.C4]) and (
                not self._c128_block_tokens or computed // self._c128_block_tokens <= done[CachePool.C128]):
            return
        chain = self._chain_upto(request, computed)
        split = self.layout.block_split(computed)
        for pool in BLOCK_POOLS:
            num_full = split[pool].num_full
            for index in range(done[pool], num_full):
                self.pools[pool].register(self._block_key(pool, index, chain), table.blocks(pool)[index])
            done[pool] = max(done[pool], num_full)

    def evict_all_checkpoints(self) -> int:
        """Evict every committed checkpoint; returns how many."""
        checkpoints = self.prefix_cache.checkpoints()
        for checkpoint in checkpoints:
            self._evict(checkpoint)
        return len(checkpoints)

    # ---- leaving ------------------------------------------------------------------------------

    def finish(self, request: Request, cache_output: bool) -> None:
        """Normal end of a request. With `cache_output` (and caching on) its live units become
        an end-of-output checkpoint at num_computed_tokens — a transfer, no copy; blocks past
        that point are freed. Otherwise, or if that checkpoint exists already, everything is
        freed."""
        request_id = request.request_id
        table = self._tables.get(request_id)
        num_tokens = request.num_computed_tokens
        if table is None or not cache_output or not self.enable_prefix_cache or num_tokens <= 0:
            self.free(request)
            return
        split = self.layout.block_split(num_tokens)
        if any(len(table.blocks(pool)) < split[pool].num_blocks for pool in BLOCK_POOLS):
            self.free(request)
            return
        chain = self._chain_upto(request, num_tokens)
        key = self._key_for(request, chain, num_tokens)
        if key in self.prefix_cache or key in self._pending_keys:
            self.free(request)
            return
        checkpoint = Checkpoint(key, table.window_slot, table.state_slot)
        for pool in BLOCK_POOLS:
            blocks, num_full = table.blocks(pool), split[pool].num_full
            checkpoint.full_blocks[pool] = blocks[:num_full]
            if split[pool].has_tail:
                checkpoint.tail_blocks[pool] = blocks[num_full]
            self._release([(pool, block) for block in blocks[split[pool].num_blocks:]])
        self._forget(request_id)
        self.prefix_cache.insert(checkpoint, chain, self._clock(), request.all_token_ids)

    def free(self, request: Request) -> None:
        """Release everything the request holds (abort, preemption, error). Idempotent."""
        table = self._tables.get(request.request_id)
        self._forget(request.request_id)
        if table is not None:
            self._release(table.units())

    # ---- lower tiers ----------------------------------------------------------------------------

    def attach_store(self, store: CheckpointStore) -> None:
        """Spill evicted checkpoints to `store` and resume from what it holds; indexes what
        its directory already has (a restart)."""
        if not self.enable_prefix_cache:
            raise ValueError("checkpoint tiers need prefix caching on")
        self.store = store
        events, skipped = store.scan()
        self._apply(events)
        for reason, count in skipped.items():
            self.load_failures[reason] = self.load_failures.get(reason, 0) + count

    def poll_tiers(self) -> None:
        """Take in what the store's I/O thread finished (call before `schedule`)."""
        if self.store is not None:
            self._apply(self.store.poll())

    def take_transfers(self) -> tuple[list[CheckpointExport], list[CheckpointImport]]:
        """The exports and imports planned since the last call; the runner side must run every
        export, then every import, before the step's forward, and hand exports back to
        `store_export`."""
        exports, imports = self._exports, list(self._imports.values())
        self._exports, self._imports = [], {}
        return exports, imports

    def store_export(self, export: CheckpointExport, payload: bytes) -> None:
        """An exported checkpoint's bytes go to the lower tiers."""
        units = {pool: len(ids) for pool, ids in export.units.items()}
        self._apply(self.store.put(StoredCheckpoint(export.key, units, payload)))

    def checkpoints_to_keep(self) -> list[CheckpointExport]:
        """Exports of every device checkpoint, to keep across a restart (shutdown)."""
        return [CheckpointExport(c.key, _unit_lists(c.held_units())) for c in self.prefix_cache.checkpoints()
                if self._worth_spilling(c)]

    def _worth_spilling(self, checkpoint: Checkpoint) -> bool:
        """Every unit goes down a tier (superseded ones too: an end-of-prompt unit serves a
        regenerated reply). Each payload holds its whole prefix; the tiers' size bounds and
        LRU order limit what that duplication costs."""
        return self.store is not None

    def _apply(self, events: list[TierEvent]) -> None:
        for event in events:
            if event.kind in ("host", "disk"):
                self.prefix_cache.add_offloaded(OffloadedCheckpoint(event.key, event.kind, event.nbytes))
            elif event.kind == "failed":
                self._drop_offloaded(event.key, event.reason)
            else:
                self.prefix_cache.remove_offloaded(event.key)

    def _drop_offloaded(self, key: CheckpointKey, reason: str) -> None:
        self.load_failures[reason] = self.load_failures.get(reason, 0) + 1
        self.prefix_cache.remove_offloaded(key)

    # ---- reporting ----------------------------------------------------------------------------

    def tier_load_failures(self) -> dict[str, int]:
        return dict(self.load_failures)

    def usage(self) -> CacheUsage:
        """O(pools): the live counts are kept as tables change (`_count_live`)."""
        pools, used_bytes, live_bytes, total_bytes, checkpoint_bytes = {}, 0, 0, 0, {}
        for kind, pool in self.pools.items():
            num_live = self._num_live[kind]
            pools[kind.value] = PoolUsage(pool.num_blocks, num_live, pool.num_used - num_live, pool.num_free)
            unit = self._unit_bytes[kind]
            checkpoint_bytes[kind.value] = (pool.num_used - num_live) * unit
            used_bytes += pool.num_used * unit
            live_bytes += num_live * unit
            total_bytes += pool.num_blocks * unit
        return CacheUsage(
            pools,
            used_bytes / total_bytes if total_bytes else 0.0,
            live_bytes / total_bytes if total_bytes else 0.0,
            checkpoint_bytes,
        )

    def check_integrity(self) -> None:
        """Every unit's ref count equals its number of holders (tables + checkpoints)."""
        expected: dict[CachePool, Counter] = {pool: Counter() for pool in CachePool}
        holders = [table.units() for table in self._tables.values()]
        holders += [c.held_units() for c in self.prefix_cache.checkpoints()]
        holders += [c.held_units() for c, _, _ in self._pending]
        for units in holders:
            for pool, unit in units:
                expected[pool][unit] += 1
        live: dict[CachePool, Counter] = {pool: Counter() for pool in CachePool}
        for table in self._tables.values():
            for pool, unit in table.units():
                live[pool][unit] += 1
        for kind, pool in self.pools.items():
            pool.check_integrity()
            if self._num_live[kind] != len(live[kind]) or any(
                    self._live_refs[kind][u] != live[kind][u] for u in range(pool.num_blocks)):
                raise AssertionError(f"pool {kind.value!r}: live-unit counts out of step with the tables")
            for unit in range(pool.num_blocks):
                if pool.ref_count(unit) != expected[kind][unit]:
                    raise AssertionError(
                        f"pool {kind.value!r}: unit {unit} has ref count {pool.ref_count(unit)} "
                        f"but {expected[kind][unit]} holders"
                    )
        self.prefix_cache.check_integrity()

    # ---- internals ----------------------------------------------------------------------------

    @property
    def _has_state(self) -> bool:
        return self.layout.has_compressed_layers

    def _allocate_state(self) -> int | None:
        return self.pools[CachePool.STATE].allocate() if self._has_state else None

    def _table(self, request: Request) -> BlockTable:
        table = self._tables.get(request.request_id)
        if table is None:
            raise ValueError(f"request {request.request_id!r} is not admitted")
        return table

    def _forget(self, request_id: str) -> None:
        table = self._tables.pop(request_id, None)
        if table is not None:
            self._count_live(table.units(), -1)
        self._chains.pop(request_id, None)
        self._num_registered.pop(request_id, None)
        self._parked_chains.pop(request_id, None)
        self._loading.pop(request_id, None)
        self._imports.pop(request_id, None)

    def _count_live(self, units: list[tuple[CachePool, int]], delta: int) -> None:
        """A live table gained (+1) or lost (-1) these units."""
        for pool, unit in units:
            refs = self._live_refs[pool]
            before = refs[unit]
            refs[unit] = before + delta
            if before == 0 or before + delta == 0:
                self._num_live[pool] += delta

    def _release(self, units: list[tuple[CachePool, int]]) -> None:
        for pool, unit in units:
            self.pools[pool].decref(unit)

    def _chain_upto(self, request: Request, num_tokens: int) -> HashChain:
        """The request's hash chain, extended to cover num_tokens // hash_page pages."""
        chain = self._chains[request.request_id]
        target = num_tokens // self.hash_page
        if target > chain.num_pages:
            chain.extend(request.token_ids_slice(chain.num_pages * self.hash_page, target * self.hash_page))
        return chain

    def _key_for(self, request: Request, chain: HashChain, num_tokens: int) -> CheckpointKey:
        anchor = num_tokens // self.hash_page * self.hash_page
        return self.prefix_cache.make_key(chain, num_tokens, request.token_ids_slice(anchor, num_tokens))

    def _block_key(self, pool: CachePool, index: int, chain: HashChain) -> bytes:
        """Content name of full block `index`: the chain value at the block's last token."""
        block_tokens = self.layout.c4_block_tokens if pool is CachePool.C4 else self.layout.c128_block_tokens
        return chain.value((index + 1) * block_tokens // self.hash_page)

    def _share_full_blocks(
        self, pool: CachePool, blocks: list[int], num_full: int, chain: HashChain
    ) -> list[int]:
        """Take a reference to each full block, preferring the copy already registered under
        the same content hash (so identical prefixes computed twice are kept once)."""
        shared = []
        for index in range(num_full):
            registered = self.pools[pool].cached_block(self._block_key(pool, index, chain))
            block = blocks[index] if registered is None else registered
            self.pools[pool].incref(block)
            shared.append(block)
        return shared

    def _make_room(self, needs: dict[CachePool, int], protect: Checkpoint | None = None) -> bool:
        """Evict checkpoints (in `PrefixCache.eviction_order`) until every pool has
        `needs[pool]` free units.

        Only units held by checkpoints alone can be reclaimable; if they are too few, nothing is
        evicted. First pass: checkpoints that free a unit of a short pool by themselves.
        Second pass: holders of units that several checkpoints share (none frees them alone).
        Checkpoints that hold nothing reclaimable in a short pool are never evicted here.
        """
        missing = self._short_pools(needs)
        if not missing:
            return True
        candidates = [c for c in self.prefix_cache.eviction_order() if c is not protect]
        reclaimable = self._reclaimable_units(candidates, needs, missing)
        if reclaimable is None:
            return False
        for targeted in (True, False):
            for checkpoint in candidates:
                if not missing:
                    return True
                if checkpoint.key not in self.prefix_cache:
                    continue  # evicted in the first pass
                units = [(p, u) for p, u in checkpoint.held_units() if p in missing]
                if targeted:
                    helping = [p for p, u in units if self.pools[p].ref_count(u) == 1]
                else:
                    helping = [p for p, u in units if (p, u) in reclaimable]
                if helping:
                    self._evict(checkpoint, short_pool=min(helping, key=list(CachePool).index).value)
                    missing = self._short_pools(needs)
        return not missing

    def _short_pools(self, needs: dict[CachePool, int]) -> set[CachePool]:
        return {pool for pool, n in needs.items() if n > self.pools[pool].num_free}

    def _reclaimable_units(
        self, candidates: list[Checkpoint], needs: dict[CachePool, int], missing: set[CachePool]
    ) -> set[tuple[CachePool, int]] | None:
        """Units of short pools held by checkpoints only, or None if evicting every candidate
        would still leave a pool short. Cheap path: stop scanning (LRU first) once the units
        that single checkpoints hold alone are enough — the first pass will free exactly those."""
        def enough(found: Counter) -> bool:
            return all(self.pools[p].num_free + found[p] >= needs[p] for p in missing)

        solo: Counter = Counter()
        for checkpoint in candidates:
            for pool, unit in checkpoint.held_units():
                if pool in missing and self.pools[pool].ref_count(unit) == 1:
                    solo[pool] += 1
            if enough(solo):
                return set()
        holders = Counter(
            (pool, unit) for c in candidates for pool, unit in c.held_units() if pool in missing
        )
        shared = {key for key, n in holders.items() if self.pools[key[0]].ref_count(key[1]) == n}
        return shared if enough(Counter(pool for pool, _ in shared)) else None

    def _evict(self, checkpoint: Checkpoint, short_pool: str = "reset") -> None:
        if self._worth_spilling(checkpoint):
            self._exports.append(CheckpointExport(checkpoint.key, _unit_lists(checkpoint.held_units())))
        self.prefix_cache.remove(checkpoint, evicted=True, short_pool=short_pool)
        self._release(checkpoint.held_units())
