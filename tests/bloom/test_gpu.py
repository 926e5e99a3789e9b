"""On a CUDA GPU (skipped without one): bf16 parity with the reference, generation and the engine."""

import pytest
import torch

import bloom
from bloom.engine import Engine, GenerationParams
from tests.conftest import left_padded, load_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("cls_name", ["BloomForCausalLM", "BloomForTokenClassification"])
def test_bf16_on_gpu_matches_the_reference(make_checkpoint, cls_name):
    src = make_checkpoint(cls_name, std=0.15)
    ours = getattr(bloom, cls_name).from_pretrained(src, dtype="bfloat16", device="cuda")
    ref = load_reference(src, cls_name).to(device="cuda", dtype=torch.bfloat16)
    ids, mask = (t.cuda() for t in left_padded([[5, 9, 200, 31, 7], [8, 60]]))
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()].float(), want[mask.bool()].float(), atol=0.05, rtol=0)


def test_generation_and_the_engine_on_gpu_agree_with_generate_alone(make_checkpoint):
    model = bloom.BloomForCausalLM.from_pretrained(make_checkpoint(std=0.3), dtype="float32", device="cuda")
    prompts = [[5, 9, 200, 31], [8, 60], [7, 7, 7, 7, 7, 7]]
    alone = []
    for p in prompts:
        out = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=8, return_dict_in_generate=True)
        alone.append(out.sequences[0, len(p):len(p) + out.num_new_tokens[0]].tolist())
    engine = Engine(model, cache_tokens=256, max_seq_len=32)
    seqs = engine.generate(prompts, GenerationParams(max_new_tokens=8))
    assert [s.output_ids for s in seqs] == alone
    assert engine.cache.max_seq_len == 32 and engine.stats()["slots_used"] == 0


def test_int8_on_gpu_dequantizes_and_stays_close_to_bf16(make_checkpoint):
    src = make_checkpoint(std=0.15)
    plain = bloom.BloomForCausalLM.from_pretrained(src, dtype="bfloat16", device="cuda")
    quant = bloom.BloomForCausalLM.from_pretrained(src, dtype="bfloat16", device="cuda")
    assert quant.quantize_int8() == 4 * quant.config.n_layer + 1
    assert not quant.lm_head.kernel and quant.lm_head.weight.device.type == "cuda"
    ids, mask = (t.cuda() for t in left_padded([[5, 9, 200, 31, 7], [8, 60]]))
    with torch.no_grad():
        got, want = quant(ids, attention_mask=mask).logits.float(), plain(ids, attention_mask=mask).logits.float()
    assert (got - want)[mask.bool()].abs().max() <= 0.05 * want[mask.bool()].abs().max()
