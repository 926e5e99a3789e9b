"""The online endpoint: a Ray Serve deployment (FastAPI ingress) over the same BloomReplica as the
offline job, so a request gets exactly what the job writes for the same row.

Routes: POST /v1/generate, /v1/classify, /v1/ner, /v1/qa (one item or a list, per-request parameters),
OpenAI-style POST /v1/completions (`stream: true` answers with server-sent events) and GET /v1/models,
GET /healthz (alive) and /readyz (models loaded). Generation requests, streamed or not, are sequences
of one continuous-batching engine per replica (bloom.engine): they join and leave its running batch
between decode steps. Classify, NER and QA requests are batched with @serve.batch, batches capped by a
token budget, re-tunable through `user_config`; they never wait behind a generation.
"""


import asyncio
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from .config import LabelConfig
from .replica import BloomReplica, RowError
from .tasks import TASKS, timings

logger = logging.getLogger("bloomline.serve")
# Our @serve.batch's max_batch_size counts tokens (batch_size_fn), not requests, so Serve's warning that it
# exceeds max_ongoing_requests compares unlike things: drop that one message.
logging.getLogger("ray.serve").addFilter(lambda record: "is larger than `max_ongoing_requests`" not in record.getMessage())
app = FastAPI(title="Bloomline", docs_url=None, redoc_url=None)


# ----------------------------------------------------------------------------- request models

# /v1/<task>: {"inputs": one item or a list, "parameters": the task's Params}, from the task objects.
REQUESTS = {name: task.request_model() for name, task in TASKS.items()}


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


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):  # unknown routes (404), wrong methods (405)
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return JSONResponse({"error": {"message": message.get(e.status_code, str(e.detail)), "code": e.status_code}},
                        status_code=e.status_code, headers=getattr(e, "headers", None))


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, e: RequestValidationError):
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors())
    return JSONResponse({"error": {"message": f"invalid request: {problems}", "code": 422}}, status_code=422)


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception):
    logger.exception("request failed")  # the trace stays in the server's log, never in the answer
    return JSONResponse({"error": {"message": "internal error", "code": 500}}, status_code=500)


# ----------------------------------------------------------------------------- the deployment


# No logging_config here: Serve applies a config file's logging_config only to deployments that set none.
# Ray admits up to max_ongoing_requests per replica, above the app's own max_requests, so that the app
# sheds load itself with a 503 in its error shape; Ray's queue (plain-text 503) is only a backstop.
@serve.deployment(max_ongoing_requests=256, max_queued_requests=64, health_check_period_s=5)
@serve.ingress(app)
class BloomEndpoint:
    """One BloomReplica per configured task, loaded once per Serve replica.

    tasks: {task: LabelConfig fields} (model, dtype, limits, default parameters).
    max_body_bytes: larger request bodies get 413. max_new_tokens_cap: larger requests get 422.
    max_requests: labeling requests and streams this replica holds at once (running or waiting for the
    batcher or the engine); more get 503 at once, to be retried (or sent to another replica)."""

    def __init__(self, tasks: dict[str, dict], max_body_bytes: int = 1_000_000, max_new_tokens_cap: int = 512,
                 max_requests: int = 192):
        self.replicas = {task: BloomReplica(LabelConfig(task=task, **settings),
                                            max_new_tokens_cap=max_new_tokens_cap if task == "generate" else None)
                         for task, settings in tasks.items()}
        self.max_body_bytes, self.max_new_tokens_cap = max_body_bytes, max_new_tokens_cap
        self.max_requests, self.held = max_requests, 0  # held: requests in progress (one event loop: no lock)
        if "generate" in self.replicas:  # every generation request joins this engine's running batch
            self.replicas["generate"].start_engine()
        # Threads that only wait for a sequence to end (the engine computes on its own thread).
        self.waiters = ThreadPoolExecutor(max_workers=512, thread_name_prefix="bloomline-wait")
        self.api_key = _api_key()
        self.requests = Counter("bloomline_requests", "requests per route and status", tag_keys=("route", "status"))
        self.tokens = Counter("bloomline_tokens", "tokens in and out", tag_keys=("task", "direction"))
        self.batch_sizes = Histogram("bloomline_batch_size", "items per model batch",
                                     boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.latency = Histogram("bloomline_latency_ms", "request latency", boundaries=[10, 50, 100, 250, 500, 1000,
                                                                                        2500, 5000, 10000],
                                 tag_keys=("route",))
        self.seconds = {name: Histogram(f"bloomline_{name}_ms", text, boundaries=[1, 5, 10, 25, 50, 100, 250, 500,
                                                                                    1000, 2500, 5000, 10000])
                        for name, text in (("ttft", "generation: time to first token"),
                                           ("tpot", "generation: time per output token after the first"),
                                           ("queue", "generation: wait for a cache slot"))}
        self.engine_gauges = {name: Gauge(f"bloomline_engine_{name}", f"generation engine: {name.replace('_', ' ')}")
                              for name in ("running", "waiting", "slots_used", "cache_tokens_held")}
        self.batches_seen: list[int] = []  # recent batch sizes, for /v1/stats (observing batching in tests)
        self.batch_settings = {"max_batch_tokens": 8192, "batch_wait_timeout_s": 0.01}
        # Classify, NER and QA each batch on a queue of their own (and generation on the engine), so that
        # no task's request waits behind another task's batch.
        self.batchers = {task: self._batcher(task) for task in self.replicas if task != "generate"}

    def reconfigure(self, user_config: dict) -> None:
        """user_config: {max_batch_tokens, batch_wait_timeout_s}; applied without a redeploy."""
        unknown = set(user_config) - {"max_batch_tokens", "batch_wait_timeout_s"}
        if unknown:
            raise ValueError(f"unknown user_config keys: {sorted(unknown)}")
        for batcher in self.batchers.values():
            if "max_batch_tokens" in user_config:
                batcher.set_max_batch_size(int(user_config["max_batch_tokens"]))
            if "batch_wait_timeout_s" in user_config:
                batcher.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        self.batch_settings.update(user_config)
        self.batches_seen = []

    # -- batching: one queue per labeling task; a batch's items are one task's rows, with their own parameters

    def _batcher(self, task: str):
        """An async function of one (row, params, token estimate) item → its result, batched by Serve with
        the other items of `task` up to max_batch_tokens (re-tunable in reconfigure)."""
        replica = self.replicas[task]

        async def run(items: list[tuple[dict, dict | None, int]]) -> list[dict]:
            self.batch_sizes.observe(len(items))
            self.batches_seen = (self.batches_seen + [len(items)])[-1000:]
            return await asyncio.get_running_loop().run_in_executor(
                None, replica.label_rows, [row for row, _, _ in items], [params for _, params, _ in items])

        return serve.batch(max_batch_size=int(self.batch_settings["max_batch_tokens"]),
                           batch_wait_timeout_s=float(self.batch_settings["batch_wait_timeout_s"]),
                           batch_size_fn=lambda items: sum(item[2] for item in items))(run)

    def _hold(self, count: bool = True) -> None:
        """Count a request in (count=False: only check), or refuse it with 503 when the replica holds
        max_requests already."""
        if self.held >= self.max_requests:
            self.requests.inc(1, {"route": "any", "status": "503"})
            raise ApiError(503, f"this replica is busy with {self.held} requests (max_requests); retry shortly")
        self.held += count

    async def _label(self, route: str, task: str, rows: list[dict], params: dict, single: bool,
                     field: str = "inputs", listed: bool | None = None):
        """Label a request's rows through the batcher; 422 naming the first item that cannot be labeled.
        single: answer one object (else {"results": [...]}); field / listed: how the request named its items."""
        self._hold()
        try:
            return await self._label_held(route, task, rows, params, single, field, listed)
        finally:
            self.held -= 1

    async def _label_held(self, route, task, rows, params, single, field, listed):
        listed = not single if listed is None else listed
        start = time.perf_counter()
        params = self._validate(task, params)
        if not rows:
            raise ApiError(422, f"{field} is empty")
        if task == "generate":
            results = await self._generate(rows, params, field, listed)
        else:  # classify, ner, qa: each batched on its own queue, never behind a generation or each other
            # ~4 bytes a token, for the batch's token budget; capped at the budget so that a large item
            # forms a batch of its own rather than being refused by Serve.
            size = min(len(json.dumps(rows)) // (4 * len(rows)) + 1, int(self.batch_settings["max_batch_tokens"]))
            results = await asyncio.gather(*[self.batchers[task]((row, params or None, size)) for row in rows])
        for i, r in enumerate(results):  # an item that cannot be labeled refuses the request (one rule, 422)
            if r.get("error"):
                raise ApiError(422, f"{f'{field}[{i}]' if listed else field}: {r['error']}")
        keys = [f.name for f in self.replicas[task].fields]
        body = [{k: r.get(k) for k in keys} for r in results]
        for direction, key in (("in", "input_tokens"), ("out", "completion_tokens")):
            n = sum(r.get(key) or 0 for r in results)
            if n:  # Ray's counters take positive increments only
                self.tokens.inc(n, {"task": task, "direction": direction})
        self.latency.observe((time.perf_counter() - start) * 1000, {"route": route})
        self.requests.inc(1, {"route": route, "status": "200"})
        return body[0] if single else {"results": body}

    def _submit(self, rows: list[dict], params: dict, field: str, listed: bool):
        """Check every row, then submit each as a sequence of the generate replica's engine; 422 naming
        the first row that cannot be generated for (before anything is submitted)."""
        replica = self.replicas["generate"]
        c = replica.with_params(params)
        prepared = []
        for i, row in enumerate(rows):
            try:
                prepared.append(replica.prompt_ids(row, c))
            except RowError as e:
                raise ApiError(422, f"{f'{field}[{i}]' if listed else field}: {e}") from None
        try:
            return c, prepared, [replica.task.submit(replica, prompt, ids, c) for (prompt, ids), _ in prepared]
        except ValueError as e:  # cannot fit the engine's slots
            raise ApiError(422, f"{field}: {e}") from None

    async def _generate(self, rows: list[dict], params: dict, field: str, listed: bool) -> list[dict]:
        """Generate for every row on the engine (joining its running batch); results as `label_rows`'.
        A request cancelled before its end (client gone) aborts its sequences."""
        replica = self.replicas["generate"]
        c, prepared, seqs = self._submit(rows, params, field, listed)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*[loop.run_in_executor(self.waiters, seq.result) for seq in seqs])
        finally:
            for seq in seqs:
                if not seq.finished:
                    replica.engine.abort(seq)
        out = []
        for ((_, ids), result), seq in zip(prepared, seqs):
            self._observe(seq)
            out.append({**result, **replica.task.result(replica, c, seq.output_ids, seq.finish_reason, len(ids))})
        return out

    def _observe(self, seq) -> None:
        for name, value in timings(seq).items():
            self.seconds[name].observe(value * 1000)
        for name, value in self.replicas["generate"].engine.stats().items():
            if name in self.engine_gauges:
                self.engine_gauges[name].set(value)

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
        engine = self.replicas["generate"].engine.stats() if "generate" in self.replicas else None
        return {"batch_sizes": self.batches_seen, **self.batch_settings, "engine": engine}

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
        if "generate" not in self.replicas:
            raise ApiError(404, "this endpoint does not serve task 'generate'")
        if req.model is not None and req.model != "generate":
            raise ApiError(404, f"model {req.model!r} is not served here (completions serve: generate)")
        if req.max_tokens > self.max_new_tokens_cap:
            raise ApiError(422, f"max_tokens {req.max_tokens} is over the limit of {self.max_new_tokens_cap}")
        model_name = "generate"
        replica = self.replicas["generate"]
        rows = [replica.task.item_row(p, replica.config) for p in prompts]
        if req.stream:
            params = self._validate("generate", params)
            c = replica.with_params(params)
            for i, row in enumerate(rows):  # refuse a bad prompt before the 200 of a stream is sent
                try:
                    replica.prompt_ids(row, c)
                except RowError as e:
                    raise ApiError(422, f"prompt{'' if isinstance(req.prompt, str) else f'[{i}]'}: {e}") from None
            self._hold(count=False)  # counted while the stream runs (a stream never started holds nothing)
            return StreamingResponse(self._stream(cid, created, model_name, prompts, params),
                                     media_type="text/event-stream")
        body = await self._label("completions", "generate", rows, params, single=False, field="prompt",
                                 listed=isinstance(req.prompt, list))
        choices = [{"index": i, "text": r["generated_text"], "finish_reason": _openai_reason(r["finish_reason"]),
                    "logprobs": None} for i, r in enumerate(body["results"])]
        usage = {"prompt_tokens": sum(r["prompt_tokens"] for r in body["results"]),
                 "completion_tokens": sum(r["completion_tokens"] for r in body["results"])}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage}

    async def _stream(self, cid, created, model_name, prompts, params):
        """Server-sent events in OpenAI's format: chunks of text as tokens are generated (prompts one after
        another), a chunk with each prompt's finish_reason, then [DONE]. Each prompt is a sequence of the
        engine's running batch; a client that goes away aborts it (its cache slot is free the next step)."""
        self.held += 1
        try:
            async for event in self._events(cid, created, model_name, prompts, params):
                yield event
        finally:
            self.held -= 1

    async def _events(self, cid, created, model_name, prompts, params):
        replica = self.replicas["generate"]
        for i, prompt in enumerate(prompts):
            chunk = {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                     "choices": [{"index": i, "text": "", "finish_reason": None, "logprobs": None}]}
            seq, texts = replica.open_stream(replica.task.item_row(prompt, replica.config), params)
            try:
                async for text, result in iterate_in_threadpool(texts):
                    if text:
                        chunk["choices"][0]["text"] = text
                        yield f"data: {json.dumps(chunk)}\n\n"
                    if result is not None:
                        chunk["choices"][0].update(text="", finish_reason=_openai_reason(result["finish_reason"]))
                        yield f"data: {json.dumps(chunk)}\n\n"
            finally:
                if not seq.finished:
                    replica.engine.abort(seq)
            self._observe(seq)
        yield "data: [DONE]\n\n"

    # Declared last: /v1/completions, /v1/models and /v1/stats match first.
    @app.post("/v1/{task}")
    async def label(self, task: str, request: Request):
        """/v1/generate, /v1/classify, /v1/ner, /v1/qa: {"inputs": item or [items], "parameters": {...}}."""
        if task not in TASKS:
            raise ApiError(404, f"no route /v1/{task}")
        req = await self._body(request, REQUESTS[task])
        if task not in self.replicas:
            raise ApiError(404, f"this endpoint does not serve task {task!r} (it serves: {', '.join(self.replicas)})")
        replica = self.replicas[task]
        single = not isinstance(req.inputs, list)
        rows = [replica.task.item_row(item, replica.config) for item in ([req.inputs] if single else req.inputs)]
        return await self._label(task, task, rows, req.parameters.model_dump(), single)


def build_app(args: dict[str, Any]) -> serve.Application:
    """`serve run` / Serve config entry point: args = {tasks: {...}, max_body_bytes, max_new_tokens_cap}."""
    return BloomEndpoint.bind(**args)


def app_from_config(config: dict) -> tuple[serve.Application, str, str, dict]:
    """A Serve config (the schema of serve_config.yaml, one application) → (application, name,
    route_prefix, http_options), with the deployment options (autoscaling, queue limits, user_config)
    applied."""
    (application,) = config["applications"]
    options = {k: v for d in application.get("deployments", []) for k, v in d.items() if k != "name"}
    logs = application.get("logging_config") or config.get("logging_config")  # as `serve run` applies them
    if logs:
        options.setdefault("logging_config", logs)
    bound = BloomEndpoint.options(**options).bind(**application.get("args", {}))
    return bound, application["name"], application.get("route_prefix", "/"), config.get("http_options", {})
