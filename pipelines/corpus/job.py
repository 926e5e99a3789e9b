"""The offline labeling job: Parquet in → Ray Data → a pool of BloomReplica actors → Parquet out.

`run_label_job(config)` checks everything it can before starting (model, inputs, columns, the output's
fingerprint), labels only the rows not yet in the output, verifies that the output holds every input
row exactly once, and writes a run report (`_report.json`) beside the parts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
import time
from pathlib import Path

import pyarrow.compute as pc

import bloom
from bloom.engine import kv_bytes_per_token

from .. import adapters, delta, storage
from ..config import LabelConfig, model_fingerprint
from . import (ENGINE_COUNTS, CorpusPlan, check_output, list_input_files, list_parts, merge_reasons, pending,
               plan, read_row_groups, scan_output, verify, write_part)
from ..hub import resolve_model
from ..processor import cluster_pool, replica_stage
from ..replica import check_model
from ..tasks import TASKS

logger = logging.getLogger("bloomline")
RUN_FILE, REPORT_FILE = "_run.json", "_report.json"
PARTS_DIR = "_parts"  # output_format delta: where the parts, _run.json and _report.json live, under the table


class JobFailed(RuntimeError):
    """The job ran but its result is not acceptable (too many errored rows, rows missing or repeated)."""


def text_columns(config: LabelConfig) -> list[str]:
    """The columns the task reads text from."""
    return TASKS[config.task].input_columns(config)


def required_columns(config: LabelConfig) -> list[str]:
    adapter = [config.adapter_column] if config.adapter_column else []
    return list(dict.fromkeys([config.id_column, *config.keep_columns, *text_columns(config), *adapter]))


def _prepare_output(config: LabelConfig, fingerprint: str, columns: dict[str, str], model_id: str,
                    adapter_ids: dict[str, str] | None = None) -> None:
    """Refuse to mix runs: an output written with another model, adapters, task or parameters (another
    fingerprint), or whose parts give pass-through columns other types (`columns`: name → type), is an
    error unless overwrite is set, which deletes its parts first. adapter_ids: name → digest of each
    declared adapter's bytes."""
    run_path = storage.join(config.output, RUN_FILE)
    parts = list_parts(config.output)
    previous = storage.read_json(run_path) if storage.kind(run_path) == "file" else None
    if parts or previous:
        if config.overwrite:
            storage.delete(parts + [storage.join(config.output, REPORT_FILE)])
        elif previous is None:
            raise ValueError(f"output {config.output} holds Parquet parts but no {RUN_FILE}: not written by this "
                             "job; choose another output or rerun with --overwrite (overwrite: true in a config) "
                             "to delete them")
        elif previous.get("fingerprint") != fingerprint and parts:  # no part written yet: nothing to protect
            raise ValueError(f"output {config.output} was written with another model, task or parameters "
                             f"({_differences(previous, config, model_id, adapter_ids or {})}); rerun with "
                             "--overwrite (overwrite: true in a config) to replace it, or choose another output")
        elif previous.get("columns", columns) != columns and parts:
            changed = {c: (previous["columns"].get(c), t) for c, t in columns.items() if previous["columns"].get(c) != t}
            raise ValueError(f"output {config.output} has parts whose pass-through columns have other types than "
                             f"this input gives them ({', '.join(f'{c}: {a} there, {b} now' for c, (a, b) in changed.items())}); "
                             "a table of both would not read as one: use --overwrite or another output")
    storage.make_dirs(config.output)
    storage.put_json(run_path, {"fingerprint": fingerprint, "task": config.task, "model": config.model,
                                "model_fingerprint": model_id, "params": config.task_params(),
                                "numerics": config.numerics(), "columns": columns,
                                **({"adapters": adapter_ids} if adapter_ids else {})})


def _differences(previous: dict, config: LabelConfig, model_id: str, adapter_ids: dict[str, str]) -> str:
    """What differs between the run recorded in `previous` (its _run.json) and this one, in words."""
    if previous.get("task") != config.task:
        return f"task {previous.get('task')!r} there, {config.task!r} now"
    out = []
    if previous.get("model_fingerprint", model_id) != model_id or previous.get("model") != config.model:
        out.append(f"model {previous.get('model')!r} there, {config.model!r} now"
                   + (" (other weights)" if previous.get("model") == config.model else ""))
    before = previous.get("adapters", {})
    out += [f"adapter {n!r}: " + ("not declared there" if n not in before else "not declared now" if n not in adapter_ids
                                  else "other bytes") for n in sorted(set(before) | set(adapter_ids))
            if before.get(n) != adapter_ids.get(n)]
    for group, now in (("params", config.task_params()), ("numerics", config.numerics())):
        before = previous.get(group)
        if before is None:  # a _run.json from before this was recorded
            continue
        now = json.loads(json.dumps(now, default=str))  # as stored
        out += [f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(before) | set(now))
                if before.get(k) != now.get(k)]
    return "; ".join(out) or f"task {config.task!r}, model {config.model!r}"


def error_problems(errored: int, rows: int, config: LabelConfig) -> list[str]:
    """Why `errored` of `rows` rows break the config's thresholds (none: acceptable)."""
    problems = []
    if config.max_errored_rows is not None and errored > config.max_errored_rows:
        problems.append(f"{errored} rows errored, over max_errored_rows={config.max_errored_rows}")
    if config.max_errored_fraction is not None and rows and errored / rows > config.max_errored_fraction:
        problems.append(f"{errored} of {rows} rows errored ({errored / rows:.1%}), over "
                        f"max_errored_fraction={config.max_errored_fraction:.1%}")
    return problems


def _repair(output: str, state) -> None:
    """Delete parts that repeat rows of other parts (a write that outlived a killed run can land after
    the next run planned the same rows); the rows they alone held are labeled again."""
    paths = [p for ps in state.overlaps.values() for p in ps]
    logger.warning("%d part(s) repeat rows of other parts; deleting them and labeling their rows again", len(paths))
    storage.delete(paths)


def check_checkpoint(config: LabelConfig) -> LabelConfig:
    """config with its model resolved to a local directory, checked for the task without loading it:
    config.json, tokenizer.json and the task's head. FileNotFoundError / ValueError in one line."""
    config = dataclasses.replace(config, model=resolve_model(config.model))
    bloom.BloomConfig.from_pretrained(config.model)  # a clear error now rather than in every actor
    if not (Path(config.model) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {config.model}")
    check_model(config, config.model)  # the task's head is there: one line now, not a failing actor later
    return config


def parts_config(config: LabelConfig) -> LabelConfig:
    """The config whose output is where the parts go: the output itself (parquet), or <output>/_parts
    (delta), so the exactly-once parts machinery is the same for both and the table is published from it."""
    if config.output_format != "delta":
        return config
    return dataclasses.replace(config, output=storage.join(config.output, PARTS_DIR))


def check_format(config: LabelConfig) -> None:
    """ValueError when the output was written in the other format (parts at its root, or a Delta log)."""
    if config.output_format == "delta" and storage.exists(storage.join(config.output, RUN_FILE)):
        raise ValueError(f"output {config.output} holds Parquet parts written with --output-format parquet; "
                         "keep that or use another output")
    if config.output_format == "parquet" and storage.exists(storage.join(config.output, "_delta_log")):
        raise ValueError(f"output {config.output} is a Delta table written with --output-format delta; "
                         "keep that or use another output")


def check_job(config: LabelConfig) -> LabelConfig:
    """The checks that need no cluster (`check_checkpoint`, an output given, declared adapters used); the
    config to run."""
    if not config.output:
        raise ValueError("no output given")
    if config.adapter_dir:
        raise ValueError("adapter_dir is the endpoint's: a labeling run declares each adapter (--adapter NAME=PATH), "
                         "since their bytes enter the run's fingerprint")
    if config.adapters and not (config.adapter or config.adapter_column):
        raise ValueError("adapters are declared (--adapter) but no row uses one: give --use-adapter NAME for every "
                         "row, or --adapter-column COLUMN naming each row's")
    config = dataclasses.replace(config, adapters=adapters.absolute(config.adapters)) if config.adapters else config
    return check_checkpoint(config)


def check_cache_fits(config: LabelConfig, node_memory: list[float]) -> None:
    """ValueError when one generated sequence's KV cache (max_input_tokens + max_new_tokens tokens, every
    layer's keys and values, 2 bytes an element at the least) is larger than the memory Ray gives the
    largest node: no actor could hold a single cache slot. Run before anything is written. It catches
    impossible settings only: a GPU actor's cache must fit the GPU's memory, which Ray does not report."""
    if not TASKS[config.task].runs_on_engine or not node_memory:
        return
    cfg = bloom.BloomConfig.from_pretrained(config.model)
    tokens = config.max_input_tokens + config.max_new_tokens
    need = tokens * kv_bytes_per_token(cfg, element_size=2)
    if need > max(node_memory):
        raise ValueError(
            f"max_input_tokens + max_new_tokens = {tokens:,} tokens: one sequence's KV cache would take "
            f"{need / 1e9:,.1f} GB ({cfg.n_layer} layers x {cfg.hidden_size} wide, bf16), more than the "
            f"largest node's {max(node_memory) / 1e9:,.1f} GB of memory; lower max_new_tokens")


class Progress:
    """A progress line on stderr every `every` seconds (a terminal, a pseudo-terminal or a log alike):
    rows labeled of the rows to label, rows/s and the time left at that rate. Used as a context manager
    it also speaks while no part has been written yet (a model loading, a long first batch)."""

    def __init__(self, total: int, every: float = 5.0):
        self.total, self.every, self.start = total, every, time.time()
        self.last, self.shown, self.done = self.start, None, 0
        self._stop, self._lock = threading.Event(), threading.Lock()  # the ticker and the caller both print
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Progress":
        def tick():
            while not self._stop.wait(self.every):
                if time.time() - self.last >= self.every:
                    self._print(self.done)
        self._thread = threading.Thread(target=tick, name="bloomline-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.show(self.done, last=True)

    def show(self, done: int, last: bool = False) -> None:
        self.done = done
        if (not last and time.time() - self.last < self.every) or done == self.shown:
            return
        self._print(done)

    def _print(self, done: int) -> None:
        with self._lock:
            now = time.time()
            self.last, self.shown, rate = now, done, done / max(now - self.start, 1e-9)
            eta = f", {(self.total - done) / rate:,.0f} s left" if rate and done < self.total else ""
            print(f"labeled {done:,} of {self.total:,} rows ({done / max(self.total, 1):.0%}), {rate:,.1f} rows/s{eta}",
                  file=sys.stderr, flush=True)


EARLIER_RUNS = 30  # runs a report keeps of those before it


def _earlier_runs(uri: str) -> list[dict]:
    """The report already at `uri`, without its own history, then its history: newest first, at most
    EARLIER_RUNS. So a rerun that labels nothing (a nightly night with nothing new) does not erase the
    figures of the run that did the work. A missing or unreadable report gives []."""
    try:
        before = storage.read_json(uri)
    except (FileNotFoundError, OSError, ValueError):
        return []
    if not isinstance(before, dict):
        return []
    history = before.pop("earlier_runs", [])
    return [before, *(history if isinstance(history, list) else [])][:EARLIER_RUNS]


@dataclasses.dataclass
class LabelPlan:
    """What `plan_label_job` found without a cluster: the checked config, the input files and their
    units, the run's fingerprint, and whether the output already holds every row with these settings."""

    config: LabelConfig
    files: list[str]
    corpus: CorpusPlan
    model_id: str
    fingerprint: str
    finished: bool
    adapter_ids: dict[str, str] = dataclasses.field(default_factory=dict)  # name → digest of its bytes


def plan_label_job(config: LabelConfig) -> LabelPlan:
    """Every check that needs no Ray, reading footers and listings only and writing nothing: the model,
    the inputs (missing paths, unreadable Parquet, missing columns, clashing types), the output's
    store, and whether a run is needed at all. So a job finds bad input before it starts Ray, and a
    rerun of a finished job starts none. FileNotFoundError / ValueError in one line."""
    config = check_job(config)
    files = list_input_files(config.input)
    passthrough = [c for c in dict.fromkeys([config.id_column, *config.keep_columns]) if c not in text_columns(config)]
    corpus = plan(files, required_columns(config), passthrough)
    model_id = model_fingerprint(config.model)
    adapter_ids = adapters.fingerprints(config)
    fingerprint = config.fingerprint(model_id, adapter_ids)
    check_output(config.output)
    check_format(config)
    finished = _finished(parts_config(config), fingerprint, corpus) and (
        config.output_format != "delta" or delta.published_fingerprint(config.output) == fingerprint)
    return LabelPlan(config, files, corpus, model_id, fingerprint, finished, adapter_ids)


def _finished(config: LabelConfig, fingerprint: str, corpus: CorpusPlan) -> bool:
    """The output was written with these settings and column types and holds every unit's rows once."""
    if config.overwrite:
        return False
    try:
        previous = storage.read_json(storage.join(config.output, RUN_FILE))
    except (FileNotFoundError, OSError, ValueError):
        return False
    columns = {c: str(t) for c, t in corpus.types.items()}
    if not isinstance(previous, dict) or previous.get("fingerprint") != fingerprint \
            or previous.get("columns", columns) != columns:
        return False
    state = scan_output(config.output, clean=False)
    return not state.overlaps and not pending(corpus.units, state)


def _publish(table_uri: str, parts_dir: str, fingerprint: str, rows: int) -> int:
    """The table's version holding every labeled row: a new commit of all parts, unless its newest
    commit already is this run's (a rerun of a finished job adds none)."""
    if delta.published_fingerprint(table_uri) == fingerprint:
        return delta.open_table(table_uri).version()
    return delta.publish_parts(table_uri, list_parts(parts_dir), {"fingerprint": fingerprint, "rows": rows})


def run_label_job(config: LabelConfig, planned: LabelPlan | None = None) -> dict:
    """Label config.input into config.output on the Ray cluster this process is connected to (none is
    needed when `planned`, from `plan_label_job(config)`, says the output is finished).

    Returns the run report (also written to <output>/_report.json). Raises FileNotFoundError /
    ValueError before any work for bad models, inputs, columns or outputs, and JobFailed when the
    errored rows pass the configured threshold (the labeled rows are kept)."""
    start = time.time()
    planned = planned or plan_label_job(config)
    config, files, corpus, model_id, fingerprint = (planned.config, planned.files, planned.corpus, planned.model_id,
                                                    planned.fingerprint)
    table_uri, config = config.output, parts_config(config)  # delta: label into <output>/_parts, publish after
    rows_in = corpus.rows
    todo, pool = [], None
    if not planned.finished:
        import ray

        check_cache_fits(config, [n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")])
        _prepare_output(config, fingerprint, {c: str(t) for c, t in corpus.types.items()}, model_id,
                        planned.adapter_ids)
        state = scan_output(config.output)
        if state.overlaps:
            _repair(config.output, state)
            state = scan_output(config.output)
        todo = pending(corpus.units, state)
        del state  # only the units left to label are needed from here on
        pool = cluster_pool(config)

    run_rows = run_tokens = generated = 0
    engine = {name: 0 for _, name, _ in ENGINE_COUNTS}  # the generation engine's counters, summed
    errors: dict[str, list] = {}
    if todo:
        import ray

        logger.info("labeling %d units (row groups or slices) with %s", len(todo), pool)
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map_batches(read_row_groups, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                            fn_kwargs={"columns": required_columns(config), "text_columns": text_columns(config),
                                       "casts": corpus.casts})
        ds = replica_stage(ds, config, pool)
        ds = ds.map_batches(write_part, batch_size=None, batch_format="pyarrow", num_cpus=0.25,
                            fn_kwargs={"output": config.output, "id_column": config.id_column})
        with Progress(sum(u["num_rows"] - sum(b - a for a, b in json.loads(u["done"])) for u in todo)) as progress:
            for summary in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                run_rows += pc.sum(summary.column("rows")).as_py() or 0
                run_tokens += pc.sum(summary.column("input_tokens")).as_py() or 0
                generated += pc.sum(summary.column("generated_tokens")).as_py() or 0
                for name in engine:
                    engine[name] += pc.sum(summary.column(name)).as_py() or 0
                for reasons in summary.column("reasons").to_pylist():
                    merge_reasons(errors, json.loads(reasons))
                progress.show(run_rows)

    # Exactly-once from the listing: each part's keys were checked where it was written.
    state = scan_output(config.output)
    wall = time.time() - start
    report = {
        "status": "succeeded", "task": config.task, "model": config.model, "fingerprint": fingerprint,
        "rows_in": rows_in, "rows_out": state.rows, "errored_rows": state.errored, "rows_labeled_this_run": run_rows,
        "input_tokens": state.tokens, "wall_seconds": round(wall, 3),
        "rows_per_second": round(run_rows / wall, 3) if wall else None,
        "tokens_per_second": round(run_tokens / wall, 3) if wall else None,
        "pool": pool, "parameters": config.task_params(), "input_files": len(files), "output": table_uri,
        "parts": state.parts, "units": len(corpus.units),
        "errors_this_run": {reason: {"rows": n, "sample_ids": ids}
                            for reason, (n, ids) in sorted(errors.items(), key=lambda e: -e[1][0])},
    }
    if TASKS[config.task].runs_on_engine:
        report["generated_tokens_this_run"] = generated
        report["generated_tokens_per_second"] = round(generated / wall, 3) if wall else None
        # Each step gives every sequence in the batch one token: tokens / steps = mean rows per step.
        steps, prompt = engine["engine_steps"], engine["engine_prompt_tokens"]
        report["mean_batch_occupancy"] = round(generated / steps, 2) if steps else None
        # Prompt tokens the prefix cache gave / prompt tokens of the sequences started (this run's).
        report["prefix_tokens_reused_this_run"] = engine["prefix_tokens_reused"]
        report["prefix_hit_rate"] = round(engine["prefix_tokens_reused"] / prompt, 4) if prompt else None
    problems = verify(corpus, state)
    if problems:
        problems.insert(0, f"the output holds {state.rows} rows for {rows_in} input rows")
    problems += error_problems(state.errored, rows_in, config)
    if problems:
        report["status"], report["problems"] = "failed", problems
    elif config.output_format == "delta":
        report["table_version"] = _publish(table_uri, config.output, fingerprint, state.rows)
    report_uri = storage.join(config.output, REPORT_FILE)
    report["earlier_runs"] = _earlier_runs(report_uri)
    storage.put_json(report_uri, report)
    if problems:
        raise JobFailed("; ".join(problems) + f" (report: {config.output}/{REPORT_FILE})")
    return report
