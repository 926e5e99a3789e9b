"""Continuous batching for BloomForCausalLM: sequences join and leave a running batch between decode steps.

A request is a `Sequence`: its prompt ids, its own `GenerationParams` (max_new_tokens, sampling, seed,
stop strings, eos) and its output, streamed token by token. `Engine.step()` does one round:

  1. take new sequences and aborts (an aborted sequence's slot is freed here, before any model call);
  2. admit waiting sequences in arrival order while a cache slot is free;
  3. one forward for the whole step (`PackedStep`): one token for every running sequence, plus up to
     `prefill_chunk` prompt tokens of the sequences being prefilled (several short prompts, or the next
     chunk of a long one), packed into one row without padding; so a long prompt delays the running
     streams by one chunk per step, not by its whole prefill, and a prompt joining costs no forward of
     its own; a prompt whose last chunk went in gets its first token this step;
  4. sample every row of the step in one call (each with its own settings and generator), finish rows
     on eos, a stop string or their own max_new_tokens, and free their slot at once.

The KV cache (`SlotKVCache`) is allocated once: `cache_tokens // max_seq_len` slots of `max_seq_len`
tokens, per layer. A sequence takes a slot when it is admitted, so it never runs out of room while it
runs (no preemption, no recomputation), and gives it back the moment it ends. Running sequences are kept
in the first slots (a finished one's hole is filled by moving another in), so the decode rows attend over
a view of the cache, with no copy. ALiBi positions and the causal mask come from each row's own length.
Why slots and not pages: pages would fit more short sequences in the same memory, but without a paged
attention kernel every decode step must first gather each row's keys and values into one tensor; on
CPU that copy made a first paged version of this engine 2.2x slower than the static path in
benchmarks/bench_engine.py, where slots are faster than it.

Knobs (constructor arguments):
  cache_tokens   the KV cache budget in tokens (memory: 2 · n_layer · cache_tokens · hidden_size · dtype
                 bytes); with max_seq_len it sets how many sequences run at once (the decode batch).
                 `fit_cache_tokens` sizes it for 16 sequences within half the free memory (the labeling
                 job's and the endpoint's default).
  max_seq_len    the most tokens one sequence may hold, prompt + max_new_tokens (a slot's size).
  prefill_chunk  prompt tokens per step (default 256): smaller keeps the running streams' time per
                 token steadier while prompts arrive, larger prefills faster.

Guarantees:
  - Greedy output of a sequence is token for token `model.generate` on its prompt alone, whatever
    joins or leaves around it (tested in float32; bf16 matmuls may round differently per batch shape).
  - A sequence with a seed samples from its own generator, drawn only by it: the same tokens as
    `model.generate(prompt, do_sample=True, seed=[seed])`, whatever the batch holds.
  - Memory never grows after construction. When the cache is full, new sequences wait (first come,
    first served); one that could never fit is refused by `submit` with a ValueError naming the sizes.
  - A group of n sequences of one prompt (`submit_group`, OpenAI's `n`) prefills the prompt once: its
    first sequence prefills, the others take a copy of its cached prompt and sample their first token
    from the same logits, each with its own generator (seed + i).
  - Log-probabilities, for the sequences that ask (`GenerationParams.logprobs`, `prompt_logprobs`), are
    of the model's own distribution: log_softmax of the fp32 logits, before any repetition penalty,
    temperature, top-k or top-p.
  - `submit` and `abort` are safe from any thread. The model runs only inside `step()`, one caller at a
    time; `start()` runs the steps on a background thread (or call `step()` / `run()` yourself).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .generation import (
    SamplingParams,
    StopStrings,
    check_max_new_tokens,
    eos_ids,
    finish_reason,
    next_token,
    sampling_params,
    token_logprobs,
)
from .model import attention, attention_bias

logger = logging.getLogger("bloom")

# ----------------------------------------------------------------------------- the KV cache


DEFAULT_SLOTS = 16  # sequences a cache holds by default (see fit_cache_tokens)


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: the driver's free memory on CUDA; on CPU the
    kernel's MemAvailable (free memory plus what it can reclaim), else the free pages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_bytes_per_token(config, element_size: int, n_layer: int | None = None) -> int:
    """Bytes of one token's keys and values over `n_layer` layers (default: all of the model's)."""
    return 2 * (config.n_layer if n_layer is None else n_layer) * config.hidden_size * element_size


def fit_cache_tokens(model, max_seq_len: int, slots: int = DEFAULT_SLOTS, memory_share: float = 0.5,
                     free=free_memory) -> int:
    """A KV cache size for `slots` sequences of `max_seq_len` tokens, or fewer where that would take more
    than `memory_share` of what is free on a device holding layers (each device holds the cache of its
    own layers); at least one sequence. Call after loading the model, so that its weights are counted."""
    layers: dict[torch.device, int] = {}
    for block in model.transformer.h:
        w = block.input_layernorm.weight
        layers[w.device] = layers.get(w.device, 0) + 1
    elem = model.transformer.h[0].input_layernorm.weight.element_size()
    per_token = {d: kv_bytes_per_token(model.config, elem, n) for d, n in layers.items()}
    room = min(int(memory_share * free(d)) // b for d, b in per_token.items())
    return max(1, min(slots, room // max_seq_len)) * max_seq_len


class SlotKVCache:
    """Keys and values of every layer, allocated once: (num_slots, H, max_seq_len, D) per layer, each on its
    layer's device. A sequence holds one slot (its prompt and new tokens at positions 0, 1, 2, ...) from
    admission to its end; `allocate` and `release` hand slots out and take them back."""

    def __init__(self, model, cache_tokens: int, max_seq_len: int):
        if max_seq_len < 1 or cache_tokens < max_seq_len:
            raise ValueError(f"cache_tokens ({cache_tokens}) must hold at least one sequence of max_seq_len "
                             f"({max_seq_len}) tokens")
        cfg = model.config
        self.max_seq_len = max_seq_len
        self.num_slots = cache_tokens // max_seq_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for block in model.transformer.h:
            w = block.input_layernorm.weight  # never packed, so it names the layer's device and dtype
            shape = (self.num_slots, cfg.n_head, max_seq_len, cfg.head_dim)
            # Zeros, not empty: a forward also reads positions it masks out, whose probability is then exactly
            # 0, and 0 × value must stay 0 (uninitialised memory may hold NaN).
            self.keys.append(torch.zeros(shape, dtype=w.dtype, device=w.device))
            self.values.append(torch.zeros(shape, dtype=w.dtype, device=w.device))
        self._free = list(range(self.num_slots))

    @property
    def capacity(self) -> int:
        """Tokens the cache holds in all."""
        return self.num_slots * self.max_seq_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        """A free slot (the lowest), or None when all are taken."""
        if not self._free:
            return None
        self._free.sort()
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def take(self, slot: int, instead_of: int) -> None:
        """Hold the free `slot` and free `instead_of` (a sequence moved between them)."""
        self._free.remove(slot)
        self._free.append(instead_of)

    def move(self, src: int, dst: int, n: int, n_dst: int = 0) -> None:
        """Copy the first n tokens of slot src into slot dst; with n_dst, dst's first n_dst go to src (a swap)."""
        for buf in self.keys + self.values:
            held = buf[dst, :, :n_dst].clone()
            buf[dst, :, :n] = buf[src, :, :n]
            buf[src, :, :n_dst] = held


class PackedStep:
    """One step's forward over the slot cache: every row's new tokens packed into one sequence of N tokens,
    with no padding, passed to the model as its `past_key_values`.

    The rows are R decoding sequences (one token each, in slots 0 .. R-1, c_i tokens cached) followed by P
    prompt chunks (n_j tokens each, in their own slots, c_j cached). The linears, LayerNorms and the MLP
    see all N = R + sum(n_j) tokens as one (1, N, C) batch, so a step costs one forward however many
    prompts join it, and nothing is computed for padding. Only attention needs to know the rows: `attend`
    writes each new token's key and value at its position in its slot, then
      - the R decode queries attend together over a view of slots 0 .. R-1 (no copy), right-padded to
        the longest of them, max(c_i) + 1 keys; the mask hides each row's padding;
      - each prompt chunk attends over its own slot's first c_j + n_j keys, causally.
    ALiBi positions are each row's own token positions 0, 1, 2, ... (the mask's cumulative sum, as in
    BloomModel), so a row's result does not depend on what else is in the step."""

    length = 0  # BloomModel reads it; each row's own length is known here

    def __init__(self, cache: SlotKVCache, decode_cached: list[int], chunks: list[tuple[int, int, int]],
                 n_head: int, dtype: torch.dtype):
        """decode_cached: c_i of the sequences in slots 0 .. R-1; chunks: (slot, c_j, n_j) of each prompt chunk."""
        device = cache.keys[0].device
        self.cache, self.R = cache, len(decode_cached)
        slots = list(range(self.R)) + [slot for slot, _, n in chunks for _ in range(n)]
        positions = list(decode_cached) + [c + t for _, c, n in chunks for t in range(n)]
        # Each new token's row, per head, in a layer's cache seen as (num_slots * H * max_seq_len, D): one
        # index_copy_ per layer writes them all (an index_put with two index tensors costs ~10x more).
        H, L = cache.keys[0].shape[1], cache.max_seq_len
        slot_t, pos_t = torch.tensor(slots, device=device), torch.tensor(positions, device=device)
        self.write_rows = ((slot_t[:, None] * H + torch.arange(H, device=device)) * L + pos_t[:, None]).reshape(-1)
        # Offsets of each row's new tokens in the packed sequence; `last` picks each row's last token.
        self.offsets, self.last, at = list(range(self.R)), list(range(self.R)), self.R
        for _, _, n in chunks:
            self.offsets.append(at)
            self.last.append(at + n - 1)
            at += n
        self.chunks = chunks
        biases = []
        if self.R:
            self.end = max(decode_cached) + 1
            mask = torch.arange(self.end, device=device) < torch.tensor(decode_cached, device=device)[:, None] + 1
            biases.append(attention_bias(mask, 1, n_head, dtype))  # (R, H, 1, end)
        for _, c, n in chunks:  # (1, H, n, c + n): causal over the row's own tokens
            biases.append(attention_bias(torch.ones(1, c + n, dtype=torch.long, device=device), n, n_head, dtype))
        self._biases = biases
        self._on_device: dict[torch.device, tuple] = {}

    def _moved(self, device: torch.device) -> tuple:
        """(write_rows, biases) on `device` (a layer's, under a device map), moved once a forward."""
        if device not in self._on_device:
            self._on_device[device] = (self.write_rows.to(device), [b.to(device) for b in self._biases])
        return self._on_device[device]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q, k, v (1, H, N, D) of the packed tokens → attention output (1, H, N, D), each row over its own
        tokens; stores k, v in the rows' slots first."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        rows, biases = self._moved(keys.device)
        for buf, new in ((keys, k), (values, v)):
            buf.view(-1, buf.shape[-1]).index_copy_(0, rows, new[0].transpose(0, 1).reshape(-1, buf.shape[-1]))
        out, R = [], self.R
        if R:  # (R, H, 1, D) queries over slots 0 .. R-1, in place
            y, _ = attention(q[0, :, :R].transpose(0, 1)[:, :, None], keys[:R, :, : self.end],
                             values[:R, :, : self.end], biases[0], scale)
            out.append(y[:, :, 0].transpose(0, 1)[None])  # (1, H, R, D)
        for j, (slot, c, n) in enumerate(self.chunks):
            o = self.offsets[R + j]
            y, _ = attention(q[:, :, o : o + n], keys[slot : slot + 1, :, : c + n], values[slot : slot + 1, :, : c + n],
                             biases[j + (1 if R else 0)], scale)
            out.append(y)  # (1, H, n, D)
        return out[0] if len(out) == 1 else torch.cat(out, 2)

    def advance(self, n: int) -> None:
        """The model calls this after a forward; the engine keeps each sequence's length itself."""


# ----------------------------------------------------------------------------- one request


@dataclass(frozen=True)
class GenerationParams:
    """One sequence's settings, as `model.generate`'s arguments for one row.

    top_k 0 and top_p 1 disable them; seed None samples from torch's global generator; eos_token_id None
    means the model config's, an empty tuple none; stop_strings need the engine's tokenizer.
    logprobs: record each new token's log-probability and the `logprobs` most likely tokens' (0: the
    chosen token's only) in `Sequence.logprobs`; prompt_logprobs: the same for every prompt token after
    the first, in `Sequence.prompt_logprobs` (with max_new_tokens 0 the prompt is still run, to score it).
    None computes nothing.
    logit_bias: token id → bias in [-100, 100], added to this sequence's logits before sampling and the
    greedy choice (as OpenAI's); logprobs stay those of the model's own distribution.
    frequency_penalty, presence_penalty, min_tokens: OpenAI's / vLLM's settings (declared here; the
    sampler applies them in the engine's own branch of this work)."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    eos_token_id: int | tuple[int, ...] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_tokens: int = 0


def apply_logit_bias(logits: torch.Tensor, params: list[GenerationParams]) -> torch.Tensor:
    """(B, V) logits with each row's `logit_bias` added (row i has params[i]); the same tensor when no
    row has one, else a copy (the logprobs are recorded from the unbiased logits)."""
    biased = [(i, p.logit_bias) for i, p in enumerate(params) if p.logit_bias]
    if not biased:
        return logits
    logits = logits.clone()
    for i, bias in biased:
        ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
        logits[i, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


_END = object()  # the last item of a sequence's token queue
_ids = itertools.count()


class Sequence:
    """One request: its prompt, settings and output, and the state the engine keeps for it.

    Read by the caller: `output_ids` (new tokens so far), `finish_reason` ("eos", "stop", "length",
    "abort", "error"; None while running), `error`, `finished`, and `times` (perf_counter seconds at
    "submitted", "admitted", "first_token", "finished"). Iterate `stream()` for the tokens as they come,
    or wait with `result()`; both work from any thread.

    When the params ask for them: `logprobs[k]` = (log-probability of output_ids[k], [(id, logprob)] of the
    most likely tokens, most likely first), recorded before the token is streamed; `prompt_logprobs` the
    same per prompt token, None for the first (complete before the first new token)."""

    def __init__(self, prompt_ids: list[int], params: GenerationParams, sampling: SamplingParams, stop: StopStrings,
                 eos: tuple[int, ...], seen: torch.Tensor | None, on_token: Callable | None):
        self.id = next(_ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.times: dict[str, float] = {"submitted": time.perf_counter()}
        # Engine-side state: the sampling row (with this sequence's own generator), stop-string window,
        # eos ids, tokens seen (for the repetition penalty), its cache slot and how many tokens it holds.
        self.sampling, self.stop, self.eos, self.seen = sampling, stop, eos, seen
        self.slot: int | None = None
        self.num_cached = 0
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None if params.logprobs is None else []
        self.prompt_logprobs: list | None = None if params.prompt_logprobs is None else [None]
        # The rest of its group (submit_group) until this sequence's prompt is cached; they hold no slot yet.
        self.siblings: list[Sequence] = []
        self._on_token = on_token
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()

    def __repr__(self) -> str:
        return (f"Sequence(id={self.id}, prompt={len(self.prompt_ids)} tokens, new={len(self.output_ids)}, "
                f"finish_reason={self.finish_reason!r})")

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """The new token ids as they are generated (one consumer); ends when the sequence ends, raising
        RuntimeError if the engine failed. timeout: seconds to wait for each token (queue.Empty after)."""
        while True:
            item = self._queue.get(timeout=timeout)
            if item is _END:
                self._raise_error()
                return
            yield item

    def result(self, timeout: float | None = None) -> list[int]:
        """Wait for the sequence to end; its new token ids. TimeoutError after `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"sequence {self.id} still running after {timeout} s")
        self._raise_error()
        return list(self.output_ids)

    def _raise_error(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"generation failed for sequence {self.id}: {self.error}") from self.error

    def _emit(self, token: int, reason: str | None) -> None:
        """Called by the engine with each new token; finish_reason is set first, so a callback sees it."""
        self.output_ids.append(token)
        self.finish_reason = reason
        self.times.setdefault("first_token", time.perf_counter())
        self._queue.put(token)
        if self._on_token is not None:
            self._on_token(self, token)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        untold = self.finish_reason is None  # no token event carried the end (abort, error, max_new_tokens=0)
        self.finish_reason, self.error = reason, error
        self.times["finished"] = time.perf_counter()
        self._queue.put(_END)
        self._done.set()
        if self._on_token is not None and untold:
            try:
                self._on_token(self, None)
            except Exception:  # the sequence has ended anyway; a callback must not stop the engine
                logger.exception("on_token callback failed for sequence %d", self.id)


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Continuous batching over one BloomForCausalLM (see the module docstring for knobs and guarantees).

    Synchronous: `submit(...)` then `run()` (or `step()` in your own loop), or `generate(prompts, params)`.
    Threaded: `start()` (or `with engine:`) runs the steps on a background thread; `submit` and `abort`
    from any thread; `stop()` ends the thread and aborts what is left."""

    def __init__(self, model, tokenizer=None, *, cache_tokens: int = 8192, max_seq_len: int = 1024,
                 prefill_chunk: int = 256):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model.eval()
        self.tokenizer = tokenizer  # for stop strings
        self.prefill_chunk = prefill_chunk
        self.device = model.get_input_embeddings().weight.device
        self.cache = SlotKVCache(model, cache_tokens, max_seq_len)
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
        check_max_new_tokens(params.max_new_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(params, name)
            if n is not None and not (isinstance(n, int) and 0 <= n <= cfg.vocab_size):
                raise ValueError(f"{name} must be None or an integer in [0, {cfg.vocab_size}], got {n!r}")
        bias = params.logit_bias or {}
        if not all(isinstance(t, int) and 0 <= t < cfg.vocab_size and -100 <= b <= 100 for t, b in bias.items()):
            raise ValueError(f"logit_bias must map token ids in [0, {cfg.vocab_size}) to biases in [-100, 100], "
                             f"got {bias!r}")
        need = len(prompt) + params.max_new_tokens
        if need > self.cache.max_seq_len:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} = {need} tokens can never "
                f"fit the engine's KV cache slots of {self.cache.max_seq_len} tokens (max_seq_len)")
        sampling = sampling_params(1, self.device, params.do_sample, params.temperature, params.top_k,
                                   params.top_p, params.repetition_penalty, params.seed)
        stop = StopStrings(params.stop_strings, self.tokenizer)
        seen = None
        if params.repetition_penalty != 1:
            seen = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=self.device)
            seen[torch.tensor(prompt, device=self.device)] = True
        return Sequence(prompt, params, sampling, stop, eos_ids(cfg, params.eos_token_id), seen, on_token)

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
                "ended": dict(self.ended), "mean_rows_per_step": self.rows_stepped / self.steps if self.steps else 0.0}

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
        self._admit()
        self._compact()  # running sequences into slots 0 .. R-1, where the decode rows read the cache in place
        decoding, plan = list(self.running), self._plan_prefill()
        if not decoding and not plan:
            return ended
        logits = self._forward(decoding, plan)  # (R + P, V): decode rows, then prompt chunks
        for s in decoding:
            s.num_cached += 1
        for s, n in plan:
            s.num_cached += n
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

    def _admit(self) -> None:
        # First come, first served; a group waits until there is a slot for each of its sequences (its
        # siblings' slots are reserved, and taken once its prompt is cached).
        reserved = sum(len(s.siblings) for s in self.prefilling)
        while self.waiting and self.cache.free_slots - reserved >= 1 + len(self.waiting[0].siblings):
            seq = self.waiting.popleft()
            seq.slot = self.cache.allocate()
            reserved += len(seq.siblings)
            seq.times["admitted"] = time.perf_counter()
            self.prefilling.append(seq)

    def _plan_prefill(self) -> list[tuple[Sequence, int]]:
        """(sequence, prompt tokens to feed) for this step, up to prefill_chunk tokens in all; the first
        prompt in line always gets min(what is left, prefill_chunk)."""
        plan, budget = [], self.prefill_chunk
        for seq in self.prefilling:
            n = min(len(seq.prompt_ids) - seq.num_cached, budget)
            if n < 1:
                break
            plan.append((seq, n))
            budget -= n
        return plan

    def _forward(self, decoding: list[Sequence], plan: list[tuple[Sequence, int]]) -> torch.Tensor:
        """One forward for the whole step: each decoding sequence's last token and each planned prompt
        chunk, packed into one row (see PackedStep) → fp32 logits (R + P, V) of each row's last new token.
        Prompt logprobs are recorded here for the chunks that ask (from the same hidden states)."""
        ids = [s.output_ids[-1] for s in decoding]
        for s, n in plan:
            ids += s.prompt_ids[s.num_cached : s.num_cached + n]
        w = self.cache.keys[0]
        step = PackedStep(self.cache, [s.num_cached for s in decoding], [(s.slot, s.num_cached, n) for s, n in plan],
                          self.model.config.n_head, w.dtype)
        h = self.model.transformer(torch.tensor([ids], device=self.device), past_key_values=step, use_cache=True,
                                   return_dict=True).last_hidden_state[0]  # (N, C)
        self._prompt_logprobs(plan, h, step.offsets[len(decoding) :])
        return self.model.get_output_embeddings()(h[step.last]).float()

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
        params = SamplingParams.cat([s.sampling for s in rows])
        seen = None
        if any(s.seen is not None for s in rows):
            none = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            seen = torch.stack([none if s.seen is None else s.seen for s in rows])
        tokens = next_token(apply_logit_bias(logits, [s.params for s in rows]), seen, params).tolist()
        self._record_logprobs(rows, logits, tokens)
        for s, token in zip(rows, tokens):
            if s.seen is not None:
                s.seen[token] = True
            reason = finish_reason(token, len(s.output_ids) + 1, s.params.max_new_tokens, s.eos, s.stop)
            try:
                s._emit(token, reason)
            except Exception as exc:  # a failing callback ends its own sequence, not the batch
                logger.exception("on_token callback failed for sequence %d", s.id)
                reason = "error"
                s.error = exc
            if reason is not None:
                self._end(s, reason, s.error)
                ended.append(s)
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

    def _prompt_logprobs(self, plan: list[tuple[Sequence, int]], h: torch.Tensor, offsets: list[int]) -> None:
        """Record the prompt logprobs of the chunks whose sequence asks for them, before num_cached moves on.
        h (N, C): the step's final hidden states; chunk j's n tokens are h[offsets[j] : offsets[j] + n], prompt
        positions c .. c + n - 1 (c = tokens cached before it); position p's logits score prompt token p + 1."""
        head = self.model.get_output_embeddings()
        for (s, n), o in zip(plan, offsets):
            if s.prompt_logprobs is None:
                continue
            c = s.num_cached
            scored = min(n, len(s.prompt_ids) - 1 - c)  # the last prompt position predicts a new token
            for a in range(0, scored, 64):  # (64, V) fp32 logits at a time, never (N, V)
                b = min(a + 64, scored)
                logits = head(h[o + a : o + b]).float()
                s.prompt_logprobs += token_logprobs(logits, s.prompt_ids[c + a + 1 : c + b + 1], s.params.prompt_logprobs)

    def _record_logprobs(self, rows: list[Sequence], logits: torch.Tensor, tokens: list[int]) -> None:
        """Append each asking row's new token's logprob and top alternatives (before the token is emitted)."""
        asking = [j for j, s in enumerate(rows) if s.logprobs is not None]
        if not asking:
            return
        top = max(rows[j].params.logprobs for j in asking)
        for j, (lp, alternatives) in zip(asking, token_logprobs(logits[asking], [tokens[j] for j in asking], top)):
            rows[j].logprobs.append((lp, alternatives[: rows[j].params.logprobs]))

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
