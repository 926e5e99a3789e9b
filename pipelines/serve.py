"""The online endpoint: a Ray Serve deployment (FastAPI ingress) over the same BloomReplica as the
offline job, so a request gets exactly what the job writes for the same row.

Routes: POST /v1/generate, /v1/classify, /v1/ner, /v1/qa (one item or a list, per-request parameters),
OpenAI-style POST /v1/completions (n choices, logprobs, echo; `stream: true` answers with server-sent
events) and GET /v1/models, GET /healthz (alive) and /readyz (models loaded). Generation requests,
streamed or not, are sequences of one continuous-batching engine per replica (bloom.engine): they join
and leave its running batch between decode steps. Classify, NER and QA requests are batched with
@serve.batch, batches capped by a token budget, re-tunable through `user_config`; they never wait
behind a generation.
"""


import asyncio
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from .config import LabelConfig
from .replica import BloomReplica, RowError
from .tasks import TASKS, TokenTexts, timings

logger = logging.getLogger("bloomline.serve")
# Our @serve.batch's max_batch_size counts tokens (batch_size_fn), not requests, so Serve's warning that it
# exceeds max_ongoing_requests compares unlike things: drop that one message.
logging.getLogger("ray.serve").addFilter(lambda record: "is larger than `max_ongoing_requests`" not in record.getMessage())
app = FastAPI(title="Bloomline", docs_url=None, redoc_url=None)


# ----------------------------------------------------------------------------- request models

# /v1/<task>: {"inputs": one item or a list, "parameters": the task's Params}, from the task objects.
REQUESTS = {name: task.request_model() for name, task in TASKS.items()}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None


class CompletionRequest(BaseModel):
    """The OpenAI completions request; fields we cannot honour are refused rather than ignored (those in
    NO_OP are taken at the values that change nothing)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: Union[str, list[str]]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None


# OpenAI's fields that we take only at the value that changes nothing (or null); any other value is a 422.
NO_OP = {"frequency_penalty": 0, "presence_penalty": 0, "best_of": 1, "logit_bias": {}, "suffix": ""}


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


def _choice_pieces(replica, seq, c, echo: bool):
    """One completion choice as (text, result or None, logprobs or None) pieces: the prompt first when
    echoed (with its tokens' logprobs when asked, the first token's None), then the new text as
    `Generate.texts` gives it; text offsets count from the start of the choice's text."""
    if not echo:
        yield from replica.task.texts(replica, seq, c)
        return
    prompt = TokenTexts(replica.tokenizer, seq.prompt_ids, skip_special_tokens=False)
    pieces = replica.task.texts(replica, seq, c, len(prompt.text))
    first = next(pieces)  # the prompt's logprobs are complete once its first new text (or its end) comes
    yield prompt.text, None, replica.task.logprobs(replica, seq.prompt_logprobs, prompt, 0, len(prompt.ids))
    yield first
    yield from pieces


def _join_logprobs(a: dict | None, b: dict | None) -> dict | None:
    """Two consecutive pieces' logprobs as one."""
    return b if a is None else a if b is None else {key: a[key] + b[key] for key in a}


def _usage(prepared, seqs) -> dict:
    """OpenAI's usage: each prompt's tokens once (its n choices share one prefill), every choice's new tokens."""
    usage = {"prompt_tokens": sum(len(ids) for (_, ids), _ in prepared),
             "completion_tokens": sum(len(seq.output_ids) for seq in seqs)}
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    return JSONResponse({"error": {"message": e.message, "code": e.status}}, status_code=e.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):  # unknown routes (404), wrong methods (405)
    status, path = e.status_code, request.url.path
    *_, parent, last = ["", "", *path.rstrip("/").split("/")]
    if status == 405 and parent == "v1" and last not in (*TASKS, "completions", "models", "stats"):
        status = 404  # only POST /v1/{task} matched the path, and there is no such task
    message = {404: f"no route {path}", 405: f"{request.method} is not allowed on {path}"}
    return JSONResponse({"error": {"message": message.get(status, str(e.detail)), "code": status}},
                        status_code=status, headers=getattr(e, "headers", None) if status == e.status_code else None)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, e: RequestValidationError):
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors())
    return JSONResponse({"error": {"message": f"invalid request: {problems}", "code": 422}}, status_code=422)


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception):
    logger.exception("request failed")  # the trace stays in the server's log, never in the answer
    return JSONResponse({"error": {"message": "internal error", "code": 500}}, status_code=500)


# ----------------------------------------------------------------------------- the deployment


# Everything the routes use is defined above: serve.ingress freezes (pickles) the app right here.
# No logging_config here: Serve applies a config file's logging_config only to deployments that set none.
# Ray admits up to max_ongoing_requests per replica, above the app's own max_requests, so that the app
# sheds load itself with a 503 in its error shape; Ray's queue (plain-text 503) is only a backstop.
@serve.deployment(max_ongoing_requests=256, max_queued_requests=64, health_check_period_s=5)
@serve.ingress(app)
class BloomEndpoint:
    """One BloomReplica per configured task, loaded once per Serve replica.

    tasks: {task: LabelConfig fields} (model, dtype, limits, default parameters).
    max_body_bytes: larger request bodies get 413. max_new_tokens_cap: larger requests get 422.
    max_n / max_logprobs: completions asking for more choices per prompt / top logprobs get 422.
    max_requests: labeling requests and streams this replica holds at once (running or waiting for the
    batcher or the engine); more get 503 at once, to be retried (or sent to another replica)."""

    def __init__(self, tasks: dict[str, dict], max_body_bytes: int = 1_000_000, max_new_tokens_cap: int = 512,
                 max_requests: int = 192, max_n: int = 8, max_logprobs: int = 5):
        self.replicas = {task: BloomReplica(LabelConfig(task=task, **settings),
                                            max_new_tokens_cap=max_new_tokens_cap if task == "generate" else None)
                         for task, settings in tasks.items()}
        self.max_body_bytes, self.max_new_tokens_cap = max_body_bytes, max_new_tokens_cap
        self.max_n, self.max_logprobs = max_n, max_logprobs
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
        self._account(route, task, start, *(sum(r.get(key) or 0 for r in results)
                                             for key in ("input_tokens", "completion_tokens")))
        return body[0] if single else {"results": body}

    def _account(self, route: str, task: str, start: float, tokens_in: int, tokens_out: int) -> None:
        """Metrics of a request answered with 200."""
        for direction, n in (("in", tokens_in), ("out", tokens_out)):
            if n:  # Ray's counters take positive increments only
                self.tokens.inc(n, {"task": task, "direction": direction})
        self.latency.observe((time.perf_counter() - start) * 1000, {"route": route})
        self.requests.inc(1, {"route": route, "status": "200"})

    def _submit(self, rows: list[dict], params: dict, field: str, listed: bool, **choices):
        """Check every row, then submit each as sequences of the generate replica's engine (choices: n,
        logprobs, prompt_logprobs of `Generate.submit`); 422 naming the first row that cannot be generated
        for (before anything is submitted). Returns (settings, [(prompt, ids), result] per row, the
        sequences per row)."""
        replica = self.replicas["generate"]
        c = replica.with_params(params)
        prepared = []
        for i, row in enumerate(rows):
            try:
                prepared.append(replica.prompt_ids(row, c))
            except RowError as e:
                raise ApiError(422, f"{f'{field}[{i}]' if listed else field}: {e}") from None
        groups = []
        try:
            for (prompt, ids), _ in prepared:
                groups.append(replica.task.submit(replica, prompt, ids, c, **choices))
        except ValueError as e:  # cannot fit the engine's slots
            for seq in (s for group in groups for s in group):
                replica.engine.abort(seq)
            raise ApiError(422, f"{field}: {e}") from None
        return c, prepared, groups

    async def _wait(self, seqs: list) -> None:
        """Wait for the sequences to end; a request cancelled before (client gone) aborts them."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*[loop.run_in_executor(self.waiters, seq.result) for seq in seqs])
        finally:
            for seq in seqs:
                if not seq.finished:
                    self.replicas["generate"].engine.abort(seq)
        for seq in seqs:
            self._observe(seq)

    async def _generate(self, rows: list[dict], params: dict, field: str, listed: bool) -> list[dict]:
        """Generate for every row on the engine (joining its running batch); results as `label_rows`'."""
        replica = self.replicas["generate"]
        c, prepared, groups = self._submit(rows, params, field, listed)
        seqs = [seq for (seq,) in groups]
        await self._wait(seqs)
        return [{**result, **replica.task.result(replica, c, seq.output_ids, seq.finish_reason, len(ids))}
                for ((_, ids), result), seq in zip(prepared, seqs)]

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
        """OpenAI's completions API over the generate task: n choices per prompt (indexed i * n + j, as
        OpenAI numbers them), logprobs, echo; `stream: true` answers with server-sent events."""
        req = await self._body(request, CompletionRequest)
        if "generate" not in self.replicas:
            raise ApiError(404, "this endpoint does not serve task 'generate'")
        if req.model is not None and req.model != "generate":
            raise ApiError(404, f"model {req.model!r} is not served here (completions serve: generate)")
        self._check_completion(req)
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or None)
        params = self._validate("generate", {"max_new_tokens": req.max_tokens, "do_sample": req.temperature > 0,
                                             "top_p": req.top_p, "stop": stop, "seed": req.seed,
                                             "temperature": req.temperature if req.temperature > 0 else None})
        replica = self.replicas["generate"]
        rows = [replica.task.item_row(p, replica.config) for p in ([req.prompt] if isinstance(req.prompt, str)
                                                                   else req.prompt)]
        if not rows:
            raise ApiError(422, "prompt is empty")
        choices = {"n": req.n, "logprobs": req.logprobs, "prompt_logprobs": req.logprobs if req.echo else None}
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": "generate"}
        listed = isinstance(req.prompt, list)
        if req.stream:
            self._hold(count=False)  # counted while the stream runs (a stream never started holds nothing)
            c, prepared, groups = self._submit(rows, params, "prompt", listed, **choices)
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(head, c, prepared, groups, req.echo, usage),
                                     media_type="text/event-stream")
        self._hold()
        try:
            start = time.perf_counter()
            c, prepared, groups = self._submit(rows, params, "prompt", listed, **choices)
            seqs = [seq for group in groups for seq in group]
            await self._wait(seqs)
            answer = []
            for k, seq in enumerate(seqs):
                text, logprobs, result = "", None, None
                for piece, result, piece_logprobs in _choice_pieces(replica, seq, c, req.echo):
                    text += piece
                    logprobs = _join_logprobs(logprobs, piece_logprobs)
                answer.append({"index": k, "text": text, "logprobs": logprobs,
                               "finish_reason": _openai_reason(result["finish_reason"])})
            usage = _usage(prepared, seqs)
            self._account("completions", "generate", start, usage["prompt_tokens"], usage["completion_tokens"])
        finally:
            self.held -= 1
        return {**head, "choices": answer, "usage": usage}

    def _check_completion(self, req: CompletionRequest) -> None:
        """422 naming the field for what this endpoint cannot honour or allows no more of."""
        for name, value in NO_OP.items():
            given = getattr(req, name)
            if given is not None and given != value:
                raise ApiError(422, f"{name} {given!r} is not supported (only {value!r} or null)")
        if req.best_of is not None and req.best_of < req.n:
            raise ApiError(422, f"best_of {req.best_of} must be at least n ({req.n})")
        if req.stream_options is not None and not req.stream:
            raise ApiError(422, "stream_options: only with stream: true")
        if req.max_tokens > self.max_new_tokens_cap:
            raise ApiError(422, f"max_tokens {req.max_tokens} is over the limit of {self.max_new_tokens_cap}")
        if req.n > self.max_n:
            raise ApiError(422, f"n {req.n} is over the limit of {self.max_n}")
        if req.logprobs is not None and req.logprobs > self.max_logprobs:
            raise ApiError(422, f"logprobs {req.logprobs} is over the limit of {self.max_logprobs}")

    async def _stream(self, head, c, prepared, groups, echo: bool, usage: bool):
        """Server-sent events in OpenAI's format: every choice's text as its tokens come (the choices
        interleaved, each chunk naming its index, with the logprobs of the tokens it begins), a chunk with
        each choice's finish_reason, the usage when asked, then [DONE]. Every choice is a sequence of the
        engine's running batch; a client that goes away aborts them (their slots are free the next step)."""
        self.held += 1
        replica, loop, ready = self.replicas["generate"], asyncio.get_running_loop(), asyncio.Queue()
        seqs = [seq for group in groups for seq in group]

        async def pump(k, pieces):  # one choice's pieces into `ready`, read on the waiters' threads
            try:
                while (piece := await loop.run_in_executor(self.waiters, next, pieces, None)) is not None:
                    ready.put_nowait((k, piece))
                ready.put_nowait((k, None))
            except Exception as e:  # the engine failed: the stream ends with it
                ready.put_nowait((k, e))

        pumps = [asyncio.create_task(pump(k, _choice_pieces(replica, seq, c, echo))) for k, seq in enumerate(seqs)]
        try:
            for _ in range(len(seqs)):
                while (item := await ready.get())[1] is not None:
                    k, piece = item
                    if isinstance(piece, Exception):
                        raise piece
                    text, result, logprobs = piece
                    if text or logprobs or result:
                        reason = _openai_reason(result["finish_reason"]) if result else None
                        choice = {"index": k, "text": text, "logprobs": logprobs, "finish_reason": reason}
                        yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
            for seq in seqs:
                self._observe(seq)
            if usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(prepared, seqs)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.held -= 1
            for task in pumps:
                task.cancel()
            for seq in seqs:
                if not seq.finished:
                    replica.engine.abort(seq)

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
