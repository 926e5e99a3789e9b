"""What every task shares: the `Task` interface, the `Runtime` a task computes with, and the helpers that
turn checked texts into token ids, batches within a token budget, and windows.

A task gets everything it needs as arguments: the `Runtime` (model, tokenizer, device, engine) and `c`,
the effective settings (a `LabelConfig`) of a row or request. Nothing here changes per request, so one
runtime serves concurrent requests from several threads.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import pyarrow as pa
import torch
from pydantic import BaseModel, create_model

from . import settings

_REQUEST_MODELS: dict[str, tuple] = {}  # task → (its Params, its request model)
# Every task writes these after its own fields.
COMMON_FIELDS = [("input_tokens", pa.int32()), ("truncated", pa.bool_()), ("error", pa.string())]


@dataclass
class Runtime:
    """What a task computes with, loaded once per replica. input_device: where input ids go (the
    embeddings' device); length_spread: see `token_budget_batches` (inf batches by the budget alone);
    engine: the continuous-batching engine of a task that runs sequences (else None); memo: values a
    task derives from its settings once (pure values, safe to share between requests); adapters: the
    `bloom.lora.AdapterBank` of the LoRA adapters rows may name (None: none)."""

    model: Any
    tokenizer: Any
    input_device: torch.device
    pad_id: int
    length_spread: float = 1.15
    engine: Any = None
    memo: dict = field(default_factory=dict)
    adapters: Any = None


def template_fields(template: str) -> list[str]:
    """The column names a prompt template reads, e.g. 'Summarize: {text}' -> ['text']."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclass(frozen=True)
class Templated:
    """A prompt built from a template over a row's columns. When it has too many tokens and rows may be
    truncated, it gives up the end of its longest value, never the template (whose end, e.g.
    "\nTopic:", is what the model answers after)."""

    template: str
    values: dict[str, str]

    def __str__(self) -> str:
        return self.template.format(**self.values)

    def fit(self, tokenizer, limit: int) -> list[int] | None:
        """Token ids of the prompt within `limit` tokens, shortening values; None when the template
        alone is too long."""
        values = dict(self.values)
        for _ in range(2 * len(values) + 4):  # re-encoding can merge tokens at the cut: a few rounds at most
            ids = tokenizer.encode(self.template.format(**values))
            over = len(ids) - limit
            if over <= 0:
                return ids
            name = max(values, key=lambda k: len(values[k]))
            value_ids = tokenizer.encode(values[name])
            if not value_ids:
                return None
            values[name] = tokenizer.decode(value_ids[: max(0, len(value_ids) - over)])
        return None


class Task:
    """One task's knowledge; subclasses fill the class attributes and `label`.

    runs_on_engine: the task's rows are sequences of a continuous-batching engine (the replica builds
    it with `make_engine`, the endpoint streams them), else a batched forward."""

    name: ClassVar[str]
    Item: ClassVar[object] = str  # one input of an endpoint request
    fields: ClassVar[list[tuple[str, pa.DataType]]]
    runs_on_engine: ClassVar[bool] = False
    embeds: ClassVar[bool] = False  # its output is an embedding: the endpoint's /v1/embeddings serves it
    classifies: ClassVar[bool] = False  # its output is labels with every class's probability: /classify serves it
    demo_labels: ClassVar[dict | None] = None  # the labels of the demo checkpoint's head, where it has any
    head_hint: ClassVar[str] = ""  # what else to try when a checkpoint lacks the task's head

    # -- what it reads and needs --

    def input_columns(self, c) -> list[str]:
        """The columns the task reads text from."""
        return [c.text_column]

    def row_input(self, row: dict, c, text) -> object:
        """A row's input for `label`; `text(row, column)` returns a checked string or raises RowError."""
        return text(row, c.text_column)

    def item_row(self, item, c) -> dict:
        """An endpoint request's input item as a row of the input columns."""
        return {c.text_column: item}

    def model_class(self, c) -> type:
        raise NotImplementedError

    def prepare(self, rt: Runtime, c, cap: int | None = None) -> None:
        """After the model loads: build what the task needs beside it (e.g. the engine; cap: the most new
        tokens a request may ask for) or fail now on settings the model cannot serve. Default: nothing."""

    def check_request(self, rt: Runtime, c) -> None:
        """ValueError when a request's settings `c` cannot run on this runtime. Default: any can."""

    # -- what it writes and depends on --

    @property
    def Params(self) -> type[BaseModel]:
        """What a request (or a row's overrides) may set, from the declarations: None = the default."""
        return settings.params_model(self.name)

    def output_fields(self, rt: Runtime | None = None, c=None) -> list[pa.Field]:
        """The columns the task writes after the pass-through columns, with fixed Arrow types (rt: the
        loaded runtime, for a type that depends on the model, e.g. an embedding's size; c: the run's
        settings, for a column that only some settings write)."""
        return [pa.field(n, t) for n, t in self.fields + COMMON_FIELDS]

    def content_settings(self, c) -> dict:
        """The settings that decide this task's output (for the run's fingerprint): other tasks'
        parameters and the resource knobs never count; a setting declared with an `off` value stays out
        at that value."""
        out = {}
        for n in settings.content_names(self.name):
            off = settings.SETTINGS[n].off
            if off is settings.UNSET or getattr(c, n) != off:
                out[n] = getattr(c, n)
        return out

    def check_settings(self, c) -> None:
        """ValueError naming a setting that does not go with the others (each one's own bounds are
        checked by `settings.check`). Default: nothing more."""

    def request_model(self) -> type[BaseModel]:
        """The endpoint's request body: {"inputs": item or [items], "parameters": Params} (made again only
        when a declaration changes)."""
        params = self.Params
        if _REQUEST_MODELS.get(self.name, (None,))[0] is not params:
            _REQUEST_MODELS[self.name] = params, create_model(
                f"{self.name.title()}Request", __base__=settings.Strict,
                inputs=(Union[self.Item, list[self.Item]], ...), parameters=(params, params()))
        return _REQUEST_MODELS[self.name][1]

    def label(self, rt: Runtime, inputs: dict[int, object], results: list[dict], c,
              adapters: dict | None = None) -> None:
        """Fill results[i] with the task's fields for every row i of `inputs` (or set its error). adapters:
        {row: the name of its LoRA adapter in rt.adapters} (rows not in it: the base model)."""
        raise NotImplementedError


class Prompted(Task):
    """A task whose input is the text column, or a prompt template over the row's columns."""

    def input_columns(self, c):
        return template_fields(c.prompt_template) if c.prompt_template else [c.text_column]

    def row_input(self, row, c, text):
        if c.prompt_template:
            return Templated(c.prompt_template, {name: text(row, name) for name in template_fields(c.prompt_template)})
        return text(row, c.text_column)


# ----------------------------------------------------------------------------- tokens, batches, windows


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


def encode_capped(rt: Runtime, texts: dict[int, str], results: list[dict], c) -> dict[int, list[int]]:
    """Token ids per row; rows over c.max_input_tokens are errors (code "too_long") or truncated
    (flagged in `truncated`): a templated prompt shortens its values and keeps the template
    whole, a plain text keeps its start."""
    limit, encoded = c.max_input_tokens, {}
    for i, text in texts.items():
        ids = rt.tokenizer.encode(str(text))
        results[i]["input_tokens"] = len(ids)
        if len(ids) > limit:
            if c.too_long == "error":
                results[i].update(error=f"input has {len(ids)} tokens, over the limit of {limit}",
                                  error_code="too_long")
                continue
            fitted = text.fit(rt.tokenizer, limit) if isinstance(text, Templated) else None
            ids, results[i]["truncated"] = fitted or ids[:limit], True
        encoded[i] = ids
    return encoded


def batches(rt: Runtime, encoded: dict[int, list[int]], c, extra: int = 0):
    """Yield (row indices, input_ids, attention_mask) batches within c.batch_token_budget."""
    keys = list(encoded)
    lengths = [len(encoded[k]) for k in keys]
    for group in token_budget_batches(lengths, c.batch_token_budget, extra, rt.length_spread):
        idx = [keys[g] for g in group]
        yield idx, *pad_left([encoded[i] for i in idx], rt.pad_id, rt.input_device)


def windows(rt: Runtime, texts: dict[int, object], results: list[dict], c, pair: bool = False):
    """Tokenize each row into windows of c.max_input_tokens sharing c.stride tokens; returns
    {row: [(ids, offsets, sequence ids)]} with errors recorded per row."""
    out = {}
    for i, text in texts.items():
        args = (text[0], text[1]) if pair else (text,)
        try:
            enc = rt.tokenizer(*args, truncation="only_second" if pair else True, max_length=c.max_input_tokens,
                               stride=c.stride, return_overflowing_tokens=True, return_offsets_mapping=True)
        except ValueError as e:
            results[i].update(error=f"cannot fit the input into windows of {c.max_input_tokens} tokens: {e}",
                              error_code="too_long")
            continue
        out[i] = [(enc["input_ids"][w], enc["offset_mapping"][w], enc.sequence_ids(w))
                  for w in range(len(enc["input_ids"]))]
        # Every window after the first repeats `stride` tokens of the split text (and, for a pair, the
        # whole question), so the input's own length follows without tokenizing it again.
        question = sum(1 for s in out[i][0][2] if s == 0) if pair else 0
        repeated = (len(out[i]) - 1) * (c.stride + question)
        results[i]["input_tokens"] = sum(len(w[0]) for w in out[i]) - repeated
    return out


def lora_batch(rt: Runtime, adapters: dict | None, rows: list[int], per_token: bool = False):
    """The `lora=` of a forward whose batch rows are those of `rows` (row indices, repeated where a row has
    several batch rows; with per_token, one entry per packed token): each its adapter from `adapters`
    ({row: name}); None when none uses one."""
    if rt.adapters is None or not adapters:
        return None
    return rt.adapters.batch([adapters.get(i) for i in rows], per_token)


def run_windows(rt: Runtime, windows: dict[int, list], c, head, adapters: dict | None = None) -> dict[int, list]:
    """Forward every window, batched within the token budget (each with its row's adapter, see
    `lora_batch`); head(output, row in batch, length) per window."""
    flat = [(i, w) for i, ws in windows.items() for w in range(len(ws))]
    outputs = {key: None for key in flat}
    encoded = {k: windows[key[0]][key[1]][0] for k, key in enumerate(flat)}
    for idx, ids, mask in batches(rt, encoded, c):
        out = rt.model(ids, attention_mask=mask, lora=lora_batch(rt, adapters, [flat[k][0] for k in idx]))
        for j, k in enumerate(idx):
            outputs[flat[k]] = head(out, j, len(encoded[k]))
    return {i: [outputs[(i, w)] for w in range(len(ws))] for i, ws in windows.items()}
