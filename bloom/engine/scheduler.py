"""The scheduler: what one engine step does, decided from the engine's queues without changing them.

`schedule` returns a `Decision`: which waiting sequences take a cache slot (first come, first served; a
group of n waits for n free slots), which running sequences decode a token, which sequences starting
their prefill take their prompt's beginning from the prefix cache, and which prompt chunks prefill,
within `prefill_chunk` prompt tokens per step; a sequence whose prompt's beginning an earlier chunk of
the same step is computing waits a step and takes it from the prefix cache, rather than computing it
again beside it (a burst of prompts sharing a template computes it once). The engine applies it
(slots, the forward, counters); calling `schedule` twice on the same state gives the same decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence as Seq

from .sequence import Sequence


@dataclass(frozen=True)
class Decision:
    """admit: waiting sequences to give a slot, in arrival order (they start prefilling this step);
    decode: running sequences, one token each; prefill: (sequence, prompt tokens to feed) per chunk, in
    line order, the admitted sequences last; reuse: (sequence, prompt tokens to copy from the prefix cache)
    for the sequences whose first chunk is planned and whose prompt starts with cached blocks (the chunk
    starts after them)."""

    admit: tuple[Sequence, ...]
    decode: tuple[Sequence, ...]
    prefill: tuple[tuple[Sequence, int], ...]
    reuse: tuple[tuple[Sequence, int], ...] = ()

    @property
    def idle(self) -> bool:
        """Nothing for the model to run this step."""
        return not self.decode and not self.prefill


def schedule(waiting: Seq[Sequence], prefilling: Seq[Sequence], running: Seq[Sequence], free_slots: int,
             prefill_chunk: int, reusable: Callable[[Sequence], int] | None = None,
             shared: Callable[[Sequence, Sequence, int], int] | None = None) -> Decision:
    """The next step's decision. waiting: sequences without a slot, in arrival order; prefilling: slot
    held, prompt partly cached; running: prompt cached; free_slots: the cache's free slots now.

    A waiting sequence is admitted while a slot is free for it and its group's siblings (the siblings of
    groups already prefilling hold a reservation). The prompt chunks go in line order, up to
    prefill_chunk tokens in all; the first in line always gets min(what is left of its prompt, prefill_chunk).
    reusable(sequence): prompt tokens the prefix cache could give a sequence that has none cached yet (read
    only, below its prompt's length; None: no prefix cache). Asked only when its first chunk is planned,
    so a sequence admitted alongside the one computing its prefix finds that prefix once it is cached.
    shared(sequence, other, end): prompt tokens the prefix cache could give a sequence once other's first
    `end` prompt tokens are cached (None: never wait). A sequence whose first chunk is planned after a
    chunk that would give it more than reusable(sequence) is left for a later step (the sequences after
    it are still planned), so no step computes a prompt's beginning twice."""
    reserved = sum(len(s.siblings) for s in prefilling)
    admit = []
    for seq in waiting:
        if free_slots - reserved < 1 + len(seq.siblings):
            break
        admit.append(seq)
        free_slots -= 1
        reserved += len(seq.siblings)
    plan, reuse, budget = [], [], prefill_chunk
    for seq in list(prefilling) + admit:
        if budget < 1:
            break
        r = reusable(seq) if reusable is not None and seq.num_cached == 0 else 0
        if shared is not None and seq.num_cached == 0 and any(
                shared(seq, other, other.num_cached + dict(reuse).get(other, 0) + m) > r for other, m in plan):
            continue  # an earlier chunk computes its beginning: take it from the cache next step
        n = min(len(seq.prompt_ids) - seq.num_cached - r, budget)
        if n < 1:
            break
        if r:
            reuse.append((seq, r))
        plan.append((seq, n))
        budget -= n
    return Decision(tuple(admit), tuple(running), tuple(plan), tuple(reuse))
