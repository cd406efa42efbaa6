"""A local stand-in for the Hugging Face Hub's HTTP API: enough of it for create_repo,
create_branch and upload_folder (files declared 'regular', so their content travels inline in the
commit), recording every request so tests can check what huggingface_hub sent."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubRecorder:
    def __init__(self):
        self.requests = []  # (method, path, headers, body)
        self.repos = {}  # repo_id -> {"private": bool}
        self.branches = []  # (repo_id, branch)
        self.commits = []  # {"repo", "revision", "summary", "files": {path: bytes}}
        self.validated_yaml = []  # model-card YAML sent for validation


def _handler(recorder: HubRecorder):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _reply(self, code, payload):
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self):
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self):
            recorder.requests.append(("GET", self.path, dict(self.headers), b""))
            if self.path.startswith("/api/whoami"):
                return self._reply(200, {"name": "tester", "type": "user", "auth": {"accessToken": {"role": "write"}}})
            self._reply(404, {"error": "not in the stand-in"})

        def do_POST(self):
            body = self._body()
            recorder.requests.append(("POST", self.path, dict(self.headers), body))
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
            self._reply(404, {"error": f"not in the stand-in: {self.path}"})

    return Handler


def start_hub_server():
    """(server, recorder, endpoint URL) on a free loopback port; call server.shutdown() after."""
    recorder = HubRecorder()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(recorder))
    recorder.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, recorder, f"http://127.0.0.1:{server.server_address[1]}"
