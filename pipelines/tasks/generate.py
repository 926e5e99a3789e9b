"""The generate task: every row (or request) is a sequence of a continuous-batching engine
(`bloom.engine`), its text streamed as its tokens come, with OpenAI's logprobs."""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import zlib

import pyarrow as pa

import bloom
from bloom.engine import Constraint, Engine, GenerationParams, fit_cache_tokens

from dataclasses import dataclass

from . import settings
from .base import Prompted, encode_capped

logger = logging.getLogger("bloomline")


def check_cache_tokens(cache_tokens: int | None, slot: int) -> None:
    """ValueError when a given generation cache cannot hold one sequence of `slot` tokens (the longest
    prompt, max_input_tokens, plus the most new tokens); None (unset) is sized by the replica from memory."""
    if cache_tokens is not None and cache_tokens < slot:
        raise ValueError(f"cache_tokens {cache_tokens} cannot hold one sequence: a cache slot takes max_input_tokens "
                         f"+ max_new_tokens = {slot} tokens; give at least {slot} (several slots run rows together)")


def _byte_level_alphabet() -> dict[str, int]:
    """The byte each printable character of BLOOM's ByteLevel token strings stands for (GPT-2's table:
    printable bytes stand for themselves, the others for chr(256 + k) in order)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 256)}
    others = (b for b in range(256) if b not in printable)
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


BYTE_OF = _byte_level_alphabet()


def token_text(tokenizer, token: int) -> str:
    """One token's own text; for a piece of a character (its bytes alone are not UTF-8), its bytes as
    OpenAI writes them, "bytes:\\xe4\\xbd", so that different pieces never read alike."""
    text = tokenizer.decode([token])
    form = tokenizer.convert_ids_to_tokens(token) or ""
    if "\ufffd" not in text or not form or any(ch not in BYTE_OF for ch in form):
        return text
    return "bytes:" + "".join(f"\\x{BYTE_OF[ch]:02x}" for ch in form)


class TokenTexts:
    """The text of a growing list of token ids, and each token's share of it (`pieces`) and where that
    begins (`offsets`, from `start`). The pieces concatenate to the decoded text: a character split
    over several byte-level tokens belongs to the token that completes it, the others get "" (as a
    skipped special token does). Each token decodes only the few ids whose text is not out yet, where
    decoding the whole list again would grow with its length."""

    def __init__(self, tokenizer, ids=(), skip_special_tokens: bool = True, start: int = 0):
        self.tokenizer, self.skip, self.start = tokenizer, skip_special_tokens, start
        self.ids: list[int] = []
        self.pieces: list[str] = []
        self.offsets: list[int] = []
        self.text = ""
        self._open = 0  # the first token whose text is not out yet
        for token in ids:
            self.add(token)
        if ids:
            self.close()

    def add(self, token: int) -> None:
        self.ids.append(token)
        self.offsets.append(self.start + len(self.text))
        piece = self.tokenizer.decode(self.ids[self._open :], skip_special_tokens=self.skip)
        if piece.endswith("\ufffd"):  # an incomplete character: its next bytes come with a later token
            self.pieces.append("")
            return
        self.pieces.append(piece)
        self.text += piece
        self._open = len(self.ids)

    def close(self) -> None:
        """The list is complete: a character still incomplete goes out as it decodes."""
        if self._open < len(self.ids):
            self.pieces[-1] = self.tokenizer.decode(self.ids[self._open :], skip_special_tokens=self.skip)
            self.text += self.pieces[-1]
            self._open = len(self.ids)

    def begun(self, end: int) -> int:
        """How many tokens begin before character `end` of the text."""
        return bisect.bisect_left(self.offsets, self.start + end)


# The settings that constrain every row's output, each a kind of `bloom.engine.Constraint` (at most one is set).
CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")
JSON_KINDS = ("json_schema", "json_object")


def constraint_of(c) -> Constraint | None:
    """The constraint the settings `c` put on every row's output (None: free text, or per row from
    c.constraint_column). Not compiled here (`Generate.check_settings` checks it once)."""
    for name in CONSTRAINTS:
        value = getattr(c, name)
        if value not in (None, False, []):
            return Constraint.of({name: value})
    return None


@dataclass(frozen=True)
class RowConstrained:
    """A row's prompt with the constraint of its c.constraint_column cell, or the problem with that cell
    (the row's error)."""

    prompt: object  # a text or a Templated
    constraint: Constraint | None
    problem: str | None = None


def row_constraint(prompt, value, column: str) -> RowConstrained:
    """A constraint cell (JSON text of a one-key object {"json_schema": {...}}, {"regex": "..."}, {"choice":
    [...]}, {"grammar": "..."}, {"json_object": true}; or that object) checked, with its row's prompt."""
    try:
        spec = json.loads(value) if isinstance(value, str) else value
    except ValueError as e:
        return RowConstrained(prompt, None, f"{column} is not JSON: {e}")
    try:
        return RowConstrained(prompt, Constraint.of(spec).check())
    except ValueError as e:
        return RowConstrained(prompt, None, f"{column}: {' '.join(str(e).split())}")


class Generate(Prompted):
    name = "generate"
    runs_on_engine = True
    fields = [("generated_text", pa.string()), ("parsed", pa.string()), ("finish_reason", pa.string()),
              ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32())]
    settings = ("text_column", "prompt_template")
    SAMPLING = ("temperature", "top_k", "top_p", "seed")  # used only when do_sample

    def model_class(self, c):
        return bloom.BloomForCausalLM

    def input_columns(self, c):
        return super().input_columns(c) + ([c.constraint_column] if c.constraint_column else [])

    def output_fields(self, rt=None, c=None):
        """`parsed` only where the settings `c` may constrain rows to JSON (json_schema, json_object, or a
        constraint column): without one, a run writes the columns it wrote before constraints existed, so
        that resuming an older output, or adding to an older table, keeps one schema."""
        out = super().output_fields(rt, c)
        if c is None or not (c.json_schema is not None or c.json_object or c.constraint_column):
            out = [f for f in out if f.name != "parsed"]
        return out

    def row_input(self, row, c, text):
        prompt = super().row_input(row, c, text)
        if c.constraint_column and row.get(c.constraint_column) is not None:
            return row_constraint(prompt, row[c.constraint_column], c.constraint_column)
        return prompt

    def content_settings(self, c):
        # Greedy decoding reads no sampling setting: leaving them out lets a greedy rerun differ in them.
        out = super().content_settings(c)
        return out if c.do_sample else {k: v for k, v in out.items() if k not in self.SAMPLING}

    @staticmethod
    def seed(c, prompt: str) -> int:
        # A row's seed depends on its prompt only, so sampling does not depend on how rows are batched.
        return zlib.crc32(f"{c.seed}\x00{str(prompt)}".encode())

    def generation_params(self, c, prompt, constraint: Constraint | None = None) -> GenerationParams:
        """One row's settings for the engine: every setting declared with an engine name, as the engine
        takes it (the seed derived from the prompt, see `seed`), and its constraint (`constraint`, a
        row's own, else the one of `c`)."""
        values = {s.engine: getattr(c, name) for name, s in settings.SETTINGS.items() if s.engine}
        return GenerationParams(**{**values, "seed": self.seed(c, prompt), "stop_strings": tuple(c.stop),
                                   "logit_bias": {int(t): float(b) for t, b in c.logit_bias.items()} or None,
                                   "constraint": constraint or constraint_of(c)})

    def check_settings(self, c) -> None:
        if c.min_tokens > c.max_new_tokens:
            raise settings.SettingError(f"min_tokens {c.min_tokens} is over max_new_tokens ({c.max_new_tokens})",
                                        "min_tokens")
        check_cache_tokens(c.cache_tokens, c.max_input_tokens + c.max_new_tokens)
        given = [n for n in (*CONSTRAINTS, "constraint_column") if getattr(c, n) not in (None, False, [])]
        if len(given) > 1:
            raise settings.SettingError(f"{given[0]} and {given[1]} cannot go together: the output follows one "
                                        "constraint", given[1])
        if given and c.min_tokens:  # min_tokens holds eos back where the constraint may allow nothing else
            raise settings.SettingError(f"min_tokens cannot go with {given[0]}: the constraint decides where the "
                                        "output ends", "min_tokens")
        try:  # compiled now (without the tokenizer, about a millisecond): refused before any work
            constraint = constraint_of(c)
            constraint and constraint.check()
        except ValueError as e:
            raise settings.SettingError(f"{given[0]}: {e}", given[0]) from None

    def prepare(self, rt, c, cap=None):
        """The runtime's engine: every row or request of the rt joins its running batch. A slot holds
        the longest prompt plus the most new tokens a request may ask for (cap, else c.max_new_tokens)."""
        longest = c.max_input_tokens + max(c.max_new_tokens, cap or 0)
        check_cache_tokens(c.cache_tokens, longest)
        # Unset, the cache holds 64 sequences, or fewer where they would take over half the memory left
        # after loading the model (at least one).
        cache_tokens = c.cache_tokens or fit_cache_tokens(rt.model, longest)
        rt.engine = Engine(rt.model, rt.tokenizer, cache_tokens=cache_tokens, max_seq_len=longest,
                           prefill_chunk=c.prefill_chunk, adapters=rt.adapters, prefix_cache=c.prefix_cache)
        logger.info("generation cache: %d sequences of %d tokens (%.2f GB)", rt.engine.cache.num_slots, longest,
                    rt.engine.cache.nbytes / 1e9)

    def label(self, rt, prompts, results, c, adapters=None):
        """Every row is a sequence of the runtime's engine: a finished row's room goes to the next at once."""
        own = {i: p for i, p in prompts.items() if isinstance(p, RowConstrained)}  # c.constraint_column's
        for i, row in own.items():  # a bad cell is its row's error, nothing else's
            if row.problem:
                results[i].update(error=row.problem, error_code="invalid_constraint")
        prompts = {i: own[i].prompt if i in own else p for i, p in prompts.items()
                   if i not in own or not own[i].problem}
        encoded = encode_capped(rt, prompts, results, c)
        room = rt.engine.cache.max_seq_len
        for i in [i for i in encoded if len(encoded[i]) + c.max_new_tokens > room]:
            results[i].update(error=f"input has {len(encoded[i])} tokens, with max_new_tokens {c.max_new_tokens} over "
                                    f"the {room} tokens a sequence may hold", error_code="too_long")
            del encoded[i]
        idx = list(encoded)
        params = [self.generation_params(c, prompts[i], own[i].constraint if i in own else None) for i in idx]
        if adapters is not None:  # each row's own adapter (the replica resolved c.adapter into it)
            params = [dataclasses.replace(p, adapter=adapters.get(i)) for p, i in zip(params, idx)]
        seqs = rt.engine.generate([encoded[i] for i in idx], params)
        for i, seq in zip(idx, seqs):
            results[i].update(self.result(rt, c, seq.output_ids, seq.finish_reason, len(encoded[i]), seq))

    def result(self, rt, c, tokens: list[int], reason: str, prompt_tokens: int, seq=None) -> dict:
        """A finished sequence's fields. seq (its engine Sequence) tells a constrained one: ended before its
        structure closed, it gets error "incomplete structure" with error_code its finish reason
        (`length`, or `stop` for a stop string); a complete JSON one gets its text in `parsed` too."""
        text = rt.tokenizer.decode(tokens, skip_special_tokens=True)
        if reason == "stop" and any(s in text for s in c.stop):  # like OpenAI's API: the text ends before it
            text = text[: min(text.find(s) for s in c.stop if s in text)]
        out = {"generated_text": text, "parsed": None, "finish_reason": reason, "prompt_tokens": prompt_tokens,
               "completion_tokens": len(tokens)}
        constraint = seq.params.constraint if seq is not None else None
        if constraint is None:
            return out
        if seq.incomplete:
            ended = "max_new_tokens" if reason == "length" else f"finish reason {reason!r}"
            return {**out, "error": f"incomplete structure: {ended} ended the output before its {constraint.kind} "
                                    "closed", "error_code": reason}
        if constraint.kind in JSON_KINDS:
            try:
                json.loads(text)
            except ValueError as e:  # the grammar admits only JSON: a cut by a stop string, say
                return {**out, "error": f"the output is not JSON: {e}", "error_code": "invalid_output"}
            out["parsed"] = text
        return out

    def submit(self, rt, prompt, ids: list[int], c, n: int = 1, **request) -> list:
        """One prompt as n sequences of the runtime's engine (running on its background thread), sharing
        one prefill. request: a request's own `bloom.engine.GenerationParams` fields that no offline
        setting gives (logprobs, prompt_logprobs, logit_bias), over those of `c`."""
        params = dataclasses.replace(self.generation_params(c, prompt), **request)
        return rt.engine.submit_group(ids, params, n)

    def texts(self, rt, seq, c, start: int = 0):
        """Yield (new text, None, logprobs) as `seq`'s tokens come, then (the rest, the result, logprobs).

        Text that could still turn out to begin a stop string, or an incomplete UTF-8 character, is
        held back until it is certain. logprobs (None unless the sequence records them, see `logprobs`):
        those of the tokens whose text begins in this piece, text offsets counted from `start`; the
        pieces' logprobs together are the whole text's."""
        hold = max((len(s) for s in c.stop), default=1) - 1
        out, sent, told = TokenTexts(rt.tokenizer, start=start), 0, 0
        for token in seq.stream():
            out.add(token)
            # The last token may complete a stop string: its text waits for the result. (The engine sets
            # finish_reason before it hands the last token over, so a token read later than the end is
            # known not to be the last by the count.)
            if seq.finish_reason is None or len(out.ids) < len(seq.output_ids):
                safe = len(out.text) - hold
                if safe > sent:
                    begun = out.begun(safe)
                    yield out.text[sent:safe], None, self.logprobs(rt, seq.logprobs, out, told, begun)
                    sent, told = safe, begun
        out.close()
        reason = seq.finish_reason or "length"
        result = self.result(rt, c, out.ids, reason, len(seq.prompt_ids), seq)
        # Tokens past a stop string are not part of the text: their logprobs go with them.
        end = out.begun(len(result["generated_text"])) if reason == "stop" else len(out.ids)
        yield result["generated_text"][sent:], result, self.logprobs(rt, seq.logprobs, out, told, end)

    def logprobs(self, rt, entries, texts: TokenTexts, a: int, b: int) -> dict | None:
        """OpenAI's logprobs object for tokens a .. b - 1 of `texts`, from the engine's `entries` (one per
        token: (logprob, [(id, logprob)] most likely first), or None for a prompt's first token); None
        when there are no entries. `tokens` are the tokens' pieces of the text (a token without one, such
        as the eos, shows its own `token_text`); `top_logprobs` maps the alternatives' `token_text`, and
        the chosen token's, to their logprobs (so up to n + 1 of them, as OpenAI). The chosen token is
        keyed by its entry in `tokens`, so `top_logprobs[k][tokens[k]]` is always its logprob (a piece of
        text may differ from the token's own text where a character spans tokens)."""
        if entries is None:
            return None
        tokens, top = [], []
        for k in range(a, b):
            chosen = texts.ids[k]
            tokens.append(texts.pieces[k] or token_text(rt.tokenizer, chosen))
            if entries[k] is None:
                top.append(None)
                continue
            alternatives: dict[str, float] = {tokens[-1]: entries[k][0]}
            for token, lp in entries[k][1]:
                if token != chosen:
                    alternatives.setdefault(token_text(rt.tokenizer, token), lp)
            # most likely first, as the alternatives come
            top.append(dict(sorted(alternatives.items(), key=lambda item: -item[1])))
        return {"tokens": tokens, "token_logprobs": [None if e is None else e[0] for e in entries[a:b]],
                "top_logprobs": top, "text_offset": texts.offsets[a:b]}


def timings(seq) -> dict:
    """A finished sequence's queue wait, time to first token and time per output token, in seconds (the
    endpoint's metrics)."""
    t, n = seq.times, len(seq.output_ids)
    out = {"queue": t.get("admitted", t["submitted"]) - t["submitted"]}
    if "first_token" in t:
        out["ttft"] = t["first_token"] - t["submitted"]
        if n > 1:
            out["tpot"] = (t["finished"] - t["first_token"]) / (n - 1)
    return out
