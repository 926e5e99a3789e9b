"""BloomReplica: one loaded BLOOM model (and tokenizer) that labels batches of rows for one task.

It is the only implementation of the tasks. The Ray Data pipeline uses it as a `map_batches` callable
class (load in `__init__`, label in `__call__`), and the online endpoint wraps the same class.

Input batches are Arrow tables with the configured columns; the output is an Arrow table with the
pass-through columns, the task's columns (`output_schema`), and per-row `input_tokens`, `truncated`
and `error` (null when the row was labeled). A bad row never fails the batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import string
import zlib
from pathlib import Path

import pyarrow as pa
import torch

import bloom
from bloom.loading import checkpoint_tensors

from .config import LabelConfig
from .spans import best_span, merge_windows, ner_entities

logger = logging.getLogger("bloomline")

ENTITY = pa.struct([("entity_group", pa.string()), ("score", pa.float32()), ("word", pa.string()),
                    ("start", pa.int32()), ("end", pa.int32())])
LABEL_SCORE = pa.struct([("label", pa.string()), ("score", pa.float32())])
TASK_FIELDS = {
    "generate": [("generated_text", pa.string()), ("finish_reason", pa.string()),
                 ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32())],
    "classify": [("label", pa.string()), ("score", pa.float32()), ("labels", pa.list_(pa.string())),
                 ("scores", pa.list_(LABEL_SCORE))],
    "ner": [("entities", pa.list_(ENTITY))],
    "qa": [("answer", pa.string()), ("score", pa.float32()), ("start", pa.int32()), ("end", pa.int32())],
}
COMMON_FIELDS = [("input_tokens", pa.int32()), ("truncated", pa.bool_()), ("error", pa.string())]
PROVENANCE = ("_source", "_row")  # added by the pipeline's reader: input file and row index, for resuming
# Settings a single request (or row) may override; the rest are the deployment's or the job's.
REQUEST_PARAMS = {
    "generate": ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop"),
    "classify": ("candidate_labels", "threshold"),
    "ner": ("aggregation_strategy", "ignore_labels"),
    "qa": ("max_answer_len",),
}


def output_fields(task: str) -> list[pa.Field]:
    """The columns a task writes after the pass-through columns, with fixed Arrow types."""
    return [pa.field(n, t) for n, t in TASK_FIELDS[task] + COMMON_FIELDS]


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


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


def _has_weights(model_dir: Path, head: str) -> bool:
    return any(name.split(".")[0] == head or name.startswith(f"transformer.{head}.")
               for name in checkpoint_tensors(model_dir))


class BloomReplica:
    """Holds one model for `config.task`; `replica(table) -> table` labels a batch.

    device: where the model lives (default: CUDA when visible, else CPU); config.device_map, when set,
    spreads it over the visible devices instead. num_threads: torch's CPU threads for this replica."""

    def __init__(self, config: LabelConfig, device: str | None = None, num_threads: int | None = None):
        self.config = config
        if num_threads:
            torch.set_num_threads(num_threads)
        model_dir = Path(config.model)
        self.tokenizer = bloom.BloomTokenizerFast.from_pretrained(model_dir)
        self.zero_shot = config.task == "classify" and bool(config.candidate_labels)
        model_class = {
            "generate": bloom.BloomForCausalLM,
            "classify": bloom.BloomForCausalLM if self.zero_shot else bloom.BloomForSequenceClassification,
            "ner": bloom.BloomForTokenClassification,
            "qa": bloom.BloomForQuestionAnswering,
        }[config.task]
        head = {"BloomForSequenceClassification": "score", "BloomForTokenClassification": "classifier",
                "BloomForQuestionAnswering": "qa_outputs"}.get(model_class.__name__)
        if head and not _has_weights(model_dir, head):
            hint = " (or give candidate_labels for zero-shot classification with a causal LM)" if config.task == "classify" else ""
            raise ValueError(f"{model_dir} has no {head} head weights, so it cannot do task {config.task!r}{hint}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model_class.from_pretrained(
            model_dir, dtype=config.dtype, device=None if config.device_map else self.device, device_map=config.device_map)
        self.input_device = self.model.get_input_embeddings().weight.device
        if {str(d) for d in self.model.hf_device_map.values()} == {"cpu"}:
            # CPU inference: oneDNN-packed weights; decode steps 1.3-2.5x faster here (bloom.loading.PackedLinear).
            self.model.pack_for_cpu()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.length_spread = 1.15  # see token_budget_batches; inf batches by the budget alone
        self.fields = output_fields(config.task)
        self._label_ids: dict[tuple, list[list[int]]] = {}
        if self.zero_shot:
            self.candidate_label_ids(config)  # fail now on labels without tokens

    # ------------------------------------------------------------------ batch in, batch out

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Label an Arrow batch; returns pass-through columns + the task's columns, one row per input row."""
        rows = batch.to_pylist()
        results = self.label_rows(rows)
        keep = [c for c in self.passthrough_columns() if c in batch.column_names]
        columns = {c: batch.column(c) for c in keep}
        for f in self.fields:
            columns[f.name] = pa.array([r.get(f.name) for r in results], type=f.type)
        return pa.table(columns)

    def passthrough_columns(self) -> list[str]:
        c = self.config
        return list(dict.fromkeys([c.id_column, *c.keep_columns, *PROVENANCE]))

    def with_params(self, params: dict | None) -> LabelConfig:
        """The config with a request's overrides (names in REQUEST_PARAMS[task]); ValueError naming a bad one."""
        if not params:
            return self.config
        allowed = REQUEST_PARAMS[self.config.task]
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

    def candidate_label_ids(self, config: LabelConfig) -> list[list[int]]:
        key = (config.label_prefix, tuple(config.candidate_labels))
        if key not in self._label_ids:
            ids = [self.tokenizer.encode(config.label_prefix + label) for label in config.candidate_labels]
            if any(not t for t in ids):
                raise ValueError("every candidate label must have at least one token")
            self._label_ids[key] = ids
        return self._label_ids[key]

    def label_rows(self, rows: list[dict], params: list[dict | None] | None = None) -> list[dict]:
        """Rows (dicts of column values) → one result dict per row with the task's fields; a row that
        cannot be labeled gets only `error` set. params: per-row overrides (see `with_params`); rows with
        equal overrides are labeled together."""
        if params is None:
            return self._label_rows(rows)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(json.dumps(p or {}, sort_keys=True), []).append(i)
        results: list[dict] = [{} for _ in rows]
        default = self.config
        for key, idx in groups.items():
            try:
                self.config = self.with_params(json.loads(key))
            except ValueError as e:
                for i in idx:
                    results[i] = {"truncated": False, "error": str(e)}
                continue
            try:  # one batch at a time per replica: the overridden config cannot leak into another call
                for i, r in zip(idx, self._label_rows([rows[i] for i in idx])):
                    results[i] = r
            finally:
                self.config = default
        return results

    def _label_rows(self, rows: list[dict]) -> list[dict]:
        results = [{"truncated": False} for _ in rows]
        inputs = {}
        for i, row in enumerate(rows):
            if row.get("_input_error"):  # found by the pipeline's reader (a number, invalid UTF-8)
                results[i]["error"] = row["_input_error"]
                continue
            try:
                inputs[i] = self._row_input(row)
            except ValueError as e:
                results[i]["error"] = str(e)
        if inputs:
            with torch.inference_mode():
                getattr(self, f"_{self.config.task}")(inputs, results)
        return results

    # ------------------------------------------------------------------ input validation

    def _text(self, row: dict, column: str) -> str:
        value = row.get(column)
        if value is None:
            raise ValueError(f"{column} is null")
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{column} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not isinstance(value, str):
            raise ValueError(f"{column} is not a string (got {type(value).__name__})")
        if not value.strip():
            raise ValueError(f"{column} is empty")
        if len(value) > self.config.max_text_chars:
            raise ValueError(f"{column} has {len(value)} characters, over the limit of {self.config.max_text_chars}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{column} holds an invalid character ({e.reason} at {e.start})") from None
        return value

    def _row_input(self, row: dict):
        c = self.config
        if c.task == "qa":
            return self._text(row, c.question_column), self._text(row, c.context_column)
        if c.prompt_template and c.task in ("generate", "classify"):
            values = {name: self._text(row, name) for name in template_fields(c.prompt_template)}
            return c.prompt_template.format(**values)
        return self._text(row, c.text_column)

    def _encode_capped(self, texts: dict[int, str], results: list[dict]) -> dict[int, list[int]]:
        """Token ids per row; rows over max_input_tokens are errors or truncated (keeping the start)."""
        limit, encoded = self.config.max_input_tokens, {}
        for i, text in texts.items():
            ids = self.tokenizer.encode(text)
            results[i]["input_tokens"] = len(ids)
            if len(ids) > limit:
                if self.config.too_long == "error":
                    results[i]["error"] = f"input has {len(ids)} tokens, over the limit of {limit}"
                    continue
                ids, results[i]["truncated"] = ids[:limit], True
            encoded[i] = ids
        return encoded

    def _batches(self, encoded: dict[int, list[int]], extra: int = 0):
        """Yield (row indices, input_ids, attention_mask) batches within the token budget."""
        keys = list(encoded)
        lengths = [len(encoded[k]) for k in keys]
        for group in token_budget_batches(lengths, self.config.batch_token_budget, extra, self.length_spread):
            idx = [keys[g] for g in group]
            yield idx, *pad_left([encoded[i] for i in idx], self.pad_id, self.input_device)

    # ------------------------------------------------------------------ tasks

    def _generate(self, prompts: dict[int, str], results: list[dict]) -> None:
        c = self.config
        encoded = self._encode_capped(prompts, results)
        for idx, ids, mask in self._batches(encoded, extra=c.max_new_tokens):
            # A row's seed depends on its prompt only, so sampling does not depend on how rows are batched.
            seeds = [zlib.crc32(f"{c.seed}\x00{prompts[i]}".encode()) for i in idx]
            out = self.model.generate(
                ids, attention_mask=mask, max_new_tokens=c.max_new_tokens, do_sample=c.do_sample,
                temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, repetition_penalty=c.repetition_penalty,
                seed=seeds, stop_strings=c.stop or None, tokenizer=self.tokenizer, return_dict_in_generate=True)
            T = ids.shape[1]
            for j, i in enumerate(idx):
                n = out.num_new_tokens[j]
                results[i].update(self._generated(c, out.sequences[j, T : T + n].tolist(), out.finish_reason[j],
                                                  len(encoded[i])))

    def _generated(self, c: LabelConfig, tokens: list[int], reason: str, prompt_tokens: int) -> dict:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if reason == "stop":  # like OpenAI's API: the text ends before the stop string
            text = text[: min(text.find(s) for s in c.stop if s in text)]
        return {"generated_text": text, "finish_reason": reason, "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens)}

    def stream_generate(self, row: dict, params: dict | None = None):
        """Generate for one row, yielding (new text, None) as tokens come, then ("", the row's result) —
        the same result `label_rows` gives. Raises ValueError for a bad row or parameters.

        Text that could still turn out to begin a stop string, or an incomplete UTF-8 character, is
        held back until it is certain."""
        c = self.with_params(params)
        result, prompt = {"truncated": False}, self._row_input(row)
        encoded = self._encode_capped({0: prompt}, [result])
        if 0 not in encoded:
            raise ValueError(result["error"])
        ids = torch.tensor([encoded[0]], device=self.input_device)
        hold = max((len(s) for s in c.stop), default=1) - 1
        tokens, sent, reason = [], 0, None
        for step in self.model.stream(
                ids, max_new_tokens=c.max_new_tokens, do_sample=c.do_sample, temperature=c.temperature,
                top_k=c.top_k, top_p=c.top_p, repetition_penalty=c.repetition_penalty,
                seed=[zlib.crc32(f"{c.seed}\x00{prompt}".encode())], stop_strings=c.stop or None,
                tokenizer=self.tokenizer):
            if step.active[0]:
                tokens.append(int(step.tokens[0]))
            reason = step.finish_reason[0]
            if reason is None:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                safe = len(text) - hold - (1 if text.endswith("\ufffd") else 0)
                if safe > sent:
                    yield text[sent:safe], None
                    sent = safe
        result.update(self._generated(c, tokens, reason or "length", len(encoded[0])))
        yield result["generated_text"][sent:], result

    def _classify(self, texts: dict[int, str], results: list[dict]) -> None:
        encoded = self._encode_capped(texts, results)
        if self.zero_shot:
            return self._zero_shot(encoded, results)
        cfg = self.model.config
        multi = cfg.problem_type == "multi_label_classification"
        regression = cfg.problem_type == "regression" or cfg.num_labels == 1
        for idx, ids, mask in self._batches(encoded):
            logits = self.model(ids, attention_mask=mask).logits.float()  # (B, num_labels)
            probs = logits if regression else (logits.sigmoid() if multi else logits.softmax(-1))
            for j, i in enumerate(idx):
                p = probs[j].tolist()
                best = max(range(len(p)), key=p.__getitem__)
                chosen = [cfg.id2label[k] for k, v in enumerate(p) if v >= self.config.threshold] if multi else [cfg.id2label[best]]
                results[i].update(label=cfg.id2label[best], score=p[best], labels=chosen,
                                  scores=[{"label": cfg.id2label[k], "score": v} for k, v in enumerate(p)])

    def _zero_shot(self, encoded: dict[int, list[int]], results: list[dict]) -> None:
        """Rank candidate labels by the log-likelihood of their tokens after the prompt. The prompt is run
        once per row; its KV cache is shared by every label's continuation."""
        labels, label_lists = self.config.candidate_labels, self.candidate_label_ids(self.config)
        K, L = len(label_lists), max(map(len, label_lists))
        label_ids = torch.full((K, L), self.pad_id, dtype=torch.long)
        label_mask = torch.zeros((K, L), dtype=torch.long)
        for k, ids in enumerate(label_lists):  # right-padded: padding after a label cannot affect it
            label_ids[k, : len(ids)], label_mask[k, : len(ids)] = torch.tensor(ids), 1
        label_ids, label_mask = label_ids.to(self.input_device), label_mask.to(self.input_device)
        for idx, ids, mask in self._batches(encoded, extra=L):
            B = len(idx)
            out = self.model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): log p(first label token | prompt)
            total = first[:, label_ids[:, 0]]  # (B, K)
            if L > 1:
                cache = out.past_key_values.select(torch.arange(B).repeat_interleave(K))
                cont_ids = label_ids[:, :-1].repeat(B, 1)  # (B*K, L-1): feed all but the last label token
                cont_mask = torch.cat([mask.repeat_interleave(K, 0), label_mask[:, :-1].repeat(B, 1)], 1)
                logp = self.model(cont_ids, past_key_values=cache, attention_mask=cont_mask).logits.float().log_softmax(-1)
                targets = label_ids[:, 1:].repeat(B, 1)  # (B*K, L-1)
                picked = logp.gather(-1, targets[..., None]).squeeze(-1) * label_mask[:, 1:].repeat(B, 1)
                total = total + picked.sum(-1).view(B, K)
            probs = total.softmax(-1)
            for j, i in enumerate(idx):
                p = probs[j].tolist()
                best = max(range(K), key=p.__getitem__)
                results[i].update(label=labels[best], score=p[best], labels=[labels[best]],
                                  scores=[{"label": lab, "score": v} for lab, v in zip(labels, p)])

    def _windows(self, texts: dict[int, object], results: list[dict], pair: bool = False):
        """Tokenize each row into windows of max_input_tokens sharing `stride` tokens; returns
        {row: [(ids, offsets, sequence ids)]} with errors recorded per row."""
        c, windows = self.config, {}
        for i, text in texts.items():
            args = (text[0], text[1]) if pair else (text,)
            try:
                enc = self.tokenizer(*args, truncation="only_second" if pair else True, max_length=c.max_input_tokens,
                                     stride=c.stride, return_overflowing_tokens=True, return_offsets_mapping=True)
            except ValueError as e:
                results[i]["error"] = f"cannot fit the input into windows of {c.max_input_tokens} tokens: {e}"
                continue
            windows[i] = [(enc["input_ids"][w], enc["offset_mapping"][w], enc.sequence_ids(w))
                          for w in range(len(enc["input_ids"]))]
            # Every window after the first repeats `stride` tokens of the split text (and, for a pair, the
            # whole question), so the input's own length follows without tokenizing it again.
            question = sum(1 for s in windows[i][0][2] if s == 0) if pair else 0
            repeated = (len(windows[i]) - 1) * (c.stride + question)
            results[i]["input_tokens"] = sum(len(w[0]) for w in windows[i]) - repeated
        return windows

    def _run_windows(self, windows: dict[int, list], head) -> dict[int, list]:
        """Forward every window, batched within the token budget; head(output, row in batch, length) per window."""
        flat = [(i, w) for i, ws in windows.items() for w in range(len(ws))]
        outputs = {key: None for key in flat}
        encoded = {k: windows[key[0]][key[1]][0] for k, key in enumerate(flat)}
        for idx, ids, mask in self._batches(encoded):
            out = self.model(ids, attention_mask=mask)
            for j, k in enumerate(idx):
                outputs[flat[k]] = head(out, j, len(encoded[k]))
        return {i: [outputs[(i, w)] for w in range(len(ws))] for i, ws in windows.items()}

    def _ner(self, texts: dict[int, str], results: list[dict]) -> None:
        c, id2label = self.config, self.model.config.id2label
        windows = self._windows(texts, results)
        probs = self._run_windows(windows, lambda out, j, n: out.logits[j, -n:].float().softmax(-1).cpu().numpy())
        for i, ws in windows.items():
            offsets, p = merge_windows([(w[1], q) for w, q in zip(ws, probs[i])], overlap=c.stride)
            results[i]["entities"] = ner_entities(texts[i], offsets, p, id2label, c.aggregation_strategy,
                                                  tuple(c.ignore_labels))

    def _qa(self, pairs: dict[int, tuple[str, str]], results: list[dict]) -> None:
        windows = self._windows(pairs, results, pair=True)
        logits = self._run_windows(windows, lambda out, j, n: (out.start_logits[j, -n:].float().cpu().numpy(),
                                                                out.end_logits[j, -n:].float().cpu().numpy()))
        for i, ws in windows.items():
            best = (0, 0, -math.inf)
            for (ids, offsets, seq), (start, end) in zip(ws, logits[i]):
                context = [s == 1 for s in seq]
                if any(context):
                    span = best_span(start, end, offsets, context, self.config.max_answer_len)
                    best = max(best, span, key=lambda s: s[2])
            if best[2] == -math.inf:
                results[i]["error"] = "no context token fits in the window after the question"
                continue
            s, e, score = best
            results[i].update(answer=pairs[i][1][s:e], score=score, start=s, end=e)
