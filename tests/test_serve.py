"""finetune.serve as a real server process on 127.0.0.1: its routes, finetune.predict's answers,
batching of concurrent requests, bad requests refused while good ones are served, the bounded
queue, and SIGTERM draining."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import ROOT, free_port, subprocess_pythonpath
from finetune.predict import predict, read_rows
from test_e2e import train_toy_run

# The main server: long enough a batching window that concurrent test requests meet in a batch,
# small limits that the bad-request tests cross.
MAIN = ("max_batch_size=8", "model_batch_size=2", "max_wait_ms=200", "max_rows_per_request=4", "max_body_bytes=1500", "max_text_chars=500")
# A server whose rows wait 1 s for company: a queue of 3 rows fills, and SIGTERM finds rows queued.
TIGHT = ("max_batch_size=8", "max_wait_ms=1000", "max_queue=3")


class Server:
    def __init__(self, run, options, log):
        self.port, self.log = free_port(), log
        env = {**os.environ, "PYTHONPATH": subprocess_pythonpath(ROOT), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "finetune.serve", f"model={run}", f"port={self.port}", "threads=1", *options]
        with open(log, "w") as f:
            self.proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not answer /health in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def post(self, body, **kwargs):
        content = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        return httpx.post(f"{self.url}/predict", content=content, timeout=60, **kwargs)

    def metric(self, name, **labels):
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        series = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " ")]
        return values[0] if values else 0.0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def trained_run(tiny_bert, tmp_path_factory):
    return train_toy_run(tiny_bert, tmp_path_factory.mktemp("serve"), "logger=none", "plots=false")


@pytest.fixture(scope="module")
def servers(trained_run, tmp_path_factory):
    """(main server, tight server), started side by side."""
    run, logs = trained_run[0], tmp_path_factory.mktemp("serve-logs")
    started = [Server(run, MAIN, logs / "main.log"), Server(run, TIGHT, logs / "tight.log")]
    try:
        yield [s.wait_ready() for s in started]
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


def concurrently(*calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def test_answers_are_finetune_predicts(server, trained_run):
    run, files = trained_run
    rows = read_rows(files["validation"])
    expected = predict(str(run), rows, progress=False)
    texts = [e["text"] for e in expected]
    chunks = [texts[i : i + 4] for i in range(0, len(texts), 4)]  # max_rows_per_request=4
    responses = concurrently(*[lambda c=c: server.post({"inputs": c}) for c in chunks])
    got = [record for r in responses for record in r.json()["predictions"]]
    assert all(r.status_code == 200 for r in responses)
    assert [g["prediction"] for g in got] == [e["prediction"] for e in expected]
    assert [g["text"] for g in got] == texts
    for g, e in zip(got, expected):  # other batch-mates, other padding: the same numbers up to float noise
        assert set(g) == set(e) and all(abs(g[k] - e[k]) < 1e-5 for k in g if k.startswith("prob_"))
    single = server.post({"inputs": texts[0]}).json()["predictions"]
    assert [s["prediction"] for s in single] == [expected[0]["prediction"]]


def test_routes(server, trained_run):
    health = httpx.get(f"{server.url}/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    info = httpx.get(f"{server.url}/info").json()
    assert info["labels"] == ["negative", "positive"] and info["task"] == "single_label_classification"
    assert (info["threshold"], info["backend"], info["max_length"], info["windows"]) == (0.5, "torch", 32, None)
    assert info["limits"]["max_rows_per_request"] == 4 and info["text_pairs"] is False
    docs = httpx.get(f"{server.url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "/predict" in httpx.get(f"{server.url}/openapi.json").json()["paths"]
    server.post({"inputs": "a fine film"})
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for series in ("finetune_serve_requests_total{", "finetune_serve_rows_total", "finetune_serve_errors_total",
                   "finetune_serve_request_seconds_bucket", "finetune_serve_batch_rows_bucket",
                   "finetune_serve_queue_rows"):  # fmt: skip
        assert series in metrics.text


BAD_REQUESTS = {
    "malformed JSON": (b'{"inputs": ["a", ', 400, "not valid JSON"),
    "wrong field": ({"texts": ["a film"]}, 422, "'inputs' field"),
    "extra field": ({"inputs": "a film", "top_k": 3}, 422, "unknown field"),
    "not an object": (["a film"], 422, "'inputs' field"),
    "empty list": ({"inputs": []}, 422, "empty list"),
    "non-string": ({"inputs": ["a film", 7]}, 422, "inputs[1] holds a number"),
    "null inputs": ({"inputs": None}, 422, "'inputs' is a null"),
    "pair on a single-text model": ({"inputs": [["a film", "a play"]]}, 422, "reads single texts"),
    "too many rows": ({"inputs": ["a film"] * 5}, 413, "max_rows_per_request=4"),
    "text too long": ({"inputs": ["word " * 101]}, 413, "max_text_chars=500"),
    "body too large": ({"inputs": ["a film " * 60] * 4}, 413, "max_body_bytes=1500"),
}


def chunks(body: bytes):
    yield from (body[i : i + 100] for i in range(0, len(body), 100))


@pytest.mark.parametrize("case", [*BAD_REQUESTS, "body too large, no Content-Length"])
def test_bad_request_refused_while_a_good_one_is_served(server, case):
    if case in BAD_REQUESTS:
        body, status, reason = BAD_REQUESTS[case]
    else:  # sent in chunks: the limit holds while the body is read, not only on the declared length
        body, status, reason = chunks(json.dumps({"inputs": ["a film " * 60] * 4}).encode()), 413, "max_body_bytes=1500"
    bad, good = concurrently(lambda: server.post(body), lambda: server.post({"inputs": ["a good film", "a bad one"]}))
    assert bad.status_code == status, bad.text
    assert reason in bad.json()["error"] and "\n" not in bad.json()["error"]
    assert good.status_code == 200 and len(good.json()["predictions"]) == 2


def test_concurrent_requests_share_a_model_call(server):
    calls, rows = server.metric("finetune_serve_batch_rows_count"), server.metric("finetune_serve_rows_total")
    responses = concurrently(*[lambda i=i: server.post({"inputs": f"film number {i}"}) for i in range(6)])
    assert all(r.status_code == 200 for r in responses)
    assert server.metric("finetune_serve_rows_total") - rows == 6
    assert server.metric("finetune_serve_batch_rows_count") - calls < 6  # some batch served several requests
    # ... in model calls of model_batch_size=2 rows at most: 6 rows, at least 3 calls, none over 2 rows.
    assert server.metric("finetune_serve_model_call_rows_count") >= 3
    assert server.metric("finetune_serve_model_call_rows_bucket", le="2.0") == \
        server.metric("finetune_serve_model_call_rows_count")


def test_full_queue_answers_503_then_serves_again(servers):
    tight = servers[1]
    responses = concurrently(*[lambda i=i: tight.post({"inputs": f"film {i}"}) for i in range(6)])
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 3 and statuses.count(503) >= 1 and set(statuses) == {200, 503}, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "max_queue=3" in refused.json()["error"]
    assert tight.post({"inputs": "again"}).status_code == 200


def test_sigterm_answers_queued_requests_then_exits_0(servers):
    tight = servers[1]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(tight.post, {"inputs": f"film {i}"}) for i in range(3)]
        deadline = time.monotonic() + 10
        while tight.metric("finetune_serve_queue_rows") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        tight.proc.send_signal(signal.SIGTERM)  # the 3 rows wait ~1 s for their batch
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no new connection once SIGTERM has arrived
            httpx.get(f"{tight.url}/health", timeout=2)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 3
    assert tight.proc.wait(timeout=30) == 0, tight.log.read_text()[-3000:]


def test_bad_options_and_busy_port_are_one_paragraph(trained_run, capsys):
    from finetune.serve import main

    with pytest.raises(SystemExit) as exit_:
        main([f"model={trained_run[0]}", "max_batch_size=0", "max_wait_ms=-1", "backend=tpu", "port=http"])
    assert exit_.value.code == 2
    assert "port='http' is not an integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"model={trained_run[0]}", "max_batch_size=0", "max_wait_ms=-1", "backend=tpu"])
    err = capsys.readouterr().err
    assert err.startswith("finetune.serve: error:") and err.count("\n") == 1
    assert all(s in err for s in ("max_batch_size=0", "max_wait_ms=-1", "backend='tpu'"))
    with socket.socket() as busy:  # a process with a timeout: were the check gone, it would serve on
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        command = [sys.executable, "-m", "finetune.serve", f"model={trained_run[0]}", f"port={busy.getsockname()[1]}"]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": subprocess_pythonpath(ROOT)})  # fmt: skip
    assert proc.returncode == 2 and "error: cannot listen on host=127.0.0.1" in proc.stderr, proc.stderr[-2000:]
