"""The tasks, each in one place: generate, classify, ner, qa.

A task says what it reads (input columns), which model it needs (class and head), what it writes (output
fields with fixed Arrow types), which parameters a request or row may set (a pydantic model: the endpoint
validates requests with it, `LabelConfig` validates its settings with it), which settings decide its
output (the run's fingerprint), and how it labels prepared inputs.

Everything else is shared: the replica (`pipelines.replica.BloomReplica`) loads the model, checks and
tokenizes text, and batches rows within the token budget; the job and the endpoint only read these
objects. Settings always travel as an argument (`c`, the effective `LabelConfig` of a row or request):
nothing here, or on the replica, is changed per request.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import string
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, Union

import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

import bloom
from bloom.engine import GenerationParams

from .spans import AGGREGATION_STRATEGIES, best_span, merge_windows, ner_entities

if TYPE_CHECKING:
    from .config import LabelConfig
    from .replica import BloomReplica

ENTITY = pa.struct([("entity_group", pa.string()), ("score", pa.float32()), ("word", pa.string()),
                    ("start", pa.int32()), ("end", pa.int32())])
LABEL_SCORE = pa.struct([("label", pa.string()), ("score", pa.float32())])
# Every task writes these after its own fields.
COMMON_FIELDS = [("input_tokens", pa.int32()), ("truncated", pa.bool_()), ("error", pa.string())]
# Settings that decide any task's output (with the task's own `Params` and `settings`).
COMMON_SETTINGS = ("id_column", "keep_columns", "max_input_tokens", "too_long", "max_text_chars")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    """One task's knowledge; subclasses fill the class attributes and `label`."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]  # what a request (or a row's overrides) may set; None = the default
    Item: ClassVar[object] = str  # one input of an endpoint request
    fields: ClassVar[list[tuple[str, pa.DataType]]]
    settings: ClassVar[tuple[str, ...]] = ("text_column",)  # other LabelConfig fields that decide the output

    # -- what it reads and needs --

    def input_columns(self, c: LabelConfig) -> list[str]:
        """The columns the task reads text from."""
        return [c.text_column]

    def row_input(self, row: dict, c: LabelConfig, text) -> object:
        """A row's input for `label`; `text(row, column)` returns a checked string or raises RowError."""
        return text(row, c.text_column)

    def item_row(self, item, c: LabelConfig) -> dict:
        """An endpoint request's input item as a row of the input columns."""
        return {c.text_column: item}

    def model_class(self, c: LabelConfig) -> type:
        raise NotImplementedError

    # -- what it writes and depends on --

    def output_fields(self) -> list[pa.Field]:
        """The columns the task writes after the pass-through columns, with fixed Arrow types."""
        return [pa.field(n, t) for n, t in self.fields + COMMON_FIELDS]

    def content_settings(self, c: LabelConfig) -> dict:
        """The settings that decide this task's output (for the run's fingerprint): other tasks'
        parameters and the resource knobs never count."""
        names = (*COMMON_SETTINGS, *self.settings, *self.Params.model_fields)
        return {n: getattr(c, n) for n in dict.fromkeys(names)}

    def check_settings(self, c: LabelConfig) -> None:
        """ValueError naming the parameter when a setting is out of its bounds (the bounds of `Params`)."""
        try:
            self.Params.model_validate({n: getattr(c, n) for n in self.Params.model_fields})
        except ValidationError as e:
            err = e.errors()[0]
            name, msg = ".".join(map(str, err["loc"])), err["msg"]
            if err["type"] == "literal_error":
                msg = "Input should be one of " + err["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
            said = f"must be {msg[len('Input should be '):]}" if msg.startswith("Input should be ") else f": {msg}"
            raise ValueError(f"{name} {said} (got {err.get('input')!r})".replace(" :", ":")) from None

    def request_model(self) -> type[BaseModel]:
        """The endpoint's request body: {"inputs": item or [items], "parameters": Params}."""
        return create_model(f"{self.name.title()}Request", __base__=_Strict,
                            inputs=(Union[self.Item, list[self.Item]], ...), parameters=(self.Params, self.Params()))

    def label(self, replica: BloomReplica, inputs: dict[int, object], results: list[dict], c: LabelConfig) -> None:
        """Fill results[i] with the task's fields for every row i of `inputs` (or set its error)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- generate


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


class GenerateParams(_Strict):
    max_new_tokens: int | None = Field(None, ge=0)
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: list[Annotated[str, Field(min_length=1)]] | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    min_tokens: int | None = Field(None, ge=0)
    logit_bias: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-100, le=100)]] | None = None


class Generate(Task):
    name = "generate"
    Params = GenerateParams
    fields = [("generated_text", pa.string()), ("finish_reason", pa.string()),
              ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32())]
    settings = ("text_column", "prompt_template")
    SAMPLING = ("temperature", "top_k", "top_p", "seed")  # used only when do_sample
    # Settings added after runs were written: at their off value they stay out of the fingerprint, so
    # those runs still resume.
    OFF = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "min_tokens": 0, "logit_bias": {}}

    def model_class(self, c):
        return bloom.BloomForCausalLM

    def content_settings(self, c):
        # Greedy decoding reads no sampling setting: leaving them out lets a greedy rerun differ in them.
        out = {k: v for k, v in super().content_settings(c).items() if k not in self.OFF or v != self.OFF[k]}
        return out if c.do_sample else {k: v for k, v in out.items() if k not in self.SAMPLING}

    def input_columns(self, c):
        return template_fields(c.prompt_template) if c.prompt_template else [c.text_column]

    def row_input(self, row, c, text):
        if c.prompt_template:
            return Templated(c.prompt_template, {name: text(row, name) for name in template_fields(c.prompt_template)})
        return text(row, c.text_column)

    @staticmethod
    def seed(c: LabelConfig, prompt: str) -> int:
        # A row's seed depends on its prompt only, so sampling does not depend on how rows are batched.
        return zlib.crc32(f"{c.seed}\x00{str(prompt)}".encode())

    def generation_params(self, c: LabelConfig, prompt) -> GenerationParams:
        """One row's settings for the engine."""
        return GenerationParams(max_new_tokens=c.max_new_tokens, do_sample=c.do_sample, temperature=c.temperature,
                                top_k=c.top_k, top_p=c.top_p, repetition_penalty=c.repetition_penalty,
                                seed=self.seed(c, prompt), stop_strings=tuple(c.stop),
                                frequency_penalty=c.frequency_penalty, presence_penalty=c.presence_penalty,
                                min_tokens=c.min_tokens,
                                logit_bias={int(t): float(b) for t, b in c.logit_bias.items()} or None)

    def label(self, replica, prompts, results, c):
        """Every row is a sequence of the replica's engine: a finished row's room goes to the next at once."""
        encoded = replica.encode_capped(prompts, results, c)
        room = replica.engine.cache.max_seq_len
        for i in [i for i in encoded if len(encoded[i]) + c.max_new_tokens > room]:
            results[i].update(error=f"input has {len(encoded[i])} tokens, with max_new_tokens {c.max_new_tokens} over "
                                    f"the {room} tokens a sequence may hold", error_code="too_long")
            del encoded[i]
        idx = list(encoded)
        seqs = replica.engine.generate([encoded[i] for i in idx], [self.generation_params(c, prompts[i]) for i in idx])
        for i, seq in zip(idx, seqs):
            results[i].update(self.result(replica, c, seq.output_ids, seq.finish_reason, len(encoded[i])))

    def result(self, replica, c, tokens: list[int], reason: str, prompt_tokens: int) -> dict:
        text = replica.tokenizer.decode(tokens, skip_special_tokens=True)
        if reason == "stop":  # like OpenAI's API: the text ends before the stop string
            text = text[: min(text.find(s) for s in c.stop if s in text)]
        return {"generated_text": text, "finish_reason": reason, "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens)}

    def submit(self, replica, prompt, ids: list[int], c, n: int = 1, **request) -> list:
        """One prompt as n sequences of the replica's engine (running on its background thread), sharing
        one prefill. request: a request's own `bloom.engine.GenerationParams` fields that no offline
        setting gives (logprobs, prompt_logprobs, logit_bias, ...), over those of `c`."""
        replica.start_engine()
        params = dataclasses.replace(self.generation_params(c, prompt), **request)
        return replica.engine.submit_group(ids, params, n)

    def texts(self, replica, seq, c, start: int = 0):
        """Yield (new text, None, logprobs) as `seq`'s tokens come, then (the rest, the result, logprobs).

        Text that could still turn out to begin a stop string, or an incomplete UTF-8 character, is
        held back until it is certain. logprobs (None unless the sequence records them, see `logprobs`):
        those of the tokens whose text begins in this piece, text offsets counted from `start`; the
        pieces' logprobs together are the whole text's."""
        hold = max((len(s) for s in c.stop), default=1) - 1
        out, sent, told = TokenTexts(replica.tokenizer, start=start), 0, 0
        for token in seq.stream():
            out.add(token)
            # The last token may complete a stop string: its text waits for the result. (The engine sets
            # finish_reason before it hands the last token over, so a token read later than the end is
            # known not to be the last by the count.)
            if seq.finish_reason is None or len(out.ids) < len(seq.output_ids):
                safe = len(out.text) - hold
                if safe > sent:
                    begun = out.begun(safe)
                    yield out.text[sent:safe], None, self.logprobs(replica, seq.logprobs, out, told, begun)
                    sent, told = safe, begun
        out.close()
        reason = seq.finish_reason or "length"
        result = self.result(replica, c, out.ids, reason, len(seq.prompt_ids))
        # Tokens past a stop string are not part of the text: their logprobs go with them.
        end = out.begun(len(result["generated_text"])) if reason == "stop" else len(out.ids)
        yield result["generated_text"][sent:], result, self.logprobs(replica, seq.logprobs, out, told, end)

    def logprobs(self, replica, entries, texts: TokenTexts, a: int, b: int) -> dict | None:
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
            tokens.append(texts.pieces[k] or token_text(replica.tokenizer, chosen))
            if entries[k] is None:
                top.append(None)
                continue
            alternatives: dict[str, float] = {tokens[-1]: entries[k][0]}
            for token, lp in entries[k][1]:
                if token != chosen:
                    alternatives.setdefault(token_text(replica.tokenizer, token), lp)
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


# ----------------------------------------------------------------------------- classify


class ClassifyParams(_Strict):
    candidate_labels: list[str] | None = None
    threshold: float | None = Field(None, ge=0, le=1)


class Classify(Task):
    """A sequence-classification head, or zero-shot with a causal LM when candidate_labels are given."""

    name = "classify"
    Params = ClassifyParams
    fields = [("label", pa.string()), ("score", pa.float32()), ("labels", pa.list_(pa.string())),
              ("scores", pa.list_(LABEL_SCORE))]
    settings = ("text_column", "prompt_template", "label_prefix")

    def model_class(self, c):
        return bloom.BloomForCausalLM if c.candidate_labels else bloom.BloomForSequenceClassification

    input_columns = Generate.input_columns
    row_input = Generate.row_input

    def label(self, replica, texts, results, c):
        encoded = replica.encode_capped(texts, results, c)
        if c.candidate_labels:
            return self._zero_shot(replica, encoded, results, c)
        cfg = replica.model.config
        multi = cfg.problem_type == "multi_label_classification"
        regression = cfg.problem_type == "regression" or cfg.num_labels == 1
        for idx, ids, mask in replica.batches(encoded, c):
            logits = replica.model(ids, attention_mask=mask).logits.float()  # (B, num_labels)
            probs = logits if regression else (logits.sigmoid() if multi else logits.softmax(-1))
            for j, i in enumerate(idx):
                p = probs[j].tolist()
                best = max(range(len(p)), key=p.__getitem__)
                chosen = [cfg.id2label[k] for k, v in enumerate(p) if v >= c.threshold] if multi else [cfg.id2label[best]]
                results[i].update(label=cfg.id2label[best], score=p[best], labels=chosen,
                                  scores=[{"label": cfg.id2label[k], "score": v} for k, v in enumerate(p)])

    def _zero_shot(self, replica, encoded, results, c):
        """Rank candidate labels by the log-likelihood of their tokens after the prompt. The prompt is run
        once per row; its KV cache is shared by every label's continuation."""
        labels, label_lists = c.candidate_labels, replica.candidate_label_ids(c)
        K, L = len(label_lists), max(map(len, label_lists))
        label_ids = torch.full((K, L), replica.pad_id, dtype=torch.long)
        label_mask = torch.zeros((K, L), dtype=torch.long)
        for k, ids in enumerate(label_lists):  # right-padded: padding after a label cannot affect it
            label_ids[k, : len(ids)], label_mask[k, : len(ids)] = torch.tensor(ids), 1
        label_ids, label_mask = label_ids.to(replica.input_device), label_mask.to(replica.input_device)
        for idx, ids, mask in replica.batches(encoded, c, extra=L):
            B = len(idx)
            out = replica.model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): log p(first label token | prompt)
            total = first[:, label_ids[:, 0]]  # (B, K)
            if L > 1:
                cache = out.past_key_values.select(torch.arange(B).repeat_interleave(K))
                cont_ids = label_ids[:, :-1].repeat(B, 1)  # (B*K, L-1): feed all but the last label token
                cont_mask = torch.cat([mask.repeat_interleave(K, 0), label_mask[:, :-1].repeat(B, 1)], 1)
                logp = replica.model(cont_ids, past_key_values=cache, attention_mask=cont_mask).logits.float().log_softmax(-1)
                targets = label_ids[:, 1:].repeat(B, 1)  # (B*K, L-1)
                picked = logp.gather(-1, targets[..., None]).squeeze(-1) * label_mask[:, 1:].repeat(B, 1)
                total = total + picked.sum(-1).view(B, K)
            probs = total.softmax(-1)
            for j, i in enumerate(idx):
                p = probs[j].tolist()
                best = max(range(K), key=p.__getitem__)
                results[i].update(label=labels[best], score=p[best], labels=[labels[best]],
                                  scores=[{"label": lab, "score": v} for lab, v in zip(labels, p)])


# ----------------------------------------------------------------------------- ner


class NerParams(_Strict):
    aggregation_strategy: Literal[AGGREGATION_STRATEGIES] | None = None
    ignore_labels: list[str] | None = None


class Ner(Task):
    name = "ner"
    Params = NerParams
    fields = [("entities", pa.list_(ENTITY))]
    settings = ("text_column", "stride")

    def model_class(self, c):
        return bloom.BloomForTokenClassification

    def label(self, replica, texts, results, c):
        id2label = replica.model.config.id2label
        windows = replica.windows(texts, results, c)
        probs = replica.run_windows(windows, c, lambda out, j, n: out.logits[j, -n:].float().softmax(-1).cpu().numpy())
        for i, ws in windows.items():
            offsets, p = merge_windows([(w[1], q) for w, q in zip(ws, probs[i])], overlap=c.stride)
            results[i]["entities"] = ner_entities(texts[i], offsets, p, id2label, c.aggregation_strategy,
                                                  tuple(c.ignore_labels))


# ----------------------------------------------------------------------------- qa


class QaParams(_Strict):
    max_answer_len: int | None = Field(None, ge=1)


class QaItem(_Strict):
    question: str
    context: str


class Qa(Task):
    name = "qa"
    Params = QaParams
    Item = QaItem
    fields = [("answer", pa.string()), ("score", pa.float32()), ("start", pa.int32()), ("end", pa.int32())]
    settings = ("question_column", "context_column", "stride")

    def model_class(self, c):
        return bloom.BloomForQuestionAnswering

    def input_columns(self, c):
        return [c.question_column, c.context_column]

    def row_input(self, row, c, text):
        return text(row, c.question_column), text(row, c.context_column)

    def item_row(self, item, c):
        return {c.question_column: item.question, c.context_column: item.context}

    def label(self, replica, pairs, results, c):
        windows = replica.windows(pairs, results, c, pair=True)
        logits = replica.run_windows(windows, c, lambda out, j, n: (out.start_logits[j, -n:].float().cpu().numpy(),
                                                                     out.end_logits[j, -n:].float().cpu().numpy()))
        for i, ws in windows.items():
            best = (0, 0, -math.inf)
            for (ids, offsets, seq), (start, end) in zip(ws, logits[i]):
                context = [s == 1 for s in seq]
                if any(context):
                    span = best_span(start, end, offsets, context, c.max_answer_len)
                    best = max(best, span, key=lambda s: s[2])
            if best[2] == -math.inf:
                results[i]["error"] = "no context token fits in the window after the question"
                continue
            s, e, score = best
            results[i].update(answer=pairs[i][1][s:e], score=score, start=s, end=e)


TASKS: dict[str, Task] = {t.name: t for t in (Generate(), Classify(), Ner(), Qa())}
