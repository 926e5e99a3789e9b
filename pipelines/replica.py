"""BloomReplica: one loaded BLOOM model (and tokenizer) that labels batches of rows for one task.

The Ray Data pipeline uses it as a `map_batches` callable class (load in `__init__`, label in
`__call__`), and the online endpoint wraps the same class. What each task reads, computes and writes
lives in `pipelines.tasks`; the replica loads the model the task needs into a `Runtime` that it hands
to the task, checks each row's text, and resolves each row's or request's settings.

Input batches are Arrow tables with the task's columns; the output is an Arrow table with the
pass-through columns, the task's columns, and per-row `input_tokens`, `truncated` and `error` (null when
the row was labeled). A bad row never fails the batch.

Settings are arguments: `label_rows(rows, params)` resolves each row's overrides into its own
`LabelConfig` and hands it down; nothing on the replica changes per request, so one replica serves
concurrent requests from several threads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import torch

import bloom
from bloom.loading import missing_heads, resolve_dtype
from bloom.quant import check_quantize

from . import adapters
from .config import LabelConfig
from .corpus import ENGINE_COUNTS
from .tasks import TASKS, Runtime, settings
from .tasks.base import encode_capped

logger = logging.getLogger("bloomline")

PROVENANCE = ("_source", "_row")  # added by the pipeline's reader: input file and row index, for resuming


class RowError(ValueError):
    """A row that cannot be labeled. code: "invalid_input" (null, empty, not text, too many characters),
    "too_long" (more tokens than max_input_tokens) or "unknown_adapter" (its adapter is not declared)."""

    def __init__(self, message: str, code: str = "invalid_input"):
        super().__init__(message)
        self.code = code


def output_fields(task: str, c: LabelConfig | None = None) -> list[pa.Field]:
    """The columns a task writes after the pass-through columns, with fixed Arrow types (c: the run's
    settings, where some decide a column)."""
    return TASKS[task].output_fields(c=c)


def check_model(config: LabelConfig, model_dir: str | Path) -> None:
    """ValueError in one line when the checkpoint lacks the head that config.task needs (checked from the
    safetensors headers, no weights read), or when quantize does not go with its dtype (dtype "auto")."""
    if config.quantize and config.dtype == "auto":  # the checkpoint's own dtype: known before loading
        check_quantize(config.quantize, resolve_dtype("auto", bloom.BloomConfig.from_pretrained(model_dir)))
    cls = TASKS[config.task].model_class(config)
    missing = missing_heads(cls, Path(model_dir))
    if missing:
        raise ValueError(f"{model_dir} has no {', '.join(missing)} head weights, so it cannot do task "
                         f"{config.task!r}{TASKS[config.task].head_hint}")


def on_a_thread_that_ends(fn, *args):
    """fn(*args) on a new thread, joined: its result, or its exception raised here.

    The replica loads its model this way. OpenMP (libgomp, under torch's CPU kernels) keeps a team of
    worker threads for every thread that has run parallel work, for as long as that thread lives. When
    the loading thread lives on while the engine's own thread runs the steps, the process holds two
    teams, more OpenMP threads than CPUs, and libgomp then cuts its spin-waits short: its workers sleep
    between kernels and every kernel waits to wake them (futex calls of ~50 us against ~3 us). The
    engine's steps ran 1.3-1.6x slower so on the 2-vCPU EPYC (bench_recipe's 200 rows, 32 new tokens:
    13-18 s against 10-12 s). A thread that ends takes its team with it."""
    with ThreadPoolExecutor(1, thread_name_prefix="bloom-load") as pool:  # leaving joins its thread
        return pool.submit(fn, *args).result()


class BloomReplica:
    """Holds one model for `config.task`; `replica(table) -> table` labels a batch.

    device: where the model lives (default: CUDA when visible, else CPU); config.device_map, when set,
    spreads it over the visible devices instead. num_threads: torch's CPU threads for this replica.
    max_new_tokens_cap: the most new tokens a request may ask for (the endpoint's cap; default the
    config's max_new_tokens), which sizes the generation engine's cache slots."""

    def __init__(self, config: LabelConfig, device: str | None = None, num_threads: int | None = None,
                 max_new_tokens_cap: int | None = None):
        self.config = config  # the defaults; a request's settings are derived from it, never written to it
        self.task = TASKS[config.task]
        self.num_threads = num_threads  # set on each thread that runs the model (OpenMP's count is per thread)
        self._engine_lock = threading.Lock()
        self._told = [0] * len(ENGINE_COUNTS)  # the engine's counters when a batch last told them (counts_since_told)
        on_a_thread_that_ends(self._load, config, device, num_threads, max_new_tokens_cap)

    def _load(self, config: LabelConfig, device: str | None, num_threads: int | None,
              max_new_tokens_cap: int | None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        model_dir = Path(config.model)
        check_model(config, model_dir)
        self.tokenizer = bloom.BloomTokenizerFast.from_pretrained(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.task.model_class(config).from_pretrained(
            model_dir, dtype=config.dtype, device=None if config.device_map else self.device, device_map=config.device_map)
        self.input_device = self.model.get_input_embeddings().weight.device
        if config.quantize == "int8":  # before packing, which then packs only the Linears left plain
            self.model.quantize_int8()
        if {str(d) for d in self.model.hf_device_map.values()} == {"cpu"}:
            # CPU inference: oneDNN-packed weights; decode steps 1.3-2.5x faster here (bloom.packing).
            self.model.pack_for_cpu()
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # The LoRA adapters rows or requests may name (pipelines.adapters), before the task builds its engine.
        self.runtime = Runtime(self.model, self.tokenizer, self.input_device, pad_id,
                               adapters=adapters.bank(config, self.model))
        self.task.prepare(self.runtime, config, max_new_tokens_cap)  # e.g. the engine of a task that has one
        self.engine = self.runtime.engine
        self.fields = self.task.output_fields(self.runtime, config)

    # ------------------------------------------------------------------ batch in, batch out

    def __call__(self, batch: pa.Table, engine_steps: bool = True) -> pa.Table:
        """Label an Arrow batch; returns pass-through columns + the task's columns, one row per input row
        (and, with an engine and engine_steps, the job's engine-steps column)."""
        rows = batch.to_pylist()
        results = self.label_rows(rows)
        keep = [c for c in self.passthrough_columns() if c in batch.column_names]
        columns = {c: batch.column(c) for c in keep}
        for f in self.fields:
            columns[f.name] = pa.array([r.get(f.name) for r in results], type=f.type)
        if self.engine is not None and rows and engine_steps:
            # The engine counters (steps, prompt tokens, reused ones) since the last batch that ended here, on
            # its first row (the write step sums and drops the columns): the run report's mean batch occupancy
            # and prefix cache hit rate. Batches overlap on a fed engine (pipelines.processor), so each step
            # is told once, by the batch that ends first after it, not by every batch that was running then.
            for (column, _, _), n in zip(ENGINE_COUNTS, self.counts_since_told()):
                columns[column] = pa.array([n] + [0] * (len(rows) - 1), pa.int64())
        return pa.table(columns)

    def counts_since_told(self) -> list[int]:
        """How far each of the engine's ENGINE_COUNTS counters moved since the previous call (the first:
        since it was built)."""
        with self._engine_lock:
            now = [getattr(self.engine, attr) for _, _, attr in ENGINE_COUNTS]
            told, self._told = self._told, now
            return [a - b for a, b in zip(now, told)]

    def passthrough_columns(self) -> list[str]:
        c = self.config
        return list(dict.fromkeys([c.id_column, *c.keep_columns, *PROVENANCE]))

    def with_params(self, params: dict | None, caps: dict | None = None, alias: dict | None = None) -> LabelConfig:
        """The effective settings of a request: the replica's config with the request's overrides (names
        in the task's Params; None values are unset). A new object; ValueError (a `SettingError`) naming a
        bad parameter. caps: setting → the most a request may ask (the endpoint's limits); alias: setting
        → the name the request used for it (OpenAI's), for the message."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        if not params:
            return self.config
        allowed = tuple(self.task.Params.model_fields)
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"task {self.config.task!r} takes no parameter {', '.join(unknown)} "
                             f"(it takes: {', '.join(allowed)})")
        settings.check(params, caps, alias)  # the one check of a request's values, each named as it was sent
        if params.get("adapter") is not None:  # UnknownAdapter (the endpoint's 404) before anything runs
            adapters.known(self.runtime.adapters, params["adapter"], self.config)
        config = dataclasses.replace(self.config, **params)  # and how they go with the others
        self.task.check_request(self.runtime, config)
        return config

    def label_rows(self, rows: list[dict], params: list[dict | None] | None = None) -> list[dict]:
        """Rows (dicts of column values) → one result dict per row with the task's fields; a row that
        cannot be labeled gets `error` (and `error_code`, see RowError) set. params: per-row overrides
        (see `with_params`); rows with equal overrides are labeled together."""
        if params is None:
            return self._label_rows(rows, self.config)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(json.dumps(p or {}, sort_keys=True), []).append(i)
        results: list[dict] = [{} for _ in rows]
        for key, idx in groups.items():
            try:
                c = self.with_params(json.loads(key))
            except ValueError as e:
                for i in idx:
                    results[i] = {"truncated": False, "error": str(e), "error_code": "invalid_params"}
                continue
            for i, r in zip(idx, self._label_rows([rows[i] for i in idx], c)):
                results[i] = r
        return results

    def prepare(self, rows: list[dict], c: LabelConfig) -> tuple[dict[int, object], list[dict]]:
        """The task's input of every row that has one, and a result per row with the errors of the rest."""
        results = [{"truncated": False} for _ in rows]
        inputs = {}
        for i, row in enumerate(rows):
            try:
                if row.get("_input_error"):  # found by the pipeline's reader (a number, invalid UTF-8)
                    raise RowError(row["_input_error"])
                inputs[i] = self.task.row_input(row, c, self._text)
            except RowError as e:
                results[i].update(error=str(e), error_code=e.code)
        return inputs, results

    def _label_rows(self, rows: list[dict], c: LabelConfig) -> list[dict]:
        if self.num_threads:
            # OpenMP's thread count belongs to the calling thread, and Ray Data calls us on another thread
            # than the constructor's (where Ray's OMP_NUM_THREADS=1 still holds): set it where we compute.
            torch.set_num_threads(self.num_threads)
        inputs, results = self.prepare(rows, c)
        names = self.row_adapters(rows, inputs, results, c)
        if inputs:
            with torch.inference_mode():
                self.task.label(self.runtime, inputs, results, c, names)
        return results

    def row_adapters(self, rows: list[dict], inputs: dict[int, object], results: list[dict], c: LabelConfig) -> dict:
        """{row: its adapter's name} for the rows of `inputs` that use one (`adapters.row_adapter`); a row whose
        adapter is unknown leaves `inputs` with error code "unknown_adapter" (the others are labeled)."""
        names = {}
        for i in list(inputs):
            try:
                name = adapters.row_adapter(rows[i], c)
                if name is not None:
                    adapters.known(self.runtime.adapters, name, c)
                    names[i] = name
            except adapters.UnknownAdapter as e:
                results[i].update(error=str(e), error_code="unknown_adapter")
                del inputs[i]
            except ValueError as e:
                results[i].update(error=str(e), error_code="invalid_input")
                del inputs[i]
        return names

    def start_engine(self) -> None:
        """Run the generation engine's steps on a background thread (streams and the endpoint need one;
        the offline job steps it on the calling thread). Idempotent."""
        with self._engine_lock:
            if not self.engine.started:
                self.engine.start(on_start=lambda: self.num_threads and torch.set_num_threads(self.num_threads))

    def submit(self, prompt, ids: list[int], c: LabelConfig, n: int = 1, **request) -> list:
        """A prompt as n sequences of the engine, run on its background thread (see the task's `submit`)."""
        self.start_engine()
        return self.task.submit(self.runtime, prompt, ids, c, n, **request)

    def stream_generate(self, row: dict, params: dict | None = None):
        """Generate for one row, yielding (new text, None) as tokens come, then ("", the row's result) —
        the same result `label_rows` gives. Raises RowError for a bad row, ValueError for bad parameters.
        Closing the generator early aborts the row's sequence."""
        seq, texts = self.open_stream(row, params)
        try:
            yield from texts
        finally:
            if not seq.finished:
                self.engine.abort(seq)

    def open_stream(self, row: dict, params: dict | None = None):
        """(the row's engine sequence, its texts as `stream_generate` yields them): abort the sequence
        with `self.engine.abort(seq)` from any thread (e.g. when the client has gone)."""
        c = self.with_params(params)
        (prompt, ids), result = self.prompt_ids(row, c)
        (seq,) = self.submit(prompt, ids, c)

        def texts():
            for text, final, _ in self.task.texts(self.runtime, seq, c):
                yield text, final if final is None else {**result, **final}

        return seq, texts()

    def prompt_ids(self, row: dict, c: LabelConfig) -> tuple[tuple[str, list[int]], dict]:
        """A row's prompt and its token ids (within max_input_tokens) with its result so far; RowError
        when the row cannot be labeled (the endpoint refuses such a request before answering)."""
        inputs, (result,) = self.prepare([row], c)
        if 0 not in inputs:
            raise RowError(result["error"], result["error_code"])
        encoded = encode_capped(self.runtime, {0: inputs[0]}, [result], c)
        if 0 not in encoded:
            raise RowError(result["error"], result["error_code"])
        return (inputs[0], encoded[0]), result

    # ------------------------------------------------------------------ input validation

    def _text(self, row: dict, column: str) -> str:
        """The row's text in `column`, checked; RowError naming the problem."""
        value = row.get(column)
        if value is None:
            raise RowError(f"{column} is null")
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RowError(f"{column} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not isinstance(value, str):
            raise RowError(f"{column} is not a string (got {type(value).__name__})")
        if not value.strip():
            raise RowError(f"{column} is empty")
        if len(value) > self.config.max_text_chars:
            raise RowError(f"{column} has {len(value)} characters, over the limit of {self.config.max_text_chars}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RowError(f"{column} holds an invalid character ({e.reason} at {e.start})") from None
        return value
