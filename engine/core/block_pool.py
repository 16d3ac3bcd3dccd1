"""A pool of fixed-size cache units (slots or blocks) with reference counts.

Pure Python (no torch). One class serves all four pools (window slots, state slots, c4 and
c128 blocks); a unit is just an integer id into the runner's tensor for that pool. A unit is
held by live block tables and by prefix-cache checkpoints; it returns to the free list when
the last holder lets go. Full compressed blocks can be registered under a content hash while
they are held, so checkpoints of different requests share one copy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable


class NoFreeBlocks(RuntimeError):
    """Raised by `allocate` when the pool is exhausted."""


class BlockPool:
    """Free list in FIFO order (longest-free unit is reused first) plus ref counts."""

    def __init__(self, name: str, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 0:
            raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
        self.name = name
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._hash_to_block: dict[Hashable, int] = {}
        self._block_to_hash: dict[int, Hashable] = {}

    def __repr__(self) -> str:
        return f"BlockPool({self.name!r}, used={self.num_used}/{self.num_blocks})"

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of units in use, 0..1 (0 for an empty pool)."""
        return self.num_used / self.num_blocks if self.num_blocks else 0.0

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def allocate(self) -> int:
        """Take the unit that has been free the longest; its ref count becomes 1."""
        if not self._free:
            raise NoFreeBlocks(f"pool {self.name!r} has no free blocks ({self.num_blocks} total)")
        block_id = self._free.popleft()
        self._ref_counts[block_id] = 1
        return block_id

    def incref(self, block_id: int) -> None:
        """Add a holder to a unit that is already in use."""
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"pool {self.name!r}: incref of free block {block_id}")
        self._ref_counts[block_id] += 1

    def decref(self, block_id: int) -> bool:
        """Drop one holder; returns True when this freed the unit (and its hash entry)."""
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"pool {self.name!r}: decref of free block {block_id}")
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id]:
            return False
        key = self._block_to_hash.pop(block_id, None)
        if key is not None:
            del self._hash_to_block[key]
        self._free.append(block_id)
        return True

    # ---- content hashes of full blocks ----------------------------------------------------

    def register(self, key: Hashable, block_id: int) -> int:
        """Record that `block_id` holds the content named `key`; returns the block registered
        under `key` (an earlier one wins, so tables stay append-only and nothing moves)."""
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"pool {self.name!r}: cannot register free block {block_id}")
        existing = self._hash_to_block.get(key)
        if existing is not None:
            return existing
        if block_id in self._block_to_hash:
            return block_id  # already registered under another key; keep the first name
        self._hash_to_block[key] = block_id
        self._block_to_hash[block_id] = key
        return block_id

    def cached_block(self, key: Hashable) -> int | None:
        """The in-use block registered under `key`, if any."""
        return self._hash_to_block.get(key)

    # ---- invariants ---------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Free list and ref counts agree; raises AssertionError describing the first problem."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError(f"pool {self.name!r}: a block appears twice in the free list")
        for block_id, count in enumerate(self._ref_counts):
            if count < 0:
                raise AssertionError(f"pool {self.name!r}: block {block_id} ref count {count}")
            if (count == 0) != (block_id in free):
                raise AssertionError(
                    f"pool {self.name!r}: block {block_id} has ref count {count} but "
                    f"{'is' if block_id in free else 'is not'} on the free list"
                )
        for key, block_id in self._hash_to_block.items():
            if self._block_to_hash.get(block_id) != key or self._ref_counts[block_id] == 0:
                raise AssertionError(f"pool {self.name!r}: stale hash entry for block {block_id}")
        if len(self._block_to_hash) != len(self._hash_to_block):
            raise AssertionError(f"pool {self.name!r}: hash maps out of sync")

    def _check_id(self, block_id: int) -> None:
        if not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
            raise ValueError(
                f"pool {self.name!r}: block_id must be in [0, {self.num_blocks}), got {block_id!r}"
            )
