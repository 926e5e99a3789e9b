"""OpenAI's per-sequence settings in the engine (float32, tiny models): frequency and presence penalties
as OpenAI defines them (counted over generated tokens only), logit_bias, and min_tokens held against eos
and stop strings; each per sequence in a mixed batch, the others unaffected."""

import dataclasses

import pytest
import torch

from bloom.engine import Engine, GenerationParams
from tests.bloom.engine.test_engine import alone

PROMPTS = [[5, 9, 11, 40, 7], [8, 3], [100, 101, 102, 103, 104], [60, 61, 62]]
NEW = 12



def reference(model, prompt, n, frequency=0.0, presence=0.0, bias=None):
    """Greedy by hand over the model's full-sequence logits: logits[t] += bias[t], minus count[t] · frequency
    + (count[t] > 0) · presence, count over the tokens generated so far; argmax."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
            for t, b in (bias or {}).items():
                logits[t] += b
            for t in set(out):
                logits[t] -= out.count(t) * frequency + presence
            out.append(int(logits.argmax()))
    return out


def run(model, prompts, params, **engine_kwargs):
    engine = Engine(model, cache_tokens=4 * 64, max_seq_len=64, **engine_kwargs)
    return engine.generate(prompts, params)


@pytest.mark.parametrize("setting", [{"frequency": 2.0}, {"presence": 2.0}, {"frequency": -2.0},
                                     {"presence": -1.5, "frequency": 0.5}])
def test_a_penalty_changes_greedy_output_as_openai_defines_it(lm, setting):
    params = GenerationParams(max_new_tokens=NEW, eos_token_id=(), frequency_penalty=setting.get("frequency", 0.0),
                              presence_penalty=setting.get("presence", 0.0))
    seqs = run(lm, PROMPTS, params)
    plain = [reference(lm, p, NEW) for p in PROMPTS]
    want = [reference(lm, p, NEW, **setting) for p in PROMPTS]
    assert [s.output_ids for s in seqs] == want
    assert want != plain  # the penalty did change the output (else this test proves nothing)


def test_the_prompt_is_not_counted(text_lm, tokenizer):
    """A prompt ending in tokens the model then repeats: the penalties count only generated tokens, so the
    first new token is the plain greedy one although the prompt holds it."""
    start = tokenizer.encode("The quick brown fox")
    prompt = start + reference(text_lm, start, 2)
    first = reference(text_lm, prompt, 1)[0]
    with torch.no_grad():
        logits = text_lm(torch.tensor([prompt])).logits[0, -1]
    counted = logits - torch.bincount(torch.tensor(prompt), minlength=logits.shape[0]).clamp(max=1) * 4.0
    assert first in prompt and int(counted.argmax()) != first  # counting the prompt would change it
    seq, = run(text_lm, [prompt], GenerationParams(max_new_tokens=4, eos_token_id=(), frequency_penalty=2.0,
                                                   presence_penalty=2.0))
    assert seq.output_ids[0] == first and seq.output_ids == reference(text_lm, prompt, 4, 2.0, 2.0)


def test_a_logit_bias_forces_and_bans_tokens(lm):
    forced, = run(lm, PROMPTS[:1], GenerationParams(max_new_tokens=5, eos_token_id=(), logit_bias={42: 100}))
    assert forced.output_ids == [42] * 5
    plain = reference(lm, PROMPTS[0], 5)
    banned, = run(lm, PROMPTS[:1], GenerationParams(max_new_tokens=5, eos_token_id=(),
                                                    logit_bias={plain[0]: -100, 17: 0.5}))
    assert banned.output_ids == reference(lm, PROMPTS[0], 5, bias={plain[0]: -100, 17: 0.5})
    assert banned.output_ids[0] != plain[0]


def test_each_setting_is_per_sequence_in_a_mixed_batch(lm):
    """One batch: a frequency penalty, a presence penalty, a logit bias, min_tokens, sampling and plain
    greedy rows side by side; each gets its own setting's output, the plain ones exactly generate's."""
    plain = GenerationParams(max_new_tokens=NEW, eos_token_id=())
    sampled = GenerationParams(max_new_tokens=NEW, eos_token_id=(), do_sample=True, seed=3, top_k=20)
    params = [GenerationParams(max_new_tokens=NEW, eos_token_id=(), frequency_penalty=2.0), plain,
              GenerationParams(max_new_tokens=NEW, eos_token_id=(), presence_penalty=-2.0), sampled,
              GenerationParams(max_new_tokens=NEW, eos_token_id=(), logit_bias={42: 100}),
              GenerationParams(max_new_tokens=NEW, eos_token_id=2, min_tokens=4, logit_bias={2: 100})]
    prompts = PROMPTS + PROMPTS[:2]
    seqs = run(lm, prompts, params, prefill_chunk=7)  # prompts join over several steps
    assert seqs[0].output_ids == reference(lm, prompts[0], NEW, frequency=2.0)
    assert seqs[1].output_ids == alone(lm, prompts[1], plain)[0]
    assert seqs[2].output_ids == reference(lm, prompts[2], NEW, presence=-2.0)
    assert seqs[3].output_ids == alone(lm, prompts[3], sampled)[0]
    assert seqs[4].output_ids == [42] * NEW
    assert seqs[5].output_ids[4] == 2 and seqs[5].finish_reason == "eos" and 2 not in seqs[5].output_ids[:4]


def test_min_tokens_holds_off_eos(lm):
    """A bias that makes eos the greedy choice at once: with min_tokens the sequence still generates
    that many tokens (none of them eos), then ends on eos; without, it ends at its first token."""
    eos_now = {"eos_token_id": 2, "logit_bias": {2: 100}, "max_new_tokens": NEW}
    at_once, held = run(lm, PROMPTS[:2], [GenerationParams(**eos_now), GenerationParams(**eos_now, min_tokens=5)])
    assert at_once.output_ids == [2] and at_once.finish_reason == "eos"
    assert len(held.output_ids) == 6 and held.output_ids[-1] == 2 and 2 not in held.output_ids[:5]
    assert held.finish_reason == "eos"
    assert held.output_ids[:5] == reference(lm, PROMPTS[1], 5, bias={2: -float("inf")})  # greedy with eos masked
    full, = run(lm, PROMPTS[:1], GenerationParams(**{**eos_now, "max_new_tokens": 4}, min_tokens=4))
    assert len(full.output_ids) == 4 and full.finish_reason == "length"  # min_tokens = max_new_tokens


def test_min_tokens_holds_off_stop_strings(text_lm, tokenizer):
    """A stop string that appears in the first new token's text only: it ends the sequence at once, but
    with min_tokens it is held, and (not appearing again) never ends it."""
    prompt = tokenizer.encode("The quick brown fox")
    free = GenerationParams(max_new_tokens=NEW, eos_token_id=())
    expected = reference(text_lm, prompt, NEW)
    stop = tokenizer.decode(expected[:1])
    assert stop.strip() and stop not in tokenizer.decode(expected[1:])
    params = GenerationParams(max_new_tokens=NEW, eos_token_id=(), stop_strings=(stop,))
    early, held = Engine(text_lm, tokenizer, cache_tokens=128, max_seq_len=64).generate(
        [prompt, prompt], [params, dataclasses.replace(params, min_tokens=4)])
    assert early.output_ids == expected[:1] and early.finish_reason == "stop"
    assert held.output_ids == expected and held.finish_reason == "length"
    assert alone(text_lm, prompt, free, tokenizer)[0] == expected


@pytest.mark.parametrize("params, message", [
    (GenerationParams(frequency_penalty=2.5), "frequency_penalty must be a number in \\[-2, 2\\]"),
    (GenerationParams(presence_penalty=float("nan")), "presence_penalty"),
    (GenerationParams(max_new_tokens=3, min_tokens=4), "min_tokens must be an integer in \\[0, max_new_tokens=3\\]"),
    (GenerationParams(min_tokens=-1), "min_tokens"),
    (GenerationParams(logit_bias={5: 101}), "logit_bias values must be numbers in \\[-100, 100\\]"),
    (GenerationParams(logit_bias={256: 1}), "logit_bias token ids must be integers in \\[0, 256\\)"),
    (GenerationParams(logit_bias=[(5, 1)]), "logit_bias must be a mapping"),
])
def test_bad_settings_are_refused_at_submit(lm, params, message):
    engine = Engine(lm, cache_tokens=64, max_seq_len=64)
    with pytest.raises(ValueError, match=message):
        engine.submit([5, 6], params)
    assert not engine.has_work
