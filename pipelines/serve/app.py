"""The online endpoint's routes: a Ray Serve deployment (FastAPI ingress) over the same BloomReplica as
the offline job, so a request gets exactly what the job writes for the same row. OpenAI's request and
answer shapes are in `openai`, its error shape in `errors`, chat templates in `chat`.

Routes: POST /v1/generate, /v1/classify, /v1/ner, /v1/qa, /v1/embed (one item or a list, per-request parameters),
OpenAI-style POST /v1/completions (text or token-id prompts, n and best_of choices, logprobs, echo,
logit_bias; `stream: true` answers with server-sent events), POST /v1/chat/completions (where a chat
template is set: the messages rendered into a prompt, then the completions path), POST /v1/embeddings
(OpenAI's shape over the task that embeds, batched with its /v1/{task} requests), vLLM's POST /classify and
/score (`pooling`: over the tasks that classify and embed), GET /v1/models and
/v1/models/{id}, GET /healthz (alive) and /readyz (models loaded). Every error, on every route, is
OpenAI's object {"error": {"message", "type", "param", "code"}} with the status of its kind (400 invalid,
401, 404, 413, 503). Generation requests,
streamed or not, are sequences of one continuous-batching engine per replica (bloom.engine): they join
and leave its running batch between decode steps. Classify, NER, QA and embed requests are batched with
@serve.batch, batches capped by a token budget, re-tunable through `user_config`; they never wait
behind a generation.
"""


import asyncio
import json
import logging
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from .. import adapters
from ..config import LabelConfig
from ..replica import BloomReplica, RowError
from ..tasks import TASKS, timings
from ..tasks.settings import SettingError, openai_names
from .chat import ChatTemplateError, checkpoint_chat_template, compile_template, render_chat
from . import pooling
from .errors import ApiError, error_answer
from .openai import (NO_OP, ChatRequest, CompletionRequest, EmbeddingRequest, SamplingRequest, best_choices,
                     choice_pieces, constraint_settings, embedding_item, join_logprobs, make_choice, token_prompt,
                     usage_of)

logger = logging.getLogger("bloomline.serve")
ADAPTERS_REPORTED = 16  # adapters a replica reports holding to Serve's router (see _loaded_adapter)
# Our @serve.batch's max_batch_size counts tokens (batch_size_fn), not requests, so Serve's warning that it
# exceeds max_ongoing_requests compares unlike things: drop that one message.
logging.getLogger("ray.serve").addFilter(lambda record: "is larger than `max_ongoing_requests`" not in record.getMessage())
app = FastAPI(title="Bloomline", docs_url=None, redoc_url=None)


# ----------------------------------------------------------------------------- settings

def _api_key() -> str | None:
    """The API key from BLOOMLINE_API_KEY, or from the file named by BLOOMLINE_API_KEY_FILE; None: no auth."""
    if os.environ.get("BLOOMLINE_API_KEY"):
        return os.environ["BLOOMLINE_API_KEY"]
    if os.environ.get("BLOOMLINE_API_KEY_FILE"):
        return Path(os.environ["BLOOMLINE_API_KEY_FILE"]).read_text().strip()
    return None


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    return error_answer(e.status, e.message, e.param)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):  # unknown routes (404), wrong methods (405)
    status, path = e.status_code, request.url.path
    *_, parent, last = ["", "", *path.rstrip("/").split("/")]
    if status == 405 and parent == "v1" and last not in (*TASKS, "completions", "models", "stats", "embeddings"):
        status = 404  # only POST /v1/{task} matched the path, and there is no such task
    message = {404: f"no route {path}", 405: f"{request.method} is not allowed on {path}"}
    return error_answer(status, message.get(status, str(e.detail)),
                        headers=getattr(e, "headers", None) if status == e.status_code else None)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, e: RequestValidationError):
    errors = e.errors()
    where = [".".join(str(p) for p in err["loc"][1:]) or "body" for err in errors]
    problems = "; ".join(f"{name}: {err['msg']}" for name, err in zip(where, errors))
    # The field at fault: the top-level one (e.g. "prompt" for prompt.list[int].0, where pydantic names the
    # union's branch), or the parameter within a label route's "parameters".
    loc = next((err["loc"][1:] for err in errors if len(err["loc"]) > 1), ())
    param = ".".join(map(str, loc[:2])) if loc[:1] == ("parameters",) else (str(loc[0]) if loc else None)
    return error_answer(400, f"invalid request: {problems}", param)


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception):
    logger.exception("request failed")  # the trace stays in the server's log, never in the answer
    return error_answer(500, "internal error")


# ----------------------------------------------------------------------------- the deployment


# Everything the routes use is defined above: serve.ingress freezes (pickles) the app right here.
# No logging_config here: Serve applies a config file's logging_config only to deployments that set none.
# Ray admits up to max_ongoing_requests per replica, above the app's own max_requests, so that the app
# sheds load itself with a 503 in its error shape; Ray's queue (plain-text 503) is only a backstop.
@serve.deployment(max_ongoing_requests=256, max_queued_requests=64, health_check_period_s=5)
@serve.ingress(app)
class BloomEndpoint:
    """One BloomReplica per configured task, loaded once per Serve replica.

    tasks: {task: LabelConfig fields} (model, dtype, limits, default parameters); the generate task may also
    set chat_template (Jinja, as transformers'), else its checkpoint's tokenizer_config.json gives it.
    max_body_bytes: larger request bodies get 413. max_new_tokens_cap: larger requests get 400.
    max_n / max_logprobs: completions asking for more choices (n, best_of) per prompt / top logprobs get 400.
    max_requests: labeling requests and streams this replica holds at once (running or waiting for the
    batcher or the engine); more get 503 at once, to be retried (or sent to another replica)."""

    def __init__(self, tasks: dict[str, dict], max_body_bytes: int = 1_000_000, max_new_tokens_cap: int = 512,
                 max_requests: int = 192, max_n: int = 8, max_logprobs: int = 5):
        # chat_template: an endpoint-only setting of the task that generates (no labeling run reads it).
        settings = {task: dict(s) for task, s in tasks.items()}
        engine_tasks = [task for task in settings if TASKS.get(task) and TASKS[task].runs_on_engine]
        chat_template = settings[engine_tasks[0]].pop("chat_template", None) if engine_tasks else None
        self.replicas = {task: BloomReplica(LabelConfig(task=task, **s), max_new_tokens_cap=max_new_tokens_cap)
                         for task, s in settings.items()}
        # The replica whose task runs on an engine: OpenAI's routes serve it, named by its task.
        self.generator = next((r for r in self.replicas.values() if r.engine is not None), None)
        self.max_body_bytes, self.max_new_tokens_cap = max_body_bytes, max_new_tokens_cap
        self.max_n, self.max_logprobs = max_n, max_logprobs
        self.max_requests, self.held = max_requests, 0  # held: requests in progress (one event loop: no lock)
        if self.generator is not None:  # every generation request joins this engine's running batch
            self.generator.start_engine()
        # Threads that only wait for a sequence to end (the engine computes on its own thread).
        self.waiters = ThreadPoolExecutor(max_workers=512, thread_name_prefix="bloomline-wait")
        self.api_key = _api_key()
        self.created = int(time.time())  # /v1/models' "created"
        # The chat template of /v1/chat/completions: the generating task's setting, else its checkpoint's;
        # compiled now, so that an invalid one fails the deployment rather than every request.
        self.chat_template = None
        if self.generator is not None:
            self.chat_template = chat_template or checkpoint_chat_template(self.generator.config.model)
            if self.chat_template is not None:
                compile_template(self.chat_template)
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
                              for name in ("running", "waiting", "slots_used", "cache_tokens_held",
                                           "prefix_hit_rate", "prefix_blocks_held", "prefix_bytes_held")}
        self.batches_seen: list[int] = []  # recent batch sizes, for /v1/stats (observing batching in tests)
        self.batch_settings = {"max_batch_tokens": 8192, "batch_wait_timeout_s": 0.01}
        # Classify, NER and QA each batch on a queue of their own (and generation on the engine), so that
        # no task's request waits behind another task's batch.
        self.batchers = {task: self._batcher(task) for task, r in self.replicas.items() if r.engine is None}

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
                     field: str = "inputs", listed: bool | None = None, names: list[str] | None = None):
        """Label a request's rows through the batcher; 400 naming the first item that cannot be labeled.
        single: answer one object (else {"results": [...]}); field / listed: how the request named its items;
        names: each row's name instead, where the items came from several fields (e.g. "text_2[1]")."""
        self._hold()
        try:
            return await self._label_held(route, task, rows, params, single, field, listed, names)
        finally:
            self.held -= 1

    async def _label_held(self, route, task, rows, params, single, field, listed, names=None):
        listed = not single if listed is None else listed
        start = time.perf_counter()
        params, c = self._validate(task, params)
        await self._use_adapter(task, params)
        if not rows:
            raise ApiError(400, f"{field} is empty", field)
        if task not in self.batchers:  # a task on the engine: its rows join the running batch
            results = await self._generate(rows, c, field, listed)
        else:  # a batched forward (classify, ner, qa): a queue per task, never behind a generation or each other
            # ~4 bytes a token, for the batch's token budget; capped at the budget so that a large item
            # forms a batch of its own rather than being refused by Serve.
            size = min(len(json.dumps(rows)) // (4 * len(rows)) + 1, int(self.batch_settings["max_batch_tokens"]))
            results = await asyncio.gather(*[self.batchers[task]((row, params or None, size)) for row in rows])
        for i, r in enumerate(results):  # an item that cannot be labeled refuses the request (one rule, 400)
            if r.get("error"):
                name = names[i] if names else f"{field}[{i}]" if listed else field
                raise ApiError(400, f"{name}: {r['error']}", name.partition("[")[0])
        replica = self.replicas[task]  # the request's settings decide some fields (generate's `parsed`)
        keys = [f.name for f in replica.task.output_fields(replica.runtime, c)]
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

    def _submit(self, prompts: list, c: LabelConfig, field: str, listed: bool, n: int = 1, **request):
        """Check every prompt, then submit each as n sequences of the generate replica's engine (c: the
        request's effective settings, from `_validate`; request:
        the engine settings of `Generate.submit`); 400 naming the first prompt that cannot be generated
        for (before anything is submitted). prompts: rows (a text prompt's columns) or token-id lists.
        Returns (settings, [(prompt, ids), result] per prompt, the sequences per prompt)."""
        replica = self.generator
        prepared = []
        for i, prompt in enumerate(prompts):
            name = f"{field}[{i}]" if listed else field
            if not isinstance(prompt, dict):
                prepared.append(token_prompt(replica, prompt, c, name, field))
                continue
            try:
                prepared.append(replica.prompt_ids(prompt, c))
            except RowError as e:
                raise ApiError(400, f"{name}: {e}", field) from None
        groups = []
        try:
            for (prompt, ids), _ in prepared:
                groups.append(replica.submit(prompt, ids, c, n, **request))
        except ValueError as e:  # cannot fit the engine's slots
            for seq in (s for group in groups for s in group):
                replica.engine.abort(seq)
            raise ApiError(400, f"{field}: {e}", field) from None
        return c, prepared, groups

    async def _wait(self, seqs: list) -> None:
        """Wait for the sequences to end; a request cancelled before (client gone) aborts them."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*[loop.run_in_executor(self.waiters, seq.result) for seq in seqs])
        finally:
            for seq in seqs:
                if not seq.finished:
                    self.generator.engine.abort(seq)
        for seq in seqs:
            self._observe(seq)

    async def _generate(self, rows: list[dict], c: LabelConfig, field: str, listed: bool) -> list[dict]:
        """Generate for every row on the engine (joining its running batch) with the request's settings
        `c`; results as `label_rows`'."""
        replica = self.generator
        c, prepared, groups = self._submit(rows, c, field, listed)
        seqs = [seq for (seq,) in groups]
        await self._wait(seqs)
        return [{**result, **replica.task.result(replica.runtime, c, seq.output_ids, seq.finish_reason, len(ids),
                                                          seq)}
                for ((_, ids), result), seq in zip(prepared, seqs)]

    def _observe(self, seq) -> None:
        for name, value in timings(seq).items():
            self.seconds[name].observe(value * 1000)
        for name, value in self.generator.engine.stats().items():
            if name in self.engine_gauges:
                self.engine_gauges[name].set(value)

    def _validate(self, task: str, params: dict, alias: dict | None = None) -> tuple[dict, LabelConfig]:
        """The request's parameters without the unset ones, and its effective settings (`with_params`);
        400 for values over the endpoint's caps or invalid for the task, naming the parameter as the
        request did (alias: setting → OpenAI's name)."""
        if task not in self.replicas:
            raise ApiError(404, f"this endpoint does not serve task {task!r} (it serves: {', '.join(self.replicas)})")
        params = {k: v for k, v in params.items() if v is not None}
        alias = alias or {}
        try:
            c = self.replicas[task].with_params(params, caps={"max_new_tokens": self.max_new_tokens_cap}, alias=alias)
        except adapters.UnknownAdapter as e:  # a model that is not served: 404, as an unknown model
            raise ApiError(404, str(e), alias.get("adapter", "adapter")) from None
        except SettingError as e:
            message = str(e)
            for name, used in alias.items():  # a message on settings that go together names both as sent
                message = re.sub(rf"\b{name}\b", used, message)
            raise ApiError(400, message, alias.get(e.param, e.param)) from None
        except ValueError as e:
            named = str(e).split(" ", 1)[0]  # the replica's messages begin with the parameter at fault
            raise ApiError(400, str(e), named if named in params else None) from None
        return params, c

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
        engine = self.generator.engine.stats() if self.generator is not None else None
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
            raise ApiError(400, f"invalid JSON: {e}") from None

    def _model(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "bloomline"}

    @app.get("/v1/models")
    async def models(self, request: Request):
        """The served models, one per task and named by it (never the server's checkpoint paths), and one
        per task and LoRA adapter, "<task>:<adapter>" (declared, or found in the task's adapter_dir)."""
        self._check(request)
        ids = [m for task, r in self.replicas.items()
               for m in [task, *(f"{task}:{a}" for a in adapters.available(r.runtime.adapters, r.config))]]
        return {"object": "list", "data": [self._model(m) for m in ids]}

    @app.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request):
        self._check(request)
        task, _, adapter = model_id.partition(":")
        if task not in self.replicas:
            raise ApiError(404, f"model {model_id!r} is not served here (it serves: {', '.join(self.replicas)})",
                           "model")
        if adapter or model_id.endswith(":"):
            self._validate(task, {"adapter": adapter}, {"adapter": "model"})
        return self._model(model_id)

    # Serve's model multiplexing: a request with the header serve_multiplexed_model_id: "<task>:<adapter>"
    # goes to a replica that reported holding that adapter. The body still decides what is computed (its
    # model or parameters.adapter); the header only routes. The bank's LRU (max_adapters) does the memory
    # budget; this one only tells Serve's router which adapters a replica has loaded lately.
    @serve.multiplexed(max_num_models_per_replica=ADAPTERS_REPORTED)
    async def _loaded_adapter(self, model_id: str):
        task, _, name = model_id.partition(":")
        bank = self.replicas[task].runtime.adapters
        return await asyncio.get_running_loop().run_in_executor(None, bank.get, name)

    async def _use_adapter(self, task: str, params: dict) -> None:
        """Load the request's adapter (checked by `_validate`) and report it held, for Serve's routing; 500
        naming it when its files cannot be read or are refused (before the engine sees the request)."""
        if params.get("adapter"):
            try:
                await self._loaded_adapter(f"{task}:{params['adapter']}")
            except (ValueError, OSError) as e:
                logger.error("adapter %r cannot be loaded: %s", params["adapter"], e)  # its paths: not in answers
                raise ApiError(500, f"adapter {params['adapter']!r} cannot be loaded (refused or unreadable; the "
                                    "replica's log says why)") from None

    def _generator(self, model: str | None) -> BloomReplica:
        """The replica whose task runs on the engine, which OpenAI's routes serve as the model named by
        its task; 404 for another model."""
        if self.generator is None:
            name = next(name for name, task in TASKS.items() if task.runs_on_engine)
            raise ApiError(404, f"this endpoint does not serve task {name!r}", "model")
        name = self.generator.task.name
        if model is not None and model != name and not (model.startswith(name + ":") and len(model) > len(name) + 1):
            raise ApiError(404, f"model {model!r} is not served here (completions serve: {name}, and {name}:<adapter> "
                                "for its LoRA adapters)", "model")
        return self.generator

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        """OpenAI's completions API over the generate task: prompts as texts or token ids, n choices per
        prompt (indexed i * n + j, as OpenAI numbers them), best_of, logprobs, echo; `stream: true`
        answers with server-sent events."""
        req = await self._body(request, CompletionRequest)
        replica = self._generator(req.model)
        single = isinstance(req.prompt, str) or bool(req.prompt) and isinstance(req.prompt[0], int)
        prompts = [replica.task.item_row(p, replica.config) if isinstance(p, str) else p
                   for p in ([req.prompt] if single else req.prompt)]
        return await self._complete(req, prompts, not single, 16 if req.max_tokens is None else req.max_tokens,
                                    req.logprobs, req.echo, req.best_of or req.n, "max_tokens")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """OpenAI's chat completions over the generate task: the messages rendered by the chat template
        into one prompt, then generated for as a completion (the same parameters, limits and engine)."""
        req = await self._body(request, ChatRequest)
        replica = self._generator(req.model)
        if self.chat_template is None:
            raise ApiError(404, "chat completions need a chat template: the generate task's checkpoint has no "
                                "chat_template in its tokenizer_config.json, and no chat_template setting gives one",
                           "model")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs: only with logprobs: true", "top_logprobs")
        messages = [m.model_dump(exclude_unset=True) for m in req.messages]
        try:
            text = render_chat(self.chat_template, messages, replica.tokenizer.special_tokens_map)
        except ChatTemplateError as e:
            raise ApiError(400, f"messages: {e}", "messages") from None
        named = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = next((m for m in (req.max_completion_tokens, req.max_tokens) if m is not None),
                          min(replica.config.max_new_tokens, self.max_new_tokens_cap))
        return await self._complete(req, [replica.tokenizer.encode(text)], False, max_tokens,
                                    (req.top_logprobs or 0) if req.logprobs else None, False, req.n, named)

    async def _complete(self, req: SamplingRequest, prompts: list, listed: bool, max_tokens: int,
                        logprobs: int | None, echo: bool, best_of: int, max_tokens_name: str):
        """Completions and chat completions alike. prompts: rows (text prompts) or token-id lists; each is
        generated for best_of times, and the n sequences with the highest cumulative logprob answer.
        logprobs: top alternatives per token (None: no logprobs); echo: the prompt leads each choice.
        max_tokens_name: the field that gave max_tokens (errors name it)."""
        chat = isinstance(req, ChatRequest)
        field = "messages" if chat else "prompt"
        if not prompts:
            raise ApiError(400, f"{field} is empty", field)
        self._check_sampling(req, logprobs, best_of)
        replica = self.generator
        # The declared settings by their OpenAI names, checked with the task's own (once, in _validate).
        alias = {name: used for used, name in openai_names().items()} | {"max_new_tokens": max_tokens_name}
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or None)
        params = {name: getattr(req, used) for used, name in openai_names().items()} | constraint_settings(req)
        adapter = (req.model or "").partition(":")[2] or None  # model "generate:<adapter>"
        params, c = self._validate(replica.task.name, {**params, "max_new_tokens": max_tokens, "stop": stop,
                                                       "do_sample": req.temperature > 0,
                                                       "temperature": req.temperature if req.temperature > 0 else None,
                                                       "adapter": adapter},
                                   alias | {"adapter": "model"})
        await self._use_adapter(replica.task.name, params)
        # Choosing the best of more sequences than are answered ranks them by their logprobs (0: the
        # chosen tokens' only); they are shown only when asked for.
        request = {"n": best_of, "logprobs": logprobs if best_of == req.n else (logprobs or 0),
                   "prompt_logprobs": logprobs if echo else None, "logit_bias": self._logit_bias(req.logit_bias)}
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": replica.task.name + (f":{adapter}" if adapter else "")}
        if req.stream:
            self._hold(count=False)  # counted while the stream runs (a stream never started holds nothing)
            c, prepared, groups = self._submit(prompts, c, field, listed, **request)
            usage = bool(req.stream_options and req.stream_options.include_usage)
            head = {**head, "object": "chat.completion.chunk"} if chat else head
            return StreamingResponse(self._stream(head, c, prepared, groups, echo, usage, chat, logprobs),
                                     media_type="text/event-stream")
        self._hold()
        try:
            start = time.perf_counter()
            c, prepared, groups = self._submit(prompts, c, field, listed, **request)
            seqs = [seq for group in groups for seq in group]
            await self._wait(seqs)
            answer = []
            for k, seq in enumerate(s for group in groups for s in best_choices(group, req.n)):
                text, lp, result = "", None, None
                for piece, result, piece_lp in choice_pieces(replica, seq, c, echo):
                    text += piece
                    lp = join_logprobs(lp, piece_lp)
                answer.append(make_choice(k, text, lp if logprobs is not None else None, result, chat, logprobs))
            usage = usage_of(prepared, seqs)  # every sequence generated, best_of of them per prompt
            self._account("chat" if chat else "completions", replica.task.name, start, usage["prompt_tokens"],
                          usage["completion_tokens"])
        finally:
            self.held -= 1
        return {**head, "choices": answer, "usage": usage}

    def _check_sampling(self, req: SamplingRequest, logprobs: int | None, best_of: int) -> None:
        """400 naming the field for what this endpoint cannot honour or allows no more of."""
        for name, value in NO_OP.items():
            given = getattr(req, name, None)
            if given is not None and given != value:
                raise ApiError(400, f"{name} {given!r} is not supported (only {value!r} or null)", name)
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options: only with stream: true", "stream_options")
        if req.n > self.max_n:
            raise ApiError(400, f"n {req.n} is over the limit of {self.max_n}", "n")
        if best_of < req.n:
            raise ApiError(400, f"best_of {best_of} must be at least n ({req.n})", "best_of")
        if best_of > self.max_n:
            raise ApiError(400, f"best_of {best_of} is over the limit of {self.max_n}", "best_of")
        if best_of > req.n and req.stream:
            raise ApiError(400, "best_of: not with stream: true (the best choices are known only at the end)",
                           "best_of")
        name = "top_logprobs" if isinstance(req, ChatRequest) else "logprobs"
        if logprobs is not None and logprobs > self.max_logprobs:
            raise ApiError(400, f"{name} {logprobs} is over the limit of {self.max_logprobs}", name)

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        """OpenAI's logit_bias (token ids as JSON keys → bias) as the engine takes it; 400 naming a key
        that is no token id of the vocabulary, or a bias outside [-100, 100]."""
        if not bias:
            return None
        vocab, out = self.generator.model.config.vocab_size, {}
        for key, value in bias.items():
            token = int(key) if key.isdigit() else -1
            if not 0 <= token < vocab:
                raise ApiError(400, f"logit_bias: key {key!r} is not a token id in [0, {vocab})", "logit_bias")
            if not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias: the bias {value} of token {key} is outside [-100, 100]",
                               "logit_bias")
            out[token] = value
        return out

    async def _stream(self, head, c, prepared, groups, echo: bool, usage: bool, chat: bool, logprobs: int | None):
        """Server-sent events in OpenAI's format: every choice's text as its tokens come (the choices
        interleaved, each chunk naming its index, with the logprobs of the tokens it begins), a chunk with
        each choice's finish_reason, the usage when asked, then [DONE]. Chat chunks carry a `delta` (the
        role in a choice's first). Every choice is a sequence of the engine's running batch; a client that
        goes away aborts them (their slots are free the next step)."""
        self.held += 1
        replica, loop, ready = self.generator, asyncio.get_running_loop(), asyncio.Queue()
        seqs = [seq for group in groups for seq in group]

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(ready.put_nowait, item)
            except RuntimeError:  # the event loop has closed (the replica is shutting down)
                pass

        def drain(k, pieces) -> None:
            # One choice's pieces into `ready`, on a waiter thread for the whole stream: one hop to the
            # event loop per piece (a call into the pool per piece cost a second one: bench_serve_prefix's
            # TTFT p50 196 against 221 ms, tokens/s 430 against 404, medians of 5 interleaved rounds).
            try:
                for piece in pieces:
                    put((k, piece))
                put((k, None))
            except Exception as e:  # the engine failed: the stream ends with it
                put((k, e))

        for k, seq in enumerate(seqs):  # each drain ends with its sequence (the abort below ends it early)
            loop.run_in_executor(self.waiters, drain, k, choice_pieces(replica, seq, c, echo))
        begun, events, ended = set(), [], 0
        try:
            while ended < len(seqs):
                k, piece = await ready.get()
                if isinstance(piece, Exception):
                    if events:  # what came before the failure still goes out
                        yield "".join(events)
                    raise piece
                if piece is None:
                    ended += 1
                elif any(piece):  # (text, result, logprobs)
                    text, result, lp = piece
                    choice = make_choice(k, text, lp, result, chat, logprobs, streamed=True, first=k not in begun)
                    begun.add(k)
                    events.append(f"data: {json.dumps({**head, 'choices': [choice]})}\n\n")
                if events and ready.empty():
                    # The events ready now go out as one chunk: under load a stream falls behind its tokens,
                    # and each chunk is a message from the replica to Serve's proxy.
                    yield "".join(events)
                    events = []
            for seq in seqs:
                self._observe(seq)
            if usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage_of(prepared, seqs)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.held -= 1
            for seq in seqs:
                if not seq.finished:
                    replica.engine.abort(seq)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        """OpenAI's embeddings API over the task that embeds: input as a text, texts, token ids or lists of
        token ids; encoding_format float or base64; dimensions only the model's own (else 400). The items
        are batched with the task's other requests (/v1/{task}), so they get what the job writes."""
        req = await self._body(request, EmbeddingRequest)
        replica = self._pooling_replica("embeds", req.model, "embeddings")
        name, size = replica.task.name, replica.model.config.hidden_size
        if req.dimensions is not None and req.dimensions != size:
            raise ApiError(400, f"dimensions {req.dimensions} is not supported: this model's embeddings have "
                                f"{size} (send {size} or leave it out)", "dimensions")
        single = isinstance(req.input, str) or bool(req.input) and isinstance(req.input[0], int)
        items = [req.input] if single else req.input
        rows = [replica.task.item_row(item, replica.config) for item in items]
        answer = await self._label("embeddings", name, rows, {}, False, "input", listed=not single)
        results = answer["results"]
        tokens = sum(r["input_tokens"] for r in results)
        return {"object": "list", "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [embedding_item(i, r["embedding"], req.encoding_format) for i, r in enumerate(results)]}

    def _pooling_replica(self, serves: str, model: str | None, route: str) -> BloomReplica:
        """The replica of the task whose flag `serves` is set (Task.embeds, Task.classifies), for a route
        that serves that kind of task; 404 when none is served, or `model` names another."""
        replica = next((r for r in self.replicas.values() if getattr(r.task, serves)), None)
        name = replica.task.name if replica else next(n for n, task in TASKS.items() if getattr(task, serves))
        if replica is None:
            raise ApiError(404, f"this endpoint does not serve task {name!r}", "model")
        if model is not None and model != name:
            raise ApiError(404, f"model {model!r} is not served here ({route} serve: {name})", "model")
        return replica

    @app.post("/classify")
    async def classify_pooling(self, request: Request):
        """vLLM's classification API over the task that classifies: the label and every class's probability
        of each input text (`pooling`), batched with the task's /v1/{task} requests."""
        req = await self._body(request, pooling.ClassifyRequest)
        replica = self._pooling_replica("classifies", req.model, "/classify")
        name, single = replica.task.name, isinstance(req.input, str)
        rows = [replica.task.item_row(item, replica.config) for item in ([req.input] if single else req.input)]
        results = (await self._label("vllm_classify", name, rows, {}, False, "input", listed=not single))["results"]
        return pooling.answer(pooling.CLASSIFY_ID, name, [pooling.classify_item(i, r) for i, r in enumerate(results)],
                              sum(r["input_tokens"] for r in results))

    @app.post("/score")
    async def score(self, request: Request):
        """vLLM's score API over the task that embeds: the cosine similarity of text_1's and text_2's
        embeddings, paired 1:1, 1:N or N:N (`pooling.score_pairs`); each text embedded once."""
        req = await self._body(request, pooling.ScoreRequest)
        replica = self._pooling_replica("embeds", req.model, "/score")
        pairs = pooling.score_pairs(req.text_1, req.text_2)
        sides = [[side] if isinstance(side, str) else side for side in (req.text_1, req.text_2)]
        names = [field if isinstance(sent, str) else f"{field}[{i}]"
                 for field, sent, side in zip(("text_1", "text_2"), (req.text_1, req.text_2), sides)
                 for i in range(len(side))]
        rows = [replica.task.item_row(text, replica.config) for side in sides for text in side]
        results = (await self._label("score", replica.task.name, rows, {}, False, names=names))["results"]
        first, second = results[:len(sides[0])], results[len(sides[0]):]
        data = [pooling.score_item(k, pooling.cosine(first[i]["embedding"], second[j]["embedding"]))
                for k, (i, j) in enumerate(pairs)]
        return pooling.answer(pooling.SCORE_ID, replica.task.name, data, sum(r["input_tokens"] for r in results))

    # Declared last: /v1/completions, /v1/embeddings, /v1/models and /v1/stats match first.
    @app.post("/v1/{task}")
    async def label(self, task: str, request: Request):
        """/v1/generate, /v1/classify, /v1/ner, /v1/qa: {"inputs": item or [items], "parameters": {...}}."""
        if task not in TASKS:
            raise ApiError(404, f"no route /v1/{task}")
        req = await self._body(request, TASKS[task].request_model())
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
