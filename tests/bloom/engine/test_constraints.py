"""Constrained generation: every constrained output parses and validates (on a random-weight model, where
free text does not), greedy and sampled, mixed with free sequences in one batch; a constrained greedy
sequence gets the same tokens whatever the batch holds; bad specs are refused at submit."""

import json
import os
import random
import re

import jsonschema
import pytest
import torch

import bloom
from bloom import Engine, GenerationParams
from bloom.engine.constraints import Constraint

SCHEMA = {
    "type": "object",
    "properties": {
        "topic": {"type": "string", "maxLength": 12},
        "people": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "label": {"enum": ["positive", "negative", "neutral"]},
    },
    "required": ["topic", "people", "label"],
    "additionalProperties": False,
}
REGEX = r"(Mr|Ms|Dr)\. [A-Z][a-z]{1,8}, age [0-9]{1,2}"
CHOICES = ["spam", "ham", "not sure"]
GRAMMAR = 'start: "sum(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/'


@pytest.fixture(scope="module")
def text_lm(make_checkpoint, tokenizer):
    return bloom.BloomForCausalLM.from_pretrained(make_checkpoint(std=0.3, seed=3, vocab_size=len(tokenizer)))


@pytest.fixture(scope="module")
def engine(text_lm, tokenizer):
    return Engine(text_lm, tokenizer, cache_tokens=8 * 160, max_seq_len=160, prefill_chunk=32)


def valid(kind, text):
    """Whether `text` satisfies the test's spec of `kind`."""
    if kind == "choice":
        return text in CHOICES
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "grammar":
        return re.fullmatch(r"sum\([0-9]{1,3}(,[0-9]{1,3})*\)", text) is not None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    if kind == "json_object":
        return isinstance(value, dict)
    try:
        jsonschema.validate(value, SCHEMA)
    except jsonschema.ValidationError:
        return False
    return True


SPECS = {"choice": Constraint.choice(CHOICES), "regex": Constraint.regex(REGEX),
         "json_schema": Constraint.json_schema(SCHEMA), "json_object": Constraint.json_object(),
         "grammar": Constraint.grammar(GRAMMAR)}
PROMPTS = ["Label this:", "Le modèle", "def label(row):"]


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("do_sample", [False, True])
def test_every_constrained_output_validates_where_free_text_does_not(engine, tokenizer, kind, do_sample):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    free = engine.generate(prompts, GenerationParams(max_new_tokens=30, do_sample=do_sample, seed=5))
    assert not any(valid(kind, tokenizer.decode(s.output_ids, skip_special_tokens=True)) for s in free)
    params = GenerationParams(max_new_tokens=120, do_sample=do_sample, seed=5, constraint=SPECS[kind])
    seqs = engine.generate(prompts, params)
    for s in seqs:
        text = tokenizer.decode(s.output_ids, skip_special_tokens=True)
        assert valid(kind, text), (kind, text)
        assert s.finish_reason in ("stop", "eos") and not s.incomplete


def test_choice_ends_with_stop_and_its_last_token(engine, tokenizer):
    s = engine.generate([tokenizer.encode("Label:")], GenerationParams(constraint={"choice": CHOICES}))[0]
    assert s.finish_reason == "stop"
    assert tokenizer.decode(s.output_ids) in CHOICES  # ended by the grammar: no eos token appended


def test_greedy_constrained_sequence_is_the_same_whatever_the_batch_holds(engine, tokenizer):
    rng = random.Random(0)
    target = tokenizer.encode("Extract the people:")
    params = GenerationParams(max_new_tokens=120, constraint=SPECS["json_schema"])
    want = engine.generate([target], params)[0].output_ids
    for trial in range(3):
        others = [[rng.randrange(4, len(tokenizer)) for _ in range(rng.randint(1, 30))] for _ in range(5)]
        other_params = [GenerationParams(max_new_tokens=rng.randint(1, 60), do_sample=rng.random() < 0.5,
                                         seed=trial, constraint=rng.choice([None, *SPECS.values()]))
                        for _ in others]
        arrivals = others[:2] + [target] + others[2:]
        seqs = engine.generate(arrivals, other_params[:2] + [params] + other_params[2:])
        assert seqs[2].output_ids == want
    free = GenerationParams(max_new_tokens=20)  # an unconstrained row beside constrained ones is untouched
    alone = engine.generate([target], free)[0].output_ids
    assert engine.generate([target, target], [params, free])[1].output_ids == alone


def test_structure_cut_by_max_new_tokens_is_marked_incomplete(engine, tokenizer):
    s = engine.generate([tokenizer.encode("Extract:")], GenerationParams(max_new_tokens=3, constraint=SPECS["json_schema"]))[0]
    assert s.finish_reason == "length" and s.incomplete
    assert not valid("json_schema", tokenizer.decode(s.output_ids))


def test_bad_specs_are_refused_at_submit_naming_them(engine, tokenizer):
    prompt = tokenizer.encode("x")
    bad = [(Constraint.regex("a(b"), "regex"), (Constraint.json_schema({"type": "strin"}), "json_schema"),
           (Constraint.grammar("start: foo"), "grammar")]
    for constraint, name in bad:
        with pytest.raises(ValueError, match=f"cannot compile the {name} constraint"):
            engine.submit(prompt, GenerationParams(constraint=constraint))
    assert not engine.has_work  # nothing was queued
    with pytest.raises(ValueError, match="one of choice, regex"):
        GenerationParams(constraint={"yaml": "x"})
    with pytest.raises(ValueError, match="non-empty list"):
        Constraint.choice([])
    with pytest.raises(ValueError, match="not valid JSON"):
        Constraint.json_schema("{oops")
    with pytest.raises(ValueError, match="min_tokens cannot be combined"):
        engine.submit(prompt, GenerationParams(min_tokens=2, constraint=SPECS["regex"]))


def test_a_constraint_needs_the_tokenizer(text_lm):
    with pytest.raises(ValueError, match="needs the engine's tokenizer"):
        Engine(text_lm, cache_tokens=160, max_seq_len=160).submit([5, 6], GenerationParams(constraint=SPECS["regex"]))


def test_each_distinct_spec_is_compiled_once(engine, tokenizer):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    engine.generate(prompts, [GenerationParams(constraint={"json_schema": json.dumps(SCHEMA)})] * len(prompts))
    compiled = dict(engine._constrainer._compiled)
    engine.generate(prompts, [GenerationParams(constraint={"json": SCHEMA})] * len(prompts))  # same spec, as a dict
    assert engine._constrainer._compiled.keys() == compiled.keys()
    assert all(engine._constrainer._compiled[k] is v for k, v in compiled.items())


@pytest.mark.parametrize("B, rows, V", [(3, [0, 1, 2], 250_880), (4, [1, 3], 100)],
                         ids=["all-rows", "some-rows-odd-vocab"])
def test_packed_masks_apply_as_a_masked_fill_would(B, rows, V):
    """The sampler applies llguidance's packed bits (32 tokens a word) to the logits without unpacking
    them: the same -inf tokens and the same, exact, allowed logits as a masked_fill of the unpacked mask."""
    from bloom.engine import sampler

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=g)
    words = torch.randint(-2**31, 2**31 - 1, (len(rows), (V + 31) // 32), dtype=torch.int32, generator=g)
    words[:, ::5] = 0  # whole words forbidden
    bits = torch.tensor([[(int(w) >> j) & 1 for w in row for j in range(32)][:V] for row in words.tolist()]).bool()
    want = logits.clone()
    want[rows] = want[rows].masked_fill(~bits, float("-inf"))
    before = logits.clone()
    assert torch.equal(sampler.constrained(logits, rows, words, copy=True), want)
    assert torch.equal(logits, before)  # a copy
    assert torch.equal(sampler.constrained(logits, rows, words, copy=False), want)


@pytest.mark.parametrize("do_sample", [False, True])
def test_masks_computed_after_the_forward_give_the_tokens_of_masks_computed_beside_it(engine, tokenizer, do_sample):
    """Where the next masks are computed (a worker thread during the forward, or the engine's thread after
    it, on how many llguidance threads) changes no token, in a batch of every kind beside a free row."""
    from bloom.engine.constraints import Constrainer

    prompts = [tokenizer.encode(p) for p in PROMPTS] * 2
    params = [GenerationParams(max_new_tokens=120, do_sample=do_sample, seed=i, constraint=c)
              for i, c in enumerate([*SPECS.values(), None])]
    eos, outputs, own = engine.model.config.eos_token_id, {}, engine._constrainer
    try:
        for overlap, threads in ((True, 1), (False, 1), (False, 2)):
            engine._constrainer = Constrainer(tokenizer, engine.model.config.vocab_size, [eos], overlap=overlap,
                                              threads=threads)
            outputs[overlap, threads] = [s.output_ids for s in engine.generate(prompts, params)]
            engine._constrainer.close()
    finally:
        engine._constrainer = own
    assert outputs[True, 1] == outputs[False, 1] == outputs[False, 2]
    assert all(valid(kind, tokenizer.decode(out, skip_special_tokens=True))
               for kind, out in zip(SPECS, outputs[True, 1]))


def test_allowed_ids_are_the_set_bits_of_a_packed_mask_in_ascending_order():
    """Every bit of every word, the sign bit too (int32 words), and none at or past the vocabulary."""
    from bloom.engine import sampler

    V = 100
    bits = torch.zeros(128, dtype=torch.bool)
    bits[[0, 5, 31, 32, 63, 64, 99, 100, 127]] = True  # 100 and 127: past the vocabulary
    words = (bits.view(4, 32).long() << torch.arange(32)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    assert sampler.allowed_ids(words, V).tolist() == [0, 5, 31, 32, 63, 64, 99]
    assert sampler.allowed_ids(torch.zeros(4, dtype=torch.int32), V).tolist() == []


@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_rows_checked_against_their_matcher_choose_the_masked_argmax(engine, tokenizer, overlap):
    """A greedy constrained row whose mask is computed only when its matcher refuses its unmasked argmax
    gets the tokens of a row masked every step: every kind, beside a free row and a sampled constrained row,
    and with a logit_bias that pushes a token the constraint mostly refuses (the masked path); fewer masks."""
    from bloom.engine.constraints import Constrainer

    class Counting(Constrainer):
        rows = 0

        def compute(self, matchers):
            self.rows += len(matchers)
            return super().compute(matchers)

    prompts = [tokenizer.encode(p) for p in PROMPTS] * 2
    specs = [*SPECS.values(), None]
    params = [GenerationParams(max_new_tokens=120, constraint=c) for c in specs]
    params += [GenerationParams(max_new_tokens=60, constraint=specs[0], logit_bias={tokenizer.encode(" the")[0]: 8.0}),
               GenerationParams(max_new_tokens=60, do_sample=True, seed=3, constraint=specs[1])]
    prompts += prompts[:2]
    eos, outputs, counted, own = engine.model.config.eos_token_id, {}, {}, engine._constrainer
    try:
        for check in (False, True):
            engine._constrainer = Counting(tokenizer, engine.model.config.vocab_size, [eos], overlap=overlap,
                                           check_greedy=check)
            outputs[check] = [s.output_ids for s in engine.generate(prompts, params)]
            counted[check] = engine._constrainer.rows
            engine._constrainer.close()
    finally:
        engine._constrainer = own
    assert outputs[True] == outputs[False]
    assert counted[True] < counted[False]
    assert all(valid(kind, tokenizer.decode(out, skip_special_tokens=True))
               for kind, out in zip(SPECS, outputs[True]))


def test_masks_overlap_the_forward_only_when_torch_leaves_a_cpu_free(tokenizer):
    from bloom.engine.constraints import Constrainer

    threads = torch.get_num_threads()
    try:
        for n in {1, os.cpu_count() or 1}:
            torch.set_num_threads(n)
            assert Constrainer(tokenizer, len(tokenizer), [2]).overlap == (n < (os.cpu_count() or 1))
    finally:
        torch.set_num_threads(threads)
    assert not Constrainer(tokenizer, len(tokenizer), [2], overlap=False).overlap


def test_logprobs_of_a_constrained_row_are_the_models_own(engine, tokenizer, text_lm):
    """A row asking logprobs gets the model's log_softmax, not the masked one; a batch where no row asks
    lets the sampler mask the step's logits in place, and the tokens are the same either way."""
    prompt = tokenizer.encode("Extract the people:")
    spec = SPECS["json_schema"]
    scored, plain = engine.generate([prompt, prompt], [GenerationParams(max_new_tokens=20, constraint=spec, logprobs=3),
                                                       GenerationParams(max_new_tokens=20, constraint=spec)])
    alone = engine.generate([prompt], GenerationParams(max_new_tokens=20, constraint=spec))[0]  # masked in place
    assert scored.output_ids == plain.output_ids == alone.output_ids
    with torch.inference_mode():
        want = text_lm(torch.tensor([prompt + scored.output_ids])).logits[0].float().log_softmax(-1)
    for k, (lp, top) in enumerate(scored.logprobs):
        row = want[len(prompt) - 1 + k]
        assert lp == pytest.approx(row[scored.output_ids[k]].item(), abs=1e-4)
        assert [t for t, _ in top] == row.topk(3).indices.tolist()  # the constraint's bans included
