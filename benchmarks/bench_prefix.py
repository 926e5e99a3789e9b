"""Few-shot labeling on the engine: rows under one shared ~400-token template, the prefix cache on vs off.

The corpus: a template of `--template` tokens (a few-shot prompt: instructions and examples) followed by
each row's own 24-36 tokens, 8 new tokens per row (greedy, eos off). Each run builds a fresh `bloom.Engine`
(16 slots, the cache empty: the first rows compute the template) and generates every row; runs are
interleaved (off, on, off, ...) and the medians reported as rows/s, with the ratio on/off and the prefix
hit rate (prompt tokens reused / prompt tokens). Both runs must give the same tokens.

Zero-shot classify (the replica's path, `Classify.label`): rows of `--classify-rows` texts, a ~400-token few-shot
template + ~30 tokens of the row's own, 4 candidate labels, with prefix_cache off and on (the call's common prefix
run once); rows/s and the ratio, medians of interleaved runs; the probabilities must agree (float32 rounding).

Growth: the same rows spread over 1 and 10 distinct templates, with the default prefix budget (a quarter
of cache_tokens) and with one sized for 10 templates: blocks and bytes held, bytes per template held, the
hit rate and rows/s. A random model (wide weights), float32, packed for CPU as the replica does.

    python benchmarks/bench_prefix.py                       # ~1.5 min on 2 idle cores
    python benchmarks/bench_prefix.py --rows 64 --repeats 1 --no-growth
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from common import describe, machine, random_lm, write_results


import bloom
from bloom.engine.prefix import DEFAULT_BLOCK

ROOT = Path(__file__).resolve().parent
NEW_TOKENS = 8
SLOTS = 16


def corpus(rows: int, templates: int, template_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """rows prompts: one of `templates` templates (round robin) + the row's own 24-36 tokens."""
    rng = random.Random(seed)
    heads = [[rng.randrange(4, vocab) for _ in range(template_len)] for _ in range(templates)]
    return [heads[i % templates] + [rng.randrange(4, vocab) for _ in range(rng.randint(24, 36))] for i in range(rows)]


def run(model, prompts, prefix_cache: bool, prefix_tokens: int | None = None) -> tuple[list[list[int]], float, dict]:
    """Outputs, seconds and the engine's stats (with the process's CPU seconds, "cpu_s": on a shared
    machine they vary less than the wall time) after generating every prompt on a fresh engine."""
    longest = max(map(len, prompts)) + NEW_TOKENS
    engine = bloom.Engine(model, cache_tokens=SLOTS * longest, max_seq_len=longest, prefix_cache=prefix_cache,
                          prefix_cache_tokens=prefix_tokens)
    params = bloom.GenerationParams(max_new_tokens=NEW_TOKENS, eos_token_id=())
    start, cpu = time.perf_counter(), time.process_time()
    seqs = engine.generate(prompts, params)
    stats = {**engine.stats(), "cpu_s": time.process_time() - cpu}
    return [s.output_ids for s in seqs], time.perf_counter() - start, stats


LABELS = ["models", "languages", "river", "dog"]  # 2 tokens each here, as topic words are 1-2 in BLOOM's vocabulary


def classify_corpus(tokenizer, rows: int, template_len: int, seed: int = 0) -> tuple[str, list[str]]:
    """A few-shot template of about template_len tokens ("{text}" where the row goes) and rows of about 30."""
    from bloom.tiny import SAMPLE_TEXT

    rng, words = random.Random(seed), " ".join(SAMPLE_TEXT).split()
    head = "Classify the topic of the text. Examples:"
    while len(tokenizer.encode(head)) < template_len:
        head += " " + rng.choice(words)
    texts = []
    for _ in range(rows):
        text = rng.choice(words)
        while len(tokenizer.encode(text)) < 30:
            text += " " + rng.choice(words)
        texts.append(text)
    return head + "\nText: {text}\nTopic:", texts


def run_classify(model, tokenizer, template: str, texts: list[str], prefix_cache: bool) -> tuple[list, float, float]:
    """Each row's label probabilities, and the seconds and process CPU seconds `Classify.label` took over all
    rows at once."""
    import torch

    from pipelines.config import LabelConfig
    from pipelines.tasks import TASKS, Runtime, Templated

    c = LabelConfig(task="classify", candidate_labels=LABELS, prompt_template=template, prefix_cache=prefix_cache,
                    max_input_tokens=4096)
    rt = Runtime(model, tokenizer, torch.device("cpu"), tokenizer.pad_token_id)
    inputs = {i: Templated(template, {"text": t}) for i, t in enumerate(texts)}
    results = [{} for _ in texts]
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        TASKS["classify"].label(rt, inputs, results, c)
    return ([[s["score"] for s in r["scores"]] for r in results], time.perf_counter() - start,
            time.process_time() - cpu)


def bench_classify(args, model) -> dict:
    from bloom.tiny import sample_tokenizer

    tokenizer = sample_tokenizer(min(512, args.vocab))
    template, texts = classify_corpus(tokenizer, args.classify_rows, args.template)
    tokens = [len(tokenizer.encode(template.format(text=t))) for t in texts]
    run_classify(model, tokenizer, template, texts[:8], True)  # warm up (the first forward of a shape costs more)
    times, cpu, probs = {"off": [], "on": []}, {"off": [], "on": []}, {}
    for _ in range(args.repeats):
        for name in times:
            probs[name], sec, cpu_s = run_classify(model, tokenizer, template, texts, name == "on")
            times[name].append(sec)
            cpu[name].append(cpu_s)
    worst = max(abs(a - b) for p, q in zip(probs["on"], probs["off"]) for a, b in zip(p, q))
    # float32 rounding, summed in other orders (one prefix row vs padded batches): this wide random model's large
    # activations make it ~1e-5; in float64 the two agree exactly (checked), and the tests' tiny model within 1e-5.
    assert worst <= 2e-4, f"prefix reuse changed a probability by {worst}"
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    out = {"rows": len(texts), "prompt_tokens": [min(tokens), max(tokens)], "labels": len(LABELS),
           "rows_per_s": {"off": len(texts) / off, "on": len(texts) / on}, "seconds": times, "speedup": off / on,
           "cpu_seconds": cpu, "cpu_ratio": statistics.median(cpu["off"]) / statistics.median(cpu["on"]),
           "max_probability_difference": worst}
    print(f"zero-shot classify, {len(texts)} rows of {min(tokens)}-{max(tokens)} prompt tokens, {len(LABELS)} labels: "
          f"prefix reuse off {len(texts) / off:6.1f} rows/s   on {len(texts) / on:6.1f} rows/s   x{off / on:.2f} "
          f"(CPU seconds x{out['cpu_ratio']:.2f})   "
          f"(medians of {args.repeats}; probabilities within {worst:.1e})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--template", type=int, default=400, help="shared template tokens")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-growth", action="store_true", help="skip the 1 vs 10 templates runs")
    p.add_argument("--classify-rows", type=int, default=128, help="zero-shot classify rows (0: skip)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_prefix.json")
    args = p.parse_args(argv)

    model, packed = random_lm(args)
    prompts = corpus(args.rows, 1, args.template, args.vocab)
    info = machine()
    print(f"machine: {describe(info)}, {info['threads']} threads")
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, float32, {packed} Linear packed")
    print(f"corpus: {args.rows} rows = a {args.template}-token template + 24-36 own tokens, {NEW_TOKENS} new tokens "
          f"each; {SLOTS} slots, prefix blocks of {DEFAULT_BLOCK} tokens")

    times, cpu = {"off": [], "on": []}, {"off": [], "on": []}
    outputs, stats = {}, {}
    for _ in range(args.repeats):
        for name in times:
            outputs[name], sec, stats[name] = run(model, prompts, name == "on")
            times[name].append(sec)
            cpu[name].append(stats[name]["cpu_s"])
    assert outputs["on"] == outputs["off"], "the prefix cache changed some row's tokens"
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "rows_per_s": {"off": args.rows / off, "on": args.rows / on}, "seconds": times, "cpu_seconds": cpu,
               "cpu_ratio": statistics.median(cpu["off"]) / statistics.median(cpu["on"]),
               "speedup": off / on, "prefix_hit_rate": stats["on"]["prefix_hit_rate"],
               "prefix_bytes": stats["on"]["prefix_bytes"], "growth": []}
    print(f"prefix cache off: {args.rows / off:7.1f} rows/s   on: {args.rows / on:7.1f} rows/s   "
          f"x{off / on:.2f} (CPU seconds x{results['cpu_ratio']:.2f})   hit rate {stats['on']['prefix_hit_rate']:.1%}"
          f"   (medians of {args.repeats})")

    if args.classify_rows:
        results["classify"] = bench_classify(args, model)

    if not args.no_growth:
        template_tokens = (args.template // DEFAULT_BLOCK + 2) * DEFAULT_BLOCK  # its blocks + a row's own
        print(f"{'templates':>9}{'budget tokens':>15}{'blocks held':>13}{'MB held':>9}{'MB/template':>13}"
              f"{'MB pool':>9}{'hit rate':>10}{'rows/s':>8}")
        for templates, budget in ((1, None), (10, None), (10, 10 * template_tokens)):
            rows = corpus(args.rows, templates, args.template, args.vocab, seed=1)
            _, sec, s = run(model, rows, True, budget)
            blocks = s["prefix_blocks"] * DEFAULT_BLOCK
            entry = {"templates": templates, "budget_tokens": blocks, "blocks_held": s["prefix_blocks_held"],
                     "bytes_held": s["prefix_bytes_held"], "bytes_pool": s["prefix_bytes"],
                     "bytes_per_template": s["prefix_bytes_held"] / templates,
                     "hit_rate": s["prefix_hit_rate"], "rows_per_s": args.rows / sec}
            results["growth"].append(entry)
            print(f"{templates:>9}{blocks:>15}{entry['blocks_held']:>13}{entry['bytes_held'] / 1e6:>9.2f}"
                  f"{entry['bytes_per_template'] / 1e6:>13.2f}{entry['bytes_pool'] / 1e6:>9.2f}"
                  f"{entry['hit_rate']:>10.1%}{entry['rows_per_s']:>8.1f}")
    write_results(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
