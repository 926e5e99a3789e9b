"""Constrained against free generation at BLOOM's real vocabulary (250,880 tokens), batch 16.

Two figures:
  1. the mask cost per decode step: llguidance computing the next allowed tokens of 16 sequences (a JSON
     Schema, a regex) into packed bitmasks, walking valid outputs token by token; and the sampler
     applying them (a copy of the logits, -inf outside), against unpacking them to bool and masked_fill;
  2. tokens/s of the engine generating 16 constrained sequences against 16 free ones of the same
     lengths (each free sequence gets its constrained twin's length as max_new_tokens, no eos), runs
     interleaved, medians. The goal is constrained >= 0.9x free.

There is no hub here, so the tokenizer is a byte-level BPE of 250,680 entries (BLOOM's tokenizer size;
the model pads to 250,880) built programmatically: every byte, then words of several scripts grown one
merge at a time. The model is random (real vocabulary, a smaller body: --hidden, --layers).

    python benchmarks/bench_constrained.py                      # hidden 512 x 4 layers, ~3 min on 2 cores
    python benchmarks/bench_constrained.py --only mask          # the mask cost alone, about a minute
    python benchmarks/bench_constrained.py --hidden 1024 --layers 24   # bloom-560m's shape
    python benchmarks/bench_constrained.py --libraries --out /tmp/libraries.json   # the library choice
                                            # (pip install xgrammar outlines-core beside llguidance first)
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
import types
from pathlib import Path

from bench_model import timed
from common import bench_main, describe, machine

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

import bloom
from bloom import Engine, GenerationParams
from bloom.config import BloomConfig
from bloom.engine import sampler
from bloom.engine.constraints import Constrainer, Constraint
from bloom.tiny import SAMPLE_TEXT, randomise_
from bloom.tokenizer import BloomTokenizerFast

ROOT = Path(__file__).resolve().parent
VOCAB, TOKENIZER_SIZE, BATCH = 250_880, 250_680, 16
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["topic", "people", "label"],
          "properties": {"topic": {"type": "string", "maxLength": 40},
                         "people": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
                         "score": {"type": "number"}, "label": {"enum": ["positive", "negative", "neutral"]}}}
REGEX = r"(Mr|Ms|Dr)\. [A-Z][a-z]+ [A-Z][a-z]+, age [0-9]{1,3}, born in [A-Z][a-z]+"
SPECS = {"json_schema": Constraint.json_schema(SCHEMA), "regex": Constraint.regex(REGEX)}


def byte_symbols() -> dict[int, str]:
    """Byte → the printable character a byte-level BPE writes it as (printable bytes stand for
    themselves, the others are shifted past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def synthetic_tokenizer(size: int = TOKENIZER_SIZE, seed: int = 0) -> BloomTokenizerFast:
    """A byte-level BPE with `size` entries: BLOOM's 4 special tokens, the 256 bytes, then random words
    (Latin, accented, Cyrillic, CJK letters, digits, punctuation; half with a leading space), each added
    with all its prefixes so that every entry is one merge of two others."""
    symbol, rng = byte_symbols(), random.Random(seed)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + [symbol[b] for b in range(256)])}
    letters = ("etaoinshrdlucmfwypvbgkjqxz" * 4 + "ETAOINSHRDLUCMFWYPVBGKJQXZ" + "0123456789" + "éèàüöñçßøå"
               + "абвгдежзиклмнопрстуфхцчшщыэюя" + "的一是在不了有和人这中大为上个国我以要他" + " .,;:!?'\"(){}[]-_/")
    merges = []
    while len(vocab) < size:
        word = (" " if rng.random() < 0.5 else "") + "".join(rng.choice(letters) for _ in range(rng.randint(2, 10)))
        word = "".join(symbol[b] for b in word.encode())
        for k in range(2, len(word) + 1):
            if word[:k] not in vocab and len(vocab) < size:
                merges.append((word[: k - 1], word[k - 1]))
                vocab[word[:k]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return BloomTokenizerFast(tok)


def valid_outputs(kind: str, n: int) -> list[str]:
    """n different texts that satisfy the spec of `kind`, for walking the matchers."""
    rng = random.Random(1)
    names = ["Ada Obi", "Lima Ruiz", "Jean Dupont", "Olu Ade", "Mei Lin"]
    if kind == "regex":
        return [f"{rng.choice(['Mr', 'Ms', 'Dr'])}. {rng.choice(names)}, age {rng.randint(1, 99)}, born in Lagos"
                for _ in range(n)]
    return [json.dumps({"topic": f"report {i} about the river bank", "people": rng.sample(names, 2),
                        "score": round(rng.random(), 3), "label": rng.choice(["positive", "negative", "neutral"])})
            for i in range(n)]


def unpacked_fill(logits: torch.Tensor, index: list[int], allowed: torch.Tensor) -> torch.Tensor:
    """The way the sampler applied masks before (for comparison): the packed bits unpacked to a (K, V)
    bool mask by a per-byte table lookup, then masked_fill on a copy of the logits."""
    K, V = allowed.shape[0], logits.shape[-1]
    zero_bits = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1 == 0).to(torch.uint8)
    forbidden = torch.nn.functional.embedding(allowed.view(torch.uint8).int(), zero_bits).view(K, -1)[:, :V].bool()
    out = logits.clone()
    out[index] = out[index].masked_fill_(forbidden, float("-inf"))
    return out


def mask_cost(tokenizer, kind: str) -> dict:
    """Per decode step of 16 sequences walking valid outputs: seconds for llguidance to compute their
    packed masks, and to apply them to (16, V) logits as the sampler does (on a copy), interleaved with
    the earlier way (`unpacked_fill`) on the same masks, so that both see the same load."""
    constrainer = Constrainer(tokenizer, VOCAB, 2)
    start = time.perf_counter()
    first = constrainer.matcher(SPECS[kind])
    compile_s = time.perf_counter() - start
    matchers = [first] + [constrainer.matcher(SPECS[kind]) for _ in range(BATCH - 1)]
    walks = [tokenizer.encode(text) + [2] for text in valid_outputs(kind, BATCH)]
    logits = torch.randn(BATCH, VOCAB)
    compute, apply, unpacked = [], [], []
    for k in range(max(map(len, walks))):
        live = [i for i in range(BATCH) if k < len(walks[i])]
        start = time.perf_counter()
        allowed = constrainer.compute([matchers[i] for i in live])
        compute.append(time.perf_counter() - start)
        ways = [(apply, lambda: sampler.constrained(logits, live, allowed, copy=True)),
                (unpacked, lambda: unpacked_fill(logits, live, allowed))]
        for times, fn in ways if k % 2 else ways[::-1]:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        for i in live:
            assert matchers[i].consume_token(walks[i][k]), (kind, matchers[i].get_error())
    constrainer.close()
    return {"compile_ms": compile_s * 1e3, "steps": len(compute),
            "compute_ms_mean": statistics.mean(compute) * 1e3, "compute_ms_median": statistics.median(compute) * 1e3,
            "compute_ms_max": max(compute) * 1e3, "apply_ms_mean": statistics.mean(apply) * 1e3,
            "apply_ms_median": statistics.median(apply) * 1e3,
            "unpacked_fill_ms_mean": statistics.mean(unpacked) * 1e3,
            "unpacked_fill_ms_median": statistics.median(unpacked) * 1e3}


def walk(start, fill, advance, kind: str, tokenizer) -> list[float]:
    """Seconds per step to fill 16 masks while 16 matchers walk valid outputs of `kind`: start() → the
    16 matchers, fill(matchers, live indices, bitmask), advance(matcher, token)."""
    matchers, walks = start(), [tokenizer.encode(text) + [2] for text in valid_outputs(kind, BATCH)]
    bitmask, steps = torch.zeros(BATCH, (VOCAB + 31) // 32, dtype=torch.int32), []
    for k in range(max(map(len, walks))):
        live = [i for i in range(BATCH) if k < len(walks[i])]
        start_s = time.perf_counter()
        fill(matchers, live, bitmask)
        steps.append(time.perf_counter() - start_s)
        for i in live:
            advance(matchers[i], walks[i][k])
    return steps


def candidates(tokenizer) -> dict:
    """The same walks through each candidate library that is installed (llguidance, xgrammar,
    outlines-core): tokenizer setup, compile and mask-per-step seconds, or why it failed."""
    backend = tokenizer.backend_tokenizer
    tokens = [t for t, _ in sorted(backend.get_vocab().items(), key=lambda kv: kv[1])]

    def llguidance_():
        import llguidance as llg
        start = time.perf_counter()
        lt, ex = llg.LLTokenizer(backend.to_str(), n_vocab=VOCAB, eos_token=2), llg.LLExecutor()
        setup = time.perf_counter() - start
        grammars = {"json_schema": SPECS["json_schema"].grammar_text(), "regex": SPECS["regex"].grammar_text()}
        return setup, lambda kind: llg.LLMatcher(lt, grammars[kind]), lambda m: [m.deep_copy() for _ in range(BATCH)], \
            lambda ms, live, bm: ex.unsafe_compute_mask_ptr([(ms[i], i) for i in live], bm.data_ptr(), bm.shape[1] * 4, BATCH), \
            lambda m, t: m.consume_token(t) or (_ for _ in ()).throw(AssertionError(m.get_error()))

    def xgrammar_():
        import xgrammar as xgr
        start = time.perf_counter()
        compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(tokens, xgr.VocabType.BYTE_LEVEL, vocab_size=VOCAB,
                                                         stop_token_ids=[2]))
        setup = time.perf_counter() - start
        compile_ = {"json_schema": lambda: compiler.compile_json_schema(SPECS["json_schema"].spec, any_whitespace=False),
                    "regex": lambda: compiler.compile_regex(REGEX)}
        return setup, lambda kind: compile_[kind](), lambda g: [xgr.GrammarMatcher(g) for _ in range(BATCH)], \
            lambda ms, live, bm: [ms[i].fill_next_token_bitmask(bm, i) for i in live], \
            lambda m, t: m.accept_token(t) or (_ for _ in ()).throw(AssertionError(t))

    def outlines_core_():
        import outlines_core as oc
        start = time.perf_counter()
        by_text: dict[str, list[int]] = {}
        for i, t in enumerate(tokens):
            if i != 2:
                by_text.setdefault(t, []).append(i)
        vocab = oc.Vocabulary(2, by_text)
        setup = time.perf_counter() - start
        regex = {"json_schema": oc.json_schema.build_regex_from_schema(SPECS["json_schema"].spec), "regex": REGEX}
        return setup, lambda kind: oc.Index(regex[kind], vocab), lambda idx: [oc.Guide(idx) for _ in range(BATCH)], \
            lambda ms, live, bm: [ms[i].write_mask_into(bm[i].data_ptr(), bm.shape[1], 4) for i in live], \
            lambda m, t: t == 2 or m.advance(t)

    out = {}
    for name, make in (("llguidance", llguidance_), ("xgrammar", xgrammar_), ("outlines-core", outlines_core_)):
        try:
            setup, compile_, copies, fill, advance = make()
        except ImportError:
            continue
        out[name] = {"setup_s": setup}
        for kind in SPECS:
            try:
                start = time.perf_counter()
                compiled = compile_(kind)
                compile_s = time.perf_counter() - start
                steps = walk(lambda: copies(compiled), fill, advance, kind, tokenizer)
                out[name][kind] = {"compile_ms": compile_s * 1e3, "mask_ms_mean": statistics.mean(steps) * 1e3,
                                   "mask_ms_median": statistics.median(steps) * 1e3}
            except Exception as exc:  # a library that cannot take this vocabulary or spec: say so
                out[name][kind] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    return out


def breakdown(engine, prompts, params) -> dict:
    """One generate of `prompts` with `params`, timed by part: milliseconds per step of the forward, of the
    masks (`Constrainer.allowed`: waiting for the prefetched ones, or computing them), of applying them
    (`sampler.constrained`), of the matchers consuming the chosen tokens, and of the whole step; and the
    number of steps. The parts are wrapped for this call only (the engine has run a constrained
    generate before, so its Constrainer exists)."""
    spent: dict[str, float] = {}

    def timing(name, fn):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
        return wrapped

    parts = [(engine.runner, "forward"), (sampler, "constrained"), (sampler, "_settle"), (sampler, "consume"),
             (engine, "_step")]
    if engine._constrainer is not None:
        parts.append((engine._constrainer, "allowed"))
    saved = [(owner, name, getattr(owner, name)) for owner, name in parts]
    steps = engine.steps
    try:
        for owner, name, fn in saved:
            setattr(owner, name, timing(name, fn))
        engine.generate(prompts, params)
    finally:
        for owner, name, fn in saved:
            if isinstance(owner, types.ModuleType):
                setattr(owner, name, fn)
            else:
                delattr(owner, name)  # the instance's attribute hid its class's method
    steps = engine.steps - steps
    names = {"forward": "forward", "allowed": "masks", "constrained": "apply", "consume": "consume", "_step": "step",
             "_settle": "check"}
    return {"steps": steps, **{f"{names[k]}_ms": v / steps * 1e3 for k, v in spent.items()}}


def throughput(model, tokenizer, kind: str, max_new_tokens: int, repeats: int) -> dict:
    """Generated tokens/s at batch 16: constrained by `kind`, and free with the same lengths; and where a
    step's time goes in each (`breakdown`)."""
    prompts = [tokenizer.encode(SAMPLE_TEXT[i % len(SAMPLE_TEXT)])[:16] for i in range(BATCH)]
    slot = max(map(len, prompts)) + max_new_tokens
    engine = Engine(model, tokenizer, cache_tokens=BATCH * slot, max_seq_len=slot, prefill_chunk=256)
    constrained = GenerationParams(max_new_tokens=max_new_tokens, constraint=SPECS[kind])
    lengths = [len(s.output_ids) for s in engine.generate(prompts, constrained)]
    free = [GenerationParams(max_new_tokens=n, eos_token_id=()) for n in lengths]
    times = timed({"constrained": lambda: engine.generate(prompts, constrained),
                   "free": lambda: engine.generate(prompts, free)}, repeats)
    assert [len(s.output_ids) for s in engine.generate(prompts, free)] == lengths  # the same lengths, so the same steps
    tokens = sum(lengths)
    return {"tokens": tokens, "lengths": lengths, "seconds": times,
            "tok_s": {name: tokens / t for name, t in times.items()},
            "ratio": times["free"] / times["constrained"], "free_step_ms": times["free"] / max(lengths) * 1e3,
            "overlap": engine._constrainer.overlap,
            "breakdown": {"constrained": breakdown(engine, prompts, constrained), "free": breakdown(engine, prompts, free)}}


def run(args) -> dict:
    torch.manual_seed(0)
    tokenizer = synthetic_tokenizer()
    results = {"machine": machine(), "vocab": VOCAB, "tokenizer_entries": len(tokenizer), "batch": BATCH,
               "model": {"hidden": args.hidden, "layers": args.layers}, "max_new_tokens": args.max_new_tokens}
    if args.libraries:
        results["libraries"] = candidates(tokenizer)
        return results
    if args.only != "generation":
        results["mask"] = {kind: mask_cost(tokenizer, kind) for kind in args.kinds}
    if args.only == "mask":
        return results
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=args.hidden, n_layer=args.layers, n_head=16,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = randomise_(bloom.BloomForCausalLM(cfg).eval(), std=0.05)
    results["generation"] = {kind: throughput(model, tokenizer, kind, args.max_new_tokens, args.repeats)
                             for kind in args.kinds}
    return results


def show(results: dict) -> None:
    m = results["model"]
    print(f"{describe(results['machine'])}; {results['machine'].get('threads')} threads; vocab {results['vocab']}, "
          f"batch {results['batch']}, model hidden {m['hidden']} x {m['layers']} layers (random)")
    for name, r in results.get("libraries", {}).items():
        print(f"  {name:13s} setup {r['setup_s']:.1f} s; " + "; ".join(
            f"{kind}: " + (r[kind]["error"] if "error" in r[kind] else
                           f"compile {r[kind]['compile_ms']:.1f} ms, mask per step of 16 {r[kind]['mask_ms_mean']:.2f} ms "
                           f"mean ({r[kind]['mask_ms_median']:.2f} median)") for kind in SPECS))
    for kind, r in results.get("mask", {}).items():
        print(f"  mask {kind:11s}: compile {r['compile_ms']:.1f} ms; per step of 16: compute {r['compute_ms_mean']:.2f} ms "
              f"mean ({r['compute_ms_median']:.2f} median, {r['compute_ms_max']:.1f} max), apply {r['apply_ms_mean']:.2f} ms "
              f"mean ({r['apply_ms_median']:.2f} median) against unpacking + masked_fill "
              f"{r['unpacked_fill_ms_mean']:.2f} ms ({r['unpacked_fill_ms_median']:.2f})")
    for kind, r in results.get("generation", {}).items():
        mask = results.get("mask", {}).get(kind)
        share = (mask["compute_ms_mean"] + mask["apply_ms_mean"]) / r["free_step_ms"] if mask else None
        print(f"  generate {kind:11s}: {r['tokens']} tokens; constrained {r['tok_s']['constrained']:.1f} tok/s, free "
              f"{r['tok_s']['free']:.1f} tok/s: {r['ratio']:.2f}x; a free step {r['free_step_ms']:.0f} ms"
              + (f", mask if not overlapped {100 * share:.1f}% of it" if share is not None else ""))
        for name, b in r.get("breakdown", {}).items():
            print(f"    per step, {name:11s} ({b['steps']} steps): " + ", ".join(
                f"{part} {b[part + '_ms']:.1f} ms" for part in ("step", "forward", "masks", "apply", "check", "consume")
                if part + "_ms" in b) + (f"; masks {'beside' if r['overlap'] else 'after'} the forward"
                                         if name == "constrained" else ""))


def add_arguments(p) -> None:
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=("mask", "generation"), help="mask: only the mask cost (about a minute); "
                   "generation: only the tokens/s")
    p.add_argument("--kinds", nargs="+", choices=tuple(SPECS), default=list(SPECS), help="the constraints to measure")
    p.add_argument("--libraries", action="store_true", help="only compare the candidate libraries installed "
                   "(llguidance, xgrammar, outlines-core) on the same walks; results to --out")


if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:], __doc__, ROOT / "results" / "bench_constrained.json", add_arguments, run, show))
