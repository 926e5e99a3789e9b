"""Parity of every model class with the reference (transformers' BLOOM) on checkpoints it wrote."""

import pytest
import torch

import bloom
from tests.conftest import left_padded, load_reference

ATOL = 1e-5  # fp32, ordinary random init (std 0.02)

CLASSES = {
    "BloomModel": {},
    "BloomForCausalLM": {},
    "BloomForSequenceClassification": {"num_labels": 3},
    "BloomForTokenClassification": {"num_labels": 5},
    "BloomForQuestionAnswering": {},
}
VARIANTS = {
    "8-heads": {},
    "6-heads": {"hidden_size": 48, "n_head": 6},  # not a power of two
    "12-heads": {"hidden_size": 96, "n_head": 12},  # 8 + 4 extra slopes
    "post-ln-residual": {"apply_residual_connection_post_layernorm": True},
    "tp2-slow-but-exact": {"pretraining_tp": 2, "slow_but_exact": True},
}
OUTPUT_FIELDS = ("last_hidden_state", "logits", "start_logits", "end_logits", "loss")


def batch(padding_side: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(4, 256, (n,), generator=g).tolist() for n in (9, 5, 7)]
    ids, mask = left_padded(rows)
    if padding_side == "right":
        ids = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids, mask)])
        mask = mask.flip(-1)
    return ids, mask


def assert_same(ours, ref, mask=None):
    """Compare every output field both have; with a mask, only at real (non-pad) positions."""
    compared = 0
    for name in OUTPUT_FIELDS + ("hidden_states", "attentions"):
        a, b = getattr(ours, name, None), getattr(ref, name, None)
        if a is None or b is None:
            continue
        for x, y in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
            if mask is not None and x.dim() >= 2 and x.shape[:2] == mask.shape:
                x, y = x[mask.bool()], y[mask.bool()]
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
            compared += 1
    assert compared >= 1


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_forward_matches_reference(make_checkpoint, cls_name, variant, padding_side):
    path = make_checkpoint(cls_name, **CLASSES[cls_name], **VARIANTS[variant])
    ours = getattr(bloom, cls_name).from_pretrained(path)
    ref = load_reference(path, cls_name)
    ids, mask = batch(padding_side)
    kwargs = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        a, b = ours(**kwargs), ref(**kwargs)
    # Token-level outputs are compared where tokens are real; pooled ones (B, labels) everywhere.
    assert_same(a, b, mask)
    assert len(a.hidden_states) == ours.config.n_layer + 1 and len(a.attentions) == ours.config.n_layer


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("sdpa_min_keys", [0, 10**6])
def test_fast_attention_paths_match_reference(make_checkpoint, cls_name, sdpa_min_keys, monkeypatch):
    """Without output_attentions the model uses scaled_dot_product_attention, or on CPU for short
    keys a plain product (the threshold forced both ways here); same numbers."""
    monkeypatch.setattr(bloom.model, "SDPA_MIN_KEYS_CPU", sdpa_min_keys)
    path = make_checkpoint(cls_name, **CLASSES[cls_name])
    ours, ref = getattr(bloom, cls_name).from_pretrained(path), load_reference(path, cls_name)
    ids, mask = batch("left", seed=1)
    with torch.no_grad():
        assert_same(ours(input_ids=ids, attention_mask=mask), ref(input_ids=ids, attention_mask=mask), mask)


def test_unpadded_batch_without_mask(make_checkpoint):
    path = make_checkpoint()
    ours, ref = bloom.BloomForCausalLM.from_pretrained(path), load_reference(path)
    ids = torch.randint(4, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)


def test_left_padding_is_exact(make_checkpoint):
    """ALiBi from the cumulative mask: a left-padded row computes what the row alone computes."""
    model = bloom.BloomForCausalLM.from_pretrained(make_checkpoint(std=0.15))
    ids, mask = batch("left")
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        for row in range(ids.shape[0]):
            alone = model(ids[row][mask[row].bool()][None]).logits[0]
            torch.testing.assert_close(padded[row][mask[row].bool()], alone, atol=ATOL, rtol=1e-5)


def test_inputs_embeds_match_input_ids(make_checkpoint):
    path = make_checkpoint("BloomForSequenceClassification", num_labels=3)
    ours, ref = bloom.BloomForSequenceClassification.from_pretrained(path), load_reference(path, "BloomForSequenceClassification")
    ids, mask = batch("right")
    with torch.no_grad():
        from_ids = ours(ids, attention_mask=mask).logits
        embeds = ours.get_input_embeddings()(ids)
        from_embeds = ours(inputs_embeds=embeds, attention_mask=mask).logits
        ref_embeds = ref(inputs_embeds=embeds[:1]).logits  # the reference pools the last position with embeds
    torch.testing.assert_close(from_embeds, from_ids, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(inputs_embeds=embeds[:1]).logits, ref_embeds, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="exactly one"):
        ours(input_ids=ids, inputs_embeds=embeds)


def test_sequence_classification_pools_last_real_token_either_side(make_checkpoint):
    model = bloom.BloomForSequenceClassification.from_pretrained(
        make_checkpoint("BloomForSequenceClassification", std=0.15, num_labels=3))
    with torch.no_grad():
        ids, mask = batch("left")
        left = model(ids, attention_mask=mask).logits
        ids, mask = batch("right")
        right = model(ids, attention_mask=mask).logits
        with pytest.raises(TypeError, match="attention_mask by keyword"):
            model(ids, mask)
    torch.testing.assert_close(left, right, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- losses


def _loss_pair(make_checkpoint, cls_name, config, **inputs):
    path = make_checkpoint(cls_name, **config)
    # Fresh models per call: problem_type inference writes into the config, as in the reference.
    ours, ref = getattr(bloom, cls_name).from_pretrained(path), load_reference(path, cls_name)
    with torch.no_grad():
        return ours(**inputs), ref(**inputs)


def test_causal_lm_loss(make_checkpoint):
    ids, mask = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    a, b = _loss_pair(make_checkpoint, "BloomForCausalLM", {}, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)
    assert a.loss > 0


@pytest.mark.parametrize("problem", ["single", "multi", "regression"])
def test_sequence_classification_losses(make_checkpoint, problem):
    ids, mask = batch("left")
    num_labels = 1 if problem == "regression" else 3
    labels = {
        "single": torch.tensor([0, 2, 1]),
        "multi": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]),
        "regression": torch.tensor([0.5, -1.0, 2.0]),
    }[problem]
    a, b = _loss_pair(make_checkpoint, "BloomForSequenceClassification", {"num_labels": num_labels},
                      input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)


def test_token_classification_loss_ignores_minus_100(make_checkpoint):
    ids, mask = batch("right")
    labels = (ids % 5).masked_fill(mask == 0, -100)
    a, b = _loss_pair(make_checkpoint, "BloomForTokenClassification", {"num_labels": 5},
                      input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)
    changed = labels.clone()
    changed[mask == 0] = -100
    assert torch.equal(changed, labels)  # only padding was ignored


def test_question_answering_loss_with_out_of_range_positions(make_checkpoint):
    ids, mask = batch("right")
    start, end = torch.tensor([1, 3, 50]), torch.tensor([4, 4, 60])  # the last span lies outside: ignored
    a, b = _loss_pair(make_checkpoint, "BloomForQuestionAnswering", {},
                      input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.start_logits, b.start_logits, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- cache, outputs, head mask


@pytest.mark.parametrize("sdpa_min_keys", [0, 10**6])
def test_incremental_decoding_equals_full_forward(make_checkpoint, sdpa_min_keys, monkeypatch):
    monkeypatch.setattr(bloom.model, "SDPA_MIN_KEYS_CPU", sdpa_min_keys)  # both attention paths
    path = make_checkpoint(std=0.15)
    model, ref = bloom.BloomForCausalLM.from_pretrained(path), load_reference(path)
    ids, mask = batch("left")
    extra = torch.randint(4, 256, (3, 4))
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask).logits
        ref_full = ref(full_ids, attention_mask=full_mask).logits
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(extra.shape[1]):
            out = model(extra[:, t : t + 1], past_key_values=cache, attention_mask=full_mask[:, : ids.shape[1] + t + 1])
            steps.append(out.logits)
    assert cache.length == full_ids.shape[1]
    incremental = torch.cat(steps, 1)
    m = full_mask.bool()
    torch.testing.assert_close(incremental[m], full[m], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(full[m], ref_full[m], atol=1e-4, rtol=1e-5)


def test_cache_grows_past_its_capacity(make_checkpoint):
    model = bloom.BloomForCausalLM.from_pretrained(make_checkpoint(std=0.15))
    ids = torch.randint(4, 256, (1, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = bloom.KVCache(model.config.n_layer, capacity=2)
        steps = [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-5)


def test_mask_that_does_not_cover_the_cache_is_refused(make_checkpoint):
    model = bloom.BloomForCausalLM.from_pretrained(make_checkpoint())
    ids = torch.randint(4, 256, (1, 5))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="cached and the new tokens"):
            model(ids[:, :1], past_key_values=cache, attention_mask=torch.ones(1, 1))


def test_tuple_outputs_and_item_access(make_checkpoint):
    model = bloom.BloomForCausalLM.from_pretrained(make_checkpoint())
    ids, mask = batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        as_dict = model(ids, attention_mask=mask, labels=labels)
        as_tuple = model(ids, attention_mask=mask, labels=labels, return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict["logits"])
    torch.testing.assert_close(as_dict[1], as_dict.logits)


def test_head_mask_zeroes_exactly_one_head(make_checkpoint):
    """Masking head j of layer 0 must equal removing that head's slice from the output projection."""
    path = make_checkpoint(std=0.15)
    model, pruned = bloom.BloomForCausalLM.from_pretrained(path), bloom.BloomForCausalLM.from_pretrained(path)
    cfg = model.config
    head_mask = torch.ones(cfg.n_layer, cfg.n_head)
    head_mask[0, 2] = 0
    D = cfg.head_dim
    with torch.no_grad():
        pruned.transformer.h[0].self_attention.dense.weight[:, 2 * D : 3 * D] = 0
        ids, mask = batch("left")
        masked = model(ids, attention_mask=mask, head_mask=head_mask).logits
        expected = pruned(ids, attention_mask=mask).logits
        unmasked = model(ids, attention_mask=mask, head_mask=torch.ones(cfg.n_head)).logits
        plain = model(ids, attention_mask=mask).logits
    m = mask.bool()
    torch.testing.assert_close(masked[m], expected[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unmasked[m], plain[m], atol=1e-5, rtol=1e-5)
    assert (masked[m] - plain[m]).abs().max() > 1e-3


def test_tied_lm_head_shares_the_embedding(make_checkpoint):
    model = bloom.BloomForCausalLM.from_pretrained(make_checkpoint())
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_random_init_from_config_is_usable():
    cfg = bloom.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
    model = bloom.BloomForTokenClassification(cfg).eval()
    assert model.classifier.weight.std().item() == pytest.approx(cfg.initializer_range, rel=0.3)
    assert torch.all(model.transformer.ln_f.weight == 1)
    assert model(torch.randint(0, 64, (2, 5))).logits.shape == (2, 5, 2)


def test_bf16_close_to_fp32(make_checkpoint):
    """bf16 has 8 mantissa bits: logits agree with fp32 to about 1e-2 of their scale at this size."""
    path = make_checkpoint(std=0.15)
    fp32 = bloom.BloomForCausalLM.from_pretrained(path)
    bf16 = bloom.BloomForCausalLM.from_pretrained(path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    ids, mask = batch("left")
    with torch.no_grad():
        a = fp32(ids, attention_mask=mask).logits[mask.bool()]
        b = bf16(ids, attention_mask=mask).logits[mask.bool()].float()
    rel = (a - b).abs().max() / a.abs().max()
    assert rel < 0.05, f"bf16 max deviation {rel:.3%} of the logit scale"


@pytest.mark.parametrize("cls_name", ["BloomForSequenceClassification", "BloomForTokenClassification",
                                      "BloomForQuestionAnswering"])
def test_labeling_heads_allocate_no_cache_by_default(make_checkpoint, monkeypatch, cls_name):
    made = []

    class Counting(bloom.KVCache):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(bloom.model, "KVCache", Counting)
    model = getattr(bloom, cls_name).from_pretrained(make_checkpoint(cls_name))
    ids, mask = left_padded([[5, 9, 200, 31], [8, 60]])
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    assert not made and getattr(out, "past_key_values", None) is None
    if cls_name == "BloomForSequenceClassification":  # still there when asked for
        assert model(ids, attention_mask=mask, use_cache=True).past_key_values is not None and made


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softmax_in_model_dtype_equals_fp32_then_rounded(dtype):
    """The attention takes softmax of bf16/fp16 scores directly: torch's kernel computes in fp32 and rounds
    only the result, bit for bit what the reference's softmax(dtype=float32).to(dtype) gives."""
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(64, 7, 300, generator=g) * 8).to(dtype)
    scores[:, :, :50] = torch.finfo(dtype).min  # masked keys, as the attention bias writes them
    assert torch.equal(torch.softmax(scores, -1), torch.softmax(scores, -1, dtype=torch.float32).to(dtype))
