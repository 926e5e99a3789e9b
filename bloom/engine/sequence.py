"""One request's state (`Sequence`): its prompt, settings and output, and what the engine keeps for it."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..generation import SamplingParams, StopStrings
from .params import GenerationParams

logger = logging.getLogger("bloom")

@dataclass
class SamplingState:
    """What the sampler keeps for one sequence (built by `bloom.engine.sampler.sampling_state`).

    row: its settings as a one-row SamplingParams, with its own generator; seen: (V,) bool, the prompt's
    and generated tokens, for the repetition penalty (else None); counts: (V,) fp32, how often each token
    was generated, for the frequency and presence penalties (else None); bias_ids, bias_values: (K,) its
    logit_bias (else None); matcher: its constraint's llguidance matcher, advanced by each chosen token
    (else None)."""

    row: SamplingParams
    seen: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    matcher: object | None = None


_END = object()  # the last item of a sequence's token queue
_ids = itertools.count()


class Sequence:
    """One request: its prompt, settings and output, and the state the engine keeps for it.

    Read by the caller: `output_ids` (new tokens so far), `finish_reason` ("eos", "stop", "length",
    "abort", "error"; None while running), `error`, `finished`, and `times` (perf_counter seconds at
    "submitted", "admitted", "first_token", "finished"). Iterate `stream()` for the tokens as they come,
    or wait with `result()`; both work from any thread.

    When the params ask for them: `logprobs[k]` = (log-probability of output_ids[k], [(id, logprob)] of the
    most likely tokens, most likely first), recorded before the token is streamed; `prompt_logprobs` the
    same per prompt token, None for the first (complete before the first new token).

    `incomplete`: a constrained sequence (`params.constraint`) ended before its structure was complete
    (finish_reason "length", or a stop string); its output then does not parse."""

    def __init__(self, prompt_ids: list[int], params: GenerationParams, sampling: SamplingState, stop: StopStrings,
                 eos: tuple[int, ...], on_token: Callable | None):
        self.id = next(_ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.incomplete = False
        self.error: BaseException | None = None
        self.times: dict[str, float] = {"submitted": time.perf_counter()}
        # Engine-side state: the sampler's (with this sequence's own generator), the stop-string window,
        # eos ids, its cache slot and how many tokens it holds.
        self.sampling, self.stop, self.eos = sampling, stop, eos
        self.slot: int | None = None
        self.num_cached = 0
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None if params.logprobs is None else []
        self.prompt_logprobs: list | None = None if params.prompt_logprobs is None else [None]
        # The rest of its group (submit_group) until this sequence's prompt is cached; they hold no slot yet.
        self.siblings: list[Sequence] = []
        self._on_token = on_token
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()

    def __repr__(self) -> str:
        return (f"Sequence(id={self.id}, prompt={len(self.prompt_ids)} tokens, new={len(self.output_ids)}, "
                f"finish_reason={self.finish_reason!r})")

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """The new token ids as they are generated (one consumer); ends when the sequence ends, raising
        RuntimeError if the engine failed. timeout: seconds to wait for each token (queue.Empty after)."""
        while True:
            item = self._queue.get(timeout=timeout)
            if item is _END:
                self._raise_error()
                return
            yield item

    def result(self, timeout: float | None = None) -> list[int]:
        """Wait for the sequence to end; its new token ids. TimeoutError after `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"sequence {self.id} still running after {timeout} s")
        self._raise_error()
        return list(self.output_ids)

    def _raise_error(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"generation failed for sequence {self.id}: {self.error}") from self.error

    def _emit(self, token: int, reason: str | None) -> None:
        """Called by the engine with each new token; finish_reason is set first, so a callback sees it."""
        self.output_ids.append(token)
        self.finish_reason = reason
        self.times.setdefault("first_token", time.perf_counter())
        self._queue.put(token)
        if self._on_token is not None:
            self._on_token(self, token)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        untold = self.finish_reason is None  # no token event carried the end (abort, error, max_new_tokens=0)
        self.finish_reason, self.error = reason, error
        self.times["finished"] = time.perf_counter()
        self._queue.put(_END)
        self._done.set()
        if self._on_token is not None and untold:
            try:
                self._on_token(self, None)
            except Exception:  # the sequence has ended anyway; a callback must not stop the engine
                logger.exception("on_token callback failed for sequence %d", self.id)


