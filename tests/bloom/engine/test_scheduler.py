"""The scheduler decides a step from the engine's queues and changes nothing: admission in arrival order
within the free slots (a group waits for a slot per sequence), decode rows, prompt chunks within the budget."""


from bloom.engine import Engine, GenerationParams, schedule

LONG = GenerationParams(max_new_tokens=8, eos_token_id=())



def snapshot(engine):
    """Everything a step's decision could change, to check that deciding changed none of it."""
    seqs = list(engine.waiting) + engine.prefilling + engine.running
    return ([s.id for s in engine.waiting], [s.id for s in engine.prefilling], [s.id for s in engine.running],
            [(s.slot, s.num_cached, len(s.output_ids), len(s.siblings)) for s in seqs], engine.cache.free_slots)


def test_a_decision_mutates_nothing_and_is_the_same_twice(lm):
    engine = Engine(lm, cache_tokens=3 * 64, max_seq_len=64, prefill_chunk=10)
    running = engine.submit([5] * 4, LONG)
    engine.step()  # its whole prompt goes in: it runs from now on
    for n in (12, 6, 3):
        engine.submit([6] * n, LONG)
    engine.step()  # two admitted (two slots left), the first 10 prompt tokens of the 12 go in
    engine._take_inbox()
    before = snapshot(engine)
    first = schedule(engine.waiting, engine.prefilling, engine.running, engine.cache.free_slots, engine.prefill_chunk)
    second = schedule(engine.waiting, engine.prefilling, engine.running, engine.cache.free_slots, engine.prefill_chunk)
    assert snapshot(engine) == before and first == second
    assert first.decode == (running,) and first.admit == ()  # the third waits: no slot free
    (a, n_a), (b, n_b) = first.prefill
    assert (len(a.prompt_ids) - a.num_cached, n_a) == (2, 2)  # the rest of the 12-token prompt,
    assert (len(b.prompt_ids), n_b) == (6, 6)  # then the next prompt in line, within 10 tokens in all


def test_the_budget_splits_a_long_prompt_and_the_first_in_line_always_gets_a_chunk(lm):
    engine = Engine(lm, cache_tokens=4 * 64, max_seq_len=64, prefill_chunk=8)
    long, short = engine.submit([5] * 30, LONG), engine.submit([6] * 3, LONG)
    engine._take_inbox()
    decision = schedule(engine.waiting, engine.prefilling, engine.running, engine.cache.free_slots, 8)
    assert decision.admit == (long, short) and decision.prefill == ((long, 8),) and not decision.idle
    assert long.slot is None and list(engine.waiting) == [long, short]  # admission is the engine's to apply


def test_a_group_is_admitted_only_with_a_slot_for_each_of_its_sequences(lm):
    engine = Engine(lm, cache_tokens=3 * 64, max_seq_len=64)
    single = engine.submit([5, 6], LONG)
    engine.step()
    group = engine.submit_group([7, 8], LONG, n=3)
    behind = engine.submit([9], LONG)
    engine._take_inbox()
    decision = schedule(engine.waiting, engine.prefilling, engine.running, engine.cache.free_slots, 256)
    assert decision.admit == () and decision.decode == (single,)  # 2 free slots < 3: the group waits, and so
    assert group[0] in engine.waiting and behind in engine.waiting  # does everyone behind it (first come first)
