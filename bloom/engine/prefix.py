"""The prefix cache: prompt keys and values kept in blocks across sequences, so that prompts sharing a
beginning (a few-shot template, a system prompt) compute it once.

A block is `block` prompt tokens at positions i·block .. (i+1)·block - 1, keyed by a chain hash: the hash
of (the previous block's key, this block's tokens). A key therefore stands for the whole prefix up to and
including its block, and a prompt's cached beginning is found by walking its blocks from the first until
one is missing. Each entry also keeps its parent's key and its tokens, which a lookup compares, so a hash
collision is a miss, never a wrong reuse.

Keys and values of a block depend only on the tokens up to its end (causal attention, ALiBi positions
counted from 0), so a new sequence whose prompt starts with cached blocks copies them into its slot
(`SlotKVCache`: contiguous per slot, so copying is the simple path) and prefills only the rest. The last
prompt token is always computed: its logits give the first new token.

The pool of each layer is laid out like one long slot, (H, num_blocks · block, D), and free blocks are
handed out lowest first, so a prefix inserted in one go sits in consecutive blocks: copies go run by
run, one copy_ per run of consecutive blocks and layer tensor (a 400-token prefix is usually one run:
8 copies for 4 layers instead of 200 block copies, which cost ~5 ms per sequence on a loaded 2-core
machine, mostly Python and dispatch, and made a burst of cached-prefix requests wait for one long step).
A gather of scattered blocks in one op would run on OpenMP threads, and on a shared 2-core machine with
more runnable threads than cores it took 15x the CPU time and 7x the wall time of small copies.

Memory: a pool of `max_tokens // block` blocks per layer, allocated once (2 · n_layer · max_tokens ·
hidden_size · dtype bytes). When it is full, the least recently used block makes room; a lookup touches
a prompt's blocks deepest first, so a prefix's later blocks are evicted before its earlier ones. Blocks
are copied out within the step that admits a sequence, so no sequence ever depends on a block later.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .cache import SlotKVCache, lazy_zeros

DEFAULT_BLOCK = 16  # tokens per block: small enough that a prefix ending mid-block loses little
ROOT = 0  # the "previous key" of a prompt's first block


@dataclass(frozen=True)
class _Entry:
    parent: int  # the previous block's key (ROOT for the first)
    tokens: tuple[int, ...]
    index: int  # its place in the pool


def root_key(adapter: str | None) -> int:
    """The "previous key" of a prompt's first block: one chain per adapter, since an adapter changes the
    keys and values of every prompt token (the base model's chain starts at ROOT)."""
    return ROOT if adapter is None else hash(("adapter", adapter))


def chain_keys(prompt_ids: list[int], n_blocks: int, block: int, root: int = ROOT) -> list[tuple[int, int, tuple[int, ...]]]:
    """(key, parent key, tokens) of the prompt's first n_blocks full blocks, in order, the first one's
    parent being `root` (see root_key)."""
    out, parent = [], root
    for i in range(n_blocks):
        tokens = tuple(prompt_ids[i * block : (i + 1) * block])
        key = hash((parent, tokens))
        out.append((key, parent, tokens))
        parent = key
    return out


class PrefixCache:
    """Full prompt blocks of keys and values, shared by every sequence of one engine, within a budget.

    cache: the engine's slot cache (blocks come from and go to its slots, on each layer's device);
    max_tokens: the budget in tokens, whole blocks of `block` tokens (at least one block)."""

    def __init__(self, cache: SlotKVCache, max_tokens: int, block: int = DEFAULT_BLOCK):
        if block < 1 or max_tokens < block:
            raise ValueError(f"prefix_cache_tokens ({max_tokens}) must hold at least one block of {block} tokens")
        self.cache, self.block = cache, block
        self.num_blocks = max_tokens // block
        # (H, num_blocks * block, D) per layer: blocks end to end, like one long slot
        self.keys = [lazy_zeros((k.shape[1], self.num_blocks * block, k.shape[3]), k.dtype, k.device)
                     for k in cache.keys]
        self.values = [lazy_zeros(k.shape, k.dtype, k.device) for k in self.keys]
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._free = list(range(self.num_blocks))[::-1]  # pop() gives the lowest: new blocks in a row

    @property
    def blocks_held(self) -> int:
        return len(self._entries)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers (keys and values)."""
        return sum(t.numel() // self.num_blocks * t.element_size() for t in self.keys + self.values)

    @property
    def nbytes(self) -> int:
        """Bytes of the pool (allocated once, whether blocks are held or not)."""
        return self.num_blocks * self.block_bytes

    def match(self, prompt_ids: list[int], root: int = ROOT) -> int:
        """Prompt tokens that cached blocks could give (a multiple of `block`, below len(prompt_ids)).
        Changes nothing: the scheduler asks this."""
        return len(self._matched(prompt_ids, root)) * self.block

    def _matched(self, prompt_ids: list[int], root: int) -> list[_Entry]:
        found = []
        for key, parent, tokens in chain_keys(prompt_ids, (len(prompt_ids) - 1) // self.block, self.block, root):
            entry = self._entries.get(key)
            if entry is None or entry.parent != parent or entry.tokens != tokens:
                break
            found.append(entry)
        return found

    def reuse(self, slot: int, prompt_ids: list[int], n_tokens: int, root: int = ROOT) -> None:
        """Copy the cached keys and values of the prompt's first n_tokens (from `match`) into the slot's
        positions 0 .. n_tokens - 1, and mark those blocks used."""
        found = self._matched(prompt_ids, root)[: n_tokens // self.block]
        if len(found) * self.block != n_tokens:
            raise RuntimeError(f"the prefix cache holds {len(found) * self.block} of the {n_tokens} tokens planned")
        for key, _, _ in reversed(chain_keys(prompt_ids, len(found), self.block, root)):
            self._entries.move_to_end(key)  # deepest first: the first block ends up most recently used
        self._copy([(entry.index, i) for i, entry in enumerate(found)], slot, to_slot=True)

    def insert(self, slot: int, prompt_ids: list[int], start: int, end: int, root: int = ROOT) -> None:
        """Keep the full prompt blocks that the slot's tokens start .. end - 1 completed (just computed),
        evicting the least recently used blocks for room. A block already held is only marked used."""
        end = min(end, len(prompt_ids))
        chain = chain_keys(prompt_ids, end // self.block, self.block, root)
        own = {key for key, _, _ in chain}
        new = []  # (pool index, block number)
        for i in range(start // self.block, len(chain)):
            key, parent, tokens = chain[i]
            if key in self._entries:
                continue
            if not self._free:
                victim = next(iter(self._entries))
                if victim in own:  # the pool is smaller than this prompt: keep its earlier blocks
                    break
                self._free.append(self._entries.pop(victim).index)
            index = self._free.pop()
            self._entries[key] = _Entry(parent, tokens, index)
            new.append((index, i))
        for key, _, _ in reversed(chain):
            if key in self._entries:
                self._entries.move_to_end(key)
        self._copy(new, slot, to_slot=False)

    def _copy(self, blocks: list[tuple[int, int]], slot: int, to_slot: bool) -> None:
        """Copy blocks between the pool and a slot: (pool index, block number in the slot) pairs, in
        block order; a run that is consecutive in both goes as one copy_ per layer tensor."""
        runs: list[list[int]] = []  # [pool index, block number, blocks]
        for index, i in blocks:
            if runs and runs[-1][0] + runs[-1][2] == index and runs[-1][1] + runs[-1][2] == i:
                runs[-1][2] += 1
            else:
                runs.append([index, i, 1])
        B = self.block
        for pool, buf in zip(self.keys + self.values, self.cache.keys + self.cache.values):
            for index, i, n in runs:
                a, b = pool[:, index * B : (index + n) * B], buf[slot, :, i * B : (i + n) * B]
                (b if to_slot else a).copy_(a if to_slot else b)
