"""CPU inference with oneDNN-packed weights (bloom.packing): same results, inference only."""

import pytest
import torch

import bloom
from tests.bloom.test_loading import logits
from tests.conftest import left_padded, load_reference


def linears(model):
    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, bloom.packing.PackedLinear))]


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_packed_weights_give_the_same_logits_and_tokens(make_checkpoint, dtype, atol):
    src = make_checkpoint(std=0.15)
    plain = bloom.BloomForCausalLM.from_pretrained(src, dtype=dtype)
    packed = bloom.BloomForCausalLM.from_pretrained(src, dtype=dtype)
    n_linear = len(linears(packed))
    assert packed.pack_for_cpu() == n_linear  # every Linear, the tied LM head included
    assert all(isinstance(m, bloom.packing.PackedLinear) for m in linears(packed))
    # The embedding keeps its plain weight (the packed head is a copy).
    assert packed.transformer.word_embeddings.weight.layout == torch.strided
    torch.testing.assert_close(logits(packed).float(), logits(plain).float(), atol=atol, rtol=0)
    prompt = torch.randint(4, 256, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # left-padded row
    want = plain.generate(prompt, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    got = packed.generate(prompt, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    if dtype == torch.float32:
        assert torch.equal(got, want)
    assert got.shape == want.shape


def test_packed_task_model_matches_the_reference(make_checkpoint):
    src = make_checkpoint("BloomForTokenClassification", std=0.15, num_labels=5)
    model = bloom.BloomForTokenClassification.from_pretrained(src)
    assert model.pack_for_cpu() == len(linears(model))
    ids, mask = left_padded([[5, 9, 200, 31, 7], [8, 60]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits,
                                   load_reference(src, "BloomForTokenClassification")(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=0)


def test_packed_model_refuses_saving_moving_and_training(make_checkpoint, tmp_path):
    model = bloom.BloomForCausalLM.from_pretrained(make_checkpoint())
    model.pack_for_cpu()
    with pytest.raises(ValueError, match="packed for CPU inference"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.float(), lambda m: m.to("meta")):
        with pytest.raises(RuntimeError, match="load the checkpoint again"):
            convert(model)
    x = torch.randn(1, 3, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        model.transformer.h[0].mlp.dense_h_to_4h(x)


def test_pretraining_tp_layers_stay_plain(make_checkpoint):
    src = make_checkpoint(std=0.15, pretraining_tp=2, slow_but_exact=True)
    model = bloom.BloomForCausalLM.from_pretrained(src)
    want = logits(model)
    # Per layer: query_key_value and dense_h_to_4h packed; the row-parallel dense and dense_4h_to_h sliced.
    assert model.pack_for_cpu() == 2 * model.config.n_layer + 1
    assert isinstance(model.transformer.h[0].self_attention.dense, torch.nn.Linear)
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)


def test_float16_is_not_packed(make_checkpoint):
    model = bloom.BloomForCausalLM.from_pretrained(make_checkpoint(), dtype=torch.float16)
    assert model.pack_for_cpu() == 0
    assert not any(isinstance(m, bloom.packing.PackedLinear) for m in model.modules())
