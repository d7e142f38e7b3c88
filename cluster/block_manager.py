"""KV block bookkeeping for one replica: reference counts, an LRU free list and prefix hashing.

Pure Python. The worker owns the tensors; this owns which sequence uses which block. A block
whose tokens are all known and computed is hashed (chained with its parent's hash), so a later
request with the same prefix reuses it. Freed blocks keep their hash until they are reused.
A forked sequence (an `n` sample, a beam) shares its parent's blocks; whichever of them first
writes into a shared, partly filled block gets its own copy of it (copy-on-write).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass
from typing import NamedTuple

from kvray.cluster.sequence import Sequence


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # the block's tokens, kept to rule out hash collisions


class StoredBlock(NamedTuple):
    """A block whose hash entered the prefix cache (`kv_events.py` publishes it)."""

    block_hash: int
    parent_block_hash: int | None  # None: the first block of a prompt
    token_ids: tuple[int, ...]


class EvictedBlock(NamedTuple):
    """A block whose hash left the prefix cache: its block was handed out again."""

    block_hash: int


def prefix_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The chained hashes of the full blocks of `token_ids` that a prefix-cache hit may cover
    (not the block holding the last token: its logits are needed, so it is computed).

    NOTE: a block's hash is `hash((parent's hash, its tokens))`, as `cache_full_blocks` makes
    it, so equal hashes mean (up to a collision) equal prefixes.
    """
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - 1 - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front first). Cached blocks stay here while unused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.num_prefix_queries = 0  # prompt tokens looked up
        self.num_prefix_hits = 0  # of which served from the cache
        # NOTE: None (the default) records nothing. A list gets every hash that enters or
        # leaves `_cached`, in order, for whoever takes them (KV cache events, `kv_events.py`).
        self.cache_events: list[StoredBlock | EvictedBlock] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that its first `num_tokens` tokens have slots (and its next
        write lands in a block of its own)."""
        grow = max(0, -(-num_tokens // self.block_size) - len(seq.block_ids))
        return grow + (self._shared_write_block(seq) is not None)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Append blocks to `seq` to cover `num_tokens` tokens; returns the new block ids.
        Call `copy_on_write` first."""
        need = self.blocks_needed(seq, num_tokens)
        assert need <= len(self._free), "allocate() without can_allocate()"
        new_ids = [self._take_free() for _ in range(need)]
        seq.block_ids.extend(new_ids)
        return new_ids

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give `child` (which holds no blocks) every block of `parent`, shared."""
        assert not child.block_ids
        for block_id in parent.block_ids:
            self.blocks[block_id].ref_count += 1
        child.block_ids = list(parent.block_ids)
        child.block_hashes = list(parent.block_hashes)

    def copy_on_write(self, seq: Sequence) -> tuple[int, int, int] | None:
        """If `seq`'s next write lands in a block it shares, swap in a private block.

        Returns (index in seq.block_ids, shared block, new block) for the worker to copy, or
        None. Needs a free block (counted by `blocks_needed`).
        """
        index = self._shared_write_block(seq)
        if index is None:
            return None
        shared = self.blocks[seq.block_ids[index]]
        shared.ref_count -= 1
        new_id = self._take_free()
        seq.block_ids[index] = new_id
        return index, shared.block_id, new_id

    def _shared_write_block(self, seq: Sequence) -> int | None:
        """Index of the block `seq` writes its next token into, if it is partly filled and shared.

        NOTE: only a partly filled block can be shared and written: prefix-cached blocks are
        full, and forks share a parent's last block while it is partly filled.
        """
        index, offset = divmod(seq.num_computed_tokens, self.block_size)
        if offset == 0 or index >= len(seq.block_ids):
            return None
        return index if self.blocks[seq.block_ids[index]].ref_count > 1 else None

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq`. Idempotent."""
        # NOTE: reversed, so a sequence's tail blocks (the least shared) are evicted first.
        for block_id in reversed(seq.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_ids = []
        seq.block_hashes = []

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self._cached.get(block.hash) == block_id:
            del self._cached[block.hash]
            if self.cache_events is not None:
                self.cache_events.append(EvictedBlock(block.hash))
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    # ------------------------------------------------------------------ prefix cache

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached blocks holding the longest full-block prefix of `token_ids`.

        NOTE: the last token is never matched: its logits are needed, so it must be computed.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        matched: list[int] = []
        for i, block_hash in enumerate(prefix_hashes(token_ids, bs)):
            block_id = self._cached.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tuple(
                token_ids[i * bs : (i + 1) * bs]
            ):
                break
            matched.append(block_id)
        return matched

    def num_cached_blocks(self, hashes: list[int], *, also: Container[int] = ()) -> int:
        """How many of the leading prefix blocks `hashes` (`prefix_hashes`) are cached here, or
        in `also`; read only. By hash alone: placement's estimate, which `match_prefix`
        verifies token by token at admission."""
        if not self.enable_prefix_caching:
            return 0
        for i, block_hash in enumerate(hashes):
            if block_hash not in self._cached and block_hash not in also:
                return i
        return len(hashes)

    def num_free_after_acquiring(self, block_ids: list[int]) -> int:
        return len(self._free) - sum(1 for b in block_ids if self.blocks[b].ref_count == 0)

    def acquire_prefix(self, seq: Sequence, block_ids: list[int]) -> None:
        """Give `seq` (which holds no blocks yet) the cached prefix blocks `block_ids`."""
        assert not seq.block_ids
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            assert block.hash is not None  # only hashed (full, computed) blocks are cached
            seq.block_ids.append(block_id)
            seq.block_hashes.append(block.hash)
        self.num_prefix_queries += seq.num_prompt_tokens
        self.num_prefix_hits += len(block_ids) * self.block_size

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hash and publish `seq`'s blocks that are full of known, computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens, seq.num_known_tokens) // bs
        if num_full <= len(seq.block_hashes):
            return
        tokens = seq.all_token_ids
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), num_full):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            block_hash = hash((parent, chunk))
            seq.block_hashes.append(block_hash)
            block = self.blocks[seq.block_ids[i]]
            if block.hash is None:
                block.hash, block.token_ids = block_hash, chunk
                holder = self._cached.setdefault(block_hash, block.block_id)
                if self.cache_events is not None and holder == block.block_id:
                    self.cache_events.append(StoredBlock(block_hash, parent, chunk))
            parent = block_hash
