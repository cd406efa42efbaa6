"""Serve a trained run over HTTP: ``python -m finetune.serve model=RUN_DIR``.

    python -m finetune.serve model=outputs/2026-11-22/10-00-00 port=8080
    curl -s localhost:8080/predict -d '{"inputs": ["a gorgeous, witty film", "a dull mess"]}'

``model`` is what finetune.predict takes (a run directory, its model/ folder, a folder written by
finetune.export, or a Hub model id). Each row is prepared and decided by finetune.predict's own
``Predictor`` (the run's columns, truncation or windows, threshold, label names), and the answer
holds, per input, the record finetune.predict writes for that row.

Routes: POST /predict {"inputs": "text" | ["text", ...] | [["text", "text_pair"], ...]} ->
{"predictions": [{"text", ["text_pair",] "prediction", "prob_<label>"...}, ...]} (a token-classification
model: [{"text", "entities": [...]}, ...], finetune.predict's entities of raw text); GET /health;
GET /info (model, task, labels, threshold, backend, max_length, windows, limits); GET /metrics
(Prometheus text); GET /docs (OpenAPI).

Rows of concurrent requests are batched together: up to max_batch_size rows, or whatever arrived
within max_wait_ms of the oldest waiting row, run on a worker thread (sorted by length, as
finetune.predict does, in model calls of model_batch_size rows: little padding), so the event loop
keeps accepting requests.

Options (key=value): backend=auto|torch|onnx, device=auto|cpu|cuda, threads=N (CPU threads of
the model), threshold=T, max_length=N (as finetune.predict); host=127.0.0.1, port=8080,
max_batch_size=32, model_batch_size=4, max_wait_ms=5, max_queue=1024 (rows accepted and not yet answered; past it: 503
with Retry-After), max_rows_per_request=256, max_body_bytes=1048576, max_text_chars=100000
(past a limit: 413). SIGTERM (or Ctrl-C) stops accepting, answers every accepted row, exits 0.
"""

# No `from __future__ import annotations`: FastAPI reads the route's `request: Request` annotation
# at run time, and Request is imported inside create_app (fastapi is needed only to serve).
import asyncio
import json
import logging
import signal
import socket
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from typing import Dict, List, Optional

from finetune.config import FinetuneError
from finetune.predict import PredictError, check_options, parse_options, resolve_model_dir, run_command
from finetune.ranges import Range, option_problems

logger = logging.getLogger(__name__)


class ServeError(FinetuneError):
    """Bad options to finetune.serve."""


@dataclass
class Limits:
    """How much the server takes at once; every default lives here."""

    max_batch_size: int = 32
    # Rows per model call: a batch's rows, sorted by length, run this many at a time. Small calls
    # pad little: on 2 CPU cores the int8 MiniLM teacher served 401 rows/s at 4 rows per call,
    # 339 at 8, 214 with each batch in one call (BENCHMARKS.md, "Serving over HTTP").
    model_batch_size: int = 4
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_rows_per_request: int = 256
    max_body_bytes: int = 1 << 20
    max_text_chars: int = 100_000


LIMIT_TYPES = {f.name: float if f.name == "max_wait_ms" else int for f in fields(Limits)}
PREDICT_OPTIONS = ("backend", "device", "threads", "threshold", "max_length")
OPTIONS = ("model", "host", "port", *PREDICT_OPTIONS, *LIMIT_TYPES)
OPTION_RANGES = {"port": Range(lo=0, hi=65535, note="0: any free port"), "max_wait_ms": Range(lo=0),
                 **{k: Range(lo=1) for k in LIMIT_TYPES if k != "max_wait_ms"}}  # fmt: skip
TYPES = {"port": int, "threads": int, "threshold": float, "max_length": int, **LIMIT_TYPES}
USAGE = "python -m finetune.serve model=RUN_DIR [port=8080] [max_batch_size=32] [max_wait_ms=5]"

# What clients send as JSON; validated by parse_inputs (one-line reasons), described for /docs.
INPUTS_SCHEMA = {"type": "object", "required": ["inputs"], "additionalProperties": False, "properties": {"inputs": {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
              {"type": "array", "minItems": 1, "items": {"type": "array", "items": {"type": "string"},
                                                         "minItems": 2, "maxItems": 2}}],
    "description": "one text, a list of texts, or (for a model trained on text pairs) a list of [text, text_pair]",
}}, "example": {"inputs": ["a gorgeous, witty film", "a dull mess"]}}  # fmt: skip


class RequestError(Exception):
    """A request answered with ``status`` and a one-line ``reason``; the server goes on."""

    def __init__(self, status: int, reason: str, kind: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(reason)
        self.status, self.reason, self.kind, self.headers = status, reason, kind, headers


def parse_inputs(payload: object, pairs: bool, limits: Limits) -> List[Dict[str, str]]:
    """The rows of a /predict body ({"text": ...[, "text_pair": ...]}), or a RequestError naming
    the field and what is wrong with it."""
    shape = '{"inputs": [[text, text_pair], ...]}' if pairs else '{"inputs": "text"} or {"inputs": ["text", ...]}'
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise RequestError(422, f"the body must be a JSON object with an 'inputs' field: {shape}", "bad_input")
    unknown = sorted(set(payload) - {"inputs"})
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}; the body is {shape}", "bad_input")
    inputs = payload["inputs"]
    if isinstance(inputs, str) and not pairs:
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        got = "an empty list" if inputs == [] else f"a {_json_type(inputs)}"
        raise RequestError(422, f"'inputs' is {got}; send {shape} with at least one row", "bad_input")
    if len(inputs) > limits.max_rows_per_request:
        raise RequestError(413, f"'inputs' has {len(inputs)} rows, more than max_rows_per_request="
                                f"{limits.max_rows_per_request}; split it into several requests", "too_large")  # fmt: skip
    rows = []
    for i, item in enumerate(inputs):
        texts = item if isinstance(item, list) else [item]
        if isinstance(item, list) and not pairs:
            raise RequestError(422, f"inputs[{i}] is a list, but this model reads single texts: {shape}", "bad_input")
        if pairs and len(texts) != 2:
            what = "a single text" if not isinstance(item, list) else f"a list of {len(texts)}"
            raise RequestError(422, f"inputs[{i}] is {what}, but this model reads text pairs: {shape}", "bad_input")
        for text in texts:
            if not isinstance(text, str):
                raise RequestError(422, f"inputs[{i}] holds a {_json_type(text)}, not a string", "bad_input")
            if len(text) > limits.max_text_chars:
                raise RequestError(413, f"inputs[{i}] has a text of {len(text)} characters, more than "
                                        f"max_text_chars={limits.max_text_chars}", "too_large")  # fmt: skip
        rows.append(dict(zip(("text", "text_pair"), texts)))
    return rows


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


class Metrics:
    """The Prometheus series of one server (its own registry, so two apps in one process never
    share counts)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("finetune_serve_requests", "POST /predict requests, by HTTP status", ["status"], registry=r)
        self.errors = Counter("finetune_serve_errors", "POST /predict requests refused, by reason", ["reason"], registry=r)
        self.rows = Counter("finetune_serve_rows", "Rows predicted", registry=r)
        self.latency = Histogram("finetune_serve_request_seconds", "POST /predict latency (answered requests)",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)  # fmt: skip
        rows = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        self.batch_rows = Histogram("finetune_serve_batch_rows", "Rows per batch (of the requests gathered together)",
                                    buckets=rows, registry=r)  # fmt: skip
        self.model_call_rows = Histogram("finetune_serve_model_call_rows", "Rows per model call (model_batch_size at most)",
                                         buckets=rows, registry=r)  # fmt: skip
        self.model_seconds = Histogram("finetune_serve_model_seconds", "Time of one batch (tokenize, run, decide)",
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)  # fmt: skip
        self.queue_rows = Gauge("finetune_serve_queue_rows", "Rows accepted and not yet answered", registry=r)


class Batcher:
    """Gathers the rows of concurrent requests into batches for one model worker thread.

    ``submit`` is called on the event loop; ``run`` is the loop's one batching task. A request's
    rows stay together in one batch; a request larger than max_batch_size runs alone (the
    predictor splits it into model batches of max_batch_size)."""

    def __init__(self, predictor, pairs: bool, limits: Limits, metrics: Metrics):
        self.predictor, self.pairs, self.limits, self.metrics = predictor, pairs, limits, metrics
        self.pending: deque = deque()  # (rows, future, arrival time)
        self.waiting_rows = 0  # rows in pending
        self.queued_rows = 0  # rows accepted and not yet answered (pending + the batch running)
        self.wakeup = asyncio.Event()
        # One thread: the model runs one batch at a time with all its intra-op threads.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetune-model")

    async def submit(self, rows: List[Dict[str, str]]) -> List[Dict[str, object]]:
        if self.queued_rows + len(rows) > self.limits.max_queue:
            raise RequestError(503, f"the server is busy ({self.queued_rows} rows queued, max_queue="
                                    f"{self.limits.max_queue}); retry shortly", "queue_full", {"Retry-After": "1"})  # fmt: skip
        future = asyncio.get_running_loop().create_future()
        self.pending.append((rows, future, time.monotonic()))
        self._count(len(rows), waiting=len(rows))
        self.wakeup.set()
        return await future

    def _count(self, queued: int, waiting: int = 0) -> None:
        self.queued_rows += queued
        self.waiting_rows += waiting
        self.metrics.queue_rows.set(self.queued_rows)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
            # Wait for more rows until the batch is full or the oldest row has waited max_wait_ms.
            deadline = self.pending[0][2] + self.limits.max_wait_ms / 1000
            while self.waiting_rows < self.limits.max_batch_size and time.monotonic() < deadline:
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    break
            batch = [self.pending.popleft()]
            while self.pending and len(batch[0][0]) + sum(len(b[0]) for b in batch[1:]) + len(self.pending[0][0]) <= (
                self.limits.max_batch_size
            ):
                batch.append(self.pending.popleft())
            await self._run_batch(loop, batch)

    async def _run_batch(self, loop, batch) -> None:
        rows = [row for request_rows, _, _ in batch for row in request_rows]
        self._count(0, waiting=-len(rows))
        started = time.perf_counter()
        try:
            columns = ("text", "text_pair" if self.pairs else None)
            records = await loop.run_in_executor(self.executor, self.predictor, rows, *columns)
        except Exception as err:  # a bad batch answers 500 to its requests; the server goes on
            logger.exception("finetune.serve: the model call on %d rows failed", len(rows))
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(RequestError(500, f"the model failed on this batch ({type(err).__name__})",
                                                      "model_error"))  # fmt: skip
        else:
            self.metrics.batch_rows.observe(len(rows))
            self.metrics.model_seconds.observe(time.perf_counter() - started)
            start = 0
            for request_rows, future, _ in batch:
                if not future.done():  # a client that went away cancelled its future
                    future.set_result(records[start : start + len(request_rows)])
                start += len(request_rows)
        finally:
            self._count(-len(rows))

    async def drain(self) -> None:
        """Answer every accepted row (uvicorn has closed the connections by now; this is the
        belt to its braces), then stop."""
        while self.queued_rows:
            await asyncio.sleep(0.01)
        self.executor.shutdown(wait=True)


class CountedRunner:
    """A predictor's backend that observes the rows of each model call."""

    def __init__(self, runner, histogram):
        self.runner, self.histogram = runner, histogram

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __call__(self, batch):
        self.histogram.observe(len(next(iter(batch.values()))))
        return self.runner(batch)


def create_app(predictor, model_ref: str, limits: Limits):
    """The FastAPI app serving ``predictor`` (a finetune.predict.Predictor)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics = Metrics()
    predictor.runner = CountedRunner(predictor.runner, metrics.model_call_rows)
    pairs = bool(predictor.meta.get("text_pair_column"))
    batcher = Batcher(predictor, pairs, limits, metrics)

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        await batcher.drain()
        task.cancel()

    app = FastAPI(title="finetune.serve", summary=f"Predictions of {model_ref}", lifespan=lifespan)
    info = {"model": model_ref, "model_dir": predictor.model_dir, "task": predictor.task.name,
            "labels": [predictor.id2label[i] for i in sorted(predictor.id2label)], "threshold": predictor.threshold,
            "backend": predictor.runner.name, "max_length": predictor.max_length, "text_pairs": pairs,
            "windows": None if predictor.stride is None else {"stride": predictor.stride,
                                                              "pool": predictor.meta.get("window_pool", "mean")},
            "limits": vars(limits)}  # fmt: skip

    @app.post("/predict", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": INPUTS_SCHEMA}}}})  # fmt: skip
    async def predict_route(request: Request):
        """Predictions for one text, a list of texts or a list of text pairs, in input order."""
        started = time.perf_counter()
        try:
            rows = parse_inputs(await _read_json(request, limits.max_body_bytes), pairs, limits)
            records = await batcher.submit(rows)
        except RequestError as err:
            metrics.requests.labels(str(err.status)).inc()
            metrics.errors.labels(err.kind).inc()
            return JSONResponse({"error": err.reason}, err.status, headers=err.headers)
        metrics.requests.labels("200").inc()
        metrics.rows.inc(len(records))
        metrics.latency.observe(time.perf_counter() - started)
        return {"predictions": records}

    @app.get("/health")
    async def health():
        """200 once the model is loaded (the port opens only then)."""
        return {"status": "ok"}

    @app.get("/info")
    async def info_route():
        """The model, its task, labels and decision threshold, and the server's limits."""
        return info

    @app.get("/metrics")
    async def metrics_route():
        """Prometheus text: requests, rows, errors, latency, batch sizes, queue depth."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _read_json(request, max_bytes: int) -> object:
    """The parsed body, refusing one past ``max_bytes`` before reading it all."""
    too_large = RequestError(413, f"the body is larger than max_body_bytes={max_bytes}", "too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON ({err})", "bad_json") from None


def parse_args(argv: List[str]) -> Dict[str, object]:
    args = parse_options(argv, OPTIONS, ("model",), USAGE, error=ServeError, types=TYPES)
    problems = option_problems(args, OPTION_RANGES)
    try:  # the options shared with finetune.predict, checked by its rules
        check_options({k: args.get(k) for k in PREDICT_OPTIONS})
    except PredictError as err:
        problems.insert(0, str(err))
    if problems:
        raise ServeError(" ".join(problems))
    return args


def serve(args: Dict[str, object]) -> None:
    """Load the model, open the port, serve until SIGTERM / SIGINT."""
    import uvicorn

    from finetune.predict import Predictor

    limits = Limits(**{k: args[k] for k in LIMIT_TYPES if k in args})
    # A request with more rows than the queue holds could never be taken: 413 for it, not 503 forever.
    limits.max_rows_per_request = min(limits.max_rows_per_request, limits.max_queue)
    host, port = args.get("host", "127.0.0.1"), args.get("port", 8080)
    backend = args.get("backend", "auto")
    model_dir, meta = resolve_model_dir(args["model"], backend)
    # The port before the model: a port in use fails in a second, not after a long load.
    # proto=IPPROTO_TCP: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are
    # TCP; without it every keep-alive answer waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in str(host) else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ServeError(f"cannot listen on host={host} port={port} ({err.strerror}); pick another port=... "
                         "(or port=0 for any free one), or stop what listens there.") from None  # fmt: skip
    from finetune.backends import OnnxBackend

    OnnxBackend.spin = False  # see OnnxBackend.spin
    predictor = Predictor(args["model"], model_dir, meta, limits.model_batch_size, args.get("threshold"),
                          args.get("max_length"), backend, args.get("threads"), args.get("device", "auto"))  # fmt: skip
    # One call before the port opens: the first model call pays for lazy set-up (seconds on
    # torch), which should not land on the first client.
    pair_column = "text_pair" if meta.get("text_pair_column") else None
    predictor([dict.fromkeys(("text", "text_pair"), "warm up")], "text", pair_column)
    app = create_app(predictor, str(args["model"]), limits)
    config = uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM / SIGINT, then re-raises the signal to the handler that was there
    # before it: a no-op one here, so that a graceful stop exits 0, not 143 or a KeyboardInterrupt.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(f"finetune.serve: {args['model']} ({predictor.runner.name}) on http://{host}:{sock.getsockname()[1]}",
          file=sys.stderr, flush=True)  # fmt: skip
    server.run(sockets=[sock])


def main(argv: Optional[List[str]] = None) -> None:
    run_command("finetune.serve", __doc__, argv, lambda argv: serve(parse_args(argv)))


if __name__ == "__main__":
    main()
