"""The continuous-batching engine: every sequence's output equals `generate` on its prompt alone (float32),
whatever joins or leaves around it; admission, abort, chunked prefill and threads."""

import dataclasses
import random
import threading

import pytest
import torch

import bloom
from bloom import Engine, GenerationParams
from bloom.tiny import SAMPLE_TEXT

from tests.bloom.engine.conftest import STD



def alone(model, prompt, params, tokenizer=None):
    """`generate` on this prompt alone with these settings → (new tokens, finish reason)."""
    kwargs = dataclasses.asdict(params)
    del kwargs["logprobs"], kwargs["prompt_logprobs"]  # the engine's own: generate records none
    openai = ("logit_bias", "frequency_penalty", "presence_penalty", "min_tokens", "constraint")  # the engine's only
    assert all(kwargs.pop(name) == getattr(GenerationParams(), name) for name in openai), "no reference for these"
    assert kwargs.pop("adapter") is None, "adapters are compared with peft in tests/bloom/test_lora.py"
    kwargs["seed"] = None if params.seed is None else [params.seed]
    out = model.generate(torch.tensor([prompt]), tokenizer=tokenizer, return_dict_in_generate=True, **kwargs)
    n = out.num_new_tokens[0]
    return out.sequences[0, len(prompt) : len(prompt) + n].tolist(), out.finish_reason[0]


def random_prompts(rng, n, max_len=40, vocab=256):
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def drive(engine, arrivals, rng, watch=None):
    """Submit `arrivals` [(prompt, params)] a few at a time between steps, in random bursts, until all end."""
    pending, seqs = list(arrivals), []
    while pending or engine.has_work:
        for _ in range(rng.choice([0, 0, 1, 2])):
            if pending:
                seqs.append(engine.submit(*pending.pop(0)))
        engine.step()
        if watch:
            watch(engine)
    return seqs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_generate_alone_whatever_the_arrivals(lm, seed):
    rng = random.Random(seed)
    prompts = random_prompts(rng, 12)
    params = []
    for p in prompts:
        n = rng.randint(1, 24)
        free, _ = alone(lm, p, GenerationParams(max_new_tokens=n, eos_token_id=()))
        # Some rows end on an eos id that they really produce, some on the config's, some never.
        eos = rng.choice([(), None, (free[rng.randrange(len(free))],)])
        params.append(GenerationParams(max_new_tokens=n, eos_token_id=eos))
    engine = Engine(lm, cache_tokens=4 * 64, max_seq_len=64, prefill_chunk=16)
    seen = {"running": 0, "waiting": 0}

    def watch(e):
        seen["running"] = max(seen["running"], len(e.running))
        seen["waiting"] = max(seen["waiting"], len(e.waiting))
        assert len(e.running) + len(e.prefilling) <= 4

    order = list(range(len(prompts)))
    rng.shuffle(order)
    seqs = drive(engine, [(prompts[i], params[i]) for i in order], rng, watch)
    reasons = set()
    for i, seq in zip(order, seqs):
        want, reason = alone(lm, prompts[i], params[i])
        assert seq.output_ids == want, (i, params[i])
        assert seq.finish_reason == reason
        reasons.add(reason)
    assert seen["running"] >= 3 and seen["waiting"] >= 1  # rows really shared steps, and some had to wait
    assert "eos" in reasons and "length" in reasons
    assert max(map(len, prompts)) > 16  # some prompt was prefilled in several chunks
    assert engine.stats()["slots_used"] == 0 and not engine.has_work


def test_mixed_sampling_settings_in_one_batch(lm):
    """Greedy, penalised, top-k / top-p / temperature sampled rows side by side, each as it is alone; a seeded
    row draws the same tokens whatever runs beside it."""
    rng = random.Random(3)
    prompts = random_prompts(rng, 6, max_len=12)
    settings = [
        GenerationParams(max_new_tokens=14, eos_token_id=()),
        GenerationParams(max_new_tokens=10, repetition_penalty=1.4, eos_token_id=()),
        GenerationParams(max_new_tokens=16, do_sample=True, seed=11, eos_token_id=()),
        GenerationParams(max_new_tokens=12, do_sample=True, seed=12, top_k=5, temperature=0.7, eos_token_id=()),
        GenerationParams(max_new_tokens=9, do_sample=True, seed=13, top_p=0.8, repetition_penalty=1.2,
                         eos_token_id=()),
        GenerationParams(max_new_tokens=15, do_sample=True, seed=14, top_k=1, eos_token_id=()),  # greedy in effect
    ]
    engine = Engine(lm, cache_tokens=512, max_seq_len=64, prefill_chunk=32)
    seqs = engine.generate(prompts, settings)
    for prompt, params, seq in zip(prompts, settings, seqs):
        assert seq.output_ids == alone(lm, prompt, params)[0], params
    greedy = alone(lm, prompts[2], dataclasses.replace(settings[2], do_sample=False))[0]
    assert seqs[2].output_ids != greedy  # the sampled row really sampled
    assert seqs[5].output_ids == alone(lm, prompts[5], GenerationParams(max_new_tokens=15, eos_token_id=()))[0]
    # The same seeded row alone in the engine, and beside different company: the same tokens.
    solo = engine.generate([prompts[3]], settings[3])[0]
    others = [GenerationParams(max_new_tokens=20, do_sample=True, eos_token_id=())] * 3
    crowd = engine.generate([prompts[0], prompts[3], prompts[1], prompts[4]], [others[0], settings[3], *others[1:]])
    assert solo.output_ids == crowd[1].output_ids == seqs[3].output_ids


def test_stop_strings_and_eos_per_sequence(text_lm, tokenizer):
    prompts = [tokenizer.encode(t)[:12] for t in SAMPLE_TEXT[:6]]
    free = [alone(text_lm, p, GenerationParams(max_new_tokens=20, eos_token_id=()))[0] for p in prompts]
    params = []
    for i, tokens in enumerate(free):
        text = tokenizer.decode(tokens)
        stop = text[4 + i : 6 + i]
        stops = (stop,) if len(stop) == 2 and "\ufffd" not in stop and i % 3 != 2 else ()
        eos = (tokens[5],) if i % 3 == 2 else ()
        params.append(GenerationParams(max_new_tokens=20, stop_strings=stops, eos_token_id=eos))
    engine = Engine(text_lm, tokenizer, cache_tokens=256, max_seq_len=64, prefill_chunk=8)
    seqs = drive(engine, list(zip(prompts, params)), random.Random(4))
    reasons = []
    for prompt, p, seq in zip(prompts, params, seqs):
        want, reason = alone(text_lm, prompt, p, tokenizer)
        assert seq.output_ids == want and seq.finish_reason == reason
        reasons.append(reason)
    assert "stop" in reasons and "eos" in reasons
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(text_lm, cache_tokens=64, max_seq_len=64).submit([5], GenerationParams(stop_strings=("x",)))


def test_admission_waits_for_room_and_abort_frees_it(lm):
    rng = random.Random(5)
    a, b = random_prompts(rng, 2, max_len=10)
    long = GenerationParams(max_new_tokens=50, eos_token_id=())
    engine = Engine(lm, cache_tokens=64, max_seq_len=64)  # room for one sequence at a time
    tokens_a = []
    first = engine.submit(a, long, on_token=lambda seq, t: tokens_a.append(t))
    for _ in range(3):
        engine.step()
    second = engine.submit(b, GenerationParams(max_new_tokens=6, eos_token_id=()))
    engine.step()
    assert list(engine.waiting) == [second] and second.slot is None  # no room: it waits, holding nothing
    assert engine.stats()["slots_used"] == 1
    engine.abort(first)
    engine.step()  # the abort is taken first thing, and the room goes to the waiting sequence
    assert first.finished and first.finish_reason == "abort" and first.slot is None
    assert tokens_a[-1] is None and tokens_a[:-1] == first.output_ids  # the callback was told it ended
    assert list(first.stream()) == first.output_ids == alone(lm, a, long)[0][: len(first.output_ids)]
    assert second.slot == 0 and not engine.waiting
    engine.run()
    assert second.output_ids == alone(lm, b, GenerationParams(max_new_tokens=6, eos_token_id=()))[0]
    assert engine.stats()["slots_used"] == 0


@pytest.mark.parametrize("prompt_len, max_new, message", [
    (40, 30, "40 tokens \\+ max_new_tokens 30 = 70 tokens can never fit .* slots of 64 tokens"),
    (0, 5, "empty"),
])
def test_a_sequence_that_can_never_fit_is_refused(lm, prompt_len, max_new, message):
    engine = Engine(lm, cache_tokens=128, max_seq_len=64)
    with pytest.raises(ValueError, match=message):
        engine.submit([7] * prompt_len, GenerationParams(max_new_tokens=max_new))
    assert not engine.has_work  # nothing half-queued


@pytest.mark.parametrize("params, prompt, message", [
    (GenerationParams(do_sample=True, temperature=0.0), [5], "temperature"),
    (GenerationParams(top_p=1.5), [5], "top_p"),
    (GenerationParams(max_new_tokens=-1), [5], "max_new_tokens"),
    (GenerationParams(), [5, 256], "token ids must be in"),
])
def test_bad_settings_are_refused_at_submit(lm, params, prompt, message):
    with pytest.raises(ValueError, match=message):
        Engine(lm, cache_tokens=64, max_seq_len=64).submit(prompt, params)


def test_a_bad_prompt_in_a_list_queues_none_of_them(lm):
    engine = Engine(lm, cache_tokens=128, max_seq_len=64)
    with pytest.raises(ValueError, match="can never fit"):
        engine.generate([[5, 6], [7] * 60, [8]], GenerationParams(max_new_tokens=10))
    assert not engine.has_work


def test_a_long_prefill_does_not_stall_running_streams(lm):
    rng = random.Random(6)
    short, long_prompt = random_prompts(rng, 1, max_len=5)[0], [rng.randrange(4, 256) for _ in range(100)]
    engine = Engine(lm, cache_tokens=256, max_seq_len=128, prefill_chunk=16)
    running = engine.submit(short, GenerationParams(max_new_tokens=30, eos_token_id=()))
    engine.step()
    late = engine.submit(long_prompt, GenerationParams(max_new_tokens=4, eos_token_id=()))
    prefill_steps = 0
    while not late.output_ids:
        before = len(running.output_ids)
        engine.step()
        assert len(running.output_ids) == before + 1  # one token every step while the long prompt goes in
        prefill_steps += 1
    assert prefill_steps == 7  # 100 prompt tokens in chunks of 16
    engine.run()
    assert late.output_ids == alone(lm, long_prompt, late.params)[0]
    assert running.output_ids == alone(lm, short, running.params)[0]


def test_zero_new_tokens_ends_at_once(lm):
    engine = Engine(lm, cache_tokens=64, max_seq_len=64)
    events = []
    seq = engine.submit([5, 6], GenerationParams(max_new_tokens=0), on_token=lambda s, t: events.append(t))
    engine.run()
    assert seq.finish_reason == "length" and seq.result() == [] and events == [None]


def test_threads_submit_stream_and_abort_while_a_background_loop_steps(lm):
    rng = random.Random(7)
    prompts = random_prompts(rng, 8, max_len=20)
    settings = [GenerationParams(max_new_tokens=rng.randint(2, 20), eos_token_id=(),
                                 do_sample=i % 2 == 1, seed=100 + i, top_k=[0, 8][i % 4 // 2]) for i in range(8)]
    got, errors = {}, []
    victim_started, abort_sent = threading.Event(), threading.Event()

    def hold_at_third_token(seq, token):  # on the engine thread: pause it until the abort is in
        if len(seq.output_ids) == 3:
            victim_started.set()
            abort_sent.wait(60)

    with Engine(lm, cache_tokens=6 * 256, max_seq_len=256, prefill_chunk=16) as engine:
        def client(i):
            try:
                seq = engine.submit(prompts[i], settings[i])
                got[i] = (list(seq.stream(timeout=60)), seq.finish_reason)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        victim = engine.submit(prompts[0], GenerationParams(max_new_tokens=200, eos_token_id=()),
                               on_token=hold_at_third_token)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        assert victim_started.wait(60)
        engine.abort(victim)  # from this thread, while the others stream
        abort_sent.set()
        for t in threads:
            t.join(60)
        victim.result(timeout=60)
    assert not errors
    assert victim.finish_reason == "abort" and len(victim.output_ids) == 3  # ended before the next model call
    for i in range(8):
        assert got[i] == (alone(lm, prompts[i], settings[i])[0], "length"), i


def test_a_failing_step_ends_its_sequences_with_the_error(lm, monkeypatch):
    engine = Engine(lm, cache_tokens=64, max_seq_len=64)
    seq = engine.submit([5, 6, 7], GenerationParams(max_new_tokens=4))

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(lm.transformer, "forward", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert seq.finish_reason == "error" and engine.stats()["slots_used"] == 0 and not engine.has_work
    with pytest.raises(RuntimeError, match="generation failed"):
        seq.result()


def test_running_sequences_are_kept_in_the_first_slots(lm):
    """When a sequence ends, a running one moves into its slot (swapping with a prompt being prefilled
    there), so decoding reads the cache in place; outputs are unchanged by the moves."""
    rng = random.Random(8)
    prompts = random_prompts(rng, 3, max_len=8) + [[rng.randrange(4, 256) for _ in range(40)]]
    lengths = [30, 3, 30, 10]
    engine = Engine(lm, cache_tokens=3 * 64, max_seq_len=64, prefill_chunk=8)
    a, b, c = (engine.submit(p, GenerationParams(max_new_tokens=n, eos_token_id=())) for p, n in zip(prompts[:3], lengths))
    while not b.finished:
        engine.step()
    assert (a.slot, b.slot, c.slot) == (0, None, 2)
    d = engine.submit(prompts[3], GenerationParams(max_new_tokens=lengths[3], eos_token_id=()))
    engine.step()  # d takes the free slot 1 to prefill, then swaps with c, which decodes in slot 1
    assert (a.slot, c.slot, d.slot) == (0, 1, 2) and 0 < d.num_cached < 40
    engine.run()
    for prompt, seq in zip(prompts, (a, b, c, d)):
        assert seq.output_ids == alone(lm, prompt, seq.params)[0]


def test_bfloat16_model_gets_a_bfloat16_cache(make_checkpoint):
    model = bloom.BloomForCausalLM.from_pretrained(make_checkpoint(std=STD, seed=1), dtype="bfloat16")
    engine = Engine(model, cache_tokens=128, max_seq_len=64)
    assert engine.cache.keys[0].dtype == torch.bfloat16  # half the memory of a float32 cache per token
    seqs = engine.generate([[5, 6, 7], [8] * 20], [GenerationParams(max_new_tokens=n, eos_token_id=()) for n in (9, 4)])
    assert [len(s.output_ids) for s in seqs] == [9, 4] and all(s.finish_reason == "length" for s in seqs)


# ----------------------------------------------------------------------------- groups (n) and log-probabilities


def count_fed_tokens(model):
    """A hook counting the token ids every forward feeds (padding included): (counts list, handle)."""
    fed = []
    handle = model.transformer.register_forward_pre_hook(lambda module, args: fed.append(args[0].numel()))
    return fed, handle


def test_a_group_prefills_its_prompt_once_and_greedy_siblings_equal_generate_alone(lm):
    rng = random.Random(9)
    prompt = [rng.randrange(4, 256) for _ in range(20)]
    params = GenerationParams(max_new_tokens=7, eos_token_id=())
    engine = Engine(lm, cache_tokens=4 * 64, max_seq_len=64, prefill_chunk=8)
    fed, handle = count_fed_tokens(lm)
    try:
        group = engine.submit_group(prompt, params, n=3)
        engine.run()
    finally:
        handle.remove()
    want = alone(lm, prompt, params)[0]
    assert [s.output_ids for s in group] == [want] * 3 and all(s.finish_reason == "length" for s in group)
    # 20 prompt tokens once (chunks of 8, 8, 4), then 6 decode steps of the 3 sequences together.
    assert fed == [8, 8, 4] + [3] * 6
    assert engine.stats()["slots_used"] == 0 and not engine.has_work


def test_groups_among_other_sequences_each_equal_generate_alone(lm):
    """Groups and single sequences arriving in bursts, with more work than slots: every sequence as alone."""
    rng = random.Random(10)
    prompts = random_prompts(rng, 8, max_len=30)
    sizes = [rng.choice([1, 2, 3]) for _ in prompts]
    params = [GenerationParams(max_new_tokens=rng.randint(1, 15), eos_token_id=()) for _ in prompts]
    engine = Engine(lm, cache_tokens=4 * 64, max_seq_len=64, prefill_chunk=16)
    pending, groups = list(range(len(prompts))), {}
    while pending or engine.has_work:
        for _ in range(rng.choice([0, 1, 2])):
            if pending:
                i = pending.pop(0)
                groups[i] = engine.submit_group(prompts[i], params[i], n=sizes[i])
        engine.step()
        assert len(engine.running) + len(engine.prefilling) <= 4
    for i, group in groups.items():
        want = alone(lm, prompts[i], params[i])[0]
        assert [s.output_ids for s in group] == [want] * sizes[i], i
    assert engine.stats()["slots_used"] == 0


def test_seeded_siblings_are_reproducible_and_differ_from_each_other(lm):
    prompt = [5, 9, 23, 77, 140]
    params = GenerationParams(max_new_tokens=12, do_sample=True, seed=21, eos_token_id=())
    engine = Engine(lm, cache_tokens=4 * 64, max_seq_len=64)
    group = engine.submit_group(prompt, params, n=3)
    engine.run()
    outputs = [s.output_ids for s in group]
    assert len({tuple(o) for o in outputs}) == 3  # different samples
    for j, seq in enumerate(group):  # sibling j draws exactly what seed + j draws alone
        assert seq.params.seed == 21 + j
        assert seq.output_ids == alone(lm, prompt, dataclasses.replace(params, seed=21 + j))[0]
    again = engine.generate([prompt], params)[0]
    assert again.output_ids == outputs[0]


def test_a_group_waits_for_a_slot_per_sequence_and_one_that_never_fits_is_refused(lm):
    engine = Engine(lm, cache_tokens=3 * 64, max_seq_len=64)
    with pytest.raises(ValueError, match="a group of 4 sequences needs 4 cache slots at once; the engine has 3"):
        engine.submit_group([5, 6], GenerationParams(max_new_tokens=3), n=4)
    assert not engine.has_work
    first = engine.submit([5, 6, 7], GenerationParams(max_new_tokens=5, eos_token_id=()))
    engine.step()
    group = engine.submit_group([8, 9], GenerationParams(max_new_tokens=3, eos_token_id=()), n=3)
    single = engine.submit([10], GenerationParams(max_new_tokens=2, eos_token_id=()))
    engine.step()
    # Two slots free, the group needs three: it waits, and the sequence behind it waits its turn.
    assert list(engine.waiting) == [group[0], single] and engine.stats()["slots_used"] == 1
    engine.abort(group[2])  # aborted before the prompt went in: it never takes a slot
    engine.run()
    assert first.finish_reason == "length" and single.finish_reason == "length"
    assert [s.finish_reason for s in group] == ["length", "length", "abort"] and group[2].output_ids == []
    assert engine.stats()["slots_used"] == 0
    leader_aborted = engine.submit_group([8, 9], GenerationParams(max_new_tokens=3), n=2)
    engine.abort(leader_aborted[0])  # its sibling never started: it ends too
    engine.run()
    assert [s.finish_reason for s in leader_aborted] == ["abort", "abort"]
    assert engine.stats()["slots_used"] == 0 and not engine.has_work


def test_logprobs_are_the_models_log_softmax_at_those_positions(lm):
    """Recorded for the rows that ask: the chosen token's logprob and the top n, ordered, equal to
    log_softmax of the model's logits over prompt + output (computed here in one forward), whatever the
    sampling settings, the chunking of the prompt or the rows around."""
    rng = random.Random(11)
    prompts = random_prompts(rng, 4, max_len=30) + [[rng.randrange(4, 256) for _ in range(45)]]
    settings = [
        GenerationParams(max_new_tokens=9, eos_token_id=(), logprobs=3, prompt_logprobs=2),
        GenerationParams(max_new_tokens=7, eos_token_id=()),  # asks nothing
        GenerationParams(max_new_tokens=8, do_sample=True, seed=4, temperature=0.6, top_k=5, eos_token_id=(),
                         logprobs=0),
        GenerationParams(max_new_tokens=6, repetition_penalty=1.5, eos_token_id=(), logprobs=5),
        GenerationParams(max_new_tokens=5, eos_token_id=(), logprobs=1, prompt_logprobs=4),  # 3 prompt chunks
    ]
    engine = Engine(lm, cache_tokens=8 * 64, max_seq_len=64, prefill_chunk=16)
    seqs = engine.generate(prompts, settings)
    assert seqs[1].logprobs is None and seqs[1].prompt_logprobs is None
    for prompt, params, seq in zip(prompts, settings, seqs):
        assert seq.output_ids == alone(lm, prompt, params)[0]  # asking changes nothing
        if params.logprobs is None:
            continue
        ids = prompt + seq.output_ids
        with torch.inference_mode():
            want = lm(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
        scored = [(len(prompt) + k, lp, top, params.logprobs) for k, (lp, top) in enumerate(seq.logprobs)]
        if params.prompt_logprobs is not None:
            assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(prompt)
            scored += [(p, lp, top, params.prompt_logprobs) for p, (lp, top) in enumerate(seq.prompt_logprobs[1:], 1)]
        assert len(seq.logprobs) == len(seq.output_ids)
        for position, lp, top, n in scored:
            row = want[position - 1]  # position t - 1 scores token t
            assert lp == pytest.approx(row[ids[position]].item(), abs=1e-4)
            assert len(top) == n
            assert [t for t, _ in top] == row.topk(n).indices.tolist()
            assert [v for _, v in top] == pytest.approx(row.topk(n).values.tolist(), abs=1e-4)
            assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    # The sampled row drew from its tempered, top-k distribution; its logprobs are still the model's.
    assert seqs[2].output_ids != alone(lm, prompts[2], dataclasses.replace(settings[2], do_sample=False))[0]


def test_a_prompt_can_be_scored_without_generating(lm):
    """max_new_tokens 0 with prompt_logprobs (OpenAI's echo with max_tokens 0): the prompt is run, nothing
    is generated, and the group shares the one scoring."""
    prompt = [5, 9, 23, 77, 140, 3, 18]
    engine = Engine(lm, cache_tokens=4 * 64, max_seq_len=64)
    fed, handle = count_fed_tokens(lm)
    try:
        group = engine.submit_group(prompt, GenerationParams(max_new_tokens=0, prompt_logprobs=1), n=2)
        engine.run()
    finally:
        handle.remove()
    assert fed == [len(prompt)]
    assert [(s.finish_reason, s.output_ids) for s in group] == [("length", []), ("length", [])]
    assert group[1].prompt_logprobs == group[0].prompt_logprobs and len(group[0].prompt_logprobs) == len(prompt)
    assert engine.stats()["slots_used"] == 0


def test_the_default_cache_fits_sixty_four_sequences_in_half_the_free_memory(lm):
    from bloom.engine import fit_cache_tokens, free_memory

    cfg = lm.config
    per_token = 2 * cfg.n_layer * cfg.hidden_size * 4  # keys and values of every layer, float32
    assert fit_cache_tokens(lm, 100, free=lambda device: 10**12) == 64 * 100
    # half of what is free holds 3.5 sequences: 3 slots
    assert fit_cache_tokens(lm, 100, free=lambda device: 2 * 350 * per_token) == 3 * 100
    assert fit_cache_tokens(lm, 100, free=lambda device: 0) == 100  # always one
    assert free_memory(torch.device("cpu")) > 0
    engine = Engine(lm, cache_tokens=fit_cache_tokens(lm, 64), max_seq_len=64)
    assert engine.cache.num_slots == 64 and engine.cache.nbytes == 64 * 64 * per_token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_caches_start_as_zeros_of_their_shape_and_dtype_and_take_writes(lm, dtype):
    # The slot and prefix caches come from calloc'd pages on CPU (lazy_zeros): the masked positions a
    # forward reads must be exact zeros, and the tensors must be ordinary writable ones.
    from bloom.engine.cache import lazy_zeros

    t = lazy_zeros((3, 2, 5, 4), dtype, torch.device("cpu"))
    assert t.shape == (3, 2, 5, 4) and t.dtype == dtype and t.is_contiguous()
    assert torch.equal(t, torch.zeros_like(t))
    t[1, :, 2] = 7
    assert t.sum().item() == 7 * 2 * 4
    engine = Engine(lm, cache_tokens=2 * 32, max_seq_len=32)
    assert all(torch.count_nonzero(b) == 0 for b in engine.cache.keys + engine.cache.values)
    assert all(torch.count_nonzero(b) == 0 for b in engine.prefix.keys + engine.prefix.values)
