"""A fake Hugging Face Hub on 127.0.0.1, for tests of ``jobs.export --push-to-hub`` that upload over real HTTP with
nothing reaching huggingface.co.

It answers only what huggingface_hub's single-commit upload calls (``HfApi.create_repo`` then ``upload_folder`` with
hf_xet off, which goes through ``create_commit``):
- ``POST /api/repos/create``: JSON ``{name, organization, visibility, type}``; answers the repo's URL;
- ``POST /api/models/{org}/{name}/preupload/{revision}``: which upload mode each file takes. Always "regular", so the
  client sends every file's bytes inline in the commit and no LFS upload endpoint is needed;
- ``POST /api/models/{org}/{name}/commit/{revision}``: ndjson, a header line then one line per file (base64 content);
  stores the files under ``root/{org}/{name}/`` and answers the commit's oid and URL.
Any other request is answered 404 and kept in ``unanswered``, so a test sees a client that asks for more. A request
without the accepted bearer token is answered 401, as the Hub answers a bad token. One public request is answered
404 before that and kept nowhere: ``GET /api/agent-harnesses``, the registry huggingface_hub fetches (without a token)
once per process for its user agent — whether a test sees it depends on what ran before it in the process, and a 404
keeps the client from caching the fake's answer under HF_HOME.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"
PREUPLOAD = re.compile(rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)")
COMMIT = re.compile(rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)")


class FakeHub:
    """The server, started by ``with FakeHub(root, token) as hub`` (``hub.url`` is its endpoint) and stopped after.
    What it saw: ``requests`` (method, path, Authorization header of each), ``created`` (repo id → create_repo's
    JSON body), ``commits`` (repo id → each commit's oid and header), ``unanswered`` ("METHOD path" of each 404)."""

    def __init__(self, root: Path, token: str):
        self.root, self.token = Path(root), token
        self.requests: list[dict] = []
        self.created: dict[str, dict] = {}
        self.commits: dict[str, list[dict]] = {}
        self.unanswered: list[str] = []
        self.lock = threading.Lock()  # the handler threads append concurrently
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def files(self, repo: str) -> dict[str, bytes]:
        """The repo's files as committed: path in the repo → bytes."""
        folder = self.root / repo
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    # The endpoints; each takes the request's JSON (ndjson: raw bytes) and returns (status, JSON answer).
    def create_repo(self, body: dict) -> tuple[int, dict]:
        repo = f"{body['organization']}/{body['name']}"
        with self.lock:
            self.created[repo] = body
        (self.root / repo).mkdir(parents=True, exist_ok=True)
        return 200, {"url": f"{self.url}/{repo}", "name": repo}

    def preupload(self, repo: str, body: dict) -> tuple[int, dict]:
        if repo not in self.created:
            return 404, {"error": "Repository not found"}
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                               for f in body["files"]]}

    def commit(self, repo: str, ndjson: bytes) -> tuple[int, dict]:
        if repo not in self.created:
            return 404, {"error": "Repository not found"}
        lines = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
        header, operations = lines[0], lines[1:]
        if header["key"] != "header" or any(op["key"] != "file" for op in operations):
            # only inline files: this server never asks for LFS, so an lfsFile line is a client it does not know
            return 400, {"error": f"unexpected commit lines {[op['key'] for op in lines]}"}
        for op in operations:
            target = self.root / repo / op["value"]["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(op["value"]["content"]))
        oid = hashlib.sha1(ndjson).hexdigest()  # any 40-hex id will do; this one differs per commit
        with self.lock:
            self.commits.setdefault(repo, []).append({"oid": oid, **header["value"]})
        return 200, {"commitOid": oid, "commitUrl": f"{self.url}/{repo}/commit/{oid}"}


class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer  # with .hub

    def do_GET(self) -> None:
        self.answer(None)

    def do_POST(self) -> None:
        self.answer(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def answer(self, body: bytes | None) -> None:
        hub: FakeHub = self.server.hub
        path = urlsplit(self.path).path
        if path == "/api/agent-harnesses":
            return self.reply(404, {"error": "not served here"})
        authorization = self.headers.get("Authorization")
        with hub.lock:
            hub.requests.append({"method": self.command, "path": path, "authorization": authorization})
        if authorization != f"Bearer {hub.token}":
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        if self.command == "POST" and path == "/api/repos/create":
            return self.reply(*hub.create_repo(json.loads(body)))
        if self.command == "POST" and (match := PREUPLOAD.fullmatch(path)):
            return self.reply(*hub.preupload(match["repo"], json.loads(body)))
        if self.command == "POST" and (match := COMMIT.fullmatch(path)):
            return self.reply(*hub.commit(match["repo"], body))
        with hub.lock:
            hub.unanswered.append(f"{self.command} {path}")
        self.reply(404, {"error": f"the fake Hub does not serve {self.command} {path}"})

    def reply(self, status: int, answer: dict) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # requests are kept in FakeHub.requests, not printed
        pass
