"""A Hugging Face hub stand-in for tests: real HTTP servers on 127.0.0.1 that answer what
huggingface_hub 2.x asks while `dreamd models pull` runs (read in the venv's hf_api.py
`model_info`, file_download.py `get_hf_file_metadata` / `http_get`, utils/_http.py):

- GET /api/models/{org}/{name}[/revision/{rev}]?blobs=True: the model info, its commit
  `sha` and `siblings` (rfilename, size, blobId, lfs {size, sha256, pointerSize});
  404 with X-Error-Code RepoNotFound or RevisionNotFound as the hub says them.
- HEAD or GET /{org}/{name}/resolve/{rev}/{path}: a file kept in git answers 200 with ETag
  (its git blob id), X-Repo-Commit and Content-Length; an LFS file answers 302 to the CDN
  with X-Linked-Etag (its sha256), X-Linked-Size, X-Repo-Commit and Location. The CDN is a
  second listener on another port, so another origin: huggingface_hub takes the metadata
  from the redirect and downloads from Location, as from the hub's real CDN.
- GET /cdn/{sha256} (the CDN): the bytes, with Range (206 and Content-Range), Accept-Ranges.

Faults a test sets: drop the connection after N bytes of a file (the next `times` GETs),
stall after N bytes until released, serve bytes whose sha256 is not the listed one, list a
size larger than the content. Every request is recorded (method, path, Range, bytes sent).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

from tests.comfyui_double import _Server as TrackingServer

LFS_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pth", ".onnx")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """A model repo at one commit: its files by path (bytes), which of them are in LFS."""

    repo_id: str
    files: dict[str, bytes]
    commit: str = ""
    lfs: set[str] | None = None          # default: the weight suffixes above
    license: str = "openrail++"
    listed_size: dict[str, int] = field(default_factory=dict)   # fault: a size that lies

    def __post_init__(self) -> None:
        if not self.commit:
            self.commit = hashlib.sha1(self.repo_id.encode() + b"".join(
                p.encode() + git_blob_id(d).encode() for p, d in sorted(self.files.items()))
            ).hexdigest()
        if self.lfs is None:
            self.lfs = {p for p in self.files if p.endswith(LFS_SUFFIXES)}

    def sha256(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest()

    def sibling(self, path: str) -> dict[str, Any]:
        data = self.files[path]
        size = self.listed_size.get(path, len(data))
        entry: dict[str, Any] = {"rfilename": path, "size": size, "blobId": git_blob_id(data)}
        if path in self.lfs:
            entry["lfs"] = {"size": size, "sha256": self.sha256(path), "pointerSize": 134}
        return entry


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int
    sent: int = 0               # body bytes written


@dataclass
class _Cut:
    after: int                  # body bytes sent before the fault
    times: int                  # how many GETs it hits
    stall: bool = False         # hold the connection open (until released) instead of dropping


class HubDouble:
    """`with HubDouble() as hub:` then `hub.add(Repo(...))`; point HF_ENDPOINT at hub.url."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.cuts: dict[str, _Cut] = {}          # sha256 -> fault
        self.corrupt: set[str] = set()           # sha256s served with a byte flipped
        self.release = threading.Event()         # ends every stall
        self.stalled = threading.Event()         # set when a stall began
        self.lock = threading.Lock()
        self._hub = _Server(("127.0.0.1", 0), _Handler, self, cdn=False)
        self._cdn = _Server(("127.0.0.1", 0), _Handler, self, cdn=True)
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def add(self, repo: Repo) -> Repo:
        self.repos[repo.repo_id] = repo
        return repo

    def blob(self, sha256: str) -> bytes | None:
        for repo in self.repos.values():
            for path in repo.lfs or ():
                if repo.sha256(path) == sha256:
                    return repo.files[path]
        return None

    # -- faults and inspection

    def cut(self, repo: Repo, path: str, after: int, *, times: int = 1,
            stall: bool = False) -> None:
        self.cuts[repo.sha256(path)] = _Cut(after, times, stall)

    def corrupt_file(self, repo: Repo, path: str) -> None:
        self.corrupt.add(repo.sha256(path))

    def downloads(self, repo: Repo, path: str) -> list[Request]:
        """The GETs of an LFS file's bytes at the CDN."""
        target = f"/cdn/{repo.sha256(path)}"
        with self.lock:
            return [r for r in self.requests if r.method == "GET" and r.path == target]

    def sent_bytes(self, repo: Repo | None = None) -> int:
        """Body bytes of files sent (CDN and resolve GETs), of one repo or all."""
        with self.lock:
            return sum(r.sent for r in self.requests if r.method == "GET" and (
                r.path.startswith("/cdn/") or "/resolve/" in r.path) and (
                repo is None or r.path.startswith(f"/{repo.repo_id}/")
                or r.path[5:] in {repo.sha256(p) for p in repo.lfs or ()}))

    def file_requests(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.method == "GET" and (
                r.path.startswith("/cdn/") or "/resolve/" in r.path)]

    # -- life

    def start(self) -> HubDouble:
        for server in (self._hub, self._cdn):
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                 daemon=True, name="hub-double")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self.release.set()
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
            server.drop_connections()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> HubDouble:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class _Server(TrackingServer):
    """The ComfyUI double's server (it drops kept-alive connections at stop), with the
    hub's two faces: the API and the CDN that serves the large files."""

    def __init__(self, addr, handler, double: HubDouble, *, cdn: bool) -> None:
        self.cdn = cdn
        super().__init__(addr, handler, double)


_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?/?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # -- routing

    def _route(self, head: bool) -> None:
        double = self.server.double
        path = unquote(urlsplit(self.path).path)
        record = Request(self.command, path, self.headers.get("Range"), 0)
        with double.lock:
            double.requests.append(record)
        if self.server.cdn:
            if path.startswith("/cdn/"):
                return self._cdn(path[5:], head, record)
            return self._error(404, record, "EntryNotFound", "no such object")
        m = _INFO.match(path)
        if m and not head:
            return self._info(m.group(1), m.group(2), record)
        m = _RESOLVE.match(path)
        if m:
            return self._resolve(m.group(1), m.group(2), m.group(3), head, record)
        self._error(404, record, None, "not a route of this stand-in")

    def _repo(self, repo_id: str, revision: str | None, record: Request) -> Repo | None:
        repo = self.server.double.repos.get(repo_id)
        if repo is None:
            self._error(404, record, "RepoNotFound", "Repository not found")
            return None
        if revision not in (None, "main", repo.commit):
            self._error(404, record, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _info(self, repo_id: str, revision: str | None, record: Request) -> None:
        repo = self._repo(repo_id, revision, record)
        if repo is None:
            return
        body = {"_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0], "sha": repo.commit, "private": False,
                "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": ["diffusers", f"license:{repo.license}"],
                "cardData": {"license": repo.license}, "library_name": "diffusers",
                "siblings": [repo.sibling(p) for p in sorted(repo.files)]}
        self._send(200, json.dumps(body).encode(), record,
                   {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, revision: str, name: str, head: bool,
                 record: Request) -> None:
        repo = self._repo(repo_id, revision, record)
        if repo is None:
            return
        if name not in repo.files:
            return self._error(404, record, "EntryNotFound", f"{name} does not exist",
                               {"X-Repo-Commit": repo.commit})
        data = repo.files[name]
        common = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
        if name in (repo.lfs or ()):
            sha = repo.sha256(name)
            size = repo.listed_size.get(name, len(data))
            headers = {**common, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(size),
                       "ETag": f'"{git_blob_id(data)}"',
                       "Location": f"{self.server.double.cdn_url}/cdn/{sha}"}
            return self._send(302, b"", record, headers, head=head)
        headers = {**common, "ETag": f'"{git_blob_id(data)}"',
                   "Content-Type": "application/octet-stream"}
        self._send(200, data, record, headers, head=head)

    def _cdn(self, sha: str, head: bool, record: Request) -> None:
        double = self.server.double
        data = double.blob(sha)
        if data is None:
            return self._error(404, record, None, "no such object")
        if sha in double.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        status = 200
        headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        m = _RANGE.match(self.headers.get("Range") or "")
        if m:
            start = int(m.group(1))
            end = int(m.group(2)) + 1 if m.group(2) else len(data)
            if start >= len(data):
                return self._send(416, b"", record, {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            data = data[start:end]
            status = 206
        cut = None
        if not head:
            with double.lock:
                cut = double.cuts.get(sha)
                if cut and cut.times > 0:
                    cut.times -= 1
                else:
                    cut = None
        if cut is None:
            return self._send(status, data, record, headers, head=head)
        # the fault: the headers promise the whole body, then the connection ends short
        self._send_head(status, len(data), headers)
        part = data[:max(0, cut.after - start)]
        self.wfile.write(part)
        self.wfile.flush()
        record.sent = len(part)
        record.status = status
        if cut.stall:
            double.stalled.set()
            double.release.wait(timeout=300)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- answers

    def _send_head(self, status: int, length: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send(self, status: int, body: bytes, record: Request,
              headers: dict[str, str] | None = None, *, head: bool = False) -> None:
        record.status = status
        try:
            self._send_head(status, len(body), headers or {})
            if not head and body:
                self.wfile.write(body)
                record.sent = len(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _error(self, status: int, record: Request, code: str | None, message: str,
               extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        self._send(status, json.dumps({"error": message}).encode(), record, headers,
                   head=self.command == "HEAD")
