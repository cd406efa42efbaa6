#!/usr/bin/env python
"""finetune.serve under load, against the web app users write around transformers.pipeline.

Both are started as their own uvicorn processes on 127.0.0.1 and driven in turn, over the same
rows, by --clients concurrent async clients (aiohttp), each sending one text per request:

- finetune.serve (`python -m finetune.serve model=--model`): dynamic batching, the run's
  post-processing; --model may be an ONNX (int8) export of the run.
- the baseline: a FastAPI endpoint calling `pipeline("text-classification", model=RUN/model)` on each
  request (a plain `def` route, so FastAPI runs it in its thread pool, as such apps are written).

Printed per server: rows/s (answered rows over the wall time of the load), p50/p95/p99 latency,
errors by kind (HTTP status, timeout, connection), labels that differ from `finetune.predict`'s on
the same row (in-process, same model folder and backend as the server), resident memory of the
server process before and after the load, rows per batch and per model call (finetune.serve's /metrics); then
whether a request right after the load is answered.

    HF_HUB_OFFLINE=1 python scripts/serve_benchmark.py --run runs/teacher --model runs/teacher-int8 \
        --rows 2000 --clients 32 [--threads N] [--max-batch-size 32] [--model-batch-size 4] [--max-wait-ms 5] [--json out.json]
    # overload: many clients, a small queue; 503s are counted, memory reported
    HF_HUB_OFFLINE=1 python scripts/serve_benchmark.py --run runs/teacher --model runs/teacher-int8 \
        --clients 256 --max-queue 64 --no-baseline
"""

import argparse
import asyncio
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_texts(path: str, limit: int, text_column: str) -> list:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return [r[text_column] for r in rows]


def baseline_app(model_dir: str, max_length, threads: int):
    """The naive server: one pipeline call per request."""
    import torch
    from fastapi import FastAPI
    from transformers import pipeline

    torch.set_num_threads(threads)
    clf = pipeline("text-classification", model=model_dir, device=-1)
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: dict):
        out = clf(body["inputs"], truncation=True, max_length=max_length)
        return {"predictions": [{"prediction": o["label"], "score": o["score"]} for o in out]}

    return app


def start(command: list, port: int, log: Path, timeout: float = 300) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{command[:4]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.25)
    proc.kill()
    sys.exit(f"{command[:4]} did not answer /health within {timeout} s:\n{log.read_text()[-3000:]}")


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


async def drive(url: str, texts: list, clients: int, timeout: float) -> dict:
    """Every text sent once, by ``clients`` concurrent clients each taking the next text. aiohttp:
    the load generator shares the CPU with the server, and on 2 cores aiohttp's clients took 0.07 of
    a core at 213 requests/s where httpx's took ~0.7 at 135 (the clients' cost is in both servers'
    numbers, so the cheaper the fairer)."""
    import aiohttp

    queue = asyncio.Queue()
    for i, text in enumerate(texts):
        queue.put_nowait((i, text))
    latencies, labels, errors = [], [None] * len(texts), {}

    async def client(http):
        while not queue.empty():
            i, text = queue.get_nowait()
            started = time.perf_counter()
            try:
                async with http.post(f"{url}/predict", json={"inputs": text}) as response:
                    if response.status != 200:
                        errors[str(response.status)] = errors.get(str(response.status), 0) + 1
                        await response.read()
                        continue
                    body = await response.json()
            except asyncio.TimeoutError:
                errors["timeout"] = errors.get("timeout", 0) + 1
                continue
            except aiohttp.ClientError as err:
                errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - started)
            labels[i] = body["predictions"][0]["prediction"]

    connector = aiohttp.TCPConnector(limit=clients)  # one keep-alive connection per client (Nagle off by default)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        started = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(clients)])
        wall = time.perf_counter() - started
    return {"wall_s": wall, "latencies": latencies, "labels": labels, "errors": errors}


def percentile(values: list, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def measure(name: str, proc, url: str, texts: list, expected: list, args) -> dict:
    import httpx

    before = rss_mb(proc.pid)
    load = asyncio.run(drive(url, texts, args.clients, args.timeout))
    after = rss_mb(proc.pid)
    answered = len(load["latencies"])
    result = {
        "server": name, "rows": len(texts), "clients": args.clients, "answered": answered,
        "rows_per_s": answered / load["wall_s"], "wall_s": load["wall_s"],
        "p50_ms": 1000 * percentile(load["latencies"], 50), "p95_ms": 1000 * percentile(load["latencies"], 95),
        "p99_ms": 1000 * percentile(load["latencies"], 99), "max_ms": 1000 * max(load["latencies"], default=float("nan")),
        "errors": load["errors"],
        "label_mismatches": sum(g is not None and g != e for g, e in zip(load["labels"], expected)),
        "rss_mb_before": before, "rss_mb_after": after,
    }  # fmt: skip
    if name == "finetune.serve":
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        value = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line and line[0] != "#"}
        for key, series in (("rows_per_batch", "batch_rows"), ("rows_per_model_call", "model_call_rows")):
            calls = value.get(f"finetune_serve_{series}_count", 0)
            result[key] = value.get(f"finetune_serve_{series}_sum", 0) / calls if calls else None
    after_load = [httpx.post(f"{url}/predict", json={"inputs": t}, timeout=args.timeout).status_code for t in texts[:5]]
    result["after_load_statuses"] = after_load
    return result


def stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run directory (its model/ feeds the baseline)")
    parser.add_argument("--model", help="what finetune.serve serves (default: --run), e.g. an ONNX int8 export")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "validation.tsv"))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--model-batch-size", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    parser.add_argument("--max-queue", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=60, help="seconds a client waits for one answer")
    parser.add_argument("--no-baseline", action="store_true", help="drive finetune.serve only")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--serve-baseline", nargs=2, metavar=("MODEL_DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve_baseline:  # this script, started again as the baseline's server process
        import uvicorn

        model_dir, port = args.serve_baseline
        meta_file = Path(model_dir) / "finetune.json"
        max_length = json.loads(meta_file.read_text()).get("max_length") if meta_file.is_file() else None
        uvicorn.run(baseline_app(model_dir, max_length, args.threads), host="127.0.0.1", port=int(port),
                    log_level="warning")  # fmt: skip
        return

    from finetune.predict import predict, resolve_model_dir

    model = args.model or args.run
    model_dir, meta = resolve_model_dir(model)
    texts = read_texts(args.data, args.rows, meta.get("text_column") or "text")
    rows = [{"text": t} for t in texts]
    print(f"{len(texts)} rows of {args.data}; finetune.predict on {model} for the expected labels", file=sys.stderr)
    expected = [r["prediction"] for r in predict(model, rows, progress=False, threads=args.threads)]
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    results = []

    port = free_port()
    proc = start([sys.executable, "-m", "finetune.serve", f"model={model}", f"port={port}", f"threads={args.threads}",
                  f"max_batch_size={args.max_batch_size}", f"model_batch_size={args.model_batch_size}",
                  f"max_wait_ms={args.max_wait_ms}",
                  f"max_queue={args.max_queue}"], port, logs / "serve_benchmark.serve.log")  # fmt: skip
    results.append(measure("finetune.serve", proc, f"http://127.0.0.1:{port}", texts, expected, args))
    results[-1]["exit_code_after_sigterm"] = stop(proc)

    if not args.no_baseline:
        run_model_dir, _ = resolve_model_dir(args.run, "torch")
        port = free_port()
        proc = start([sys.executable, __file__, "--run", args.run, "--threads", str(args.threads), "--serve-baseline",
                      run_model_dir, str(port)], port, logs / "serve_benchmark.baseline.log")  # fmt: skip
        results.append(measure("pipeline per request", proc, f"http://127.0.0.1:{port}", texts, expected, args))
        results[-1]["exit_code_after_sigterm"] = stop(proc)

    print(f"\n{len(texts)} single-text requests, {args.clients} concurrent clients, {args.threads} threads, "
          f"max_batch_size={args.max_batch_size} model_batch_size={args.model_batch_size} max_wait_ms={args.max_wait_ms} "
          f"max_queue={args.max_queue}")  # fmt: skip
    print("| server | rows/s | p50 ms | p95 ms | p99 ms | max ms | errors | labels != predict | RSS MB before/after |"
          " rows per batch / per model call | after the load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        per_call = f"{r['rows_per_batch']:.1f} / {r['rows_per_model_call']:.1f}" if r.get("rows_per_batch") else ""
        print(f"| {r['server']} | {r['rows_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} "
              f"| {r['max_ms']:.0f} | {sum(r['errors'].values())} {r['errors'] or ''} | {r['label_mismatches']} "
              f"| {r['rss_mb_before']:.0f} / {r['rss_mb_after']:.0f} | {per_call} | {r['after_load_statuses']} |")  # fmt: skip
    if len(results) == 2:
        print(f"\nfinetune.serve / pipeline per request: {results[0]['rows_per_s'] / results[1]['rows_per_s']:.1f}x rows/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
