"""The engine: one daemon thread owns the `Decoder`; async callers get per-request event streams.

Continuous batching: the thread keeps one `DecodeBatch`. At every step boundary it admits
waiting requests FIFO (up to ``max_num_seqs`` running and ``max_batched_tokens`` columns per
prefill), runs their prefill, then one decode step for every running request; finished
requests leave the batch at once. Events are routed by ``StepEvent.index``.

Hand-off: the thread puts events into each request's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``; nothing async ever touches the model. Leaving a stream (client
gone, error, shutdown) sets the request's cancel flag, which the decode loop polls at every
step boundary; a request still queued is removed without running.

Faults: a request that fails alone in the decode loop (its sampling, stop strings, policy)
ends with `EngineError` while the others go on (`decode`, fault isolation). When the shared
decode forward fails, the running requests move once to a fresh batch and continue where they
stopped (`Engine._retry`); a second failure ends them with `EngineError`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from safety_decoding.decode import DecodeBatch, Decoder, GenerationRequest, StepEvent
from safety_decoding.layout import round_up
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt, build_raw_prompt, load_unicode_tables
from safety_decoding.sampling import SamplingParams
from safety_decoding.types import FinishReason

from .metrics import Metrics

log = logging.getLogger("ess.engine")


WARM_PREFILL_COLUMNS = 512
"""`Engine.start` runs one prefill of every width up to this many columns (the prompts of up to
about 480 tokens), so that no request is the first of its width. Our choice: on 2 cores with
AMX, the first prefill of a width oneDNN has not run yet took 14-19 % longer (6-10 ms on
80-144 columns) than the next one of that width, and one prefill of the width with other text
and safety off removed it (1.00x; session 19, 2 cores with AMX, bfloat16). About 3 s at start
on that machine."""

WARM_PREFILL_SECONDS = 5.0
"""The widths are warmed narrowest first until this many seconds have passed. Our choice: on 2
AVX2-only cores in float32 all 30 widths took 42 s (session 20), where each prefill is slow
enough that the first-of-width cost is a small share of it; a start-up should not wait that long."""


def prefill_warm_ups(decoder: Decoder, max_columns: int) -> list[GenerationRequest]:
    """One request per prefill width from a one-word chat turn's (the template's system text
    included) up to ``max_columns`` (`Decoder.prefill_bucket` multiples, `Decoder.prefill_columns`
    rounded up): a user turn of repeated words, safety off (the
    width fixes the shapes of the products and the attention; safety's rows are in the width),
    one new token. ``[]`` when prefills are not bucketed (every length would be a width)."""
    bucket = getattr(decoder, "prefill_bucket", 1)
    if bucket <= 1:
        return []
    policy = SafetyParams.from_config(decoder.model.config, enabled=False)
    requests, words, width = [], 1, 0
    while True:
        prompt = build_chat_prompt(decoder.tok, [{"role": "user", "content": "hello " * words}])
        request = GenerationRequest(prompt, SamplingParams(max_new_tokens=1), policy)
        columns = decoder.prefill_columns(request)
        if round_up(columns, bucket) > max_columns:
            return requests
        if columns > width:
            requests.append(request)
            width = round_up(columns, bucket)
        words += max(1, width + 1 - columns)  # each word adds at least one token


class EngineError(RuntimeError):
    """The engine could not run a request (the HTTP layer maps it to 5xx)."""


class EngineOverloaded(EngineError):
    """The waiting queue is full (HTTP 429 with Retry-After)."""


class EngineNotRunning(EngineError):
    """The engine is not started, or is shutting down (HTTP 503)."""


class EngineTimeout(EngineError):
    """The request ran past the engine's ``request_timeout`` (HTTP 504)."""


def load_off_thread(fn):
    """Run ``fn()`` (model loading) in a short-lived thread; return its result or raise its error.

    Why: with GNU OpenMP every thread that runs a parallel torch op keeps a worker team for its
    lifetime, and while a second team exists the engine thread's decode step is much slower
    (measured on 2 cores, SmolLM2-135M: 32 ms a step alone, 58-62 ms beside an idle team).
    Loading in a thread that then exits leaves the engine thread's team the only one, as long
    as the event-loop thread runs no torch op (it does not: requests are tokenized, not
    tensorized, there).
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="ess-load") as pool:
        return pool.submit(fn).result()


def reported_finish_reason(event: StepEvent) -> str:
    """The finish reason clients and metrics see.

    ``abort`` and ``error`` win (nobody is waiting for a verdict, or there is none), then
    ``content_filter`` when the safety policy intervened (OpenAI's word; docs/architecture.md,
    "Protocols and finish reasons"), else the library's TGI names.
    """
    if event.finish_reason in (FinishReason.ABORT, FinishReason.ERROR):
        return event.finish_reason
    if event.safety and event.safety.get("intervened"):
        return FinishReason.CONTENT_FILTER
    return event.finish_reason


@dataclass(eq=False)
class _Job:
    """One submitted request and its thread-safe way back to the event loop."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    submitted: float
    """``time.perf_counter()`` at submit (seconds)."""
    record: bool = True
    """False for the warm-up request: it stays out of the metrics."""
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    """Set by the consumer side (plain bool: atomic under the GIL, polled by the thread)."""
    first_token: float | None = None
    last_token: float | None = None
    released: bool = False
    """Its engine slot was given back (set under the engine lock)."""
    deadline: float = float("inf")
    """``perf_counter()`` past which the request is stopped (`EngineTimeout`)."""
    timed_out: bool = False
    delivered: int = 0
    """Tokens handed to the consumer so far."""
    retried: bool = False
    """It was already moved to a fresh batch once after a failed decode step."""

    def deliver(self, item: StepEvent | BaseException) -> None:
        """Called on the engine thread: hand one item to the consumer's loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody will read this request
            self.cancelled = True


class RequestStream:
    """Async iterator of the `StepEvent`s of one request; the last one has a finish_reason.

    Leaving early (``aclose()``, ``async with`` exit, the consuming task being cancelled, or
    garbage collection) cancels the request in the engine.

    Raises (from iteration):
        EngineError: the decode loop failed for this request.
        EngineNotRunning: the engine shut down before the request ran.
    """

    def __init__(self, engine: "Engine", job: _Job):
        self._engine = engine
        self._job = job
        self._finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> StepEvent:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._job.queue.get()
        except BaseException:  # the consumer is being cancelled: it will not read on
            self.cancel()
            raise
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if item.finish_reason is not None:
            self._finished = True
        return item

    def cancel(self) -> None:
        """Abort the request: dropped if still queued, else stopped at the next step."""
        if not self._finished:
            self._finished = True
            self._engine._cancel(self._job)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()

    def __del__(self):
        # GC may run on any thread, even one holding the engine lock: only set the flag.
        if not self._finished:
            self._job.cancelled = True


class Engine:
    """Owns a `Decoder` on one daemon thread; continuous batching over a bounded FIFO queue.

    Args:
        decoder: the library decoder (model + tokenizer); used only on the engine thread.
        max_num_seqs: requests decoded together (vLLM's name); more wait.
        max_batched_tokens: columns one prefill may take (vLLM's ``max_num_batched_tokens``;
            `Decoder.prefill_columns`: the prompt, ``[CLS]`` and the first check's slots); a
            longer prompt still runs, alone.
        max_waiting: requests that may wait behind the running ones; more raise
            `EngineOverloaded`.
        request_timeout: seconds from submit after which a request is stopped at the next
            step boundary and fails with `EngineTimeout`; None: no limit.
        prefill_chunk: tokens per chunk of a long join's prefill (`DecodeBatch`); None: off.
        metrics: where to record; a fresh `Metrics` (own registry) when None.

    Raises:
        ValueError: a limit out of range.

    Use: ``await engine.start()`` (warm-up included), ``engine.submit(request)`` from the
    event loop, ``await engine.stop()``. An engine is not restartable after ``stop``.
    """

    def __init__(self, decoder: Decoder, *, max_num_seqs: int = 8, max_batched_tokens: int = 4096,
                 max_waiting: int = 64, request_timeout: float | None = None,
                 metrics: Metrics | None = None, prefill_chunk: int | None = None):
        if max_waiting < 0 or max_num_seqs < 1 or max_batched_tokens < 1:
            raise ValueError("need max_waiting >= 0, max_num_seqs >= 1, max_batched_tokens >= 1")
        if request_timeout is not None and request_timeout <= 0:
            raise ValueError("request_timeout must be > 0 seconds")
        self._decoder = decoder
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.max_waiting = max_waiting
        self.request_timeout = request_timeout
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics if metrics is not None else Metrics()
        self._cv = threading.Condition()  # an RLock inside: helpers may re-enter it
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._inflight = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._warm = False
        self._crash: BaseException | None = None  # what ended the engine thread, for `start`

    # ---- facts the HTTP layer validates against ------------------------------------------

    @property
    def tokenizer(self):
        """The tokenizer the decoder detokenizes with (build prompts with the same one)."""
        return self._decoder.tok

    @property
    def model_max_length(self) -> int:
        """Positions the model supports: ``[CLS]`` + prompt + generated must fit (tokens)."""
        return int(self._decoder.model.decoder.config.max_position_embeddings)

    @property
    def safety_config(self):
        """The checkpoint's `SafetyConfig` (defaults for the server's safety policy)."""
        return self._decoder.model.config

    @property
    def ready(self) -> bool:
        """True once the thread runs and a warm-up generation finished, until `stop`."""
        return (self._warm and not self._stopping and self._thread is not None
                and self._thread.is_alive())

    @property
    def crashed(self) -> bool:
        """True once the engine thread died of an error outside a decode step (its requests
        failed; it never serves again)."""
        return self._crash is not None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the thread, build client-text normalization's tables
        (`prompt.load_unicode_tables`) and run one tiny generation (prefill + a probe step), then
        one prefill of each width up to `WARM_PREFILL_COLUMNS` (`prefill_warm_ups`), narrowest
        first, until `WARM_PREFILL_SECONDS` have passed.

        Idempotent. Raises:
            EngineNotRunning: the engine was stopped.
            EngineError: the warm-up generation failed.
        """
        if self._stopping:
            raise EngineNotRunning("the engine was stopped; build a new one")
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="ess-engine", daemon=True)
            self._thread.start()
        if not self._warm:
            warm = GenerationRequest(build_raw_prompt(self.tokenizer, "Hello"),
                                     SamplingParams(max_new_tokens=2),
                                     SafetyParams.from_config(self._decoder.model.config))
            widths = prefill_warm_ups(self._decoder, min(WARM_PREFILL_COLUMNS, self.model_max_length - 1))
            warmed = 0
            await asyncio.to_thread(load_unicode_tables)
            try:
                await self._run_unrecorded(warm)  # compiles the decode step where ESS_COMPILE is on
                t0 = time.perf_counter()
                for request in widths:
                    if time.perf_counter() - t0 > WARM_PREFILL_SECONDS:
                        break
                    await self._run_unrecorded(request)
                    warmed += 1
            except EngineNotRunning:
                if self._crash is None:
                    raise
                # the thread crashed before the warm-up was queued: say why, not only that it stopped
                raise EngineError(f"generation failed: {_exc_reason(self._crash)}") from None
            self._warm = True
            log.info("engine warm; %d of %d prefill widths warmed in %.1f s", warmed, len(widths),
                     time.perf_counter() - t0)

    async def _run_unrecorded(self, request: GenerationRequest) -> None:
        """Run ``request`` to its end outside the metrics and the queue bound (warm-ups)."""
        async with self._submit(request, record=False, bounded=False) as stream:
            async for _ in stream:
                pass

    async def stop(self, timeout: float = 10.0) -> None:
        """Abort running requests, fail queued ones with `EngineNotRunning`, join the thread."""
        with self._cv:
            self._stopping = True
            while self._waiting:
                job = self._waiting.popleft()
                self._release(job)
                job.deliver(EngineNotRunning("the server is shutting down"))
                self._count_dropped(job)
            for job in self._running:
                job.cancelled = True
            self.metrics.waiting.set(0)
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            await asyncio.to_thread(self._thread.join, timeout)

    # ---- submitting --------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue ``request``; call from the event loop. Returns its event stream.

        Raises:
            EngineOverloaded: ``max_waiting`` requests already wait (map to HTTP 429).
            EngineNotRunning: not started, or shutting down (map to HTTP 503).
        """
        return self._submit(request, record=True, bounded=True)

    def _submit(self, request: GenerationRequest, record: bool, bounded: bool) -> RequestStream:
        job = _Job(request, asyncio.get_running_loop(), time.perf_counter(), record)
        if self.request_timeout is not None and bounded:
            job.deadline = job.submitted + self.request_timeout
        outer = request.cancelled
        job.request = replace(request, cancelled=lambda: job.cancelled or outer())
        with self._cv:
            if self._stopping or self._thread is None:
                raise EngineNotRunning("the engine is not running")
            if bounded and self._inflight >= self.max_num_seqs + self.max_waiting:
                raise EngineOverloaded(
                    f"{self._inflight} requests in flight; the queue holds {self.max_waiting}")
            self._inflight += 1
            self._waiting.append(job)
            if record:
                self.metrics.waiting.set(self._count_recorded(self._waiting))
            self._cv.notify()
        return RequestStream(self, job)

    def _cancel(self, job: _Job) -> None:
        job.cancelled = True
        with self._cv:
            if job in self._waiting:  # never started: drop it now and free its slot
                self._waiting.remove(job)
                self._release(job)
                self.metrics.waiting.set(self._count_recorded(self._waiting))
                self._count_dropped(job)

    # ---- engine thread -----------------------------------------------------------------------

    def _serve(self) -> None:
        """The thread's body. A bug that escapes the loop fails every request in flight and
        stops the engine (health turns 503) instead of leaving clients waiting forever."""
        try:
            self._loop()
        except BaseException as exc:
            log.exception("engine thread crashed")
            with self._cv:
                self._crash = exc
                self._stopping = True
                jobs = list(self._waiting) + list(self._running)
                self._waiting.clear()
            self._fail(jobs, exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))

    def _loop(self) -> None:
        batch = self._decoder.new_batch(self.prefill_chunk)
        jobs: dict[int, _Job] = {}  # StepEvent.index -> job
        while True:
            new = self._admit(len(batch))
            if new is None:
                return
            if new:
                try:
                    ids, events = batch.add([j.request for j in new])
                except Exception as exc:  # the batch is untouched: only these requests fail
                    self._fail(new, exc)
                else:
                    jobs.update(zip(ids, new))
                    self._deliver(events, jobs, time.perf_counter())
            if not len(batch):
                continue
            t0, chunks = time.perf_counter(), batch.prefill_chunks_run
            try:
                events = batch.step()
            except Exception as exc:  # the shared forward failed: the cache may be inconsistent
                batch = self._retry(batch, jobs, exc)
                continue
            now = time.perf_counter()
            if any(j.record for j in jobs.values()):
                self.metrics.observe_steps([now - t0], [any(ev.checked for ev in events)])
                self.metrics.prefill_chunks.inc(batch.prefill_chunks_run - chunks)
            self._deliver(events, jobs, now)
            self._expire(jobs.values(), now)

    def _admit(self, running: int) -> list[_Job] | None:
        """Waiting jobs to prefill now (FIFO, within the limits); blocks while idle.

        Returns None when stopping with nothing left running (the thread ends).
        """
        with self._cv:
            while not self._waiting and not running and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return [] if running else None
            self._expire(self._waiting, time.perf_counter())
            for job in [j for j in self._waiting if j.cancelled]:
                self._waiting.remove(job)
                self._release(job)
                if job.timed_out:
                    self._count_timeout(job)
                    job.deliver(self._timeout_error())
                else:
                    self._count_dropped(job)
            admitted, tokens = [], 0
            while self._waiting and running + len(admitted) < self.max_num_seqs:
                job = self._waiting[0]
                n = self._decoder.prefill_columns(job.request)
                if admitted and tokens + n > self.max_batched_tokens:
                    break
                self._waiting.popleft()
                admitted.append(job)
                tokens += n
            self._running.extend(admitted)
            self.metrics.waiting.set(self._count_recorded(self._waiting))
            self.metrics.running.set(self._count_recorded(self._running))
            return admitted

    def _expire(self, jobs, now: float) -> None:
        """Mark jobs past their deadline: the decode loop aborts them at the next step."""
        for job in list(jobs):
            if now >= job.deadline and not job.timed_out:
                job.timed_out = job.cancelled = True

    def _retry(self, batch: DecodeBatch, jobs: dict[int, _Job], exc: Exception) -> DecodeBatch:
        """After a failed decode step: a fresh batch holding the rows that may go on.

        `DecodeBatch.step` raises with every row as it was at the step boundary, so each row
        is re-prefilled (prompt + its generated tokens, `DecodeBatch.resume`) and continues
        where it stopped, its released text not repeated. Once only: a job that was already
        retried fails, as does one whose consumer did not get every token the row released
        (the step failed after it had advanced the rows), and all of them when the resume
        itself fails.
        """
        log.warning("decode step failed (%s: %s); retrying the running requests in a fresh batch",
                    type(exc).__name__, exc)
        retry, failed = [], []
        for row in batch.rows:
            job = jobs.pop(row.id, None)
            if job is None:
                continue
            ok = not job.retried and row.finish_reason is None and job.delivered == row.released
            (retry if ok else failed).append((row, job))
        failed += [(None, job) for job in jobs.values()]  # no row left to resume
        jobs.clear()
        if failed:
            self._fail([job for _, job in failed], exc)
        fresh = self._decoder.new_batch(self.prefill_chunk)
        if not retry:
            return fresh
        for _, job in retry:
            job.retried = True
        try:
            ids = fresh.resume([row for row, _ in retry])
        except Exception as again:
            self._fail([job for _, job in retry], again)
            return self._decoder.new_batch(self.prefill_chunk)
        jobs.update(zip(ids, (job for _, job in retry)))
        return fresh

    def _deliver(self, events: list[StepEvent], jobs: dict[int, _Job], now: float) -> None:
        for ev in events:
            job = jobs[ev.index]
            job.delivered += len(ev.tokens)
            if ev.finish_reason == FinishReason.ERROR:  # this request alone failed
                del jobs[ev.index]
                self._fail_job(job, ev.error)
                continue
            if any(t.text for t in ev.tokens):  # visible text: TTFT/TPOT count what clients see
                if job.first_token is None:
                    job.first_token = now
                job.last_token = now
            if ev.finish_reason is None:
                job.deliver(ev)
                continue
            del jobs[ev.index]
            self._release(job)
            if job.timed_out:
                self._count_timeout(job)
                job.deliver(self._timeout_error())
            else:
                self._count_finished(job, ev, now)
                job.deliver(ev)

    def _timeout_error(self) -> EngineTimeout:
        return EngineTimeout(f"the request ran past the {self.request_timeout:g} s request timeout")

    def _fail(self, jobs: list[_Job], exc: Exception) -> None:
        log.exception("decode loop failed", exc_info=exc)
        for job in jobs:
            self._fail_job(job, _exc_reason(exc))

    def _fail_job(self, job: _Job, reason: str) -> None:
        """End ``job`` with `EngineError` (``reason``: ``"<ExceptionType>: <message>"``)."""
        if job.record:
            self.metrics.requests.labels(FinishReason.ERROR).inc()
        self._release(job)
        job.deliver(EngineError(f"generation failed: {reason}"))

    def _release(self, job: _Job) -> None:
        """Give the job's slot back, before its last item is delivered: a client that sends
        its next request the moment it has read the last one must find room."""
        with self._cv:
            if job.released:
                return
            job.released = True
            self._inflight -= 1
            if job in self._running:
                self._running.remove(job)
            self.metrics.running.set(self._count_recorded(self._running))

    # ---- metrics helpers ---------------------------------------------------------------------

    @staticmethod
    def _count_recorded(jobs) -> int:
        return sum(1 for j in jobs if j.record)

    def _count_timeout(self, job: _Job) -> None:
        if job.record:
            self.metrics.requests.labels(FinishReason.TIMEOUT).inc()

    def _count_dropped(self, job: _Job) -> None:
        if job.record:
            self.metrics.requests.labels(FinishReason.ABORT).inc()

    def _count_finished(self, job: _Job, ev: StepEvent, now: float) -> None:
        if not job.record:
            return
        m = self.metrics
        m.requests.labels(reported_finish_reason(ev)).inc()
        m.request_duration.observe(now - job.submitted)
        m.prompt_tokens.inc(ev.prompt_tokens)
        m.generation_tokens.inc(ev.generated_tokens)
        if job.first_token is not None:
            m.ttft.observe(job.first_token - job.submitted)
            if ev.generated_tokens > 1:
                m.tpot.observe((job.last_token - job.first_token) / (ev.generated_tokens - 1))
        m.observe_safety(ev.safety)


def _exc_reason(exc: BaseException) -> str:
    """``"<ExceptionType>: <message>"``, the reason an `EngineError` gives."""
    return f"{type(exc).__name__}: {exc}"
