"""The model's packed entry (`packed=`): prompts of different lengths packed into one row give each its own
forward's hidden states, and the packed entry refuses what it does not use."""

import pytest
import torch

import bloom
from bloom.engine import PackedAttention, SlotKVCache



def test_packed_prompts_equal_each_prompt_alone_and_fill_their_slots(lm):
    prompts = [[5, 9, 11, 40, 7], [8, 3], [100, 101, 102, 103, 104, 105, 106]]
    cache = SlotKVCache(lm, cache_tokens=4 * 16, max_seq_len=16)
    slots = [2, 0, 3]  # any slots, in any order
    step = PackedAttention(cache, [], [(s, 0, len(p)) for s, p in zip(slots, prompts)], lm.config.n_head, torch.float32)
    with torch.no_grad():
        packed = lm.transformer(torch.tensor([sum(prompts, [])]), packed=step).last_hidden_state[0]
        for prompt, slot, o in zip(prompts, slots, step.offsets):
            out = lm.transformer(torch.tensor([prompt]), use_cache=True)
            torch.testing.assert_close(packed[o : o + len(prompt)], out.last_hidden_state[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.keys[1][slot, :, : len(prompt)], out.past_key_values.keys[1][0, :, : len(prompt)])


def test_the_packed_entry_refuses_a_mask_a_cache_or_a_batch(lm):
    cache = SlotKVCache(lm, cache_tokens=16, max_seq_len=16)
    step = PackedAttention(cache, [], [(0, 0, 2)], lm.config.n_head, torch.float32)
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="no past_key_values, attention_mask"):
        lm.transformer(ids, packed=step, attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="no past_key_values, attention_mask"):
        lm.transformer(ids, packed=step, past_key_values=bloom.KVCache(lm.config.n_layer))
    with pytest.raises(ValueError, match="one row"):
        lm.transformer(torch.tensor([[5], [6]]), packed=step)
