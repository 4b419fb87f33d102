"""A small, in-memory, Hugging Face Hub-compatible HTTP server for offline tests (standard library only).

It implements what the real ``huggingface_hub`` 2.4 client (and ``transformers`` / ``peft`` on top of it)
sends for: ``create_repo`` / ``delete_repo`` / ``update_repo_settings(private=)``, ``create_branch`` /
``delete_branch`` / ``create_tag``, ``create_commit`` and ``upload_folder`` / ``upload_file`` (``preupload``
always answers ``uploadMode: "regular"`` so contents travel base64-inline in the NDJSON commit, never LFS or
Xet), ``repo_info`` / ``model_info``, ``list_repo_tree`` / ``list_repo_files``, ``get_paths_info``,
``list_repo_refs``, ``list_repo_commits``, ``whoami``, ``file_exists``, ``hf_hub_download`` (HEAD + GET
``/resolve``, with ``Range``), ``snapshot_download``, ``AutoModelForCausalLM`` / ``AutoTokenizer`` /
``PeftModel.from_pretrained``. Model, dataset and space repos are all accepted. Everything lives in memory,
per repo and per commit; branches and tags point at commits, so ``files(repo, "main")`` is a snapshot.

    server = start_hub_server(token="hf_test")          # or: with HubServer("hf_test") as server: ...
    server.url                                          # http://127.0.0.1:<ephemeral port>
    server.files("user/name")                           # {"config.json": b"...", ...} at main
    server.requests                                     # every request: method, path, headers, body
    server.fail_next("/commit/", status=500, times=1)   # next matching request(s) fail
    server.close()

Pointing the client at the server
---------------------------------
``huggingface_hub`` reads most of its configuration ONCE, at import (``huggingface_hub/constants.py``):
``HF_ENDPOINT`` -> ``constants.ENDPOINT`` and ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (the ``/resolve`` url
used by ``hf_hub_download`` and therefore by transformers / peft), ``HF_HUB_OFFLINE`` -> ``constants.HF_HUB_OFFLINE``,
``HF_HUB_CACHE`` / ``HF_HOME`` -> ``constants.HF_HUB_CACHE`` and the token file path. Setting those environment
variables after ``import huggingface_hub`` (or after anything that imports it: transformers, peft, datasets,
trl, accelerate...) changes nothing. Also, the module-level functions (``huggingface_hub.create_repo``,
``upload_folder``, ``file_exists``, ``model_info``, ...) are bound methods of a single ``HfApi()`` built at
import, so they keep the endpoint that was current at import. ``HF_TOKEN`` is the exception: it is read at
call time (explicit ``token=`` argument / ``HfApi(token=)`` > ``HF_TOKEN`` > ``HUGGING_FACE_HUB_TOKEN`` > the
saved token file, whose path is frozen at import from ``HF_TOKEN_PATH`` / ``HF_HOME``; ``token=False`` sends none).

1. A subprocess (what a CLI test should do): pass ``env={**os.environ, **server.client_env(cache_dir)}``,
   i.e. ``HF_ENDPOINT=server.url``, ``HF_HUB_OFFLINE=0``, ``HF_TOKEN=<token>``, ``HF_HUB_CACHE=<dir>``,
   ``HF_HOME=<dir>/hf_home`` (so no real saved token is picked up), ``HF_HUB_DISABLE_TELEMETRY=1`` and
   ``NO_PROXY``. Everything then works unchanged: ``HfApi()``, ``hf_hub_download(repo, file)``,
   ``snapshot_download``, transformers and peft ``from_pretrained("user/name")``.
2. In this process (tests/conftest.py froze ``HF_HUB_OFFLINE=1``): ``with server.patch_client(cache_dir=...):``
   patches ``constants.ENDPOINT`` + ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (always together:
   ``hf_hub_url(..., endpoint=X)`` only swaps X in when the template starts with ``constants.ENDPOINT``),
   ``constants.HF_HUB_OFFLINE=False`` (every request goes through an httpx event hook that raises
   ``OfflineModeIsEnabled`` when that attribute is true; ``is_offline_mode()`` reads it at call time, so
   patching it works where changing the env var does not), ``constants.HF_HUB_CACHE``, the endpoint of the
   module-level ``huggingface_hub.hf_api.api`` (peft calls ``huggingface_hub.file_exists``), and ``os.environ``
   ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE=0`` (peft's ``check_file_exists_on_hf_hub`` reads the env var at call
   time) / ``HF_TOKEN``; all restored on exit. transformers reads ``is_offline_mode()`` and
   ``constants.HF_HUB_CACHE`` at call time, so nothing of its own needs patching. Inside the block
   ``HfApi(endpoint=server.url, token=...)``, ``hf_hub_download(..., endpoint=server.url, cache_dir=...)`` and
   ``snapshot_download(..., endpoint=...)`` work too (they take ``endpoint=``; transformers / peft do not).
   Only lifting offline mode is NOT enough to stay local: unless ``HF_HUB_DISABLE_TELEMETRY`` is set
   (``constants.HF_HUB_DISABLE_TELEMETRY``, frozen at import), the first request a process makes while online
   builds a user-agent through ``utils/_detect_agent.py``, which GETs ``{constants.ENDPOINT}/api/agent-harnesses``
   without a token (timeout 3 s; result cached in-process and, on success, in ``HF_HOME/.agent_harnesses.json``),
   i.e. the real huggingface.co unless ``constants.ENDPOINT`` points here. ``patch_client`` therefore also sets
   ``constants.HF_HUB_DISABLE_TELEMETRY = True`` and ``client_env`` sets ``HF_HUB_DISABLE_TELEMETRY=1``; were the
   call made anyway, this server answers it 404 (the client then uses an empty registry and writes nothing).

What the client retries by itself (measured against this server; huggingface_hub 2.4
``utils/_http.py::http_backoff``: statuses 408, 429, 500, 502, 503, 504 plus timeouts / network errors /
``RemoteProtocolError``; 5 retries = 6 attempts, sleeping 1, 2, 4, 8, 8 s, or ``Retry-After`` + 1 s):

* ``preupload`` (``POST /api/{type}s/{repo}/preupload/{rev}``): retried (``http_backoff``) on every entry point.
* ``commit`` (``POST /api/{type}s/{repo}/commit/{rev}``) depends on the entry point:
  ``HfApi.create_commit`` (and ``upload_file`` / ``delete_file``): NOT retried. A 500 raises ``HfHubHTTPError``
  at once, a dropped connection raises ``httpx2.RemoteProtocolError`` (not an HfHubHTTPError); the repo is
  unchanged either way. The caller must retry ``create_commit`` itself; passing the same ``CommitOperationAdd``
  objects again is fine (they are only marked committed on success, and keep their upload mode, so the retry
  sends the commit alone, without a new preupload).
  ``HfApi.upload_folder`` with ``hf_xet`` installed (it is: 1.8.0; ``HF_HUB_DISABLE_XET=1``, read at import,
  turns it off): goes through ``_upload_pipeline.pipelined_upload``, which posts the commit with
  ``retry_on_error=True``. One 500 or one dropped connection costs a 1 s sleep and the upload succeeds; a
  persistent 5xx gives up after 6 attempts (~23 s) with ``HfHubHTTPError``. Without hf_xet ``upload_folder``
  calls ``create_commit``, so no retry.
* NOT retried: ``create_repo`` (``POST /api/repos/create``; it only loops on a 409 "another conflicting operation
  is in progress"), ``create_branch``, ``validate-yaml``, ``repo_info`` / ``model_info``. Retried:
  ``list_repo_tree`` / ``list_repo_files`` (pagination goes through ``http_backoff``).
* downloads: ``hf_hub_download`` makes the HEAD ``/resolve`` metadata call once without retry; on
  408/429/5xx/timeout, when nothing is cached, it makes a second HEAD with retries, so one failing HEAD is
  survived. The GET of the content only retries 408 / 429 (and resumes after connection errors); a 500 on
  the GET raises ``HfHubHTTPError``.

Other things worth knowing: ``create_commit`` and ``upload_folder`` with a ``README.md`` first POST its content to
``/api/validate-yaml`` (answered here with no errors); preupload returns the git-sha1 ``oid`` of files that
already exist, so the client drops unchanged files and an all-unchanged upload makes NO commit (it
returns the current head from ``/api/models/{repo}/revision/{rev}``). The client maps ``X-Error-Code`` headers
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) to typed errors; a wrong token gets a 401 without a
code, which stays a plain ``HfHubHTTPError`` (the client's own 401 -> RepositoryNotFound mapping only matches
``https://`` urls). Like the Hub, an anonymous request for a private or missing repo gets 401 + ``RepoNotFound``
(-> ``RepositoryNotFoundError``), an authenticated one for a missing repo 404 + ``RepoNotFound``. Repos are
created with an empty initial commit (the real Hub adds a ``.gitattributes``; this server does not, so
``files()`` holds exactly what was uploaded). Not implemented: LFS / Xet transfers, pull requests
(``create_pr``), discussions, copies of LFS files; any other route answers 404.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["HubServer", "RecordedRequest", "start_hub_server", "git_blob_sha1"]

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_ACTIONS = {"revision", "tree", "preupload", "commit", "paths-info", "refs", "branch", "tag", "commits",
                 "settings"}
_EMPTY_SHA_INPUT = b"hub_server initial commit"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file (what the Hub uses as ETag / oid of non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _no_proxy() -> str:
    current = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    return ",".join(filter(None, [current, "127.0.0.1", "localhost"]))


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class RecordedRequest:
    """One request as received. ``path`` is percent-decoded and without the query string; ``headers`` keys are
    lower-cased; ``status`` is what the server answered (0 when the connection was dropped on purpose)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    query: dict[str, list[str]] = field(default_factory=dict)
    raw_path: str = ""
    status: int | None = None

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[dict]:
        """The lines of an NDJSON body (a commit payload: header, file, deletedFile... items)."""
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]

    @property
    def token(self) -> str | None:
        auth = self.headers.get("authorization")
        return auth[len("Bearer "):] if auth and auth.startswith("Bearer ") else None


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, bytes]


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision.startswith("refs/heads/") and revision[len("refs/heads/"):] in self.branches:
            return self.branches[revision[len("refs/heads/"):]]
        if len(revision) >= 7 and all(c in "0123456789abcdef" for c in revision.lower()):
            matches = [oid for oid in self.commits if oid.startswith(revision.lower())]
            if len(matches) == 1:
                return matches[0]
        return None


@dataclass
class _FailureRule:
    substring: str
    status: int
    remaining: int
    method: str | None
    headers: dict[str, str]


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class HubServer:
    """In-memory Hub on 127.0.0.1 served from a background thread; see the module docstring."""

    def __init__(self, token: str, *, host: str = "127.0.0.1", port: int = 0, username: str = "user"):
        self.token = token
        self.username = username
        self.requests: list[RecordedRequest] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._rules: list[_FailureRule] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd = _Server((host, port), _Handler)
        self._httpd.hub = self
        self.host, self.port = self._httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "HubServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"hub-server-{self.port}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.close_all_connections()
        self._httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ test hooks

    def fail_next(self, path_substring: str, status: int = 500, times: int = 1, *, method: str | None = None,
                  headers: dict[str, str] | None = None) -> None:
        """Make the next ``times`` requests whose decoded path contains ``path_substring`` (and whose method is
        ``method``, if given) fail with ``status`` before any other processing (nothing is stored, no auth
        check). ``status=0`` drops the connection without answering (the client sees ``httpx2.RemoteProtocolError``).
        ``headers`` are added to the failure response (e.g. ``{"Retry-After": "3"}``: the client's backoff then
        sleeps 3 + 1 s instead of its 1, 2, 4, 8, 8 s schedule)."""
        with self._lock:
            self._rules.append(_FailureRule(path_substring, status, times, method.upper() if method else None,
                                            dict(headers or {})))

    def clear_failures(self) -> None:
        with self._lock:
            self._rules.clear()

    def requests_matching(self, path_substring: str = "", method: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests
                    if path_substring in r.path and (method is None or r.method == method.upper())]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (a branch, a tag or a commit sha): ``{path: bytes}``."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                raise KeyError(f"no {repo_type} repo {repo_id!r}")
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(f"no revision {revision!r} in {repo_id!r}")
            return dict(repo.commits[oid].files)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """The commit sha ``revision`` points at."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(f"no revision {revision!r} in {repo_id!r}")
            return oid

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict[str, Any]]:
        """The history of ``revision``, newest first: ``[{"oid", "title", "message", "files"}]``."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            oid, out = repo.resolve(revision), []
            while oid is not None:
                c = repo.commits[oid]
                out.append({"oid": c.oid, "title": c.title, "message": c.message, "files": dict(c.files)})
                oid = c.parent
            return out

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        with self._lock:
            return dict(self._repos[(repo_type, repo_id)].branches)

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return self._repos[(repo_type, repo_id)].private

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, *, private: bool = False,
                 repo_type: str = "model") -> str:
        """Seed a repo directly (no HTTP); returns the head commit of ``main``."""
        with self._lock:
            repo = self._create_repo(repo_id, repo_type, private)
            if files:
                self._commit(repo, "main", "Seed files", "", dict(files))
            return repo.branches["main"]

    def _token_value(self, token: str | bool | None) -> str:
        if token is True:
            return self.token
        return token or ""  # HF_TOKEN="" counts as no token (huggingface_hub's `_clean_token`)

    def client_env(self, cache_dir: str | os.PathLike | None = None, token: str | bool | None = True
                   ) -> dict[str, str]:
        """Environment variables that point a NEW process's huggingface_hub / transformers / peft at this server;
        merge them over ``os.environ``. ``token``: True = the server's token in ``HF_TOKEN``, a string = that
        token, False / None = ``HF_TOKEN=""`` (no token; with ``cache_dir`` given ``HF_HOME`` is a fresh folder, so
        no saved login is found either). ``cache_dir`` sets ``HF_HUB_CACHE`` and ``HF_HOME=<cache_dir>/hf_home``."""
        env = {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "HF_TOKEN": self._token_value(token), "NO_PROXY": _no_proxy(), "no_proxy": _no_proxy()}
        if cache_dir is not None:
            env["HF_HOME"] = str(os.path.join(cache_dir, "hf_home"))
            env["HF_HUB_CACHE"] = str(cache_dir)
        return env

    @contextlib.contextmanager
    def patch_client(self, cache_dir: str | os.PathLike | None = None, token: str | bool | None = True
                     ) -> Iterator[None]:
        """Point the ALREADY-IMPORTED huggingface_hub (and so transformers / peft) of this process at the server,
        online, for the duration of the block; everything is restored on exit. ``token`` as in
        :meth:`client_env` (goes to ``os.environ["HF_TOKEN"]``); ``cache_dir`` patches ``constants.HF_HUB_CACHE``
        (the default cache of hf_hub_download / snapshot_download / transformers)."""
        import huggingface_hub.constants as constants
        import huggingface_hub.hf_api as hf_api

        saved = {name: getattr(constants, name) for name in
                 ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_OFFLINE", "HF_HUB_CACHE",
                  "HF_HUB_DISABLE_TELEMETRY")}
        saved_api_endpoint = hf_api.api.endpoint
        env = {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
               "HF_TOKEN": self._token_value(token)}
        if cache_dir is not None:
            env["HF_HUB_CACHE"] = str(cache_dir)
        saved_env = {k: os.environ.get(k) for k in env}
        try:
            # ENDPOINT and the /resolve url template go together: `hf_hub_url(..., endpoint=X)` only swaps the
            # endpoint in when the template starts with constants.ENDPOINT.
            constants.ENDPOINT = self.url
            constants.HUGGINGFACE_CO_URL_TEMPLATE = self.url + "/{repo_id}/resolve/{revision}/{filename}"
            constants.HF_HUB_OFFLINE = False
            constants.HF_HUB_DISABLE_TELEMETRY = True  # also skips the user-agent's agent-registry fetch
            if cache_dir is not None:
                constants.HF_HUB_CACHE = str(cache_dir)
            hf_api.api.endpoint = self.url
            os.environ.update(env)
            yield
        finally:
            for name, value in saved.items():
                setattr(constants, name, value)
            hf_api.api.endpoint = saved_api_endpoint
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    # ------------------------------------------------------------------ state (call with the lock held)

    def _next_oid(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\0".join((*parts, str(self._counter), str(time.time_ns()))).encode()).hexdigest()

    def _create_repo(self, repo_id: str, repo_type: str, private: bool) -> _Repo:
        if (repo_type, repo_id) in self._repos:
            raise _HubError(409, f"You already created this {repo_type} repo")
        now = _now_iso()
        repo = _Repo(repo_id, repo_type, private, now)
        oid = self._next_oid(repo_type, repo_id, "initial")
        repo.commits[oid] = _Commit(oid, None, "initial commit", "", now, {})
        repo.branches["main"] = oid
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def _commit(self, repo: _Repo, branch: str, title: str, message: str, files: dict[str, bytes]) -> str:
        parent = repo.branches[branch]
        tree = "\n".join(f"{p} {git_blob_sha1(b)}" for p, b in sorted(files.items()))
        oid = self._next_oid(repo.repo_id, parent, title, tree)
        repo.commits[oid] = _Commit(oid, parent, title, message, _now_iso(), files)
        repo.branches[branch] = oid
        return oid


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: HubServer

    def __init__(self, *args: Any, **kwargs: Any):
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def close_all_connections(self) -> None:
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every response carries a Content-Length
    timeout = 60  # idle keep-alive connections are dropped after this
    server: _Server

    # -------------------------------------------------------------- plumbing

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr log
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        hub = self.server.hub
        body = self._read_body()
        split = urlsplit(self.path)
        record = RecordedRequest(
            method=self.command, path=unquote(split.path), headers={k.lower(): v for k, v in self.headers.items()},
            body=body, query=parse_qs(split.query, keep_blank_values=True), raw_path=self.path)
        with hub._lock:
            hub.requests.append(record)
            rule = next((r for r in hub._rules if r.remaining > 0 and r.substring in record.path
                         and (r.method is None or r.method == self.command)), None)
            if rule is not None:
                rule.remaining -= 1
                hub._rules = [r for r in hub._rules if r.remaining > 0]
        self._record = record
        if rule is not None:
            if rule.status == 0:
                record.status = 0
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._send_json(rule.status, {"error": f"injected failure (HTTP {rule.status})"},
                            headers={"X-Error-Message": f"injected failure (HTTP {rule.status})", **rule.headers})
            return
        try:
            segments = [unquote(s) for s in split.path.split("/")[1:]]
            self._route(segments, record)
        except _HubError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
            self._send_json(e.status, {"error": e.message, **e.extra}, headers=headers)
        except Exception as e:  # noqa: BLE001 - a server bug must surface as a 500, not a hang
            self._send_json(500, {"error": f"hub_server internal error: {type(e).__name__}: {e}"})

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self._record.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", f"hub-server-{id(self._record):x}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    # -------------------------------------------------------------- auth & lookups

    def _auth(self) -> bool:
        """True if the request carries the server's token; raises 401 on a wrong / malformed one."""
        header = self.headers.get("Authorization")
        if header is None:
            return False
        if header != f"Bearer {self.server.hub.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")
        return True

    def _require_auth(self) -> None:
        if not self._auth():
            raise _HubError(401, "You must be authenticated to access this resource (no Authorization header)")

    def _repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> _Repo:
        authed = self._auth()
        if write and not authed:
            self._require_auth()
        repo = self.server.hub._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authed):
            # The real Hub answers 401 (not 404) to unauthenticated requests on private/missing repos.
            status = 401 if not authed else 404
            raise _HubError(status, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _resolve(repo: _Repo, revision: str) -> str:
        oid = repo.resolve(revision)
        if oid is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid

    def _base(self) -> str:
        return self.server.hub.url

    # -------------------------------------------------------------- routing

    def _route(self, seg: list[str], record: RecordedRequest) -> None:
        m = self.command
        self._auth()  # any request carrying a wrong token is refused, whatever the route
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if rest == ["whoami-v2"] and m == "GET":
                return self._whoami()
            if rest == ["validate-yaml"] and m == "POST":
                return self._send_json(200, {"errors": [], "warnings": []})
            if rest == ["repos", "create"] and m == "POST":
                return self._create_repo(record)
            if rest == ["repos", "delete"] and m == "DELETE":
                return self._delete_repo(record)
            if rest and rest[0] in _REPO_TYPES and len(rest) >= 2:
                repo_type = _REPO_TYPES[rest[0]]
                repo_id, tail = self._split_repo(repo_type, rest[1:])
                return self._repo_api(m, repo_type, repo_id, tail, record)
        else:
            # /{repo_id}/resolve/{rev}/{path}, /datasets/{repo_id}/resolve/..., /spaces/...
            repo_type, rest = "model", seg
            if rest and rest[0] in ("datasets", "spaces") and len(rest) >= 4:
                repo_type, rest = _REPO_TYPES[rest[0]], rest[1:]
            if len(rest) >= 4 and rest[2] == "resolve":
                repo_id, tail = "/".join(rest[:2]), rest[3:]
            elif len(rest) >= 3 and rest[1] == "resolve":
                repo_id, tail = rest[0], rest[2:]
            else:
                tail = None
            if tail is not None and len(tail) >= 2 and m in ("GET", "HEAD"):
                return self._resolve_file(repo_type, repo_id, tail[0], "/".join(tail[1:]))
        raise _HubError(404, f"hub_server: no route for {m} {record.path}")

    def _split_repo(self, repo_type: str, rest: list[str]) -> tuple[str, list[str]]:
        hub = self.server.hub
        if len(rest) == 1 or (rest[1] in _REPO_ACTIONS and (repo_type, rest[0]) in hub._repos
                              and (repo_type, "/".join(rest[:2])) not in hub._repos):
            return rest[0], rest[1:]
        return "/".join(rest[:2]), rest[2:]

    def _repo_api(self, m: str, repo_type: str, repo_id: str, tail: list[str], record: RecordedRequest) -> None:
        action = tail[0] if tail else None
        arg = "/".join(tail[1:])
        with self.server.hub._lock:
            if action is None and m == "GET":
                return self._info(repo_type, repo_id, None, record)
            if action == "revision" and m == "GET" and arg:
                return self._info(repo_type, repo_id, arg, record)
            if action == "tree" and m == "GET" and len(tail) >= 2:
                return self._tree(repo_type, repo_id, tail[1], "/".join(tail[2:]), record)
            if action == "preupload" and m == "POST" and arg:
                return self._preupload(repo_type, repo_id, arg, record)
            if action == "commit" and m == "POST" and arg:
                return self._commit(repo_type, repo_id, arg, record)
            if action == "paths-info" and m == "POST" and arg:
                return self._paths_info(repo_type, repo_id, arg, record)
            if action == "refs" and m == "GET":
                return self._refs(repo_type, repo_id)
            if action == "commits" and m == "GET" and arg:
                return self._list_commits(repo_type, repo_id, arg)
            if action == "branch" and arg and m in ("POST", "DELETE"):
                return self._branch(m, repo_type, repo_id, arg, record)
            if action == "tag" and arg and m in ("POST", "DELETE"):
                return self._tag(m, repo_type, repo_id, arg, record)
            if action == "settings" and m == "PUT":
                return self._settings(repo_type, repo_id, record)
        raise _HubError(404, f"hub_server: no route for {m} {record.path}")

    # -------------------------------------------------------------- endpoints

    def _whoami(self) -> None:
        self._require_auth()
        hub = self.server.hub
        self._send_json(200, {"type": "user", "id": "0" * 24, "name": hub.username, "fullname": hub.username,
                              "email": None, "emailVerified": False, "canPay": False, "isPro": False,
                              "orgs": [], "auth": {"type": "access_token",
                                                   "accessToken": {"displayName": "hub_server", "role": "write"}}})

    def _create_repo(self, record: RecordedRequest) -> None:
        self._require_auth()
        payload = record.json()
        hub = self.server.hub
        name, organization = payload.get("name"), payload.get("organization")
        if not name:
            raise _HubError(400, "name is required")
        repo_id = f"{organization or hub.username}/{name}"
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HubError(400, f"hub_server: unsupported repo type {repo_type!r}")
        private = bool(payload.get("private", False)) or payload.get("visibility") in ("private", "protected")
        url = f"{hub.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        with hub._lock:
            try:
                hub._create_repo(repo_id, repo_type, private)
            except _HubError as e:  # the client's `exist_ok=True` reads the url from the 409 body
                raise _HubError(409, e.message, extra={"url": url}) from None
        self._send_json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]})

    def _delete_repo(self, record: RecordedRequest) -> None:
        self._require_auth()
        payload = record.json()
        hub = self.server.hub
        repo_id = f"{payload.get('organization') or hub.username}/{payload['name']}"
        with hub._lock:
            if hub._repos.pop((payload.get("type") or "model", repo_id), None) is None:
                raise _HubError(404, "Repository not found", "RepoNotFound")
        self._send_json(200, {})

    def _info(self, repo_type: str, repo_id: str, revision: str | None, record: RecordedRequest) -> None:
        repo = self._repo(repo_type, repo_id)
        oid = self._resolve(repo, revision or "main")
        commit = repo.commits[oid]
        with_blobs = record.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, data in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(data), blobId=git_blob_sha1(data))
            siblings.append(sibling)
        namespace = repo_id.split("/")[0] if "/" in repo_id else None
        info = {"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": namespace,
                "sha": oid, "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
                "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": siblings, "usedStorage": sum(len(b) for b in commit.files.values())}
        if repo_type == "model":
            info["modelId"] = repo_id
        self._send_json(200, info)

    def _entries(self, files: dict[str, bytes], base: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{base}/" if base else ""
        out: list[dict[str, Any]] = []
        folders: set[str] = set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rel_parts = path[len(prefix):].split("/")
            for depth in range(1, len(rel_parts)):
                folder = prefix + "/".join(rel_parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    out.append({"type": "directory", "path": folder, "size": 0,
                                "oid": hashlib.sha1(f"tree:{folder}".encode()).hexdigest()})
            if recursive or len(rel_parts) == 1:
                out.append({"type": "file", "path": path, "size": len(files[path]),
                            "oid": git_blob_sha1(files[path])})
        return out

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, record: RecordedRequest) -> None:
        repo = self._repo(repo_type, repo_id)
        oid = self._resolve(repo, revision)
        commit = repo.commits[oid]
        path = path.strip("/")
        if path and not any(p.startswith(path + "/") for p in commit.files):
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": oid})
        recursive = record.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = self._entries(commit.files, path, recursive)
        if record.query.get("expand", ["false"])[0].lower() in ("1", "true"):
            for entry in entries:
                entry["lastCommit"] = {"id": oid, "title": commit.title, "date": commit.date}
        self._send_json(200, entries)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, record: RecordedRequest) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = repo.commits[self._resolve(repo, revision)]
        form = parse_qs(record.body.decode(), keep_blank_values=True)
        if record.headers.get("content-type", "").startswith("application/json"):
            form = {k: v if isinstance(v, list) else [v] for k, v in record.json().items()}
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                out.append({"type": "file", "path": path, "size": len(commit.files[path]),
                            "oid": git_blob_sha1(commit.files[path])})
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append({"type": "directory", "path": path, "size": 0,
                            "oid": hashlib.sha1(f"tree:{path}".encode()).hexdigest()})
        self._send_json(200, out)

    def _preupload(self, repo_type: str, repo_id: str, revision: str, record: RecordedRequest) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        if record.query.get("create_pr"):
            raise _HubError(400, "hub_server: pull requests (create_pr) are not supported")
        commit = repo.commits[self._resolve(repo, revision)]
        files = []
        for item in record.json().get("files", []):
            path = item["path"]
            existing = commit.files.get(path)
            files.append({"path": path, "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_sha1(existing) if existing is not None else None})
        self._send_json(200, {"files": files, "commitOid": commit.oid})

    def _commit(self, repo_type: str, repo_id: str, revision: str, record: RecordedRequest) -> None:
        hub = self.server.hub
        repo = self._repo(repo_type, repo_id, write=True)
        if record.query.get("create_pr"):
            raise _HubError(400, "hub_server: pull requests (create_pr) are not supported")
        if revision not in repo.branches:
            # Commits go to a branch; a tag, a sha or a missing branch is refused like the Hub does.
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        try:
            items = record.ndjson()
        except ValueError as e:
            raise _HubError(400, f"Invalid NDJSON commit payload: {e}") from None
        if not items or items[0].get("key") != "header":
            raise _HubError(400, "The first line of a commit payload must be the header")
        header = items[0]["value"]
        summary = (header.get("summary") or "").strip()
        if not summary:
            raise _HubError(400, "The commit summary (title) can't be empty")
        head = repo.branches[revision]
        parent = header.get("parentCommit")
        if parent and not head.startswith(parent.lower()):
            raise _HubError(412, f"A commit has happened since. Please refresh and try again. (expected parent "
                                 f"{parent}, head of {revision} is {head})")
        files = dict(repo.commits[head].files)
        for item in items[1:]:
            key, value = item.get("key"), item.get("value") or {}
            path = str(value.get("path", "")).strip("/")
            if key == "file":
                if not path:
                    raise _HubError(400, "file item without a path")
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(400, f"hub_server: unsupported encoding {value.get('encoding')!r}")
                files[path] = base64.b64decode(value.get("content", ""), validate=True)
            elif key == "deletedFile":
                if path not in files:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")] if path else list(files)
                if not doomed:
                    raise _HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            elif key in ("lfsFile", "lfsFileCopy"):
                raise _HubError(422, f"hub_server: LFS files are not supported ({path}); preupload always answers "
                                     "uploadMode=regular")
            else:
                raise _HubError(400, f"Unknown commit item key {key!r}")
        with hub._lock:
            if repo.branches[revision] != head:  # raced with another commit on the same branch
                raise _HubError(409, "A commit has happened since. Please refresh and try again.")
            oid = hub._commit(repo, revision, summary, header.get("description") or "", files)
        self._send_json(200, {"success": True, "commitOid": oid, "pullRequestUrl": None, "hookOutput": "",
                              "commitUrl": f"{hub.url}/{_URL_PREFIX[repo_type]}{repo_id}/commit/{oid}"})

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo(repo_type, repo_id)

        def refs(d: dict[str, str], kind: str) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": o} for n, o in sorted(d.items())]

        self._send_json(200, {"branches": refs(repo.branches, "heads"), "tags": refs(repo.tags, "tags"),
                              "converts": [], "pullRequests": []})

    def _list_commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        oid, out = self._resolve(repo, revision), []
        while oid is not None:
            c = repo.commits[oid]
            out.append({"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                        "authors": [{"user": self.server.hub.username}]})
            oid = c.parent
        self._send_json(200, out)

    def _branch(self, m: str, repo_type: str, repo_id: str, branch: str, record: RecordedRequest) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        if m == "DELETE":
            if branch not in repo.branches:
                raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == "main":
                raise _HubError(403, "You cannot delete the default branch")
            del repo.branches[branch]
            return self._send_json(200, {})
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        payload = record.json() if record.body else {}
        start = payload.get("startingPoint") or "main"
        repo.branches[branch] = self._resolve(repo, start)
        self._send_json(200, {})

    def _tag(self, m: str, repo_type: str, repo_id: str, arg: str, record: RecordedRequest) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        if m == "DELETE":
            if repo.tags.pop(arg, None) is None:
                raise _HubError(404, f"Invalid rev id: {arg}", "RevisionNotFound")
            return self._send_json(200, {})
        tag = record.json().get("tag")
        if not tag:
            raise _HubError(400, "tag is required")
        if tag in repo.tags:
            raise _HubError(409, f"Reference already exists: refs/tags/{tag}")
        repo.tags[tag] = self._resolve(repo, arg)
        self._send_json(200, {})

    def _settings(self, repo_type: str, repo_id: str, record: RecordedRequest) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        payload = record.json()
        if "private" in payload and payload["private"] is not None:
            repo.private = bool(payload["private"])
        if payload.get("visibility"):
            repo.private = payload["visibility"] in ("private", "protected")
        self._send_json(200, {})

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = self._repo(repo_type, repo_id)
            oid = self._resolve(repo, revision)
            data = repo.commits[oid].files.get(path)
        if data is None:
            # X-Repo-Commit on the 404 lets the client cache the non-existence (`.no_exist/<commit>/<path>`).
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        headers = {"X-Repo-Commit": oid, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}; "
                                          f"filename=\"{path.rsplit('/', 1)[-1]}\";"}
        status, body = 200, data
        range_header = self.headers.get("Range")
        if range_header and self.command == "GET":
            start, end = self._parse_range(range_header, len(data))
            if start is None:
                self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
                return
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, body, headers, content_type="application/octet-stream")

    @staticmethod
    def _parse_range(header: str, size: int) -> tuple[int | None, int]:
        try:
            unit, spec = header.split("=", 1)
            first, last = spec.strip().split("-", 1)
            if unit.strip().lower() != "bytes" or "," in spec:
                return None, 0
            if first == "":
                start, end = max(size - int(last), 0), size - 1
            else:
                start, end = int(first), (int(last) if last else size - 1)
            end = min(end, size - 1)
            return (start, end) if 0 <= start <= end else (None, 0)
        except ValueError:
            return None, 0


def start_hub_server(token: str, **kwargs: Any) -> HubServer:
    """A started :class:`HubServer` on 127.0.0.1 with an ephemeral port; call ``close()`` when done."""
    return HubServer(token, **kwargs).start()
