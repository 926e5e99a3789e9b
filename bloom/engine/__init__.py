"""Continuous batching for BloomForCausalLM: sequences join and leave a running batch between decode steps.

The parts, each one file:
  params.py     GenerationParams: one sequence's settings
  sequence.py   Sequence: one request's prompt, settings, output and engine-side state
  scheduler.py  schedule(): what a step does (admit, decode, prefill chunks), decided without mutating
  cache.py      SlotKVCache: the KV cache, one slot per sequence, allocated once; fit_cache_tokens sizes it
  prefix.py     PrefixCache: prompt blocks kept by chain hash, copied into a new sequence's slot
  runner.py     Runner / PackedAttention: the packed forward of a step (and prompt logprobs)
  sampler.py    each row's next token with its own settings, and its logprobs
  constraints.py  Constraint (choice, regex, JSON Schema, Lark grammar) and the Constrainer: compiled
                specs, per-sequence matchers, the next masks computed while the model runs
  engine.py     Engine: the step loop, the inbox, groups, and the background thread

A request is a `Sequence`: its prompt ids, its own `GenerationParams` (max_new_tokens, sampling, seed,
stop strings, eos) and its output, streamed token by token. `Engine.step()` does one round:

  1. take new sequences and aborts (an aborted sequence's slot is freed here, before any model call);
  2. admit waiting sequences in arrival order while a cache slot is free (the scheduler decides 2-3); a
     sequence whose prefill starts this step first copies its prompt's cached leading blocks from the
     prefix cache into its slot and prefills only the rest; one whose beginning an earlier chunk of the
     step is computing waits a step for it, so a burst of prompts sharing a template computes it once;
  3. one forward for the whole step (`PackedAttention`): one token for every running sequence, plus up to
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
(Why slots and not pages: see cache.py.)

Knobs (constructor arguments):
  cache_tokens   the KV cache budget in tokens (memory: 2 · n_layer · cache_tokens · hidden_size · dtype
                 bytes); with max_seq_len it sets how many sequences run at once (the decode batch).
                 `fit_cache_tokens` sizes it for 64 sequences within half the free memory (the labeling
                 job's and the endpoint's default).
  max_seq_len    the most tokens one sequence may hold, prompt + max_new_tokens (a slot's size).
  prefill_chunk  prompt tokens per step (default 256): smaller keeps the running streams' time per
                 token steadier while prompts arrive, larger prefills faster.
  prefix_cache   keep prompt blocks for later prompts that start the same way (default True);
  prefix_cache_tokens  its budget in tokens, allocated at once (default a quarter of cache_tokens),
                 least recently used blocks evicted.

Guarantees:
  - Greedy output of a sequence is token for token `model.generate` on its prompt alone, whatever
    joins or leaves around it (tested in float32; bf16 matmuls may round differently per batch shape),
    and whether or not its prompt's beginning came from the prefix cache.
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

from .cache import DEFAULT_SLOTS, SlotKVCache, fit_cache_tokens, free_memory, kv_bytes_per_token
from .constraints import Constraint
from .engine import Engine
from .params import GenerationParams, check_params
from .prefix import PrefixCache
from .runner import PackedAttention, Runner
from .scheduler import Decision, schedule
from .sequence import Sequence

__all__ = [
    "DEFAULT_SLOTS", "Constraint", "Decision", "Engine", "GenerationParams", "PackedAttention", "PrefixCache", "Runner",
    "Sequence",
    "SlotKVCache", "check_params", "fit_cache_tokens", "free_memory", "kv_bytes_per_token", "schedule",
]
