"""BloomReplica: one loaded BLOOM model (and tokenizer) that labels batches of rows for one task.

The Ray Data pipeline uses it as a `map_batches` callable class (load in `__init__`, label in
`__call__`), and the online endpoint wraps the same class. What each task reads, computes and writes
lives in `pipelines.tasks`; the replica loads the model the task needs, checks and tokenizes text, and
batches rows within the token budget.

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
from pathlib import Path

import pyarrow as pa
import torch

import bloom
from bloom.engine import Engine, fit_cache_tokens
from bloom.loading import missing_heads, resolve_dtype
from bloom.quant import check_quantize

from .config import LabelConfig, check_cache_tokens
from .corpus import ENGINE_STEPS
from .tasks import TASKS, Templated

logger = logging.getLogger("bloomline")

PROVENANCE = ("_source", "_row")  # added by the pipeline's reader: input file and row index, for resuming


class RowError(ValueError):
    """A row that cannot be labeled. code: "invalid_input" (null, empty, not text, too many characters)
    or "too_long" (more tokens than max_input_tokens)."""

    def __init__(self, message: str, code: str = "invalid_input"):
        super().__init__(message)
        self.code = code


def output_fields(task: str) -> list[pa.Field]:
    """The columns a task writes after the pass-through columns, with fixed Arrow types."""
    return TASKS[task].output_fields()


def token_budget_batches(lengths: list[int], budget: int, extra: int = 0, spread: float = 1.15) -> list[list[int]]:
    """Group row indices into batches whose padded size, rows × (longest + extra), stays within budget.

    Rows are sorted by length (length bucketing) and a batch also closes when a row is more than
    `spread` times as long as the batch's shortest, so each batch pads its rows by at most ~15 %
    however the lengths are distributed. A row longer than the budget gets a batch of its own."""
    batches, current, longest, shortest = [], [], 0, 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        size = lengths[i] + extra
        if current and ((len(current) + 1) * max(longest, size) > budget or size > spread * shortest + 1):
            batches.append(current)
            current, longest = [], 0
        if not current:
            shortest = size
        current.append(i)
        longest = max(longest, size)
    if current:
        batches.append(current)
    return batches


def pad_left(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → left-padded input_ids and attention_mask, (B, T)."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = 1
    return ids.to(device), mask.to(device)


def check_model(config: LabelConfig, model_dir: str | Path) -> None:
    """ValueError in one line when the checkpoint lacks the head that config.task needs (checked from the
    safetensors headers, no weights read), or when quantize does not go with its dtype (dtype "auto")."""
    if config.quantize and config.dtype == "auto":  # the checkpoint's own dtype: known before loading
        check_quantize(config.quantize, resolve_dtype("auto", bloom.BloomConfig.from_pretrained(model_dir)))
    cls = TASKS[config.task].model_class(config)
    missing = missing_heads(cls, Path(model_dir))
    if missing:
        hint = (" (or give candidate_labels for zero-shot classification with a causal LM)"
                if config.task == "classify" else "")
        raise ValueError(f"{model_dir} has no {', '.join(missing)} head weights, so it cannot do task "
                         f"{config.task!r}{hint}")


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
        self.num_threads = num_threads
        if num_threads:
            torch.set_num_threads(num_threads)
        model_dir = Path(config.model)
        check_model(config, model_dir)
        self.tokenizer = bloom.BloomTokenizerFast.from_pretrained(model_dir)
        self.zero_shot = config.task == "classify" and bool(config.candidate_labels)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.task.model_class(config).from_pretrained(
            model_dir, dtype=config.dtype, device=None if config.device_map else self.device, device_map=config.device_map)
        self.input_device = self.model.get_input_embeddings().weight.device
        if config.quantize == "int8":  # before packing, which then packs only the Linears left plain
            self.model.quantize_int8()
        if {str(d) for d in self.model.hf_device_map.values()} == {"cpu"}:
            # CPU inference: oneDNN-packed weights; decode steps 1.3-2.5x faster here (bloom.packing).
            self.model.pack_for_cpu()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.length_spread = 1.15  # see token_budget_batches; inf batches by the budget alone
        self.fields = self.task.output_fields()
        self.engine, self._engine_lock = None, threading.Lock()
        if config.task == "generate":
            # One engine per replica: every row or request of this replica joins its running batch. A slot
            # holds the longest prompt plus the most new tokens a request may ask for.
            longest = config.max_input_tokens + max(config.max_new_tokens, max_new_tokens_cap or 0)
            check_cache_tokens(config.cache_tokens, longest)
            # Unset, the cache holds 16 sequences, or fewer where they would take over half the memory
            # left after loading the model (at least one).
            cache_tokens = config.cache_tokens or fit_cache_tokens(self.model, longest)
            self.engine = Engine(self.model, self.tokenizer, cache_tokens=cache_tokens, max_seq_len=longest,
                                 prefill_chunk=config.prefill_chunk)
            logger.info("generation cache: %d sequences of %d tokens (%.2f GB)", self.engine.cache.num_slots,
                        longest, self.engine.cache.nbytes / 1e9)
        self._label_ids: dict[tuple, list[list[int]]] = {}
        if self.zero_shot:
            self.candidate_label_ids(config)  # fail now on labels without tokens

    # ------------------------------------------------------------------ batch in, batch out

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Label an Arrow batch; returns pass-through columns + the task's columns, one row per input row."""
        rows = batch.to_pylist()
        steps = self.engine.steps if self.engine is not None else 0
        results = self.label_rows(rows)
        keep = [c for c in self.passthrough_columns() if c in batch.column_names]
        columns = {c: batch.column(c) for c in keep}
        for f in self.fields:
            columns[f.name] = pa.array([r.get(f.name) for r in results], type=f.type)
        if self.engine is not None and rows:
            # The engine steps this batch took, on its first row (the write step sums and drops the column):
            # the run report's mean batch occupancy is generated tokens / steps.
            columns[ENGINE_STEPS] = pa.array([self.engine.steps - steps] + [0] * (len(rows) - 1), pa.int64())
        return pa.table(columns)

    def passthrough_columns(self) -> list[str]:
        c = self.config
        return list(dict.fromkeys([c.id_column, *c.keep_columns, *PROVENANCE]))

    def with_params(self, params: dict | None) -> LabelConfig:
        """The effective settings of a request: the replica's config with the request's overrides (names
        in the task's Params; None values are unset). A new object; ValueError naming a bad parameter."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        if not params:
            return self.config
        allowed = tuple(self.task.Params.model_fields)
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"task {self.config.task!r} takes no parameter {', '.join(unknown)} "
                             f"(it takes: {', '.join(allowed)})")
        config = dataclasses.replace(self.config, **params)  # validates
        if self.config.task == "classify" and bool(config.candidate_labels) != self.zero_shot:
            raise ValueError("candidate_labels need a causal LM (zero-shot); this classifier has fixed labels"
                             if config.candidate_labels else "this zero-shot classifier needs candidate_labels")
        if self.zero_shot:
            self.candidate_label_ids(config)
        return config

    def candidate_label_ids(self, c: LabelConfig) -> list[list[int]]:
        key = (c.label_prefix, tuple(c.candidate_labels))
        if key not in self._label_ids:  # a cache of pure values: safe to share between requests
            ids = [self.tokenizer.encode(c.label_prefix + label) for label in c.candidate_labels]
            if any(not t for t in ids):
                raise ValueError("every candidate label must have at least one token")
            self._label_ids[key] = ids
        return self._label_ids[key]

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
        if inputs:
            with torch.inference_mode():
                self.task.label(self, inputs, results, c)
        return results

    def start_engine(self) -> None:
        """Run the generation engine's steps on a background thread (streams and the endpoint need one;
        the offline job steps it on the calling thread). Idempotent."""
        with self._engine_lock:
            if not self.engine.started:
                self.engine.start(on_start=lambda: self.num_threads and torch.set_num_threads(self.num_threads))

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
        (seq,) = self.task.submit(self, prompt, ids, c)

        def texts():
            for text, final, _ in self.task.texts(self, seq, c):
                yield text, final if final is None else {**result, **final}

        return seq, texts()

    def prompt_ids(self, row: dict, c: LabelConfig) -> tuple[tuple[str, list[int]], dict]:
        """A row's prompt and its token ids (within max_input_tokens) with its result so far; RowError
        when the row cannot be labeled (the endpoint refuses such a request before answering)."""
        inputs, (result,) = self.prepare([row], c)
        if 0 not in inputs:
            raise RowError(result["error"], result["error_code"])
        encoded = self.encode_capped({0: inputs[0]}, [result], c)
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

    # ------------------------------------------------------------------ tokens and batches, for the tasks

    def encode_capped(self, texts: dict[int, str], results: list[dict], c: LabelConfig) -> dict[int, list[int]]:
        """Token ids per row; rows over c.max_input_tokens are errors (code "too_long") or truncated
        (flagged in `truncated`): a templated prompt shortens its values and keeps the template
        whole, a plain text keeps its start."""
        limit, encoded = c.max_input_tokens, {}
        for i, text in texts.items():
            ids = self.tokenizer.encode(str(text))
            results[i]["input_tokens"] = len(ids)
            if len(ids) > limit:
                if c.too_long == "error":
                    results[i].update(error=f"input has {len(ids)} tokens, over the limit of {limit}",
                                      error_code="too_long")
                    continue
                fitted = text.fit(self.tokenizer, limit) if isinstance(text, Templated) else None
                ids, results[i]["truncated"] = fitted or ids[:limit], True
            encoded[i] = ids
        return encoded

    def batches(self, encoded: dict[int, list[int]], c: LabelConfig, extra: int = 0):
        """Yield (row indices, input_ids, attention_mask) batches within c.batch_token_budget."""
        keys = list(encoded)
        lengths = [len(encoded[k]) for k in keys]
        for group in token_budget_batches(lengths, c.batch_token_budget, extra, self.length_spread):
            idx = [keys[g] for g in group]
            yield idx, *pad_left([encoded[i] for i in idx], self.pad_id, self.input_device)

    def windows(self, texts: dict[int, object], results: list[dict], c: LabelConfig, pair: bool = False):
        """Tokenize each row into windows of c.max_input_tokens sharing c.stride tokens; returns
        {row: [(ids, offsets, sequence ids)]} with errors recorded per row."""
        windows = {}
        for i, text in texts.items():
            args = (text[0], text[1]) if pair else (text,)
            try:
                enc = self.tokenizer(*args, truncation="only_second" if pair else True, max_length=c.max_input_tokens,
                                     stride=c.stride, return_overflowing_tokens=True, return_offsets_mapping=True)
            except ValueError as e:
                results[i].update(error=f"cannot fit the input into windows of {c.max_input_tokens} tokens: {e}",
                                  error_code="too_long")
                continue
            windows[i] = [(enc["input_ids"][w], enc["offset_mapping"][w], enc.sequence_ids(w))
                          for w in range(len(enc["input_ids"]))]
            # Every window after the first repeats `stride` tokens of the split text (and, for a pair, the
            # whole question), so the input's own length follows without tokenizing it again.
            question = sum(1 for s in windows[i][0][2] if s == 0) if pair else 0
            repeated = (len(windows[i]) - 1) * (c.stride + question)
            results[i]["input_tokens"] = sum(len(w[0]) for w in windows[i]) - repeated
        return windows

    def run_windows(self, windows: dict[int, list], c: LabelConfig, head) -> dict[int, list]:
        """Forward every window, batched within the token budget; head(output, row in batch, length) per window."""
        flat = [(i, w) for i, ws in windows.items() for w in range(len(ws))]
        outputs = {key: None for key in flat}
        encoded = {k: windows[key[0]][key[1]][0] for k, key in enumerate(flat)}
        for idx, ids, mask in self.batches(encoded, c):
            out = self.model(ids, attention_mask=mask)
            for j, k in enumerate(idx):
                outputs[flat[k]] = head(out, j, len(encoded[k]))
        return {i: [outputs[(i, w)] for w in range(len(ws))] for i, ws in windows.items()}
