"""The online endpoint: a Ray Serve deployment (FastAPI ingress) over the same BloomReplica as the
offline job, so a request gets exactly what the job writes for the same row.

Routes: POST /v1/generate, /v1/classify, /v1/ner, /v1/qa (one item or a list, per-request parameters),
OpenAI-style POST /v1/completions (`stream: true` answers with server-sent events) and GET /v1/models,
GET /healthz (alive) and /readyz (models loaded). Concurrent requests are batched with @serve.batch,
batches capped by a token budget; batch size and wait are re-tunable through `user_config`.
"""


import asyncio
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.metrics import Counter, Histogram

from .config import LabelConfig
from .replica import BloomReplica

logger = logging.getLogger("bloomline.serve")
app = FastAPI(title="Bloomline", docs_url=None, redoc_url=None)


# ----------------------------------------------------------------------------- request and response models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateParams(_Strict):
    max_new_tokens: int | None = Field(None, ge=0)
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: list[str] | None = None


class ClassifyParams(_Strict):
    candidate_labels: list[str] | None = None
    threshold: float | None = Field(None, ge=0, le=1)


class NerParams(_Strict):
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] | None = None
    ignore_labels: list[str] | None = None


class QaParams(_Strict):
    max_answer_len: int | None = Field(None, ge=1)


class QaItem(_Strict):
    question: str
    context: str


class TextRequest(_Strict):
    inputs: Union[str, list[str]]


class GenerateRequest(TextRequest):
    parameters: GenerateParams = GenerateParams()


class ClassifyRequest(TextRequest):
    parameters: ClassifyParams = ClassifyParams()


class NerRequest(TextRequest):
    parameters: NerParams = NerParams()


class QaRequest(_Strict):
    inputs: Union[QaItem, list[QaItem]]
    parameters: QaParams = QaParams()


class CompletionRequest(BaseModel):
    """The OpenAI completions request; fields we cannot honour are refused rather than ignored."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: Union[str, list[str]]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Literal[1] = 1
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    user: str | None = None


# ----------------------------------------------------------------------------- settings


def _api_key() -> str | None:
    """The API key from BLOOMLINE_API_KEY, or from the file named by BLOOMLINE_API_KEY_FILE; None: no auth."""
    if os.environ.get("BLOOMLINE_API_KEY"):
        return os.environ["BLOOMLINE_API_KEY"]
    if os.environ.get("BLOOMLINE_API_KEY_FILE"):
        return Path(os.environ["BLOOMLINE_API_KEY_FILE"]).read_text().strip()
    return None


def _openai_reason(reason: str | None) -> str | None:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    return JSONResponse({"error": {"message": e.message, "code": e.status}}, status_code=e.status)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, e: RequestValidationError):
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors())
    return JSONResponse({"error": {"message": f"invalid request: {problems}", "code": 422}}, status_code=422)


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception):
    logger.exception("request failed")  # the trace stays in the server's log, never in the answer
    return JSONResponse({"error": {"message": "internal error", "code": 500}}, status_code=500)


# ----------------------------------------------------------------------------- the deployment


@serve.deployment(max_ongoing_requests=64, max_queued_requests=128,
                  logging_config={"enable_access_log": False}, health_check_period_s=5)
@serve.ingress(app)
class BloomEndpoint:
    """One BloomReplica per configured task, loaded once per Serve replica.

    tasks: {task: LabelConfig fields} (model, dtype, limits, default parameters).
    max_body_bytes: larger request bodies get 413. max_new_tokens_cap: larger requests get 422."""

    def __init__(self, tasks: dict[str, dict], max_body_bytes: int = 1_000_000, max_new_tokens_cap: int = 512):
        self.replicas = {task: BloomReplica(LabelConfig(task=task, **settings)) for task, settings in tasks.items()}
        self.max_body_bytes, self.max_new_tokens_cap = max_body_bytes, max_new_tokens_cap
        self.api_key = _api_key()
        self.requests = Counter("bloomline_requests", "requests per route and status", tag_keys=("route", "status"))
        self.tokens = Counter("bloomline_tokens", "tokens in and out", tag_keys=("task", "direction"))
        self.batch_sizes = Histogram("bloomline_batch_size", "items per model batch",
                                     boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.latency = Histogram("bloomline_latency_ms", "request latency", boundaries=[10, 50, 100, 250, 500, 1000,
                                                                                        2500, 5000, 10000],
                                 tag_keys=("route",))
        self.batches_seen: list[int] = []  # recent batch sizes, for /v1/stats (observing batching in tests)
        self.batch_settings = {"max_batch_tokens": 8192, "batch_wait_timeout_s": 0.01}

    def reconfigure(self, user_config: dict) -> None:
        """user_config: {max_batch_tokens, batch_wait_timeout_s}; applied without a redeploy."""
        unknown = set(user_config) - {"max_batch_tokens", "batch_wait_timeout_s"}
        if unknown:
            raise ValueError(f"unknown user_config keys: {sorted(unknown)}")
        if "max_batch_tokens" in user_config:
            self._run_batch.set_max_batch_size(int(user_config["max_batch_tokens"]))
        if "batch_wait_timeout_s" in user_config:
            self._run_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        self.batch_settings.update(user_config)
        self.batches_seen = []

    # -- batching: every route's items go through one batched method, grouped by task inside --

    @serve.batch(max_batch_size=8192, batch_wait_timeout_s=0.01,
                 batch_size_fn=lambda items: sum(item[3] for item in items))
    async def _run_batch(self, items: list[tuple[str, dict, dict | None, int]]) -> list[dict]:
        """items: (task, row, params, token estimate) → one result per item, in order."""
        self.batch_sizes.observe(len(items))
        self.batches_seen = (self.batches_seen + [len(items)])[-1000:]
        out: list[dict | None] = [None] * len(items)
        for task in {item[0] for item in items}:
            idx = [i for i, item in enumerate(items) if item[0] == task]
            results = await asyncio.get_running_loop().run_in_executor(
                None, self.replicas[task].label_rows, [items[i][1] for i in idx], [items[i][2] for i in idx])
            for i, r in zip(idx, results):
                out[i] = r
        return out

    async def _label(self, route: str, task: str, rows: list[dict], params: dict, single: bool):
        start = time.perf_counter()
        params = self._validate(task, params)
        if not rows:
            raise ApiError(422, "inputs is empty")
        # ~4 bytes a token, for the batch's token budget; capped at the budget so that a large item
        # forms a batch of its own rather than being refused by Serve.
        size = min(len(json.dumps(rows)) // (4 * len(rows)) + 1, int(self.batch_settings["max_batch_tokens"]))
        results = await asyncio.gather(*[self._run_batch((task, row, params or None, size)) for row in rows])
        for r in results:
            if r.get("error", "").startswith("input has") if r.get("error") else False:
                raise ApiError(422, r["error"])
        keys = [f.name for f in self.replicas[task].fields]
        body = [{k: r.get(k) for k in keys} for r in results]
        for direction, key in (("in", "input_tokens"), ("out", "completion_tokens")):
            n = sum(r.get(key) or 0 for r in results)
            if n:  # Ray's counters take positive increments only
                self.tokens.inc(n, {"task": task, "direction": direction})
        self.latency.observe((time.perf_counter() - start) * 1000, {"route": route})
        self.requests.inc(1, {"route": route, "status": "200"})
        return body[0] if single else {"results": body}

    def _validate(self, task: str, params: dict) -> dict:
        """Drop unset parameters; 422 for values over the endpoint's caps or invalid for the task."""
        if task not in self.replicas:
            raise ApiError(404, f"this endpoint does not serve task {task!r} (it serves: {', '.join(self.replicas)})")
        params = {k: v for k, v in params.items() if v is not None}
        if params.get("max_new_tokens", 0) > self.max_new_tokens_cap:
            raise ApiError(422, f"max_new_tokens {params['max_new_tokens']} is over the limit of {self.max_new_tokens_cap}")
        try:
            self.replicas[task].with_params(params)
        except ValueError as e:
            raise ApiError(422, str(e)) from None
        return params

    def _text_rows(self, task: str, inputs) -> tuple[list[dict], bool]:
        column = self.replicas[task].config.text_column if task in self.replicas else "text"
        single = isinstance(inputs, str)
        return [{column: t} for t in ([inputs] if single else inputs)], single

    # -- routes --

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        return {"ready": True, "tasks": sorted(self.replicas)}

    @app.get("/v1/stats")
    async def stats(self, request: Request):
        self._check(request)
        return {"batch_sizes": self.batches_seen, **self.batch_settings}

    def _check(self, request: Request) -> None:
        """The API key and the body size limit, before any parsing."""
        if self.api_key is not None:
            header = request.headers.get("authorization", "")
            if header != f"Bearer {self.api_key}":
                raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
        size = request.headers.get("content-length")
        if size is not None and int(size) > self.max_body_bytes:
            raise ApiError(413, f"request body of {size} bytes is over the limit of {self.max_body_bytes}")

    async def _body(self, request: Request, model: type[BaseModel]):
        self._check(request)
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            raise ApiError(413, f"request body of {len(raw)} bytes is over the limit of {self.max_body_bytes}")
        try:
            return model.model_validate_json(raw)
        except ValueError as e:
            if hasattr(e, "errors"):
                raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
            raise ApiError(422, f"invalid JSON: {e}") from None

    async def _text_task(self, request: Request, task: str, model: type[BaseModel]):
        req = await self._body(request, model)
        rows, single = self._text_rows(task, req.inputs)
        return await self._label(task, task, rows, req.parameters.model_dump(), single)

    @app.post("/v1/generate")
    async def generate(self, request: Request):
        return await self._text_task(request, "generate", GenerateRequest)

    @app.post("/v1/classify")
    async def classify(self, request: Request):
        return await self._text_task(request, "classify", ClassifyRequest)

    @app.post("/v1/ner")
    async def ner(self, request: Request):
        return await self._text_task(request, "ner", NerRequest)

    @app.post("/v1/qa")
    async def qa(self, request: Request):
        req = await self._body(request, QaRequest)
        single = isinstance(req.inputs, QaItem)
        cfg = self.replicas["qa"].config if "qa" in self.replicas else LabelConfig(task="qa")
        rows = [{cfg.question_column: q.question, cfg.context_column: q.context}
                for q in ([req.inputs] if single else req.inputs)]
        return await self._label("qa", "qa", rows, req.parameters.model_dump(), single)

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._check(request)
        return {"object": "list", "data": [{"id": task, "object": "model", "owned_by": "bloomline",
                                            "root": r.config.model} for task, r in self.replicas.items()]}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        """OpenAI's completions API over the generate task; `stream: true` answers with server-sent events."""
        req = await self._body(request, CompletionRequest)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or None)
        params = {"max_new_tokens": req.max_tokens, "do_sample": req.temperature > 0, "top_p": req.top_p,
                  "stop": stop, "seed": req.seed}
        if req.temperature > 0:
            params["temperature"] = req.temperature
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        model_name = req.model or "generate"
        if req.stream:
            params = self._validate("generate", params)
            replica = self.replicas["generate"]
            for prompt in prompts:  # refuse over-long prompts before the 200 of a stream is sent
                n = len(replica.tokenizer.encode(prompt))
                if n > replica.config.max_input_tokens and replica.config.too_long == "error":
                    raise ApiError(422, f"input has {n} tokens, over the limit of {replica.config.max_input_tokens}")
            return StreamingResponse(self._stream(cid, created, model_name, prompts, params),
                                     media_type="text/event-stream")
        body = await self._label("completions", "generate", [{"text": p} for p in prompts], params, single=False)
        choices = [{"index": i, "text": r["generated_text"], "finish_reason": _openai_reason(r["finish_reason"]),
                    "logprobs": None} for i, r in enumerate(body["results"])]
        usage = {"prompt_tokens": sum(r["prompt_tokens"] for r in body["results"]),
                 "completion_tokens": sum(r["completion_tokens"] for r in body["results"])}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage}

    async def _stream(self, cid, created, model_name, prompts, params):
        """Server-sent events in OpenAI's format: chunks of text as tokens are generated (prompts one after
        another), a chunk with each prompt's finish_reason, then [DONE]. Streams bypass the batcher: each
        runs its own decode loop, in a worker thread so the event loop keeps serving."""
        replica = self.replicas["generate"]
        for i, prompt in enumerate(prompts):
            chunk = {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                     "choices": [{"index": i, "text": "", "finish_reason": None, "logprobs": None}]}
            async for text, result in iterate_in_threadpool(replica.stream_generate({"text": prompt}, params)):
                if text:
                    chunk["choices"][0]["text"] = text
                    yield f"data: {json.dumps(chunk)}\n\n"
                if result is not None:
                    chunk["choices"][0].update(text="", finish_reason=_openai_reason(result["finish_reason"]))
                    yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"


def build_app(args: dict[str, Any]) -> serve.Application:
    """`serve run` / Serve config entry point: args = {tasks: {...}, max_body_bytes, max_new_tokens_cap}."""
    return BloomEndpoint.bind(**args)


def app_from_config(config: dict) -> tuple[serve.Application, str, str, dict]:
    """A Serve config (the schema of serve_config.yaml, one application) → (application, name,
    route_prefix, http_options), with the deployment options (autoscaling, queue limits, user_config)
    applied."""
    (application,) = config["applications"]
    options = {k: v for d in application.get("deployments", []) for k, v in d.items() if k != "name"}
    bound = BloomEndpoint.options(**options).bind(**application.get("args", {}))
    return bound, application["name"], application.get("route_prefix", "/"), config.get("http_options", {})
