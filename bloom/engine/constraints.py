"""Constrained generation: a sequence's output held to a choice, a regex, a JSON Schema or a Lark grammar.

A `Constraint` is the spec (in `GenerationParams.constraint`). The engine's `Constrainer` compiles each
distinct spec once (llguidance, against the engine's tokenizer at the model's vocabulary size), gives
every constrained sequence its own matcher (a copy of the compiled one), and computes the tokens each
may take next as llguidance's packed bitmask (32 tokens an int32 word), which the sampler applies to
the logits (-inf outside) before the choice.

Why llguidance: measured at BLOOM's 250,880 tokens (docs/engine.md) it computes a batch of 16 masks in
about 1-2 ms for a JSON Schema and a regex alike, compiles a schema in about a millisecond (the offline
job may carry one schema per row), takes Lark grammars, has no dependencies and releases the GIL, so
the next step's masks can be computed on a worker thread while the model runs (`prefetch`), which the
Constrainer does when torch leaves a CPU free; otherwise it computes them after the forward on every
CPU (`Constrainer.overlap`).
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .sequence import Sequence

KINDS = ("choice", "regex", "json_schema", "json_object", "grammar")
# JSON as json.dumps writes it, with no free whitespace: a model may otherwise emit blanks until
# max_new_tokens (free whitespace is a classic way for constrained JSON never to close).
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """What a sequence's output must be, as one canonical text (so equal specs share one compiled form).

    kind "choice": spec is a JSON list of the allowed strings; "regex": the pattern (Rust regex syntax,
    matched against the whole output); "json_schema": the schema as JSON text; "json_object": any JSON
    object (spec ""); both JSON kinds are written as json.dumps does (", " and ": ", no other blanks); "grammar": a Lark grammar (llguidance's dialect, `start` is the top rule).
    Build one with the class methods, or `Constraint.of({"json_schema": {...}})`."""

    kind: str
    spec: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ValueError(f"a {self.kind} constraint's spec must be a string, got {type(self.spec).__name__}")

    @classmethod
    def choice(cls, options) -> "Constraint":
        """One of `options` (non-empty strings), exactly."""
        options = list(options) if isinstance(options, (list, tuple)) else options
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
            raise ValueError(f"a choice constraint needs a non-empty list of non-empty strings, got {options!r}")
        return cls("choice", json.dumps(options, ensure_ascii=False))

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"a regex constraint needs a non-empty pattern string, got {pattern!r}")
        return cls("regex", pattern)

    @classmethod
    def json_schema(cls, schema: dict | str) -> "Constraint":
        """A JSON Schema (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"a json_schema constraint's schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"a json_schema constraint needs a JSON object (dict), got {type(schema).__name__}")
        # Keys keep their order: the output writes the properties in the schema's order.
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))

    @classmethod
    def json_object(cls) -> "Constraint":
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls("json_object", "")

    @classmethod
    def grammar(cls, lark: str) -> "Constraint":
        if not isinstance(lark, str) or not lark.strip():
            raise ValueError(f"a grammar constraint needs a Lark grammar string, got {lark!r}")
        return cls("grammar", lark)

    @classmethod
    def of(cls, value: "Constraint | dict | None") -> "Constraint | None":
        """A Constraint from itself, None, or a one-key mapping {kind: value}: {"choice": [...]},
        {"regex": "..."}, {"json_schema": {...} or "..."} (also spelled "json", as vLLM does),
        {"json_object": True}, {"grammar": "..."}. ValueError naming what is wrong."""
        if value is None or isinstance(value, Constraint):
            return value
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError(f"a constraint is one of {', '.join(KINDS)} as a one-key mapping, got {value!r}")
        (kind, arg), = value.items()
        kind = "json_schema" if kind == "json" else kind
        if kind == "json_object":
            return cls.json_object()
        if kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return getattr(cls, kind)(arg)

    def grammar_text(self) -> str:
        """The grammar llguidance compiles for this constraint."""
        from llguidance import LLMatcher

        if self.kind == "choice":  # Lark string literals take JSON's escapes
            return "start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in json.loads(self.spec))
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.spec, overrides=JSON_FORMAT)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_FORMAT)
        return LLMatcher.grammar_from_lark(self.spec)

    def check(self) -> "Constraint":
        """This constraint, if llguidance can compile it (checked without a tokenizer, about a millisecond,
        each distinct spec once); else ValueError naming it and what is wrong."""
        problem = _problem(self)
        if problem:
            raise ValueError(f"cannot compile the {self.describe()}: {problem}")
        return self

    def describe(self) -> str:
        """The spec in a line, for error messages."""
        text = self.spec if len(self.spec) <= 120 else self.spec[:117] + "..."
        return f"{self.kind} constraint {text!r}" if text else f"{self.kind} constraint"


@functools.lru_cache(maxsize=256)
def _problem(constraint: Constraint) -> str:
    """What stops `constraint` compiling ("" when nothing does)."""
    from llguidance import LLMatcher

    try:
        problem = LLMatcher.validate_grammar(constraint.grammar_text())
    except (ValueError, TypeError) as exc:
        problem = str(exc)
    return " ".join(problem.split())  # one line: an HTTP answer or a row's error holds it


class Constrainer:
    """One engine's constrained decoding: the tokenizer as llguidance sees it (built once, ~seconds at
    250k tokens), compiled specs (each distinct spec once, the most recent `cache_size` kept), and the
    worker that computes the next masks while the model runs (with `overlap`). `matcher` is safe from any thread; the
    rest runs on the engine's thread."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | list[int], *, threads: int | None = None,
                 overlap: bool | None = None, check_greedy: bool = True, cache_size: int = 256):
        """tokenizer: a BloomTokenizerFast (or a tokenizers.Tokenizer); vocab_size: the model's (ids at or
        past the tokenizer's size are never allowed); eos_token_id: allowed once the structure is complete;
        overlap: compute the next masks on a worker thread while the model runs (default: only when torch
        leaves a CPU free, `torch.get_num_threads() < os.cpu_count()`), else on the engine's thread after
        the forward; check_greedy: a greedy row's mask is computed only when its matcher refuses its
        unmasked argmax (`checks`); threads: llguidance's mask threads (default: with overlap the CPUs torch leaves free,
        1 to 8; without, none: the engine's thread computes them, one after another)."""
        import llguidance

        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos_token_id)
        cpus, torch_threads = os.cpu_count() or 1, torch.get_num_threads()
        # On a machine whose CPUs all run the forward (2 vCPUs: torch's 2 threads), a mask thread beside
        # them slows every parallel region of the forward more than the masks cost when computed alone
        # on all CPUs after it (docs/engine.md, "What a constraint costs").
        self.overlap = torch_threads < cpus if overlap is None else overlap
        self.check_greedy = check_greedy
        # Without overlap the masks are computed one after another on the engine's thread by default: a
        # pool's threads spin a while after each batch of masks, into the next forward (docs/engine.md).
        threads = threads or (min(8, max(1, cpus - torch_threads)) if self.overlap else 1)
        self._executor = llguidance.LLExecutor(num_threads=threads) if self.overlap or threads > 1 else None
        self._compiled: OrderedDict[Constraint, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # The worker only waits on llguidance (GIL released); the masks stay packed until the sampler.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bloom-masks")
        self._pending: tuple[Future, dict[int, int]] | None = None  # (masks, sequence id → row)

    def matcher(self, constraint: Constraint):
        """A fresh matcher for `constraint` (its own state; the compiled grammar is shared and kept).
        Raises ValueError naming the constraint if it cannot be compiled."""
        from llguidance import LLMatcher

        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is not None:
                self._compiled.move_to_end(constraint)
        if compiled is None:
            try:
                grammar = constraint.grammar_text()
            except (ValueError, TypeError) as exc:
                raise ValueError(f"cannot compile the {constraint.describe()}: {exc}") from None
            compiled = LLMatcher(self.tokenizer, grammar, log_level=0)  # compiles, GIL released
            if compiled.is_error():
                raise ValueError(f"cannot compile the {constraint.describe()}: {compiled.get_error().strip()}")
            with self._lock:
                self._compiled[constraint] = compiled
                while len(self._compiled) > self._cache_size:
                    self._compiled.popitem(last=False)
        return compiled.deep_copy()

    # -- masks (engine thread)

    def checks(self, seq: "Sequence") -> bool:
        """Whether `seq`'s token is checked rather than masked: a constrained greedy row with no repetition
        penalty. Its choice is its logits' argmax when its matcher takes that token (the first maximum over
        all tokens is then the first maximum over the allowed ones, so the choice is the masked one); only
        otherwise is its mask computed (`sampler.sample`). Inside a JSON string most tokens are allowed and
        the argmax usually is, and those are the steps whose masks cost most (docs/engine.md)."""
        return (self.check_greedy and seq.sampling.matcher is not None and not seq.params.do_sample
                and seq.sampling.seen is None)

    def masked(self, seq: "Sequence") -> bool:
        """Whether `seq`'s mask is computed before sampling (constrained, and not `checks`)."""
        return seq.sampling.matcher is not None and not self.checks(seq)

    def prefetch(self, seqs: list["Sequence"]) -> None:
        """Start computing the next masks of the constrained, unfinished `seqs` on the worker thread, so
        they are ready when `allowed` asks for them after the next forward (with `overlap`; without, they
        are computed when `allowed` asks)."""
        self._join()
        live = [s for s in seqs if self.masked(s) and not s.finished]
        if live and self.overlap:
            self._pending = (self._worker.submit(self.compute, [s.sampling.matcher for s in live]),
                             {s.id: i for i, s in enumerate(live)})

    def allowed(self, rows: list["Sequence"]) -> tuple[list[int], torch.Tensor] | None:
        """(the indices of the constrained rows, their packed masks of the tokens they may take next: (K,
        ceil(V / 32)) int32, see `compute`), or None when no row is constrained. Uses the prefetched
        masks, computing here the ones not prefetched (a sequence that has just finished its prompt). Rows
        that `checks` are left to the sampler."""
        index = [i for i, s in enumerate(rows) if self.masked(s)]
        pending, ready = self._join()
        if not index:
            return None
        missing = [i for i in index if rows[i].id not in ready]
        if missing:
            extra = self.compute([rows[i].sampling.matcher for i in missing])
            fresh = {rows[i].id: len(ready) + k for k, i in enumerate(missing)}
            pending = extra if pending is None else torch.cat([pending, extra])
            ready = {**ready, **fresh}
        order = [ready[rows[i].id] for i in index]
        masks = pending if order == list(range(len(pending))) else pending[order]
        return index, masks

    def _join(self) -> tuple[torch.Tensor | None, dict[int, int]]:
        if self._pending is None:
            return None, {}
        future, ready = self._pending
        self._pending = None
        return future.result(), ready

    def compute(self, matchers: list) -> torch.Tensor:
        """Each matcher's next allowed tokens as llguidance packs them: (K, ceil(V / 32)) int32, bit j of
        word w set when token 32w + j is allowed; filled on llguidance's own threads, GIL released. Kept
        packed: the sampler applies the bits to the logits without a (K, V) bool mask
        (`sampler.constrained`)."""
        K, words = len(matchers), (self.vocab_size + 31) // 32
        bitmask = torch.empty(K, words, dtype=torch.int32)
        if self._executor is None:  # one after another on this thread: no pool spinning beside the forward
            for i, m in enumerate(matchers):
                bitmask[i] = torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.int32)[:words]
            return bitmask
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                               words * 4, K)
        return bitmask

    def close(self) -> None:
        self._join()
        self._worker.shutdown(wait=True)


def consume(rows: list["Sequence"], tokens: list[int]) -> None:
    """Advance each constrained row's matcher by its chosen token (always allowed: it was masked)."""
    for s, token in zip(rows, tokens):
        m = s.sampling.matcher
        if m is not None and not m.consume_token(token):
            raise RuntimeError(f"sequence {s.id}: token {token} was sampled outside its constraint: {m.get_error()}")


def end_reason(seq: "Sequence", reason: str | None) -> str | None:
    """A constrained sequence's finish reason after its latest token: "stop" once its structure is
    complete and nothing may follow (eos stays "eos"); when it ends any way before its structure is
    complete (max_new_tokens, a stop string), `seq.incomplete` is set."""
    m = seq.sampling.matcher
    if m is None:
        return reason
    if m.is_stopped() and reason != "eos":
        reason = "stop"
    if reason is not None:
        seq.incomplete = not (m.is_stopped() or m.is_accepting())
    return reason
