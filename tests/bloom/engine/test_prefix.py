"""The prefix cache: a sequence that takes its prompt's beginning from cached blocks generates token for
token what it generates without them (float32), whether the shared prefix ends inside a block, its blocks
are evicted while it runs, it asks for prompt logprobs, or it runs in a mixed batch; and it really skips
the cached tokens."""

import random

import pytest
import torch

from bloom.engine import Engine, GenerationParams, schedule
from bloom.engine.prefix import DEFAULT_BLOCK as B, PrefixCache

from .test_engine import alone, count_fed_tokens, drive

GREEDY = GenerationParams(max_new_tokens=10, eos_token_id=())



def tokens(rng, n):
    return [rng.randrange(4, 256) for _ in range(n)]


def engines(lm, **kwargs):
    """The same engine with and without the prefix cache."""
    kwargs = {"cache_tokens": 4 * 96, "max_seq_len": 96, "prefill_chunk": 32, **kwargs}
    return Engine(lm, **kwargs), Engine(lm, prefix_cache=False, **kwargs)


def forget_slots(engine):
    """Zero the slot cache, so that a reused prefix can come only from the prefix cache (a slot still
    holding an earlier sequence of the same template would hide a missing copy)."""
    for t in engine.cache.keys + engine.cache.values:
        t.zero_()


def test_a_reused_prefix_gives_the_same_tokens_and_skips_its_blocks(lm):
    rng = random.Random(0)
    template = tokens(rng, 3 * B + 5)  # the shared prefix ends inside the 4th block
    prompts = [template + tokens(rng, rng.randint(1, 12)) for _ in range(5)]
    cached, plain = engines(lm)
    fed, handle = count_fed_tokens(lm)
    try:
        first = cached.generate(prompts[:1], GREEDY)  # nothing to reuse yet: it fills the cache
        forget_slots(cached)
        fed.clear()
        rest = cached.generate(prompts[1:], GREEDY)
    finally:
        handle.remove()
    for prompt, seq, ref in zip(prompts, first + rest, plain.generate(prompts, GREEDY)):
        assert seq.output_ids == ref.output_ids == alone(lm, prompt, GREEDY)[0]
    stats = cached.stats()
    # Only the three whole blocks are shared; the 4th holds each row's own tokens too.
    assert stats["prefix_tokens_reused"] == 4 * 3 * B
    assert stats["prompt_tokens"] == sum(map(len, prompts))
    assert stats["prefix_hit_rate"] == pytest.approx(4 * 3 * B / sum(map(len, prompts)))
    # The forwards fed each later prompt without its cached blocks, plus one token per decode step.
    assert sum(fed) == sum(len(p) - 3 * B for p in prompts[1:]) + 4 * (GREEDY.max_new_tokens - 1)
    assert plain.stats()["prefix_tokens_reused"] == 0 and plain.prefix is None


def test_a_block_is_keyed_by_the_whole_prefix_before_it(lm):
    """The same block of tokens after a different beginning is a different block."""
    rng = random.Random(1)
    shared_block = tokens(rng, B)
    a, b = tokens(rng, B) + shared_block + [7], tokens(rng, B) + shared_block + [7]
    cached, plain = engines(lm)
    cached.generate([a], GREEDY)
    assert cached.prefix.match(a) == 2 * B and cached.prefix.match(b) == 0
    (seq,), (ref,) = cached.generate([b], GREEDY), plain.generate([b], GREEDY)
    assert seq.output_ids == ref.output_ids and cached.stats()["prefix_tokens_reused"] == 0


def test_the_last_prompt_token_is_always_computed(lm):
    """A prompt made of whole cached blocks reuses all but its last block: its last token's logits are needed."""
    rng = random.Random(2)
    prompt = tokens(rng, 2 * B)
    cached, plain = engines(lm)
    cached.generate([prompt], GREEDY)
    assert cached.prefix.match(prompt) == B
    forget_slots(cached)
    (seq,), (ref,) = cached.generate([prompt], GREEDY), plain.generate([prompt], GREEDY)
    assert seq.output_ids == ref.output_ids and cached.stats()["prefix_tokens_reused"] == B


def test_blocks_evicted_while_their_sequence_runs_change_nothing(lm):
    """A pool of two blocks: a sequence reuses a template's blocks, and another template's prefill evicts
    them while the first still decodes."""
    rng = random.Random(3)
    t1, t2 = tokens(rng, 2 * B + 3), tokens(rng, 2 * B + 3)
    cached, plain = engines(lm, prefix_cache_tokens=2 * B)
    long = GenerationParams(max_new_tokens=20, eos_token_id=())
    cached.generate([t1 + [9]], GREEDY)
    forget_slots(cached)
    first = cached.submit(t1 + [10, 11], long)
    cached.step()
    assert cached.stats()["prefix_tokens_reused"] == 2 * B and first in cached.running
    second = cached.submit(t2 + [12], long)
    cached.step()  # the second template's prefill takes both blocks
    assert cached.prefix.match(t1 + [10, 11]) == 0 and cached.prefix.match(t2 + [13]) == 2 * B
    assert cached.prefix.blocks_held == 2 and not first.finished
    cached.run()
    for seq in (first, second):
        assert seq.output_ids == plain.generate([seq.prompt_ids], long)[0].output_ids


def test_eviction_takes_the_least_recently_used_block_and_a_prefixs_deepest_first(lm):
    rng = random.Random(4)
    cached, _ = engines(lm, prefix_cache_tokens=3 * B)
    t1, t2, t3 = tokens(rng, B + 1), tokens(rng, 2 * B + 1), tokens(rng, B + 1)
    one = GenerationParams(max_new_tokens=1, eos_token_id=())
    cached.generate([t1], one)
    cached.generate([t2], one)  # 3 blocks held: t1's and t2's two
    cached.generate([t1], one)  # t1's block is used again: t2's are now the oldest
    cached.generate([t3], one)  # room for one: t2's second block goes first, its first stays
    p = cached.prefix
    assert (p.match(t1), p.match(t2), p.match(t3)) == (B, B, B) and p.blocks_held == 3


def test_a_pool_smaller_than_a_prompt_keeps_its_first_blocks(lm):
    rng = random.Random(5)
    cached, plain = engines(lm, prefix_cache_tokens=2 * B)
    prompt = tokens(rng, 4 * B + 2)
    cached.generate([prompt], GREEDY)
    assert cached.prefix.match(prompt) == 2 * B
    forget_slots(cached)
    (seq,), (ref,) = cached.generate([prompt], GREEDY), plain.generate([prompt], GREEDY)
    assert seq.output_ids == ref.output_ids


def test_a_prefix_whose_blocks_lie_out_of_order_in_the_pool_is_copied_back_in_order(lm):
    """Blocks are copied run by run (consecutive pool blocks in one copy): a prefix whose blocks were
    handed out by eviction in reverse order, so in two runs, still gives the same tokens."""
    rng = random.Random(6)
    cached, plain = engines(lm, prefix_cache_tokens=3 * B)
    one = GenerationParams(max_new_tokens=1, eos_token_id=())
    ta, tb, tc = tokens(rng, B + 1), tokens(rng, 2 * B + 1), tokens(rng, 2 * B + 1)
    cached.generate([ta], one)  # pool block 0
    cached.generate([tb], one)  # blocks 1, 2
    cached.generate([ta], one)  # ta used again: tb's second block, then its first, are the oldest
    cached.generate([tc], one)  # tc's first block evicts into block 2, its second into block 1
    p = cached.prefix
    assert [e.index for e in p._matched(tc + [1], 0)] == [2, 1]
    forget_slots(cached)
    (seq,), (ref,) = cached.generate([tc + [5, 6]], GREEDY), plain.generate([tc + [5, 6]], GREEDY)
    assert seq.output_ids == ref.output_ids
    assert cached.stats()["prefix_tokens_reused"] == 2 * B + B  # ta's second use, then tc's two blocks


def test_prompt_logprobs_are_computed_never_reused(lm):
    """Prompt logprobs come from the prompt's hidden states: a sequence asking for them prefills its whole
    prompt (and still fills the cache for others); its logprobs equal those of an engine without the cache."""
    rng = random.Random(6)
    template = tokens(rng, 2 * B + 4)
    asks = GenerationParams(max_new_tokens=6, eos_token_id=(), logprobs=2, prompt_logprobs=3)
    cached, plain = engines(lm)
    cached.generate([template + [5]], GREEDY)
    prompt = template + [6, 7]
    (seq,), (ref,) = cached.generate([prompt], asks), plain.generate([prompt], asks)
    assert cached.stats()["prefix_tokens_reused"] == 0
    assert seq.output_ids == ref.output_ids and len(seq.prompt_logprobs) == len(prompt)
    for got, want in zip(seq.prompt_logprobs[1:] + seq.logprobs, ref.prompt_logprobs[1:] + ref.logprobs):
        assert got[0] == pytest.approx(want[0], abs=1e-5) and [t for t, _ in got[1]] == [t for t, _ in want[1]]
    # without prompt logprobs, the same prompt reuses the template's blocks
    (again,) = cached.generate([prompt], GREEDY)
    assert cached.stats()["prefix_tokens_reused"] == 2 * B


@pytest.mark.parametrize("seed", [0, 1])
def test_a_mixed_batch_with_shared_prefixes_equals_the_engine_without_them(lm, seed):
    """Rows under three templates (and some alone), greedy and seeded sampling, a group, prompt logprobs,
    arriving in bursts between steps: every row's tokens are those of the engine without the cache."""
    rng = random.Random(seed)
    templates = [tokens(rng, rng.randint(B, 3 * B + 7)) for _ in range(3)]
    arrivals = []
    for i in range(14):
        prompt = (rng.choice(templates) if i % 5 else []) + tokens(rng, rng.randint(1, 10))
        params = rng.choice([
            GenerationParams(max_new_tokens=rng.randint(1, 12), eos_token_id=()),
            GenerationParams(max_new_tokens=8, do_sample=True, seed=i, top_k=20, eos_token_id=()),
            GenerationParams(max_new_tokens=5, eos_token_id=(), prompt_logprobs=1),
        ])
        arrivals.append((prompt, params))
    cached, plain = engines(lm, prefill_chunk=24, prefix_cache_tokens=6 * B)
    seqs = drive(cached, arrivals, random.Random(seed))
    refs = drive(plain, arrivals, random.Random(seed + 100))  # other bursts: outputs do not depend on them
    for seq, ref in zip(seqs, refs):
        assert seq.output_ids == ref.output_ids and seq.finish_reason == ref.finish_reason
    assert cached.stats()["prefix_tokens_reused"] > 0 and cached.stats()["slots_used"] == 0
    group = cached.submit_group(templates[0] + [3], GenerationParams(max_new_tokens=6, eos_token_id=()), n=2)
    cached.run()
    want = alone(lm, templates[0] + [3], GenerationParams(max_new_tokens=6, eos_token_id=()))[0]
    assert [s.output_ids for s in group] == [want, want]


def test_prompts_admitted_together_reuse_what_the_first_computes(lm):
    """The cache is looked up when a sequence's first chunk is planned, not when it is admitted: rows that
    arrive together find the template once the first row's chunks have cached it."""
    rng = random.Random(7)
    template = tokens(rng, 4 * B + 3)
    prompts = [template + tokens(rng, 3) for _ in range(3)]
    cached, plain = engines(lm, prefill_chunk=2 * B)
    seqs = cached.generate(prompts, GREEDY)
    assert [s.output_ids for s in seqs] == [r.output_ids for r in plain.generate(prompts, GREEDY)]
    assert cached.stats()["prefix_tokens_reused"] >= 2 * (2 * B)


@pytest.mark.parametrize("chunk", [3 * B, 5 * B, 8 * B])
def test_a_burst_of_prompts_sharing_a_template_computes_it_once(lm, chunk):
    """Prompts that arrive together, none cached: the later ones wait while the first computes the
    template (rather than computing its blocks again alongside it), then take all of it from the cache."""
    rng = random.Random(9)
    template = tokens(rng, 4 * B + 3)
    prompts = [template + tokens(rng, 3) for _ in range(4)]
    cached, plain = engines(lm, prefill_chunk=chunk)
    seqs = cached.generate(prompts, GREEDY)
    assert [s.output_ids for s in seqs] == [r.output_ids for r in plain.generate(prompts, GREEDY)]
    stats = cached.stats()
    # The first prompt whole; each other one only the template's last 3 tokens (its 5th block is its own) and its own 3.
    assert stats["prompt_tokens"] - stats["prefix_tokens_reused"] == len(prompts[0]) + 3 * 6
    assert stats["prefix_tokens_reused"] == 3 * 4 * B


def test_a_sequence_waiting_for_a_template_lets_the_ones_behind_it_prefill(lm):
    cached, _ = engines(lm, prefill_chunk=64)
    rng = random.Random(10)
    template = tokens(rng, 2 * B + 3)
    a, b, c = cached.submit(template + [1], GREEDY), cached.submit(template + [2], GREEDY), cached.submit(tokens(rng, 9), GREEDY)
    cached._take_inbox()
    decision = schedule(cached.waiting, cached.prefilling, cached.running, cached.cache.free_slots,
                        cached.prefill_chunk, cached._reusable, cached._shared)
    assert decision.admit == (a, b, c) and decision.prefill == ((a, 2 * B + 4), (c, 9)) and decision.reuse == ()
    cached.step()
    cached.step()  # b takes the template's two blocks from the cache
    assert b.num_cached == len(b.prompt_ids) and cached.stats()["prefix_tokens_reused"] == 2 * B


def test_the_scheduler_plans_a_reused_prefix_and_the_chunk_after_it(lm):
    cached, _ = engines(lm, prefill_chunk=40)
    rng = random.Random(8)
    template = tokens(rng, 3 * B)
    cached.generate([template + [1]], GREEDY)
    seq = cached.submit(template + [2, 3], GREEDY)
    cached._take_inbox()
    decision = schedule(cached.waiting, cached.prefilling, cached.running, cached.cache.free_slots,
                        cached.prefill_chunk, cached._reusable)
    assert decision.reuse == ((seq, 3 * B),) and decision.prefill == ((seq, 2),)
    assert seq.num_cached == 0 and cached.prefix.blocks_held == 3  # deciding changed nothing
    assert schedule(cached.waiting, cached.prefilling, cached.running, cached.cache.free_slots,
                    cached.prefill_chunk).reuse == ()  # no prefix cache: nothing to reuse


def test_settings_and_stats(lm):
    on = Engine(lm, cache_tokens=4 * 64, max_seq_len=64)
    assert on.prefix is not None and on.prefix.num_blocks == 64 // B  # default: a quarter of cache_tokens
    assert on.stats()["prefix_bytes"] == on.prefix.nbytes == on.cache.nbytes // 4
    stats = Engine(lm, cache_tokens=4 * 64, max_seq_len=64, prefix_cache=False).stats()
    assert stats["prefix_cache"] is False and stats["prefix_bytes"] == 0 and stats["prefix_hit_rate"] == 0.0
    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        Engine(lm, cache_tokens=4 * 64, max_seq_len=64, prefix_cache_tokens=B - 1)
    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        PrefixCache(on.cache, 0)
    assert on.cache.keys[0].dtype == on.prefix.keys[0].dtype == torch.float32
