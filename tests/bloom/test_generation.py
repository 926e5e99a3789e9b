"""Generation: greedy parity with the reference, padding independence, finish reasons, streaming, sampling."""

import pytest
import torch

import bloom
from bloom.tiny import make_tiny_checkpoint
from tests.conftest import left_padded, load_reference

STD = 0.3  # wide random weights: varied, non-repeating generations


def prompts(seed=0, lengths=(7, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def lm_path(make_checkpoint):
    return make_checkpoint(std=STD)


@pytest.fixture(scope="module")
def lm(lm_path):
    return bloom.BloomForCausalLM.from_pretrained(lm_path)


@pytest.fixture(scope="module")
def text_lm(tmp_path_factory):
    """A model with a tokenizer whose ids cover its vocabulary, for stop strings."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("text_lm"), vocab_size=512)
    return bloom.BloomForCausalLM.from_pretrained(path), bloom.BloomTokenizerFast.from_pretrained(path)


def test_greedy_matches_reference_token_for_token(lm, lm_path):
    ids, mask = left_padded(prompts())
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None)
    ref = load_reference(lm_path).generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                           pad_token_id=3, eos_token_id=None)
    assert ours.shape == (3, ids.shape[1] + 16)
    assert torch.equal(ours, ref)
    assert len(set(ours[0, ids.shape[1]:].tolist())) > 4  # a real continuation, not one repeated token


def test_greedy_with_repetition_penalty_matches_reference(lm, lm_path):
    ids = torch.tensor(prompts(1, lengths=(6, 6)))
    kwargs = dict(max_new_tokens=12, repetition_penalty=1.3, eos_token_id=None)
    ref = load_reference(lm_path).generate(ids, do_sample=False, pad_token_id=3, **kwargs)
    assert torch.equal(lm.generate(ids, **kwargs), ref)
    assert not torch.equal(lm.generate(ids, max_new_tokens=12, eos_token_id=None), ref)


def test_padded_batch_equals_each_prompt_alone(lm):
    rows = prompts(2, lengths=(9, 2, 5, 4))
    ids, mask = left_padded(rows)
    batched = lm.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    for row, prompt in enumerate(rows):
        alone = lm.generate(torch.tensor([prompt]), max_new_tokens=10, eos_token_id=None)
        assert batched[row, ids.shape[1]:].tolist() == alone[0, len(prompt):].tolist()


def test_rows_finish_independently_with_reasons(lm):
    ids, mask = left_padded(prompts())
    free = lm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    T = ids.shape[1]
    eos = int(free[0, T + 2])  # make row 0's third new token the end-of-sequence token
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=3,
                      return_dict_in_generate=True)
    assert out.finish_reason[0] == "eos" and out.num_new_tokens[0] == 3
    assert out.sequences[0, T : T + 3].tolist() == free[0, T : T + 3].tolist()
    assert out.sequences[0, T + 3 :].tolist() == [3] * (out.sequences.shape[1] - T - 3)  # padded after eos
    for row in (1, 2):  # rows that never produce `eos` run to the limit, unchanged
        if eos not in free[row, T:].tolist():
            assert out.finish_reason[row] == "length" and out.num_new_tokens[row] == 8
            assert torch.equal(out.sequences[row], free[row])


def test_eos_for_every_row_stops_early(lm):
    ids = torch.tensor(prompts(3, lengths=(5,)))
    first = int(lm.generate(ids, max_new_tokens=1)[0, -1])
    out = lm.generate(ids, max_new_tokens=50, eos_token_id=[first, 2], return_dict_in_generate=True)
    assert out.sequences.shape[1] == ids.shape[1] + 1 and out.finish_reason == ["eos"]


def test_stop_strings(text_lm):
    model, tok = text_lm
    enc = tok(["The model reads", "Le renard"], padding=True, return_tensors="pt")
    T = enc.input_ids.shape[1]
    free = model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=20, eos_token_id=None)
    text = tok.decode(free[0, T:])
    stop = text[6:8]
    assert len(stop) == 2 and "\ufffd" not in stop
    out = model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=20, eos_token_id=None,
                         stop_strings=[stop], tokenizer=tok, return_dict_in_generate=True)
    assert out.finish_reason[0] == "stop"
    n = out.num_new_tokens[0]
    new = out.sequences[0, T : T + n]
    assert stop in tok.decode(new) and stop not in tok.decode(new[:-1])  # stopped on the completing token
    assert new.tolist() == free[0, T : T + n].tolist()
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(enc.input_ids, stop_strings=["x"])


def test_stream_yields_the_same_tokens(lm):
    ids, mask = left_padded(prompts())
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, return_dict_in_generate=True)
    steps = list(lm.stream(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None))
    assert len(steps) == 6
    assert torch.equal(torch.stack([s.tokens for s in steps], 1), out.sequences[:, ids.shape[1]:])
    assert steps[-1].finish_reason == ["length"] * 3 and steps[0].finish_reason == [None] * 3


def test_sampling_is_reproducible_per_row_seed(lm):
    ids, mask = left_padded(prompts())
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.0, eos_token_id=None)
    a = lm.generate(ids, seed=[1, 2, 3], **kw)
    b = lm.generate(ids, seed=[1, 2, 3], **kw)
    c = lm.generate(ids, seed=[4, 5, 6], **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # A row's sample depends on its own seed, not on its batch neighbours.
    alone = lm.generate(torch.tensor([prompts()[1]]), max_new_tokens=12, do_sample=True, seed=2, eos_token_id=None)
    assert alone[0, 3:].tolist() == a[1, ids.shape[1]:].tolist()


def test_top_k_1_and_tiny_top_p_are_greedy(lm):
    ids, mask = left_padded(prompts())
    greedy = lm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = lm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None,
                              do_sample=True, seed=0, temperature=1.5, **kw)
        assert torch.equal(sampled, greedy), kw


def test_per_row_sampling_parameters(lm):
    """Rows of one batch may carry different settings: a greedy-like row beside a sampled one."""
    ids, mask = left_padded(prompts())
    greedy = lm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    mixed = lm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, do_sample=True,
                        seed=7, top_k=[1, 0, 1], temperature=[1.0, 2.0, 1.0])
    assert torch.equal(mixed[0], greedy[0]) and torch.equal(mixed[2], greedy[2])
    assert not torch.equal(mixed[1], greedy[1])


@pytest.mark.parametrize("kwargs, message", [
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"do_sample": True, "top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"temperature": [1.0, 2.0]}, "one value per row"),
    ({"seed": [1, 2]}, "one per row"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
])
def test_bad_generation_parameters(lm, kwargs, message):
    ids = torch.tensor(prompts(lengths=(4, 4, 4)))
    with pytest.raises(ValueError, match=message):
        lm.generate(ids, **kwargs)


def test_all_padding_row_is_refused(lm):
    with pytest.raises(ValueError, match="all-padding"):
        lm.generate(torch.tensor([[3, 3], [5, 6]]), attention_mask=torch.tensor([[0, 0], [1, 1]]))
