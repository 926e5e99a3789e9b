"""Every setting of a labeling run or a request, declared once.

A `Setting` gives a name, type, default, bounds, one line of help, the tasks that read it (None: every
task) and its role:

- "output": it decides what is written (it enters the run's fingerprint);
- "request": it decides the output too, and a request or a row may set it (the endpoint's parameters);
- "resource": how the work runs (actors, memory, paths); a resumed run may change it;
- "identity": the task and the model, which the fingerprint holds in their own ways (the model by the
  hash of its weights).

Everything else is derived from `SETTINGS` when it is used: `LabelConfig`'s fields and defaults (and
so its YAML loading), the command line's flags and --help (`add_flags`), each task's request parameters
(`params_model`), the OpenAI names of the endpoint (`openai` aliases), the engine's per-sequence
`GenerationParams` (`engine` names) and the fingerprint (`role`, `off`). Bounds are checked in one
function, `check`, wherever a value comes from (a config file, a flag, a request).
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .spans import AGGREGATION_STRATEGIES

UNSET = object()


@dataclass(frozen=True)
class Setting:
    """One setting. type: its Python type (inner constraints, e.g. a non-empty string, in Annotated);
    ge/gt/le: numeric bounds; choices: the allowed values; flag: the command-line flag ("" for none;
    default --name-with-dashes); openai: its name in OpenAI's requests; engine: its name in
    `bloom.engine.GenerationParams`; off: a value at which it stays out of the fingerprint (a setting
    added after runs were written, so that those runs still resume); file: the flag names a file whose
    text (JSON, for a mapping) is the value."""

    name: str
    type: Any
    default: Any
    help: str
    role: str = "output"
    tasks: tuple[str, ...] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    flag: str | None = None
    openai: str | None = None
    engine: str | None = None
    off: Any = UNSET
    file: bool = False

    def reads(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks

    @property
    def bounds(self) -> dict:
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None}


GEN, CLS, NER, QA = ("generate",), ("classify",), ("ner",), ("qa",)
EMB = ("embed",)
LogitBias = dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-100, le=100)]]

_DECLARED = [
    # --- what to label ---
    # The task is checked against `pipelines.tasks.TASKS`; the run report records it.
    Setting("task", str, "generate", "what to compute", role="identity", flag=""),
    Setting("model", str, "", "checkpoint directory or hub id; default: a tiny demo checkpoint for the task",
            role="identity"),
    Setting("input", list[str], [], "Parquet files, directories or globs (local, s3://, gs://); default: the "
            "demo corpus", role="resource"),
    Setting("output", str, "", "output directory for Parquet parts and _report.json; default: demo/out-<task> "
            "with the demo checkpoint, demo/out-<task>-<model directory name> with another", role="resource"),
    Setting("text_column", str, "text", "column with the text to label", tasks=GEN + CLS + NER + EMB),
    Setting("id_column", str, "id", "column copied to the output to identify rows"),
    Setting("keep_columns", list[str], [], "another input column to copy to the output (repeatable)",
            flag="--keep-column"),
    Setting("prompt_template", Optional[str], None, "prompt over columns, e.g. 'Summarize: {text}'",
            tasks=GEN + CLS),
    Setting("question_column", str, "question", "the question column", tasks=QA),
    Setting("context_column", str, "context", "the context column", tasks=QA),
    # --- generate ---
    Setting("max_new_tokens", int, 32, "tokens to generate per row", "request", GEN, ge=0, openai="max_tokens",
            engine="max_new_tokens"),
    Setting("do_sample", bool, False, "sample instead of greedy", "request", GEN, flag="--sample",
            engine="do_sample"),
    Setting("temperature", float, 1.0, "sampling temperature (with --sample)", "request", GEN, gt=0,
            engine="temperature"),
    Setting("top_k", int, 0, "sample among the k likeliest tokens (0: off; with --sample)", "request", GEN, ge=0,
            engine="top_k"),
    Setting("top_p", float, 1.0, "nucleus sampling mass (with --sample)", "request", GEN, gt=0, le=1,
            openai="top_p", engine="top_p"),
    Setting("repetition_penalty", float, 1.0, "> 1 makes tokens already in the text less likely (1: off)",
            "request", GEN, gt=0, engine="repetition_penalty"),
    Setting("seed", Optional[int], 0, "sampling seed (each row's seed derives from it and the prompt)", "request",
            GEN, openai="seed", engine="seed"),
    Setting("stop", list[Annotated[str, Field(min_length=1)]], [], "a stop string (repeatable); the text ends "
            "before it", "request", GEN, engine="stop_strings"),
    Setting("frequency_penalty", float, 0.0, "lowers a token's logit by this much per time it was generated "
            "(0: off)", "request", GEN, ge=-2, le=2, openai="frequency_penalty", engine="frequency_penalty",
            off=0.0),
    Setting("presence_penalty", float, 0.0, "lowers a token's logit by this much once it was generated (0: off)",
            "request", GEN, ge=-2, le=2, openai="presence_penalty", engine="presence_penalty", off=0.0),
    Setting("min_tokens", int, 0, "no eos or stop string ends a row before this many new tokens", "request", GEN,
            ge=0, openai="min_tokens", engine="min_tokens", off=0),
    Setting("logit_bias", LogitBias, {}, "a JSON object of token id to a bias in [-100, 100] added to its logit, "
            "e.g. '{\"50256\": -100}'", "request", GEN, engine="logit_bias", off={}),
    # --- generate: constrained output (at most one; checked at start, see docs/labeling.md) ---
    Setting("json_schema", Optional[dict[str, Any]], None, "the output is JSON valid against this JSON Schema "
            "(the flag names a file holding it)", "request", GEN, off=None, file=True),
    Setting("json_object", bool, False, "the output is a JSON object", "request", GEN, off=False),
    Setting("regex", Optional[str], None, "the whole output matches this regular expression (Rust syntax)",
            "request", GEN, off=None),
    Setting("choice", list[Annotated[str, Field(min_length=1)]], [], "the output is one of these strings "
            "(repeatable)", "request", GEN, off=[]),
    Setting("grammar", Optional[str], None, "the output follows this Lark grammar, start rule `start` (the flag "
            "names a file holding it)", "request", GEN, off=None, file=True),
    Setting("constraint_column", Optional[str], None, "a column of per-row constraints as JSON text, e.g. "
            "{\"json_schema\": {...}}, {\"regex\": \"...\"}, {\"choice\": [...]} (null: free text)", tasks=GEN,
            off=None),
    # --- classify ---
    Setting("candidate_labels", list[str], [], "a candidate label for zero-shot with a causal LM (repeatable)",
            "request", CLS, flag="--candidate-label"),
    Setting("label_prefix", str, " ", "zero-shot: text put between the prompt and each candidate label",
            tasks=CLS),
    Setting("threshold", float, 0.5, "multi-label probability threshold", "request", CLS, ge=0, le=1),
    # --- ner ---
    Setting("aggregation_strategy", str, "simple", "how token labels join into entities", "request", NER,
            choices=AGGREGATION_STRATEGIES),
    Setting("ignore_labels", list[str], ["O"], "an entity label left out of the output (repeatable)", "request",
            NER, flag="--ignore-label"),
    Setting("stride", int, 32, "tokens shared by consecutive windows of a long text", tasks=NER + QA, ge=0),
    # --- qa ---
    Setting("max_answer_len", int, 30, "longest answer in tokens", "request", QA, ge=1),
    # --- embed ---
    Setting("pooling", str, "weightedmean", "how the last hidden states become one vector: weightedmean (SGPT's: "
            "token t of n weighs t), mean, or last (the last token's)", "request", EMB,
            choices=("weightedmean", "mean", "last")),
    Setting("normalize", bool, False, "divide each embedding by its L2 norm", "request", EMB),
    # --- limits and errors ---
    Setting("max_input_tokens", int, 1024, "tokens per row (per window for ner/qa)", ge=1),
    Setting("too_long", str, "error", "rows over --max-input-tokens: error, or truncate (a template is kept "
            "whole, the text gives up its end; the row is flagged)", choices=("error", "truncate")),
    Setting("max_text_chars", int, 200_000, "rows with longer texts are errors, before tokenizing", ge=1),
    Setting("max_errored_rows", Optional[int], None, "fail the job when more rows than this errored",
            role="resource", ge=0),
    Setting("max_errored_fraction", Optional[float], 0.1, "fail the job past this fraction of errored rows",
            role="resource", ge=0, le=1),
    Setting("overwrite", bool, False, "replace an output written with other settings", role="resource"),
    Setting("output_format", str, "parquet", "parquet: the parts in the output directory, readable as they are "
            "written; delta: the parts under <output>/_parts/, published as one Delta Lake commit to the table at "
            "the output when every row is labeled", role="resource", choices=("parquet", "delta")),
    # --- resources ---
    Setting("dtype", str, "fast", "fast (bfloat16 where the hardware computes it fast, else float32), float32, "
            "bfloat16, float16, or auto (the checkpoint's)", role="resource"),
    Setting("quantize", Optional[str], None, "int8: weight-only int8 weights, half the memory of bfloat16 (needs "
            "--dtype bfloat16; faster for batch-1 decoding on CPU, slower for prefill)", role="resource"),
    Setting("device_map", Optional[str], None, "spread each replica over its GPUs: auto, balanced, sequential",
            role="resource"),
    Setting("num_actors", Optional[int], None, "most replicas in the pool (default: what the cluster fits)",
            role="resource", ge=1),
    Setting("min_actors", int, 1, "fewest replicas in the pool", role="resource", ge=1),
    Setting("num_gpus_per_actor", Optional[float], None, "GPUs per replica (default: 1 if the cluster has GPUs, "
            "else 0)", role="resource", ge=0, flag="--gpus-per-actor"),
    Setting("num_cpus_per_actor", Optional[float], None, "CPUs per replica (default: from the cluster, one CPU "
            "left free)", role="resource", ge=0, flag="--cpus-per-actor"),
    Setting("batch_token_budget", int, 8192, "padded tokens per forward pass", role="resource", ge=1),
    Setting("cache_tokens", Optional[int], None, "the engine's KV cache in tokens, in slots of max input + max "
            "new tokens (default: 64 slots, fewer if over half the free memory)", role="resource", tasks=GEN),
    Setting("prefill_chunk", int, 1024, "prompt tokens the engine prefills per step", role="resource", tasks=GEN,
            ge=1),
    Setting("prefix_cache", bool, True, "reuse the keys and values of prompt beginnings that rows share (generate: "
            "the engine's prefix cache, across rows and requests; zero-shot classify: a batch's common prefix, "
            "computed once); the output is the same either way", role="resource", tasks=GEN + CLS,
            flag="--no-prefix-cache"),
    Setting("rows_per_batch", int, 256, "rows handed to a replica at a time", role="resource", ge=1),
    Setting("batches_in_flight", int, 4, "batches an engine replica takes at once (the next batch's rows join "
            "its running engine while the current batch finishes)", role="resource", tasks=GEN, ge=1),
    # --- LoRA adapters (pipelines.adapters): the declared adapters' bytes enter the fingerprint ---
    Setting("adapters", list[str], [], "a PEFT LoRA adapter the run may use, NAME=PATH (a local or s3:// "
            "directory; repeatable)", role="resource", flag="--adapter"),
    Setting("adapter", Optional[str], None, "the declared adapter every row uses (a request's adapter); default: "
            "the base model", "request", flag="--use-adapter", engine="adapter", off=None),
    Setting("adapter_column", Optional[str], None, "column naming each row's adapter (empty or null: "
            "--use-adapter, else the base model)", off=None),
    Setting("max_adapters", int, 8, "adapters a replica keeps loaded (least recently used dropped)",
            role="resource", ge=1),
    Setting("adapter_cache", str, "", "local directory for adapters fetched from an object store (default: "
            "$XDG_CACHE_HOME/bloomline/adapters)", role="resource"),
    Setting("adapter_dir", str, "", "the endpoint's (a labeling run refuses it): a directory (local or s3://) "
            "whose subdirectory NAME is adapter NAME, loaded on first use when not declared", role="resource"),
]
SETTINGS: dict[str, Setting] = {s.name: s for s in _DECLARED}


class SettingError(ValueError):
    """A setting out of its bounds; `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def default(name: str):
    """The declared default of a setting (a fresh copy of a list or mapping)."""
    return copy.deepcopy(SETTINGS[name].default)


def resource_names() -> frozenset[str]:
    return frozenset(n for n, s in SETTINGS.items() if s.role == "resource")


def content_names(task: str) -> tuple[str, ...]:
    """The settings that decide `task`'s output (for the fingerprint): those it reads, less the resources."""
    return tuple(n for n, s in SETTINGS.items() if s.role in ("output", "request") and s.reads(task))


def request_names(task: str) -> tuple[str, ...]:
    """The settings a request or a row may set for `task`, in declaration order."""
    return tuple(n for n, s in SETTINGS.items() if s.role == "request" and s.reads(task))


def _annotation(s: Setting, optional: bool, bounded: bool = True):
    kind = Literal[s.choices] if s.choices else s.type
    if bounded and s.bounds:
        kind = Annotated[kind, Field(**s.bounds)]
    return Optional[kind] if optional else kind


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_MODELS: dict[tuple, type[BaseModel]] = {}


def _model(key: str, names: tuple[str, ...], optional: bool, base=Strict) -> type[BaseModel]:
    """A pydantic model of the named settings (built again whenever a declaration changes)."""
    cache_key = (key, base, optional, *(id(SETTINGS[n]) for n in names))
    if cache_key not in _MODELS:
        fields = {n: (_annotation(SETTINGS[n], optional), None if optional else ...) for n in names}
        _MODELS[cache_key] = create_model(key, __base__=base, **fields)
    return _MODELS[cache_key]


def params_model(task: str) -> type[BaseModel]:
    """What a request (or a row's overrides) may set for `task`: every field optional, None = the default."""
    return _model(f"{task.title()}Params", request_names(task), optional=True)


def openai_model(base: type[BaseModel]) -> type[BaseModel]:
    """`base` with the settings OpenAI names (e.g. max_tokens), typed but unbounded, None = the default:
    their bounds are checked once, by `check`, with the rest of a request's settings."""
    names = tuple(n for n, s in SETTINGS.items() if s.openai)
    fields = {SETTINGS[n].openai: (_annotation(SETTINGS[n], True, bounded=False), None) for n in names}
    return create_model(base.__name__, __base__=base, **fields)


def openai_names() -> dict[str, str]:
    """{OpenAI's name: our setting's name}."""
    return {s.openai: n for n, s in SETTINGS.items() if s.openai}


def check(values: dict, caps: dict | None = None, alias: dict | None = None) -> None:
    """SettingError naming the first of `values` (setting name → value) outside its declared type, bounds or
    choices, or over its cap (caps: name → the most a request may ask, e.g. the endpoint's
    max_new_tokens cap). alias: name → the name the caller used (e.g. max_tokens), for the message."""
    alias = alias or {}
    for name, cap in (caps or {}).items():
        if values.get(name) is not None and values[name] > cap:
            raise SettingError(f"{alias.get(name, name)} {values[name]} is over the limit of {cap}", name)
    names = tuple(n for n in values if n in SETTINGS and (SETTINGS[n].bounds or SETTINGS[n].choices
                                                          or SETTINGS[n].role == "request"))
    try:
        _model("Settings", names, optional=False).model_validate({n: values[n] for n in names})
    except ValidationError as e:
        err = e.errors()[0]
        name, msg = ".".join(map(str, err["loc"])), err["msg"]
        if err["type"] == "literal_error":
            msg = "Input should be one of " + err["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        said = f"must be {msg[len('Input should be '):]}" if msg.startswith("Input should be ") else f": {msg}"
        top = str(err["loc"][0])
        raise SettingError(f"{alias.get(top, top)}{name[len(top):]} {said} (got {err.get('input')!r})"
                           .replace(" :", ":"), top) from None


# ----------------------------------------------------------------------------- the command line


def _json_object(text: str) -> dict:
    """A flag's JSON object (e.g. --logit-bias '{"42": 5}'); argparse reports anything else."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _file(mapping: bool):
    """A flag's file → its text, or the JSON object it holds (mapping); argparse reports a problem."""

    def read(path: str):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise argparse.ArgumentTypeError(f"cannot read {path}: {e}") from None
        if not mapping:
            return text
        try:
            return _json_object(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{path}: {e}") from None

    return read


def _scalar(kind):
    """int for Optional[int], and so on."""
    args = [a for a in getattr(kind, "__args__", ()) if a is not type(None)]
    return args[0] if args and getattr(kind, "__origin__", None) is not list else kind


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (dest: the setting's name, default None: not given), with its help: the tasks
    that read it, its line of help, and its default."""
    for name, s in SETTINGS.items():
        if s.flag == "":
            continue
        flag = s.flag or "--" + name.replace("_", "-")
        shown = "" if s.default in (None, "", [], {}) or "default" in s.help else f" (default: {s.default!r})"
        text = f"{'/'.join(s.tasks) + ': ' if s.tasks else ''}{s.help}{shown}".replace("%", "%%")
        origin = getattr(s.type, "__origin__", None)
        if s.choices:  # help lists them; a wrong one is refused by `check`, in the job's one error shape
            text = f"{text} (one of: {', '.join(s.choices)})"
        if origin is list:
            parser.add_argument(flag, dest=name, action="append", default=None, help=text)
        elif s.file:
            parser.add_argument(flag, dest=name, type=_file(getattr(_scalar(s.type), "__origin__", None) is dict),
                                metavar="FILE", default=None, help=text)
        elif origin is dict:
            parser.add_argument(flag, dest=name, type=_json_object, default=None, help=text)
        elif s.type is bool:  # the flag says the other value than the default (--sample, --no-prefix-cache)
            parser.add_argument(flag, dest=name, action="store_const", const=not s.default, help=text)
        else:
            parser.add_argument(flag, dest=name, type=_scalar(s.type), default=None, help=text)
