"""A fake Hugging Face Hub for tests: a local HTTP server answering the few endpoints huggingface_hub's downloads call
(`repo_info`, `list_repo_tree`, and a file's HEAD and GET under /resolve/), serving repos pushed from local folders (the
tiny models of `tiny_models`), with branches and commits. `serving(hub, monkeypatch, cache)` points huggingface_hub at
it online, with its own cache; every request is kept in `hub.requests`.

The answers are the real hub's, as much of them as huggingface_hub reads: repo info with its commit `sha`, the tree as a
list of files, a file's commit in X-Repo-Commit and its ETag; a missing repo, revision or file is a 404 with the
X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) that huggingface_hub turns into its own errors.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    """Repos {repo_id: {"refs": {branch: commit}, "commits": {commit: {path: bytes}}}}, served at `url` once started."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[str] = []
        self.server: ThreadingHTTPServer | None = None

    def push(self, repo_id: str, folder: Path, branch: str = "main", extra: dict[str, bytes] | None = None) -> str:
        """A commit of `folder`'s files (and `extra` {path: bytes}) to `branch` of `repo_id`; its 40-hex commit id."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        files |= extra or {}
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        commit = hashlib.sha1(json.dumps([repo_id, branch, len(repo["commits"]), sorted(files)]).encode()).hexdigest()
        repo["commits"][commit] = files
        repo["refs"][branch] = commit
        return commit

    def start(self) -> str:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, method: str, path: str) -> tuple[int, dict, bytes]:
        """(status, headers, body) of a request, as the hub answers it."""
        self.requests.append(f"{method} {path}")
        parts = [unquote(p) for p in urlsplit(path).path.strip("/").split("/")]
        api = parts[:2] == ["api", "models"]
        if api:
            parts = parts[2:]
        repo = self.repos.get("/".join(parts[:2]))
        if repo is None:
            return _error(404, "RepoNotFound")
        action, rest = (parts[2], parts[3:]) if len(parts) > 2 else ("revision", ["main"])
        revision = rest[0] if rest else "main"
        commit = repo["refs"].get(revision, revision)
        files = repo["commits"].get(commit)
        if files is None:
            return _error(404, "RevisionNotFound")
        if api and action == "revision":
            info = {"id": "/".join(parts[:2]), "sha": commit, "siblings": [{"rfilename": name} for name in files]}
            return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
        if api and action == "tree":
            tree = [{"type": "file", "path": name, "size": len(data), "oid": _etag(data)} for name, data in files.items()]
            return 200, {"Content-Type": "application/json"}, json.dumps(tree).encode()
        name = "/".join(rest[1:])
        if api or action != "resolve" or name not in files:
            return _error(404, "EntryNotFound", {"X-Repo-Commit": commit})
        data = files[name]
        return 200, {"X-Repo-Commit": commit, "ETag": f'"{_etag(data)}"', "Content-Type": "application/octet-stream"}, data


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _error(status: int, code: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    return status, {"X-Error-Code": code, "X-Error-Message": code, **(headers or {})}, b""


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _respond(self, body: bool) -> None:
            status, headers, data = hub.answer(self.command, self.path)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self):
            self._respond(body=True)

        def do_HEAD(self):
            self._respond(body=False)

        def log_message(self, *args):
            pass

    return Handler


def serving(hub: FakeHub, monkeypatch, cache: Path) -> None:
    """huggingface_hub online, talking to `hub` (started), with `cache` as its cache: what HF_ENDPOINT, HF_HUB_CACHE and an
    unset HF_HUB_OFFLINE make of its constants and its module-level client (`hf_api.api`, whose functions diffusers calls)
    when it is imported (they are read then, so they are set here)."""
    from huggingface_hub import constants, hf_api

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
