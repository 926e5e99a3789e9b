"""LoRA adapters written by PEFT: each row of a mixed batch equals transformers + peft on that adapter alone
(logits and greedy tokens, float32); refusals name the field; the bank's LRU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bloom import BloomForCausalLM, BloomForSequenceClassification, Engine, GenerationParams
from bloom.lora import AdapterBank, UnknownAdapter, read_adapter
from tests.conftest import left_padded, load_reference

peft = pytest.importorskip("peft")

ALL = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
# name → LoraConfig arguments: ranks, alphas, rslora and targets differ, so a mix-up cannot pass.
ADAPTERS = {
    "fr": dict(r=4, lora_alpha=8, target_modules=ALL),
    "legal": dict(r=8, lora_alpha=16, target_modules=["query_key_value", "dense_4h_to_h"], use_rslora=True),
    "ner": dict(r=2, lora_alpha=3, target_modules=["dense", "dense_h_to_4h"], fan_in_fan_out=True),
}


def write_adapter(base_dir, out_dir, seed: int, cls_name="BloomForCausalLM", task_type="CAUSAL_LM", **lora):
    """PEFT wraps the reference model, lora_A and lora_B (zero at init) get random values, PEFT saves it."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(load_reference(base_dir, cls_name), peft.LoraConfig(task_type=task_type, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape))
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def base(make_checkpoint):
    return make_checkpoint(std=0.15)  # as the model tests: wide enough to vary, calm enough for 1e-5


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_adapter(base, root / name, seed, **cfg) for seed, (name, cfg) in enumerate(ADAPTERS.items())}


def peft_model(base, adapter_dir, cls_name="BloomForCausalLM"):
    """The reference: transformers' BLOOM with the adapter loaded by PEFT (None: the base alone)."""
    model = load_reference(base, cls_name)
    return model if adapter_dir is None else peft.PeftModel.from_pretrained(model, adapter_dir).eval()


def bank_for(model, adapters, **kw) -> AdapterBank:
    bank = AdapterBank(model, **kw)
    for name, path in adapters.items():
        bank.add(name, path)
    return bank


# No pad id (3) in the prompts: the reference's generate would take it for padding.
PROMPTS = [[5, 9, 14, 4, 77, 20], [8, 8, 40], [100, 7, 9, 60, 61], [11, 12, 13, 14], [200, 1, 5], [9, 30, 31, 32, 33, 34, 35]]
ROW_ADAPTERS = ["fr", None, "legal", "fr", "ner", None]


def test_each_row_of_a_mixed_batch_equals_peft_on_its_adapter(base, adapters):
    model = BloomForCausalLM.from_pretrained(base)
    bank = bank_for(model, adapters)
    ids, mask = left_padded(PROMPTS)
    with torch.inference_mode():
        logits = model(ids, attention_mask=mask, lora=bank.batch(ROW_ADAPTERS)).logits
        base_logits = model(ids, attention_mask=mask).logits
    for i, (prompt, name) in enumerate(zip(PROMPTS, ROW_ADAPTERS)):
        with torch.inference_mode():
            ref = peft_model(base, adapters.get(name))(torch.tensor([prompt])).logits[0]
        ours = logits[i, -len(prompt):]
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        if name is not None:  # the adapter really changes this row: the base differs
            assert (base_logits[i, -len(prompt):] - ref).abs().max() > 1e-2


def test_packed_engine_greedy_tokens_equal_peft_generate(base, adapters):
    model = BloomForCausalLM.from_pretrained(base)
    model.pack_for_cpu()  # as the replica runs it on CPU: the fused epilogues with the LoRA terms
    engine = Engine(model, cache_tokens=6 * 64, max_seq_len=64, prefill_chunk=7, adapters=bank_for(model, adapters))
    params = [GenerationParams(max_new_tokens=12, eos_token_id=(), adapter=a) for a in ROW_ADAPTERS]
    seqs = engine.generate(PROMPTS, params)
    for seq, prompt, name in zip(seqs, PROMPTS, ROW_ADAPTERS):
        ref = peft_model(base, adapters.get(name)).generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=3)
        assert seq.output_ids == ref[0, len(prompt):].tolist()
    # The same prompt under another adapter generates differently (the test can tell adapters apart).
    again = engine.generate([PROMPTS[0]], [GenerationParams(max_new_tokens=12, eos_token_id=(), adapter="legal")])
    assert again[0].output_ids != seqs[0].output_ids


def test_generate_takes_one_adapter_per_row(base, adapters):
    model = BloomForCausalLM.from_pretrained(base)
    bank = bank_for(model, adapters)
    ids, mask = left_padded(PROMPTS)
    out = model.generate(ids, mask, max_new_tokens=6, eos_token_id=(), lora=bank.batch(ROW_ADAPTERS))
    for i, (prompt, name) in enumerate(zip(PROMPTS, ROW_ADAPTERS)):
        ref = peft_model(base, adapters.get(name)).generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=3)
        assert out[i, -6:].tolist() == ref[0, -6:].tolist()


def test_a_classifier_with_an_adapter_equals_peft(make_checkpoint, tmp_path):
    """A classification checkpoint plus an adapter of its body. PEFT's SEQ_CLS task also saves the trained
    score head (modules_to_save), which is refused by name."""
    base = make_checkpoint("BloomForSequenceClassification", std=0.3, num_labels=3)
    cls = BloomForSequenceClassification.from_pretrained(base)
    seq_cls = write_adapter(base, tmp_path / "seq_cls", 7, "BloomForSequenceClassification", "SEQ_CLS",
                            r=4, lora_alpha=4, target_modules=ALL)
    with pytest.raises(ValueError, match="modules_to_save"):
        read_adapter(seq_cls, cls, "seq_cls")
    path = write_adapter(base, tmp_path / "body", 7, "BloomForSequenceClassification", None,
                         r=4, lora_alpha=4, target_modules=ALL)
    ids, mask = left_padded(PROMPTS[:3])
    with torch.inference_mode():
        ours = cls(ids, attention_mask=mask, lora=bank_for(cls, {"body": path}).batch(["body", None, "body"])).logits
        ref = peft_model(base, path, "BloomForSequenceClassification")(ids, attention_mask=mask).logits
        plain = load_reference(base, "BloomForSequenceClassification")(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[[0, 2]], ref[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], plain[1], atol=1e-5, rtol=1e-5)
    assert (ref[0] - plain[0]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- refusals


def _edited(src, dst, **fields):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(fields)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("field, value", [
    ("peft_type", "IA3"), ("use_dora", True), ("target_modules", ["query_key_value", "lm_head"]),
    ("target_modules", ".*dense.*"), ("layers_to_transform", [0]), ("rank_pattern", {"dense": 8}),
    ("alpha_pattern", {"dense": 2}), ("bias", "lora_only"), ("modules_to_save", ["lm_head"]),
    ("init_lora_weights", "pissa"), ("lora_bias", True), ("r", 0), ("some_future_option", {"on": 1}),
])
def test_unsupported_config_fields_are_refused_by_name(base, adapters, tmp_path, field, value):
    path = _edited(adapters["fr"], tmp_path / "bad", **{field: value})
    with pytest.raises(ValueError, match=field):
        read_adapter(path, BloomForCausalLM.from_pretrained(base), "bad")


def test_dora_written_by_peft_is_refused(base, tmp_path):
    path = write_adapter(base, tmp_path / "dora", 3, r=4, lora_alpha=8, target_modules=ALL, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        read_adapter(path, BloomForCausalLM.from_pretrained(base), "dora")


def test_an_adapter_of_another_base_is_refused(make_checkpoint, adapters, tmp_path):
    wider = make_checkpoint(std=0.3, hidden_size=32, n_head=4)
    with pytest.raises(ValueError, match=r"dense_4h_to_h\.lora_A\.weight. has shape \(4, 256\).*need \(4, 128\)"):
        read_adapter(adapters["fr"], BloomForCausalLM.from_pretrained(wider), "fr")
    deeper = make_checkpoint(std=0.3, n_layer=1)
    with pytest.raises(ValueError, match="layer 1; the base model has 1 layers"):
        read_adapter(adapters["fr"], BloomForCausalLM.from_pretrained(deeper), "fr")
    named = _edited(adapters["fr"], tmp_path / "named", base_model_name_or_path="bigscience/bloom-560m")
    with pytest.raises(ValueError, match="bloom-560m.*bloomz-7b1"):
        read_adapter(named, BloomForCausalLM.from_pretrained(make_checkpoint(std=0.3)), "n", "bigscience/bloomz-7b1")
    read_adapter(named, BloomForCausalLM.from_pretrained(make_checkpoint(std=0.3)), "n", "/models/bloom-560m")


def test_unknown_adapters_are_refused_at_submit(base, adapters):
    model = BloomForCausalLM.from_pretrained(base)
    with pytest.raises(ValueError, match="no AdapterBank"):
        Engine(model, cache_tokens=128, max_seq_len=64).submit([5, 6], GenerationParams(adapter="fr"))
    engine = Engine(model, cache_tokens=128, max_seq_len=64, adapters=bank_for(model, adapters))
    with pytest.raises(UnknownAdapter, match="'de'.*fr, legal, ner"):
        engine.submit([5, 6], GenerationParams(adapter="de"))


def test_batch_must_fit_the_input(base, adapters):
    model = BloomForCausalLM.from_pretrained(base)
    bank = bank_for(model, adapters)
    with pytest.raises(ValueError, match="2 rows, the input has 3"):
        model(torch.tensor([[5, 6]] * 3), lora=bank.batch(["fr", None]))
    assert bank.batch([None, None]) is None


# ----------------------------------------------------------------------------- the bank


def test_lru_keeps_the_budget_and_reloads_what_it_dropped(base, adapters):
    model = BloomForCausalLM.from_pretrained(base)
    bank = bank_for(model, adapters, max_adapters=2)
    bank.get("fr"), bank.get("legal"), bank.get("fr"), bank.get("ner")  # legal is least recently used
    assert list(bank.loaded) == ["fr", "ner"] and bank.loads == 3
    # One forward needing three adapters holds all three while it is built, then the budget applies again.
    assert len(bank.batch(["legal", "fr", "ner"]).adapters) == 3
    bank.get("fr")
    assert len(bank.loaded) == 2 and bank.loads == 4
    per = {n: a.nbytes for n, a in bank.loaded.items()}
    by_bytes = bank_for(model, adapters, max_bytes=max(per.values()))
    by_bytes.get("fr"), by_bytes.get("ner")
    assert list(by_bytes.loaded) == ["ner"]


def test_sources_other_than_directories_go_through_fetch(base, adapters, tmp_path):
    model = BloomForCausalLM.from_pretrained(base)
    with pytest.raises(ValueError, match="not a local directory"):
        AdapterBank(model).add("fr", "s3://bucket/adapters/fr")
    fetched = []

    def fetch(source: str):  # a storage layer's download: here the "bucket" is a local folder
        fetched.append(source)
        return shutil.copytree(adapters["fr"], tmp_path / source.rsplit("/", 1)[-1])

    bank = AdapterBank(model, fetch=fetch)
    bank.add("fr", "s3://bucket/adapters/fr")
    assert bank.get("fr").r == 4 and fetched == ["s3://bucket/adapters/fr"]
    with pytest.raises(ValueError, match="adapter names"):
        bank.add("generate:fr", adapters["fr"])


def test_the_prefix_cache_keeps_each_adapter_s_prompt_blocks_apart(base, adapters):
    """The same long prompt under the base and two adapters, one after another on one engine: an adapter
    changes the prompt's keys and values, so a sequence must never reuse blocks cached under another
    adapter (or the base). Each gets the tokens of an engine without the prefix cache."""
    model = BloomForCausalLM.from_pretrained(base)
    prompt = [(7 * i) % 250 + 4 for i in range(40)]  # two full 16-token blocks, then more
    order = [None, "fr", "legal", "fr", None]

    def run(prefix_cache: bool) -> list[list[int]]:
        engine = Engine(model, cache_tokens=2 * 64, max_seq_len=64, adapters=bank_for(model, adapters),
                        prefix_cache=prefix_cache, prefix_cache_tokens=256 if prefix_cache else None)
        out = [engine.generate([prompt], [GenerationParams(max_new_tokens=8, eos_token_id=(), adapter=a)])[0].output_ids
               for a in order]
        if prefix_cache:  # the repeats (fr, base) did reuse their own adapter's blocks
            assert engine.stats()["prefix_tokens_reused"] == 2 * 32
        return out

    cached, fresh = run(True), run(False)
    assert cached == fresh
    assert len({tuple(t) for t in fresh}) == 3  # base, fr and legal really differ on this prompt
