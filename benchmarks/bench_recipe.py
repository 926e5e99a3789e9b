"""Offline generation end to end: our labeling job against the Ray Data + transformers recipe, interleaved.

The recipe is what Ray's docs have users copy: `ray.data.read_parquet` -> `map_batches` with a class
that holds transformers' `BloomForCausalLM` and calls `model.generate` on static batches of 16 rows
(left-padded, greedy) -> `write_parquet`. Ours is `run_label_job` (task generate, its defaults). Both:
- the same checkpoint: a random BLOOM (hidden 512 x 8 layers, wide weights so generations vary) in the
  Hugging Face layout, with a tokenizer trained on the corpus' sentences; in the dtype our "fast"
  resolves to (bfloat16 where the CPU computes it fast, else float32);
- the same corpus: --rows paragraphs of 1-8 sentences (varying lengths), in 4 Parquet files;
- 32 new tokens per row, greedy, in two modes: "varied" (the eos, a token the model emits in about half
  of the rows, ends rows early) and "fixed" (min_tokens = max_new_tokens: every row 32 tokens);
- the same local Ray of 2 CPUs (started once, not timed): one actor of 1 CPU with 2 torch threads (the
  recipe's torch threads are set to 2 as well, more than Ray's OMP_NUM_THREADS=1 would give it);
- wall time from the first call to the last Parquet file written, model loading included.
Runs alternate (recipe, ours, recipe, ours, ...) so machine load hits both alike; the medians and their
ratio are printed with the machine.

    python benchmarks/bench_recipe.py                    # 200 rows, 2 repeats per mode: ~8 min on 2 cores
    python benchmarks/bench_recipe.py --rows 48 --repeats 1 --modes fixed     # a quick look
    python benchmarks/bench_recipe.py --baseline 290bbbe --repeats 1   # and the job before the continuous feed
    python benchmarks/bench_recipe.py --baseline 290bbbe --repeats 1 --rows-per-batch 50 --modes varied
    python benchmarks/bench_recipe.py --no-recipe --repeats 1 --modes fixed --rows 200    # growth: the job alone,
    python benchmarks/bench_recipe.py --no-recipe --repeats 1 --modes fixed --rows 2000   #   at N and 10N rows
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import describe, export, machine, write_results

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

MAX_NEW = 32
SENTENCES = [
    "The committee met on Tuesday to review the budget for the coming year.",
    "Rainfall in the northern valleys was twice the usual amount this spring.",
    "She opened the shop in 1998 and still works there every morning.",
    "Most of the bridges in the old town were rebuilt after the flood.",
    "The report recommends longer opening hours for the public library.",
    "Engineers tested the new turbine for six weeks before approving it.",
    "Several readers wrote to say that the recipe needed more salt.",
    "The museum will lend three paintings to a gallery in Lisbon.",
    "Prices for fresh vegetables rose sharply after the early frost.",
    "A small team of volunteers cleaned the beach over the weekend.",
    "The software update fixes a bug that drained phone batteries overnight.",
    "Our train was delayed because a tree had fallen across the tracks.",
    "Students in the evening class learn to repair bicycles and radios.",
    "The council approved plans for a cycle lane along the harbour road.",
    "He described the mountain village as quiet, cold and very friendly.",
    "The study followed two thousand patients over a period of ten years.",
    "Farmers expect a good harvest if the weather stays dry in August.",
    "The author spent four years researching the history of the canal.",
    "Visitors are asked to leave their bags at the entrance of the hall.",
    "A new ferry service now links the island with the mainland twice a day.",
    "The orchestra played a programme of early music by candlelight.",
    "Inspectors found that the kitchen met every standard for hygiene.",
    "The company plans to hire forty people at its new warehouse.",
    "Children from the local school planted trees along the river path.",
    "The price of the tickets includes a guided tour of the castle.",
    "Researchers measured the temperature of the lake every hour.",
    "The festival attracts musicians from across the whole region.",
    "A heavy storm closed the airport for most of Thursday afternoon.",
    "The new edition of the dictionary adds more than five hundred words.",
    "Residents complained about the noise from the construction site.",
]


def paragraphs(rows: int, seed: int = 0) -> list[str]:
    """rows paragraphs of 1-8 sentences each, deterministic."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 8))) for _ in range(rows)]


def make_checkpoint(directory: Path, hidden: int, layers: int, vocab: int, texts: list[str]) -> Path:
    """A random BLOOM in the HF layout, in the dtype "fast" resolves to here, with a tokenizer trained
    on `texts`, and as eos a token that greedy decoding emits in about half of a sample of prompts (so
    completion lengths vary); its id is in config.json, which both contenders read."""
    import torch

    import bloom
    from bloom.tiny import randomise_, sample_tokenizer

    tokenizer = sample_tokenizer(vocab, texts=texts + SENTENCES)
    cfg = bloom.BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=hidden // 64,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, unk_token_id=tokenizer.unk_token_id)
    torch.manual_seed(0)
    model = randomise_(bloom.BloomForCausalLM(cfg).eval(), std=0.3)
    # Greedy continuations of 16 prompts: the token found in the completions of nearest half of them.
    prompts = [tokenizer(t).input_ids[:64] for t in texts[:16]]
    engine = bloom.Engine(model, tokenizer, cache_tokens=16 * (64 + MAX_NEW), max_seq_len=64 + MAX_NEW)
    outs = [s.output_ids for s in engine.generate(prompts, bloom.GenerationParams(max_new_tokens=MAX_NEW,
                                                                                   eos_token_id=[]))]
    seen = {t for out in outs for t in out}
    cfg.eos_token_id = min(seen, key=lambda t: (abs(sum(t in o for o in outs) - len(outs) / 2), t))
    dtype = bloom.resolve_dtype("fast", cfg)
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "eos_token_id": cfg.eos_token_id}))
    return directory


def write_corpus(directory: Path, texts: list[str], files: int = 4) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True)
    per = -(-len(texts) // files)
    for k in range(files):
        rows = list(range(k * per, min(len(texts), (k + 1) * per)))
        pq.write_table(pa.table({"id": rows, "text": [texts[i] for i in rows]}), directory / f"in-{k}.parquet")
    return directory


class HFGenerate:
    """The recipe's stage: transformers' BloomForCausalLM and tokenizer, `model.generate` per batch."""

    def __init__(self, model_dir: str, dtype: str, threads: int, min_new: int, eos: int):
        import torch
        import transformers

        self.threads, self.min_new, self.eos = threads, min_new, eos
        torch.set_num_threads(threads)
        self.tok = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json",
                                                        pad_token="<pad>", padding_side="left")
        self.model = transformers.BloomForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    def __call__(self, batch: dict) -> dict:
        import torch

        torch.set_num_threads(self.threads)  # OpenMP's threads belong to the calling thread
        enc = self.tok(list(batch["text"]), return_tensors="pt", padding=True, truncation=True, max_length=1024)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=MAX_NEW, min_new_tokens=self.min_new, do_sample=False,
                                      eos_token_id=self.eos, pad_token_id=self.tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        batch["generated_text"] = self.tok.batch_decode(new, skip_special_tokens=True)
        # tokens up to and including the first eos (the rest is padding after it)
        batch["completion_tokens"] = [int(next((i + 1 for i, t in enumerate(row) if t == self.eos), len(row)))
                                      for row in new.tolist()]
        return batch


def run_recipe(corpus: Path, out: Path, model_dir: Path, dtype: str, fixed: bool, eos: int) -> tuple[float, int]:
    """(seconds, generated tokens) of the recipe, end to end."""
    import pyarrow.dataset as pads
    import ray
    from ray.data import ActorPoolStrategy

    start = time.perf_counter()
    ds = ray.data.read_parquet(str(corpus))
    ds = ds.map_batches(HFGenerate, batch_size=16, batch_format="pandas", num_cpus=1,
                        compute=ActorPoolStrategy(size=1),
                        fn_constructor_kwargs={"model_dir": str(model_dir), "dtype": dtype, "threads": 2,
                                               "min_new": MAX_NEW if fixed else 0, "eos": eos})
    ds.write_parquet(str(out))
    seconds = time.perf_counter() - start
    table = pads.dataset(str(out), format="parquet").to_table()
    return seconds, int(sum(table.column("completion_tokens").to_pylist()))


def run_ours(corpus: Path, out: Path, model_dir: Path, fixed: bool, rows_per_batch: int) -> tuple[float, int, float]:
    """(seconds, generated tokens, mean engine occupancy) of our job, end to end."""
    from pipelines.config import LabelConfig
    from pipelines.corpus.job import run_label_job

    start = time.perf_counter()
    report = run_label_job(LabelConfig(task="generate", model=str(model_dir), input=[str(corpus)], output=str(out),
                                       max_new_tokens=MAX_NEW, min_tokens=MAX_NEW if fixed else 0,
                                       rows_per_batch=rows_per_batch))
    seconds = time.perf_counter() - start
    return seconds, report["generated_tokens_this_run"], report["mean_batch_occupancy"]


def run_job_script(code: Path, corpus: Path, out: Path, model_dir: Path, fixed: bool,
                   rows_per_batch: int) -> tuple[float, int, float]:
    """As run_ours, but the job's script of the tree at `code` in its own process (joining this Ray),
    timed from its start: how a baseline revision is measured, and this tree beside it."""
    import ray

    args = [sys.executable, str(code / "jobs" / "label_corpus.py"), "--task", "generate", "--model", str(model_dir),
            "--input", str(corpus), "--output", str(out), "--max-new-tokens", str(MAX_NEW),
            "--rows-per-batch", str(rows_per_batch)]
    args += ["--min-tokens", str(MAX_NEW)] if fixed else []
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    report = json.loads((out / "_report.json").read_text())
    return seconds, report["generated_tokens_this_run"], report["mean_batch_occupancy"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows-per-batch", type=int, default=256, help="our job's rows per batch (its default: 256)")
    p.add_argument("--modes", nargs="+", default=["varied", "fixed"], choices=["varied", "fixed"])
    p.add_argument("--baseline", metavar="REV", help="also run the job of git revision REV; then both jobs run as "
                   "their script in a process of their own, the recipe in this one")
    p.add_argument("--no-recipe", action="store_true", help="run only our job (growth: its rows/s at N and 10N rows)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_recipe.json")
    args = p.parse_args(argv)

    import ray

    import bloom
    from pipelines import init_ray

    info = machine()
    work = Path(tempfile.mkdtemp(prefix="bench_recipe_"))
    texts = paragraphs(args.rows)
    model_dir = make_checkpoint(work / "model", args.hidden, args.layers, args.vocab, texts)
    cfg = bloom.BloomConfig.from_pretrained(model_dir)
    dtype = str(bloom.resolve_dtype("fast", cfg)).removeprefix("torch.")
    corpus = write_corpus(work / "corpus", texts)
    baseline = export(args.baseline, work / "baseline") if args.baseline else None
    print(init_ray(2), file=sys.stderr)
    print(f"{describe(info)}; load average {os.getloadavg()[0]:.1f}; {args.rows} rows, hidden {args.hidden} x "
          f"{args.layers} layers, vocab {args.vocab}, {dtype}, eos id {cfg.eos_token_id}", flush=True)
    results = {"machine": info, "rows": args.rows, "rows_per_batch": args.rows_per_batch, "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
               "dtype": dtype, "max_new_tokens": MAX_NEW, "load_average_start": os.getloadavg()[0], "modes": {}}
    for mode in args.modes:
        fixed = mode == "fixed"
        recipe, ours, occupancy, base, base_occupancy = [], [], [], [], []
        for k in range(args.repeats):
            if not args.no_recipe:
                seconds, tokens_r = run_recipe(corpus, work / f"recipe-{mode}-{k}", model_dir, dtype, fixed,
                                               cfg.eos_token_id)
                recipe.append(seconds)
            if baseline:
                seconds, tokens_b, occ = run_job_script(baseline, corpus, work / f"base-{mode}-{k}", model_dir, fixed,
                                                        args.rows_per_batch)
                base.append(seconds)
                base_occupancy.append(occ)
                print(f"  {mode} #{k + 1}: baseline {args.baseline} {seconds:.1f} s ({tokens_b} tokens, {occ} rows "
                      "per step)", flush=True)
                seconds, tokens_o, occ = run_job_script(ROOT.parent, corpus, work / f"ours-{mode}-{k}", model_dir, fixed,
                                                        args.rows_per_batch)
            else:
                seconds, tokens_o, occ = run_ours(corpus, work / f"ours-{mode}-{k}", model_dir, fixed, args.rows_per_batch)
            ours.append(seconds)
            occupancy.append(occ)
            theirs = f"recipe {recipe[-1]:.1f} s ({tokens_r} tokens), " if recipe else ""
            print(f"  {mode} #{k + 1}: {theirs}ours {ours[-1]:.1f} s ({tokens_o} tokens, {occ} rows per step, "
                  f"{args.rows / ours[-1]:.1f} rows/s); load {os.getloadavg()[0]:.1f}", flush=True)
        o = statistics.median(ours)
        if not recipe:
            results["modes"][mode] = {"ours_s": ours, "rows_per_s": args.rows / o, "ours_tokens": tokens_o,
                                      "mean_batch_occupancy": occupancy}
            print(f"{mode}: ours {o:.1f} s, {args.rows / o:.1f} rows/s", flush=True)
            continue
        r = statistics.median(recipe)
        results["modes"][mode] = {"recipe_s": recipe, "ours_s": ours, "speedup": r / o,
                                  "recipe_tokens": tokens_r, "ours_tokens": tokens_o,
                                  "mean_batch_occupancy": occupancy}
        line = f"{mode}: recipe {r:.1f} s, ours {o:.1f} s: ours x{r / o:.2f} the recipe (goal x1.5)"
        if base:
            b = statistics.median(base)
            results["modes"][mode].update(baseline=args.baseline, baseline_s=base, baseline_occupancy=base_occupancy,
                                          speedup_baseline=r / b, ours_vs_baseline=b / o)
            line += f"; baseline {args.baseline} {b:.1f} s: x{r / b:.2f} the recipe, ours x{b / o:.2f} the baseline"
        print(line, flush=True)
    results["load_average_end"] = os.getloadavg()[0]
    ray.shutdown()
    write_results(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
