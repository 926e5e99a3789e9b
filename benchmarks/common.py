"""What the benchmarks share: the machine their figures come from, and writing their results.

Figures on these machines differ by CPU family (AMX vs AVX512-BF16 bf16 speed), so every result names
the CPU model, its bf16 features and the core count, and a results file keeps one entry per machine:
a run on another family adds to the file instead of overwriting the first family's figures.

    {"machines": {"AMD EPYC [avx512_bf16]": {"machine": {...}, ...figures},
                  "Intel(R) Xeon(R) ... [amx_bf16 avx512_bf16]": {...}}}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "sha_ni")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # what sets a CPU's bf16 matmul speed, so part of the key
# Results files written before they were kept per machine all came from the project's EPYC VM.
LEGACY_MACHINE = {"cpu": "AMD EPYC", "flags": ["avx512_bf16"]}


def machine() -> dict:
    """CPU model, the flags that decide bf16 (and hashing) speed, cores, torch and threads, from lscpu."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    info = {"cpu": fields.get("Model name", platform.processor() or "?").strip(), "cores": os.cpu_count(),
            "flags": [f for f in FLAGS if f in flags], "platform": platform.platform()}
    try:
        import torch

        info.update(torch=torch.__version__, threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def describe(info: dict) -> str:
    """machine() in one line, for printing beside the figures."""
    return f"{info['cpu']}, {info['cores']} CPUs, flags: {' '.join(info['flags']) or 'none'}"


def machine_key(info: dict) -> str:
    """The key a machine's results are kept under: CPU model and bf16 features, plus the GPU if the
    figures are a GPU's (info["device"]), e.g. "AMD EPYC [avx512_bf16]"."""
    flags = info.get("flags", info.get("bf16_flags", []))  # bf16_flags: an older spelling
    key = f"{info['cpu']} [{' '.join(f for f in BF16_FLAGS if f in flags) or 'no bf16'}]"
    device = info.get("device", "cpu")
    return key if device == "cpu" else f"{key} + {device}"


def read_results(path: Path) -> dict[str, dict]:
    """{machine key: results} from a results file, or {} if there is none. A file from before results
    were kept per machine is read as one machine's: the one its "machine" entry names if that has a CPU
    model, else the project's EPYC VM (where all of those were measured)."""
    path = Path(path)
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if "machines" in data:
        return data["machines"]
    info = data.get("machine", {})
    if not isinstance(info, dict):  # some older files named their machine in words
        info = {"described": info}
    if "cpu" not in info:
        info = {**LEGACY_MACHINE, **info}
        data["machine"] = info
    return {machine_key(info): data}


def write_results(results: dict, out: Path) -> None:
    """Store results (which carry their "machine", from machine()) under that machine's key in `out`,
    keeping the other machines' results already there."""
    out = Path(out)
    machines = read_results(out)
    machines[machine_key(results["machine"])] = results
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machines": machines}, indent=2, default=str) + "\n")
    print(f"wrote {out} ({len(machines)} machine{'s' * (len(machines) > 1)}: {', '.join(machines)})")


def export(rev: str, directory: Path) -> Path:
    """The code of git revision `rev` of this repository, extracted into `directory` (created)."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(root), "archive", rev], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"--baseline {rev}: git archive failed (a clone with its history is needed): "
                         f"{archive.stderr.decode().strip()}")
    directory.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory


def against_baseline(script: Path, rev: str, argv: list[str], repeats: int) -> dict[str, list[dict]]:
    """Run `script` (a benchmark with a hidden `--code DIR` argument: the tree whose bloom and pipelines
    it imports) on the code of git revision `rev` and on this tree, alternating `repeats` times, each in
    its own process (and its own Ray), with `argv` less --baseline, --repeats and --out.
    {"baseline": [results], "this tree": [results]}: each run's results for this machine."""
    tmp = Path(tempfile.mkdtemp())
    baseline = export(rev, tmp / "baseline")
    passed, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--baseline", "--repeats", "--out"):
            skip = True
        elif not a.startswith(("--baseline=", "--repeats=", "--out=")):
            passed.append(a)
    runs: dict[str, list[dict]] = {"baseline": [], "this tree": []}
    for r in range(repeats):
        for name, code in (("baseline", baseline), ("this tree", Path(script).resolve().parent.parent)):
            out = tmp / f"{name.replace(' ', '_')}-{r}.json"
            print(f"--- {name} ({rev if name == 'baseline' else 'working tree'}), run {r + 1}", flush=True)
            # Ray puts its driver's working directory first on its workers' path: run in the code's folder.
            subprocess.run([sys.executable, str(Path(script).resolve()), *passed, "--code", str(code), "--out", str(out)],
                           check=True, cwd=code)
            (result,) = read_results(out).values()  # the file holds this machine's run only
            runs[name].append(result)
    return runs


def bench_main(argv, doc: str, out: Path, add_arguments, run, show) -> int:
    """The main of a benchmark that runs once, prints its figures and stores them: its own arguments
    (`add_arguments(parser)`), then `--out` (default `out`), `results = run(args)`, `show(results)`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--out", type=Path, default=out)
    args = p.parse_args(argv)
    results = run(args)
    show(results)
    write_results(results, args.out)
    return 0


def random_lm(args) -> tuple:
    """A random-weight BloomForCausalLM of args.hidden / args.layers / args.vocab (wide weights, so
    generations vary), packed for CPU as the replica runs it: (model, number of Linear packed)."""
    import torch

    import bloom
    from bloom.tiny import randomise_

    torch.manual_seed(0)
    cfg = bloom.BloomConfig(vocab_size=args.vocab, hidden_size=args.hidden, n_layer=args.layers,
                            n_head=args.hidden // 64, eos_token_id=2, pad_token_id=3)
    model = randomise_(bloom.BloomForCausalLM(cfg).eval(), std=0.3)
    return model, model.pack_for_cpu()


def local_serve(num_cpus: int = 2) -> str:
    """Start a local Ray of `num_cpus` CPUs and Ray Serve on a free port of 127.0.0.1; its base URL."""
    import socket

    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"
