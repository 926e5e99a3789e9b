"""Many LoRA adapters in one batch: the engine's tokens/s with 16 rows over 4 adapters, against the base model
and against merging each adapter into the base and running its rows one adapter after another.

Three ways to generate the same 16 rows (prompts of 16 tokens, 64 new tokens each, greedy, eos off):
  - base:     16 rows of the base model in one engine (the ceiling);
  - mixed:    16 rows over 4 adapters (r = 16 on all four linears), 4 rows each, in one engine
              (`bloom.lora.AdapterBank`, per-token adapter gathering, no merge);
  - merged:   what a user does without this: for each adapter, the base with that adapter merged into its
              weights, its 4 rows in an engine, one adapter after another (merging is done beforehand and
              not timed, which favours this path).
Runs are interleaved. Each is timed by the process's CPU time at --threads 1 (the default), the figure
that holds on a shared machine where other processes' load swings wall-clock times tenfold, and by its
wall-clock time (the fastest run reported). Then the adapter loading: time to read a PEFT adapter
(all four linears, every layer) and the memory its weights take, at r = 8, 16 and 64. The adapters are
written by PEFT itself (random lora_A and lora_B). A random model, float32, packed for CPU as the replica
does.

    python benchmarks/bench_lora.py                    # ~1 min on 2 cores
    python benchmarks/bench_lora.py --hidden 512 --layers 8
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

from common import bench_main, describe, machine

import torch

import bloom
from bloom.lora import AdapterBank, read_adapter
from bloom.tiny import randomise_

ROOT = Path(__file__).resolve().parent
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
ROWS, ADAPTERS, PROMPT, NEW = 16, 4, 16, 64


def add_arguments(p) -> None:
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16, help="the rank of the 4 adapters of the mixed batch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the work done)")


def write_peft_adapter(cfg: bloom.BloomConfig, directory: Path, r: int, seed: int) -> Path:
    """An adapter for a model of `cfg`, written by PEFT (lora_A and lora_B random: lora_B starts at zero).
    The vocabulary does not enter a LoRA of the four linears, so the wrapped model has a tiny one."""
    import peft
    import transformers

    torch.manual_seed(seed)
    ref = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=8, hidden_size=cfg.hidden_size, n_layer=cfg.n_layer, n_head=cfg.n_head))
    model = peft.get_peft_model(ref, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    model.save_pretrained(directory)
    return directory


def merged(model: bloom.BloomForCausalLM, adapter) -> bloom.BloomForCausalLM:
    """A copy of the (unpacked) model with the adapter merged into its weights, packed for CPU."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for (layer, module), (A, B) in adapter.weights.items():
            block = out.transformer.h[layer]
            linear = getattr(block.self_attention if module in ("query_key_value", "dense") else block.mlp, module)
            linear.weight += B @ A
    out.pack_for_cpu()
    return out


def generate(model, prompts, names, bank=None) -> list[list[int]]:
    engine = bloom.Engine(model, cache_tokens=len(prompts) * (PROMPT + NEW), max_seq_len=PROMPT + NEW, adapters=bank)
    params = [bloom.GenerationParams(max_new_tokens=NEW, eos_token_id=(), adapter=n) for n in names]
    return [s.output_ids for s in engine.generate(prompts, params)]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = bloom.BloomConfig(vocab_size=args.vocab, hidden_size=args.hidden, n_layer=args.layers,
                            n_head=args.hidden // 64, eos_token_id=2, pad_token_id=3)
    plain = randomise_(bloom.BloomForCausalLM(cfg).eval(), std=0.3)
    model = copy.deepcopy(plain)
    model.pack_for_cpu()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, args.vocab, (PROMPT,), generator=g).tolist() for _ in range(ROWS)]
    names = [f"a{i % ADAPTERS}" for i in range(ROWS)]
    info = machine()
    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "shape": f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, float32, packed for CPU",
               "generated_tokens": ROWS * NEW}
    with tempfile.TemporaryDirectory() as tmp:
        bank = AdapterBank(model, max_adapters=ADAPTERS)
        for i in range(ADAPTERS):
            bank.add(f"a{i}", write_peft_adapter(cfg, Path(tmp) / f"a{i}", args.rank, seed=i), load=True)
        merged_models = {n: merged(plain, bank.get(n)) for n in bank.names()}

        def run_merged():
            out = [None] * ROWS
            for n, m in merged_models.items():
                rows = [i for i in range(ROWS) if names[i] == n]
                for i, o in zip(rows, generate(m, [prompts[i] for i in rows], [None] * len(rows))):
                    out[i] = o
            return out

        contenders = {"base": lambda: generate(model, prompts, [None] * ROWS),
                      "mixed": lambda: generate(model, prompts, names, bank),
                      "merged": run_merged}
        cpu, wall = {k: [] for k in contenders}, {k: [] for k in contenders}
        outputs = {}
        for _ in range(args.repeats):
            for k, fn in contenders.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs[k] = fn()
                cpu[k].append(time.process_time() - start_cpu)
                wall[k].append(time.perf_counter() - start)
                print(f"  {k}: {cpu[k][-1]:.2f} s CPU, {wall[k][-1]:.2f} s wall", flush=True)
        results["runs"] = {k: {"cpu_seconds": cpu[k], "wall_seconds": wall[k],
                               "tokens_per_cpu_s": ROWS * NEW / statistics.median(cpu[k]),
                               "tokens_per_s_fastest_wall": ROWS * NEW / min(wall[k])} for k in contenders}
        for other in ("base", "merged"):
            results[f"mixed_vs_{other}"] = {
                unit: results["runs"]["mixed"][unit] / results["runs"][other][unit]
                for unit in ("tokens_per_cpu_s", "tokens_per_s_fastest_wall")}
        # Merging rounds differently from adding the LoRA term, so a long greedy run may part ways.
        results["rows_identical_to_merged"] = sum(a == b for a, b in zip(outputs["mixed"], outputs["merged"]))

        results["loading"] = {}
        for r in (8, 16, 64):
            path = write_peft_adapter(cfg, Path(tmp) / f"r{r}", r, seed=100 + r)
            seconds = []
            for _ in range(5):
                start = time.perf_counter()
                adapter = read_adapter(path, model, f"r{r}")
                seconds.append(time.perf_counter() - start)
            results["loading"][r] = {"seconds": statistics.median(seconds), "bytes": adapter.nbytes,
                                     "file_bytes": (path / "adapter_model.safetensors").stat().st_size}
    return results


def show(results: dict) -> None:
    info = results["machine"]
    print(f"machine: {describe(info)}, {info['threads']} threads")
    print(f"model: {results['shape']}; {ROWS} rows x {NEW} new tokens, prompts of {PROMPT}")
    print(f"{'path':<10}{'tokens per CPU s (median)':>27}{'tokens/s (fastest wall)':>26}")
    for k, run_ in results["runs"].items():
        print(f"{k:<10}{run_['tokens_per_cpu_s']:>27.0f}{run_['tokens_per_s_fastest_wall']:>26.0f}")
    for other, goal in (("base", "0.7x"), ("merged", "2x")):
        r = results[f"mixed_vs_{other}"]
        print(f"mixed / {other:<7} {r['tokens_per_cpu_s']:.2f}x CPU, {r['tokens_per_s_fastest_wall']:.2f}x wall (goal >= {goal})")
    print(f"rows identical to merged: {results['rows_identical_to_merged']}/{ROWS}")
    print(f"{'rank':<6}{'load ms':>9}{'memory MB':>11}{'file MB':>9}")
    for r, x in results["loading"].items():
        print(f"{r:<6}{x['seconds'] * 1e3:>9.1f}{x['bytes'] / 1e6:>11.2f}{x['file_bytes'] / 1e6:>9.2f}")


if __name__ == "__main__":
    raise SystemExit(bench_main(None, __doc__, ROOT / "results" / "bench_lora.json", add_arguments, run, show))
