"""The public `Engine`: sequences in, tokens out, one step at a time or on a background thread.

Each step: take the new sequences and aborts from the inbox (an aborted sequence's slot is freed before
any model call), ask the scheduler for a decision, apply it (slots, moves that keep the running
sequences in the first slots, prompt beginnings copied from the prefix cache), run the packed forward (`Runner`), sample every row (`sampler`), and end
the sequences that hit eos, a stop string or their max_new_tokens, freeing their slot at once; the
prompt blocks a step completed go into the prefix cache.
See the package docstring (`bloom.engine`) for the knobs and the guarantees.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from typing import Callable

import torch

from ..generation import StopStrings, eos_ids, finish_reason
from . import constraints, sampler
from .cache import SlotKVCache
from .prefix import DEFAULT_BLOCK, PrefixCache, root_key
from .params import GenerationParams, check_params
from .runner import Runner
from .sampler import sampling_state
from .scheduler import schedule
from .sequence import Sequence

logger = logging.getLogger("bloom")


class Engine:
    """Continuous batching over one BloomForCausalLM (see the module docstring for knobs and guarantees).

    Synchronous: `submit(...)` then `run()` (or `step()` in your own loop), or `generate(prompts, params)`.
    Threaded: `start()` (or `with engine:`) runs the steps on a background thread; `submit` and `abort`
    from any thread; `stop()` ends the thread and aborts what is left."""

    def __init__(self, model, tokenizer=None, *, cache_tokens: int = 8192, max_seq_len: int = 1024,
                 prefill_chunk: int = 256, adapters=None, prefix_cache: bool = True,
                 prefix_cache_tokens: int | None = None):
        """adapters: a `bloom.lora.AdapterBank` of `model`, for sequences whose params name an adapter.
        prefix_cache: keep prompt blocks for reuse by later prompts that start the same way, under the
        same adapter (see prefix.py); prefix_cache_tokens: its budget in tokens (None: a quarter of
        cache_tokens, at least one max_seq_len), allocated at once."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model.eval()
        self.tokenizer = tokenizer  # for stop strings
        self.prefill_chunk = prefill_chunk
        self.device = model.get_input_embeddings().weight.device
        self.cache = SlotKVCache(model, cache_tokens, max_seq_len)
        self.adapters = adapters
        self.runner = Runner(self.model, self.cache, adapters)
        if prefix_cache_tokens is None:
            prefix_cache_tokens = max(cache_tokens // 4, max_seq_len, DEFAULT_BLOCK)
        self.prefix = PrefixCache(self.cache, prefix_cache_tokens) if prefix_cache else None
        self.prompt_tokens = self.prompt_tokens_reused = 0  # over the prefills started (the prefix hit rate)
        self.waiting: deque[Sequence] = deque()  # submitted, no slot yet
        self.prefilling: list[Sequence] = []  # slot held, prompt partly cached
        self.running: list[Sequence] = []  # prompt cached, one token per step
        self._inbox: deque[tuple[str, Sequence]] = deque()  # ("submit" | "abort", sequence) from any thread
        self._wake = threading.Condition()  # guards _inbox and _stopping
        self._step_lock = threading.Lock()  # one step at a time: the model runs on one thread
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.ended: dict[str, int] = {}  # sequences ended so far, by finish_reason
        self.steps = self.rows_stepped = 0  # steps with a forward, and the rows they fed (mean occupancy)
        self._constrainer: constraints.Constrainer | None = None  # built at the first constrained submit
        self._constrainer_lock = threading.Lock()

    # -- any thread

    def submit(self, prompt_ids, params: GenerationParams | None = None,
               on_token: Callable[[Sequence, int | None], None] | None = None) -> Sequence:
        """Queue a prompt (a list or 1-D tensor of token ids) for generation; returns its Sequence at once.

        on_token(sequence, token) is called on the engine's thread for each new token (finish_reason is set
        on the last), and once with None if the sequence ends without a token (abort, error); keep it short.
        Raises ValueError for bad settings or a sequence that could never fit the cache."""
        return self.submit_group(prompt_ids, params, 1, on_token)[0]

    def submit_group(self, prompt_ids, params: GenerationParams | None = None, n: int = 1,
                     on_token: Callable[[Sequence, int | None], None] | None = None) -> list[Sequence]:
        """Queue n sequences of one prompt (OpenAI's `n` choices); their Sequences at once, as `submit`.

        The prompt is prefilled once: the group is admitted when n slots are free, its first sequence
        prefills, and the others then take a copy of its cached prompt and sample their first token from
        the same logits, each from its own generator: sequence i is seeded with seed + i (different and
        reproducible samples; greedy gives n equal outputs). Raises ValueError as `submit` does, or when
        the group needs more slots than the cache has."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if n > self.cache.num_slots:
            raise ValueError(f"a group of {n} sequences needs {n} cache slots at once; the engine has "
                             f"{self.cache.num_slots} (cache_tokens // max_seq_len)")
        params = params or GenerationParams()
        seqs = [self._sequence(prompt_ids, params if params.seed is None or i == 0 else
                               dataclasses.replace(params, seed=params.seed + i), on_token) for i in range(n)]
        seqs[0].siblings = seqs[1:]
        self._enqueue(seqs[:1])
        return seqs

    def _sequence(self, prompt_ids, params: GenerationParams | None, on_token) -> Sequence:
        """Check a request and build its Sequence (not yet queued)."""
        params = params or GenerationParams()
        cfg = self.model.config
        prompt = [int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)]
        if not prompt:
            raise ValueError("the prompt is empty: a sequence needs at least one prompt token")
        if not all(0 <= t < cfg.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}), got {min(prompt)}..{max(prompt)}")
        check_params(params, cfg.vocab_size)
        if params.adapter is not None:
            if self.adapters is None:
                raise ValueError(f"adapter {params.adapter!r} asked for, but the engine has no AdapterBank")
            self.adapters.check(params.adapter)  # UnknownAdapter, a ValueError
        need = len(prompt) + params.max_new_tokens
        if need > self.cache.max_seq_len:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} = {need} tokens can never "
                f"fit the engine's KV cache slots of {self.cache.max_seq_len} tokens (max_seq_len)")
        matcher = self._constraints().matcher(params.constraint) if params.constraint is not None else None
        sampling = sampling_state(params, prompt, cfg.vocab_size, self.device, matcher)
        stop = StopStrings(params.stop_strings, self.tokenizer)
        return Sequence(prompt, params, sampling, stop, eos_ids(cfg, params.eos_token_id), on_token)

    def _constraints(self) -> constraints.Constrainer:
        """The engine's Constrainer, built on first use (it needs the tokenizer)."""
        with self._constrainer_lock:
            if self._constrainer is None:
                if self.tokenizer is None:
                    raise ValueError("a constraint needs the engine's tokenizer: Engine(model, tokenizer)")
                eos = eos_ids(self.model.config, None)
                self._constrainer = constraints.Constrainer(self.tokenizer, self.model.config.vocab_size,
                                                            list(eos) or None)
            return self._constrainer

    def _enqueue(self, seqs: list[Sequence]) -> None:
        with self._wake:
            self._inbox.extend(("submit", s) for s in seqs)
            self._wake.notify()

    def abort(self, seq: Sequence) -> None:
        """End `seq` with finish_reason "abort"; its slot is freed at the start of the next step."""
        with self._wake:
            self._inbox.append(("abort", seq))
            self._wake.notify()

    @property
    def has_work(self) -> bool:
        return bool(self._inbox or self.waiting or self.prefilling or self.running)

    def stats(self) -> dict:
        """Sequences waiting and holding slots, and cache use (a snapshot, for metrics)."""
        held = self.prefilling + self.running
        return {"waiting": len(self.waiting) + len(self._inbox), "prefilling": len(self.prefilling),
                "running": len(self.running), "slots": self.cache.num_slots,
                "slots_used": self.cache.num_slots - self.cache.free_slots,
                "cache_tokens": self.cache.capacity, "cache_tokens_held": sum(s.num_cached for s in held),
                "ended": dict(self.ended), "mean_rows_per_step": self.rows_stepped / self.steps if self.steps else 0.0,
                **self.prefix_stats()}

    def prefix_stats(self) -> dict:
        """The prefix cache's use: prompt tokens reused / prompt tokens prefilled (hit rate), blocks held of
        the pool's, and bytes (of the blocks held, and of the pool, allocated at once); zeros when off."""
        p = self.prefix
        return {"prefix_cache": p is not None, "prompt_tokens": self.prompt_tokens,
                "prefix_tokens_reused": self.prompt_tokens_reused,
                "prefix_hit_rate": self.prompt_tokens_reused / self.prompt_tokens if self.prompt_tokens else 0.0,
                "prefix_blocks_held": p.blocks_held if p else 0, "prefix_blocks": p.num_blocks if p else 0,
                "prefix_bytes_held": p.blocks_held * p.block_bytes if p else 0, "prefix_bytes": p.nbytes if p else 0}

    # -- driving it

    def step(self) -> list[Sequence]:
        """One round (see the module docstring). Returns the sequences that ended during it. If the model
        raises, every sequence in the engine ends with finish_reason "error" and the exception propagates."""
        with self._step_lock, torch.inference_mode():
            try:
                return self._step()
            except BaseException as exc:
                self._end_all("error", exc)
                raise

    def run(self) -> None:
        """Step until every submitted sequence has ended (synchronous use: no background thread)."""
        while self.has_work:
            self.step()

    def generate(self, prompts, params: GenerationParams | list[GenerationParams] | None = None) -> list[Sequence]:
        """Submit every prompt (each a list of ids) and wait for all; their Sequences in prompt order.
        params: one for all or one per prompt. Steps here, or waits for the background thread if started."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params must be one GenerationParams or one per prompt ({len(prompts)}), got {len(params)}")
        seqs = [self._sequence(p, q, None) for p, q in zip(prompts, params)]  # all checked before any is queued
        self._enqueue(seqs)
        if self._thread is None:
            self.run()
        for s in seqs:
            s.result()
        return seqs

    @property
    def started(self) -> bool:
        """Whether a background thread runs the steps."""
        return self._thread is not None

    def start(self, on_start: Callable[[], None] | None = None) -> "Engine":
        """Run the steps on a background thread until stop(). on_start() runs first on that thread (e.g.
        torch.set_num_threads: OpenMP's thread count belongs to each thread)."""
        if self._thread is not None:
            raise RuntimeError("the engine's background thread is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, args=(on_start,), name="bloom-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background thread after its current step; sequences still in the engine end with "abort"."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._step_lock:
            self._end_all("abort")

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self, on_start: Callable[[], None] | None = None) -> None:
        if on_start is not None:
            on_start()
        while True:
            with self._wake:
                while not self._stopping and not self.has_work:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # the step already ended its sequences with the error; serve the next ones
                logger.exception("engine step failed")

    # -- one step (engine thread only)

    def _step(self) -> list[Sequence]:
        ended = self._take_inbox()
        decision = schedule(self.waiting, self.prefilling, self.running, self.cache.free_slots, self.prefill_chunk,
                            self._reusable if self.prefix is not None else None,
                            self._shared if self.prefix is not None else None)
        self._admit(decision.admit)
        self._compact()  # running sequences into slots 0 .. R-1, where the decode rows read the cache in place
        if decision.idle:
            return ended
        decoding, plan = sorted(decision.decode, key=lambda s: s.slot), list(decision.prefill)
        self._reuse(plan, decision.reuse)
        logits, scored = self.runner.forward(decoding, plan)  # (R + P, V): decode rows, then prompt chunks
        for s in decoding:
            s.num_cached += 1
        for (s, n), lps in zip(plan, scored):
            if self.prefix is not None:
                self.prefix.insert(s.slot, s.prompt_ids, s.num_cached, s.num_cached + n, root_key(s.params.adapter))
            s.num_cached += n
            if lps is not None:
                s.prompt_logprobs += lps
        # A prompt whose last chunk went in gets its first token this step.
        complete = [j for j, (s, _) in enumerate(plan) if s.num_cached == len(s.prompt_ids)]
        rows = [plan[j][0] for j in complete] + decoding
        if rows:
            self.steps, self.rows_stepped = self.steps + 1, self.rows_stepped + len(rows)
            R = len(decoding)
            ended += self._sample(rows, logits[[R + j for j in complete] + list(range(R))])
        for s in [s for s in self.prefilling if s.num_cached == len(s.prompt_ids)]:
            self.prefilling.remove(s)
            self.running.append(s)
        return ended

    def _compact(self) -> None:
        """Move running sequences into slots 0 .. R-1 (R running), in slot order, so that the decode step
        reads the cache in place. Each move copies one sequence's tokens once, where a gathered decode
        would copy every row's tokens at every step."""
        R = len(self.running)
        owner = {s.slot: s for s in self.prefilling}
        holes = iter(sorted(set(range(R)) - {s.slot for s in self.running}))
        for seq in [s for s in self.running if s.slot >= R]:
            hole = next(holes)
            other = owner.get(hole)  # a prefilling sequence there swaps places; a free slot is taken
            self.cache.move(seq.slot, hole, seq.num_cached, other.num_cached if other else 0)
            if other is not None:
                other.slot = seq.slot
            else:
                self.cache.take(hole, seq.slot)
            seq.slot = hole
        self.running.sort(key=lambda s: s.slot)

    def _take_inbox(self) -> list[Sequence]:
        with self._wake:
            items = list(self._inbox)
            self._inbox.clear()
        ended = []
        for kind, seq in items:
            if seq.finished:
                continue
            if kind == "abort":
                self._end(seq, "abort")
                ended.append(seq)
            elif seq.params.max_new_tokens == 0 and seq.prompt_logprobs is None:  # nothing to run
                self._end(seq, "length")
                ended.append(seq)
            else:
                self.waiting.append(seq)
        return ended

    def _admit(self, seqs: tuple[Sequence, ...]) -> None:
        """Give each admitted sequence a slot; it starts prefilling (its siblings take theirs once its
        prompt is cached, see _fork)."""
        for seq in seqs:
            self.waiting.remove(seq)
            seq.slot = self.cache.allocate()
            seq.times["admitted"] = time.perf_counter()
            self.prefilling.append(seq)

    def _reusable(self, seq: Sequence) -> int:
        """Prompt tokens the prefix cache could give seq (for the scheduler). None for a sequence that asks
        for prompt logprobs: they come from the prompt's hidden states, which reuse would skip."""
        if seq.params.prompt_logprobs is not None:
            return 0
        return self.prefix.match(seq.prompt_ids, root_key(seq.params.adapter))

    def _shared(self, seq: Sequence, other: Sequence, end: int) -> int:
        """Prompt tokens the prefix cache could give seq once other's first `end` prompt tokens are cached
        (for the scheduler): their common beginning in whole blocks, below seq's prompt length, under the
        same adapter."""
        if seq.params.prompt_logprobs is not None or seq.params.adapter != other.params.adapter:
            return 0
        a, b, B = seq.prompt_ids, other.prompt_ids, self.prefix.block
        blocks = min(len(a) - 1, end) // B
        return next((i for i in range(blocks) if a[i * B : (i + 1) * B] != b[i * B : (i + 1) * B]), blocks) * B

    def _reuse(self, plan: list[tuple[Sequence, int]], reuse: tuple[tuple[Sequence, int], ...]) -> None:
        """Copy the decided prompt beginnings from the prefix cache into their sequences' slots (after the
        slot moves of this step), and count the prompts whose prefill starts now."""
        self.prompt_tokens += sum(len(s.prompt_ids) for s, _ in plan if s.num_cached == 0)
        for s, n in reuse:
            self.prefix.reuse(s.slot, s.prompt_ids, n, root_key(s.params.adapter))
            s.num_cached = n
            self.prompt_tokens_reused += n

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> list[Sequence]:
        rows, logits = self._fork(rows, logits)
        ended = [s for s in rows if s.params.max_new_tokens == 0]  # it only asked for its prompt's logprobs
        if ended:
            for s in ended:
                self._end(s, "length")
            keep = [i for i, s in enumerate(rows) if s.params.max_new_tokens]
            rows, logits = [rows[i] for i in keep], logits[keep]
            if not rows:
                return ended
        allowed = self._constrainer.allowed(rows) if self._constrainer is not None else None
        # logits is this step's own copy (gathered rows): the sampler may change it unless logprobs read it
        tokens = sampler.sample(rows, logits, allowed, scratch=all(s.logprobs is None for s in rows),
                                constrainer=self._constrainer)
        for s, lp in zip(rows, sampler.logprobs(rows, logits, tokens)):
            if lp is not None:  # recorded before the token is emitted
                s.logprobs.append(lp)
        for s, token in zip(rows, tokens):
            reason = finish_reason(token, len(s.output_ids) + 1, s.params.max_new_tokens, s.eos, s.stop,
                                   s.params.min_tokens)
            reason = constraints.end_reason(s, reason)
            try:
                s._emit(token, reason)
            except Exception as exc:  # a failing callback ends its own sequence, not the batch
                logger.exception("on_token callback failed for sequence %d", s.id)
                reason = "error"
                s.error = exc
            if reason is not None:
                self._end(s, reason, s.error)
                ended.append(s)
        if self._constrainer is not None:  # the next masks, computed while the next forward runs
            self._constrainer.prefetch(rows)
        return ended

    # -- groups and log-probabilities (engine thread only)

    def _fork(self, rows: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """A group's first sequence has just cached its prompt: each sibling takes a slot (reserved at
        admission) holding a copy of that prompt, and the same next-token logits row. The siblings join the
        running sequences at the end of this step, with the prompts whose last chunk went in."""
        if not any(s.siblings for s in rows):
            return rows, logits
        out, index = [], []
        for i, s in enumerate(rows):
            group = [s] + [t for t in s.siblings if not t.finished]  # a sibling may have been aborted meanwhile
            for t in group[1:]:
                t.slot = self.cache.allocate()
                self.cache.move(s.slot, t.slot, s.num_cached)
                t.num_cached, t.prompt_logprobs = s.num_cached, s.prompt_logprobs
                t.times["admitted"] = s.times["admitted"]
                self.prefilling.append(t)
            s.siblings = []
            out += group
            index += [i] * len(group)
        return out, logits[index]

    def _end(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        """Finish `seq` and give its slot back at once (with the siblings still waiting for its prompt)."""
        for sibling in seq.siblings:
            if not sibling.finished:
                self._end(sibling, reason, error)
        seq.siblings = []
        if seq.slot is not None:
            self.cache.release(seq.slot)
            seq.slot = None
        self.ended[reason] = self.ended.get(reason, 0) + 1
        for group in (self.waiting, self.prefilling, self.running):
            if seq in group:
                group.remove(seq)
        seq._finish(reason, error)

    def _end_all(self, reason: str, error: BaseException | None = None) -> None:
        with self._wake:
            pending = [s for _, s in self._inbox]
            self._inbox.clear()
        for seq in pending + list(self.waiting) + list(self.prefilling) + list(self.running):
            if not seq.finished:
                self._end(seq, reason, error)
