"""OpenAI's API over the engine's sequences and the embedding task: the request models of
/v1/completions, /v1/chat/completions and /v1/embeddings (every declared setting with an OpenAI name,
e.g. max_tokens, comes from `pipelines.tasks.settings`), and the answer's shapes (choices, logprobs,
embeddings, usage).
"""

from __future__ import annotations

import base64
import json
from typing import Any, Literal, Union

import numpy as np

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bloom.engine import Constraint

from ..tasks import TokenTexts
from ..tasks.settings import openai_model
from .errors import ApiError


# ----------------------------------------------------------------------------- request models

class _OpenAIRequest(BaseModel):
    """A request of OpenAI's API: unknown fields are refused, and null means the default wherever OpenAI's
    spec allows null (the official client sends an explicit null for a None argument)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_OpenAIRequest):
    include_usage: bool = False


class JsonSchemaFormat(_OpenAIRequest):
    """OpenAI's response_format.json_schema: the schema (under "schema") and what only names it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None  # the output always follows the schema: strict or not


class ResponseFormat(_OpenAIRequest):
    """OpenAI's response_format: "text" (free), "json_object" (any JSON object) or "json_schema"."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_OpenAIRequest):
    """vLLM's structured_outputs, its fields that say what the output must be (one of them): json (a JSON
    Schema, or its text), regex, choice, grammar (Lark, llguidance's dialect), json_object."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: Union[dict[str, Any], str, None] = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _Sampling(_OpenAIRequest):
    """What completions and chat completions share: the model, how to sample, how many choices, how to
    stream; and (added by `openai_model`) every setting declared with an OpenAI name (max_tokens, top_p,
    seed, frequency_penalty, presence_penalty, vLLM's min_tokens), None: the route's default. Their bounds
    are checked once, with the request's other settings (`pipelines.tasks.settings.check`)."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0)  # OpenAI's 0 is greedy: our do_sample false
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (a JSON key, so a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None


SamplingRequest = openai_model(_Sampling)


class CompletionRequest(SamplingRequest):
    """OpenAI's completions request; prompt: a text, texts, token ids, or lists of token ids. Fields we
    cannot honour are refused rather than ignored (those in NO_OP are taken at the values that change
    nothing)."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class ChatMessage(BaseModel):
    """One message; passed to the chat template as sent (other keys, e.g. name, included)."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(SamplingRequest):
    """OpenAI's chat completions request. max_tokens (or max_completion_tokens) None: the generate task's
    max_new_tokens. logprobs: true with top_logprobs alternatives per token."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # max_tokens' newer name
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class EmbeddingRequest(_OpenAIRequest):
    """OpenAI's embeddings request; input: a text, texts, token ids, or lists of token ids. dimensions:
    only the model's own size (we do not shorten vectors)."""

    input: Union[str, list[str], list[int], list[list[int]]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def embedding_item(index: int, vector: list[float], encoding_format: str) -> dict:
    """One entry of an embeddings answer's data: the vector as floats, or base64 of its little-endian
    float32 bytes (what OpenAI's client decodes with numpy's frombuffer)."""
    if encoding_format == "base64":
        vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return {"object": "embedding", "index": index, "embedding": vector}


# OpenAI's fields that we take only at the value that changes nothing (or null); any other value is a 400.
NO_OP = {"suffix": ""}


# ----------------------------------------------------------------------------- settings


def constraint_settings(req: "_Sampling") -> dict:
    """The generate task's constraint setting that a request's response_format or structured_outputs gives
    ({} for none, or "text"), compiled now (about a millisecond): 400 naming the field for a spec that
    cannot compile, or for more than one constraint."""
    given = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise ApiError(400, "response_format: type json_schema needs a json_schema object {name, schema}",
                           "response_format")
        given.append(("response_format", "json_schema", fmt.json_schema.schema_))
    elif fmt is not None and fmt.type == "json_object":
        given.append(("response_format", "json_object", True))
    so = req.structured_outputs
    if so is not None:
        names = {"json_": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                 "json_object": "json_object"}
        given += [("structured_outputs", setting, getattr(so, field)) for field, setting in names.items()
                  if getattr(so, field) not in (None, False)]
    if len(given) > 1:
        fields = ", ".join(f"{where}.{'json' if name == 'json_schema' and where != 'response_format' else name}"
                           for where, name, _ in given)
        raise ApiError(400, f"one constraint at a time: the output cannot follow {fields} together", given[1][0])
    if not given:
        return {}
    ((where, name, value),) = given
    try:
        constraint = Constraint.of({name: value}).check()
    except ValueError as e:
        raise ApiError(400, f"{where}: {e}", where) from None
    return {name: json.loads(constraint.spec) if name == "json_schema" else value}  # a schema's text as its object


def finish_reason(reason: str | None) -> str | None:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def choice_pieces(replica, seq, c, echo: bool):
    """One completion choice as (text, result or None, logprobs or None) pieces: the prompt first when
    echoed (with its tokens' logprobs when asked, the first token's None), then the new text as the
    task's `texts` gives it; text offsets count from the start of the choice's text."""
    task, rt = replica.task, replica.runtime
    if not echo:
        yield from task.texts(rt, seq, c)
        return
    prompt = TokenTexts(replica.tokenizer, seq.prompt_ids, skip_special_tokens=False)
    pieces = task.texts(rt, seq, c, len(prompt.text))
    first = next(pieces)  # the prompt's logprobs are complete once its first new text (or its end) comes
    yield prompt.text, None, task.logprobs(rt, seq.prompt_logprobs, prompt, 0, len(prompt.ids))
    yield first
    yield from pieces


def join_logprobs(a: dict | None, b: dict | None) -> dict | None:
    """Two consecutive pieces' logprobs as one."""
    return b if a is None else a if b is None else {key: a[key] + b[key] for key in a}


def usage_of(prepared, seqs) -> dict:
    """OpenAI's usage: each prompt's tokens once (its n choices share one prefill), every choice's new tokens."""
    usage = {"prompt_tokens": sum(len(ids) for (_, ids), _ in prepared),
             "completion_tokens": sum(len(seq.output_ids) for seq in seqs)}
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


def token_prompt(replica, ids: list[int], c, name: str, field: str):
    """A prompt given as token ids → ((its text, ids), its result so far), as `BloomReplica.prompt_ids`
    gives for a text; 400 naming the index of an id outside the model's vocabulary, or a prompt of no
    tokens or over max_input_tokens (never truncated: its end is what the model answers after)."""
    vocab = replica.model.config.vocab_size
    if not ids:
        raise ApiError(400, f"{name} is empty", field)
    for j, token in enumerate(ids):
        if not 0 <= token < vocab:
            raise ApiError(400, f"{name}[{j}]: token id {token} is not in the vocabulary [0, {vocab})", field)
    if len(ids) > c.max_input_tokens:
        raise ApiError(400, f"{name}: input has {len(ids)} tokens, over the limit of {c.max_input_tokens}", field)
    return (replica.tokenizer.decode(ids, skip_special_tokens=False), list(ids)), {"truncated": False,
                                                                                   "input_tokens": len(ids)}


def best_choices(group: list, n: int) -> list:
    """The n sequences of one prompt's group with the highest cumulative logprob (the whole group when it
    has n: no ranking, so no logprobs needed)."""
    if len(group) == n:
        return group
    return sorted(group, key=lambda seq: -sum(lp for lp, _ in seq.logprobs))[:n]


def make_choice(k: int, text: str, logprobs: dict | None, result: dict | None, chat: bool, top: int | None,
            streamed: bool = False, first: bool = False) -> dict:
    """One choice (or a streamed piece of it, with its result on the last) in OpenAI's shape: completions'
    {"text", "logprobs"}; chat's {"message"}, or {"delta"} when streamed (with the role on a choice's
    first chunk), and chat's logprobs object (top: alternatives per token)."""
    reason = finish_reason(result["finish_reason"]) if result else None
    if not chat:
        return {"index": k, "text": text, "logprobs": logprobs, "finish_reason": reason}
    message = {"role": "assistant", "content": text} if first or not streamed else {"content": text}
    return {"index": k, "delta" if streamed else "message": message, "logprobs": chat_logprobs(logprobs, top),
            "finish_reason": reason}


def token_bytes(token: str) -> list[int]:
    """A token's bytes; a piece of a character is written "bytes:\\xe4\\xbd" (see `token_text`)."""
    if token.startswith("bytes:\\x"):
        return [int(h, 16) for h in token[len("bytes:\\x"):].split("\\x")]
    return list(token.encode())


def chat_logprobs(logprobs: dict | None, top: int | None) -> dict | None:
    """Completions' logprobs object → chat's {"content": [{token, logprob, bytes, top_logprobs}]}, the
    `top` most likely alternatives per token."""
    if logprobs is None:
        return None

    def entry(token, lp):
        return {"token": token, "logprob": lp, "bytes": token_bytes(token)}

    return {"content": [{**entry(token, lp), "top_logprobs": [entry(*alt) for alt in list(alts.items())[:top]]}
                        for token, lp, alts in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                                   logprobs["top_logprobs"])]}
