"""KV block bookkeeping: reference-counted blocks and automatic prefix caching.

Sequences own blocks through block tables (``models.cache``). A block that a sequence has
filled completely is registered under a key naming its content: the key of the block before
it and its own tokens, as vLLM does. A later sequence whose prompt starts with the same
tokens finds those blocks and skips their prefill. Keys compare the tokens themselves, not a
hash of them, so a match can never be a collision; a block's parent is named by a content id
that is never reused, so a key can only be reached through a chain of live blocks.

A block is shared read-only: only full blocks are registered, and a sequence only ever
writes to blocks past its cached prefix, which it owns alone. A block no sequence uses
(reference count 0) keeps its content for later hits until the pool needs it; then the least
recently released goes first.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

from ..models.cache import NULL_BLOCK


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        # Never-registered free blocks first (a stack), then registered unused blocks (LRU).
        self._free = [b for b in range(num_blocks - 1, -1, -1) if b != NULL_BLOCK]
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._key_of: dict[int, tuple] = {}
        self._content_of: dict[int, int] = {}   # block -> content id (a parent for later keys)
        self._by_key: dict[tuple, int] = {}
        self._ids = itertools.count(1)
        self.stats = {"query_tokens": 0, "hit_tokens": 0, "evicted_blocks": 0}

    # ------------------------------------------------------------------------------ counts
    @property
    def usable(self) -> int:
        return self.num_blocks - 1  # the null block is never handed out

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (unused, cached or not)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Unused blocks that still hold a registered prefix."""
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.usable - self.num_free

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------------------------ prefix hits
    def root(self, salt=None):
        """The parent of a sequence's first block. Sequences whose keys/values depend on more
        than their token ids (input embeddings) pass a salt naming that input."""
        return ("root",) if salt is None else ("salt", salt)

    def longest_prefix(self, tokens: list[int], salt=None) -> tuple[list[int], object]:
        """Cached blocks holding a prefix of ``tokens``, and the parent key for the block after
        them. At least one token is always left uncached: its logits are needed."""
        hits, parent = [], self.root(salt)
        if not self.enable_prefix_caching:
            return hits, parent
        bs = self.block_size
        for i in range((len(tokens) - 1) // bs):
            block = self._by_key.get((parent, tuple(tokens[i * bs:(i + 1) * bs])))
            if block is None:
                break
            hits.append(block)
            parent = self._content_of[block]
        return hits, parent

    def record_query(self, tokens: int, hits: int) -> None:
        self.stats["query_tokens"] += tokens
        self.stats["hit_tokens"] += hits

    def pending_key(self, tokens: list[int], first_block: int, parent) -> tuple | None:
        """The key the block ``first_block`` of ``tokens`` would get once computed (None when
        that block would not be full)."""
        bs = self.block_size
        chunk = tokens[first_block * bs:(first_block + 1) * bs]
        return (parent, tuple(chunk)) if len(chunk) == bs and first_block < (len(tokens) - 1) // bs else None

    # ------------------------------------------------------------------------------ allocation
    def available_with(self, hits: list[int]) -> int:
        """Blocks free for new allocation once ``hits`` are taken (hit blocks that are unused
        stop counting as free)."""
        return self.num_free - sum(1 for b in hits if self.ref[b] == 0)

    def take(self, blocks: list[int]) -> None:
        """Add a reference to blocks found in the cache."""
        for b in blocks:
            if self.ref[b] == 0:
                self._evictable.pop(b, None)
            self.ref[b] += 1

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self.stats["evicted_blocks"] += 1
        else:
            raise RuntimeError("no free KV cache block")
        assert self.ref[block] == 0, f"block {block} handed out while in use"
        self.ref[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; the last block of a table goes first, so a
        sequence's tail is evicted before the prefix other sequences may share."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            assert self.ref[b] >= 0, f"block {b} released more often than taken"
            if self.ref[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    # ------------------------------------------------------------------------------ registration
    def register(self, block: int, parent, tokens: list[int]) -> object:
        """Publish a full block's content; returns the parent key for the next block. When the
        same content is already cached (computed by another sequence at the same time), that
        copy stays the cached one and this block stays private."""
        if not self.enable_prefix_caching:
            return parent
        key = (parent, tuple(tokens))
        existing = self._by_key.get(key)
        if existing is not None:
            return self._content_of[existing]
        if block in self._key_of:  # already published under another key: cannot happen for a private block
            raise AssertionError(f"block {block} registered twice")
        content = next(self._ids)
        self._by_key[key], self._key_of[block], self._content_of[block] = block, key, content
        return content

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block)
        del self._by_key[key]
        del self._content_of[block]

    def is_cached(self, block: int) -> bool:
        return block in self._key_of

    def reset_prefix_cache(self) -> int:
        """Forget every published block (for instance because the weights changed): unused ones
        become plain free blocks, held ones stay with their sequences but are no longer found.
        Returns how many were forgotten."""
        n = len(self._key_of)
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self._free.append(block)
        for block in list(self._key_of):
            self._forget(block)
        return n
