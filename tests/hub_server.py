"""A local stand-in for the Hugging Face Hub's HTTP API, recording every request so tests can
check what huggingface_hub sent.

Downloads: model and dataset repos given as {path: bytes} are served the way the Hub serves them
(`resolve/` with the commit and ETag headers, repo info, `tree`, `paths-info`), enough for
`from_pretrained(...)`, `hf_hub_download`, `HfFileSystem` and `datasets.load_dataset(...)`.
Uploads: enough for create_repo, create_branch and upload_folder (files declared 'regular', so
their content travels inline in the commit).

`network_guard_dir` makes a subprocess refuse every connection that is not to this machine (and
write the host down), so a test can prove that a run reached nothing but the stand-in. This module
imports nothing but the standard library, so that guard costs a subprocess nothing."""

import base64
import hashlib
import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Optional
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class HubRepo:
    """One repository's files at one commit."""

    files: Dict[str, bytes]
    sha: str = ""

    def __post_init__(self):
        if not self.sha:  # a commit id that changes whenever the content does
            digest = hashlib.sha1()
            for path in sorted(self.files):
                digest.update(path.encode() + b"\0" + self.files[path])
            self.sha = digest.hexdigest()

    def entry(self, path: str) -> Optional[dict]:
        """The tree entry of a file or folder (as /tree and /paths-info list them); None if absent."""
        if path in self.files:
            content = self.files[path]
            return {"type": "file", "path": path, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
        if any(f.startswith(path + "/") for f in self.files):
            return {"type": "directory", "path": path, "size": 0, "oid": hashlib.sha1(path.encode()).hexdigest()}
        return None

    def listing(self, folder: str, recursive: bool) -> list:
        prefix = folder + "/" if folder else ""
        paths = set()
        for f in self.files:
            if f.startswith(prefix):
                parts = f[len(prefix) :].split("/")
                paths.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts) if recursive else 1))
        return [self.entry(p) for p in sorted(paths)]


class HubRecorder:
    def __init__(self):
        self.requests = []  # (method, path, headers, body)
        self.repos = {}  # repo_id -> {"private": bool}
        self.branches = []  # (repo_id, branch)
        self.commits = []  # {"repo", "revision", "summary", "files": {path: bytes}}
        self.validated_yaml = []  # model-card YAML sent for validation
        self.served = {}  # (repo_type, repo_id) -> HubRepo, the repos that can be downloaded
        self.downloads = []  # (repo_type, repo_id, path) of every file sent
        self.unhandled = []  # (method, path) of requests no route of the stand-in understood


def _handler(recorder: HubRecorder):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _reply(self, code, payload, headers=()):
            body = json.dumps(payload).encode()
            self.send_response(code)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return True

        def _error(self, code, error_code, message):
            """The Hub's error replies: huggingface_hub picks its exception by X-Error-Code."""
            return self._reply(code, {"error": message}, [("X-Error-Code", error_code), ("X-Error-Message", message)])

        def _body(self):
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _repo(self, repo_type, rest):
            """(repo_id, HubRepo, what follows the id) for a served repo named at the start of rest."""
            for (kind, repo_id), repo in recorder.served.items():
                if kind == repo_type and (rest == repo_id or rest.startswith(repo_id + "/")):
                    return repo_id, repo, rest[len(repo_id) + 1 :]
            return None, None, ""

        def _download_route(self, method, body=b""):
            """Serve the read side of the Hub; False when the path is none of its routes."""
            url = urlsplit(self.path)
            path = unquote(url.path)
            if path.startswith("/api/models/") or path.startswith("/api/datasets/"):
                _, plural, rest = path.split("/", 3)[1:]
                repo_type = plural[:-1]
            elif "/resolve/" in path:
                rest = path[1:]
                repo_type = "model"
                if rest.startswith("datasets/"):
                    repo_type, rest = "dataset", rest[len("datasets/") :]
                plural = None
            else:
                return False
            repo_id, repo, tail = self._repo(repo_type, rest)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository not found: {rest}")
            action, _, tail = tail.partition("/")
            if plural is None and action == "resolve" or action in ("tree", "paths-info", "revision"):
                revision, _, tail = tail.partition("/")
                if revision not in ("main", repo.sha):
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if plural is None and action == "resolve":
                return self._send_file(method, repo_type, repo_id, repo, tail)
            if action in ("", "revision") and method == "GET" and not tail:
                siblings = [{"rfilename": p, "size": len(c)} for p, c in sorted(repo.files.items())]
                return self._reply(200, {"id": repo_id, "sha": repo.sha, "private": False, "disabled": False,
                                         "gated": False, "siblings": siblings})  # fmt: skip
            if action == "tree" and method == "GET":
                if tail and (repo.entry(tail) or {}).get("type") != "directory":
                    return self._error(404, "EntryNotFound", f"{tail} does not exist on {repo.sha}")
                recursive = parse_qs(url.query).get("recursive", ["False"])[0].lower() == "true"
                return self._reply(200, repo.listing(tail, recursive))
            if action == "paths-info" and method == "POST":
                form = parse_qs(body.decode())
                found = [repo.entry(p) for p in form.get("paths", [])]
                return self._reply(200, [e for e in found if e])
            return False

        def _send_file(self, method, repo_type, repo_id, repo, path):
            content = repo.files.get(path)
            if content is None:
                return self._error(404, "EntryNotFound", f"Entry not found: {path}")
            start, end = 0, len(content)
            ranged = self.headers.get("Range", "").startswith("bytes=")
            if ranged:
                first, _, last = self.headers["Range"][len("bytes=") :].partition("-")
                start, end = int(first or 0), min(int(last) + 1 if last else len(content), len(content))
            self.send_response(206 if ranged else 200)
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(content)}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if method == "GET":
                recorder.downloads.append((repo_type, repo_id, path))
                self.wfile.write(content[start:end])
            return True

        def do_HEAD(self):
            recorder.requests.append(("HEAD", self.path, dict(self.headers), b""))
            if not self._download_route("HEAD"):
                recorder.unhandled.append(("HEAD", self.path))
                self._error(404, "EntryNotFound", "not in the stand-in")

        def do_GET(self):
            recorder.requests.append(("GET", self.path, dict(self.headers), b""))
            if self.path.startswith("/api/whoami"):
                return self._reply(200, {"name": "tester", "type": "user", "auth": {"accessToken": {"role": "write"}}})
            if self.path.startswith("/api/agent-harnesses"):  # huggingface_hub's registry, fetched at start
                return self._reply(200, {"standardEnvVars": [], "harnesses": {}})
            if self._download_route("GET"):
                return
            recorder.unhandled.append(("GET", self.path))
            self._reply(404, {"error": "not in the stand-in"})

        def do_POST(self):
            body = self._body()
            recorder.requests.append(("POST", self.path, dict(self.headers), body))
            if "/paths-info/" in self.path and self._download_route("POST", body):
                return
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts[:2] == ["api", "validate-yaml"]:
                recorder.validated_yaml.append(json.loads(body).get("content", ""))
                return self._reply(200, {"errors": [], "warnings": []})
            if parts[:3] == ["api", "repos", "create"]:
                data = json.loads(body)
                repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                # huggingface_hub 2.x sends visibility; older clients sent private.
                recorder.repos[repo_id] = {"private": data.get("visibility") == "private" or bool(data.get("private"))}
                return self._reply(200, {"url": f"{recorder.endpoint}/{repo_id}", "name": repo_id})
            if parts[:2] == ["api", "models"] and "preupload" in parts:
                files = json.loads(body)["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for f in files]})  # fmt: skip
            if parts[:2] == ["api", "models"] and "commit" in parts:
                i = parts.index("commit")
                commit = {"repo": "/".join(parts[2:i]), "revision": "/".join(parts[i + 1 :]), "files": {}}
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        commit["summary"] = item["value"].get("summary")
                    elif item["key"] == "file":
                        commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                recorder.commits.append(commit)
                return self._reply(200, {"commitUrl": f"{recorder.endpoint}/{commit['repo']}/commit/{'1' * 40}", "commitOid": "1" * 40,
                                         "pullRequestUrl": None})  # fmt: skip
            if parts[:2] == ["api", "models"] and "branch" in parts:
                i = parts.index("branch")
                recorder.branches.append(("/".join(parts[2:i]), "/".join(parts[i + 1 :])))
                return self._reply(200, {})
            recorder.unhandled.append(("POST", self.path))
            self._reply(404, {"error": f"not in the stand-in: {self.path}"})

    return Handler


def start_hub_server(served=None):
    """(server, recorder, endpoint URL) on a free loopback port; call server.shutdown() after.
    ``served`` maps (repo_type, repo_id) to the HubRepo that can be downloaded."""
    recorder = HubRecorder()
    recorder.served = dict(served or {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(recorder))
    recorder.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, recorder, f"http://127.0.0.1:{server.server_address[1]}"


LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def block_network(log_path: str) -> None:
    """Refuse name lookups and connections to anything but this machine, writing each refused host
    to ``log_path`` (what the sitecustomize.py of ``network_guard_dir`` does at start-up)."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def refuse(host):
        with open(log_path, "a") as f:
            f.write(f"{host}\n")
        raise socket.gaierror(socket.EAI_NONAME, f"tests: no network (refused {host})")

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOCAL_HOSTS:
            refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in LOCAL_HOSTS:
            refuse(address[0])
        return real_connect(self, address)

    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect


def network_guard_dir(folder: Path) -> Path:
    """A folder to put first on PYTHONPATH: its sitecustomize.py installs block_network at start-up."""
    folder.mkdir(parents=True, exist_ok=True)
    tests = Path(__file__).resolve().parent
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(tests)!r})\nimport hub_server\nsys.path.pop(0)\n"
        f"hub_server.block_network({str(folder / 'refused_hosts.txt')!r})\n"
    )
    return folder


def refused_hosts(folder: Path) -> set:
    log = folder / "refused_hosts.txt"
    return set(log.read_text().split()) if log.exists() else set()
