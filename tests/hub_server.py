"""A minimal in-memory Hugging Face Hub over real HTTP, for the push tests (standard library only).

It serves exactly what ``hf_lora_recipe/push.py`` (through ``huggingface_hub`` 2.x) and the round-trip loads
(``PeftModel`` / ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained("user/name", revision=...)``) send -
found by recording every request test_push.py makes. Model repos only; any other route answers 404.

=======================================================  =====================================================
route                                                    who sends it, and why
=======================================================  =====================================================
``POST /api/repos/create``                               ``create_repo``; 409 + ``{"url"}`` lets ``exist_ok``
                                                         pass on a rerun
``GET  /api/models/{repo}``                              ``create_repo(exist_ok=True)`` after a 401 checks
                                                         whether the repo exists anyway
``GET  /api/models/{repo}/revision/{rev}``               transformers resolves ``revision`` to a commit sha
                                                         (``HfApi.resolve_revision``) before downloading
``POST /api/models/{repo}/branch/{branch}``              ``create_branch`` (``push --revision``)
``POST /api/validate-yaml``                              ``create_commit`` validates README.md metadata first
``POST /api/models/{repo}/preupload/{rev}``              ``create_commit``: always answers ``uploadMode:
                                                         regular``, so contents travel base64-inline in the
                                                         commit - no LFS / Xet transfer to emulate
``POST /api/models/{repo}/commit/{branch}``              ``create_commit``: NDJSON header + ``file`` items;
                                                         atomic - a failed commit stores nothing
``HEAD|GET /{repo}/resolve/{branch or sha}/{path}``      ``hf_hub_download`` under every ``from_pretrained``;
                                                         ``ETag`` + ``X-Repo-Commit``; a missing file is 404
                                                         ``EntryNotFound`` (transformers probes for
                                                         ``adapter_config.json``)
=======================================================  =====================================================

Like the Hub: a wrong ``Authorization: Bearer`` token is refused (401) on every route, writes need the token,
and a private or missing repo answers 401 ``RepoNotFound`` without a token (404 with one). Test hooks:
``requests`` (every request, with the status answered) / ``clear_requests()``, ``fail_next(substring,
status, times)`` / ``clear_failures()``, ``files(repo, revision)``, ``repo_exists``, ``is_private``,
``add_repo`` (seed without HTTP).

Pointing the client here. ``huggingface_hub`` freezes ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``,
``HF_HOME`` and ``HF_HUB_DISABLE_TELEMETRY`` into ``huggingface_hub.constants`` at import (``HF_TOKEN`` is read
at call time), so:

* a new process (a CLI test): ``env={**os.environ, **server.client_env(cache_dir)}``;
* this process (conftest.py froze offline mode): ``with server.patch_client(cache_dir):`` patches those
  constants (``ENDPOINT`` and the ``/resolve`` url template together), the module-level ``HfApi``'s endpoint
  and the env vars peft reads at call time, and restores them all on exit.

Both turn telemetry off: with it on, the client's first online request fetches ``/api/agent-harnesses``
from ``constants.ENDPOINT`` (answered 404 here, which the client tolerates).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


__all__ = ["HubServer", "RecordedRequest", "start_hub_server"]


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file: the Hub's ETag of a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class RecordedRequest:
    """One request as received: decoded ``path`` without query, lower-cased ``headers``, the ``status`` answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int | None = None


@dataclass
class _Repo:
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha

    def resolve(self, revision: str) -> str | None:
        return self.branches.get(revision) or (revision if revision in self.commits else None)


class _HubError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.body = (
            status,
            message,
            code,
            headers or {},
            body or {},
        )


class HubServer:
    """The Hub on 127.0.0.1 (ephemeral port), served from a daemon thread; see the module docstring."""

    def __init__(self, token: str, *, username: str = "user"):
        self.token, self.username = token, username
        self.requests: list[RecordedRequest] = []
        self._repos: dict[str, _Repo] = {}
        self._failures: list[list[Any]] = []  # [path substring, status, remaining]
        self._lock = threading.RLock()
        self._commit_count = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ test hooks

    def fail_next(self, path_substring: str, status: int = 500, times: int = 1) -> None:
        """The next ``times`` requests whose path contains ``path_substring`` get ``status``; nothing is stored."""
        with self._lock:
            self._failures.append([path_substring, status, times])

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def repo_exists(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    def is_private(self, repo_id: str) -> bool:
        with self._lock:
            return self._repos[repo_id].private

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """``{path: content}`` of ``repo_id`` at ``revision`` (a branch or a commit sha)."""
        with self._lock:
            repo = self._repos[repo_id]
            return dict(repo.commits[repo.resolve(revision)])

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, *, private: bool = False) -> None:
        """Create ``repo_id`` directly (no HTTP), with ``files`` committed to main."""
        with self._lock:
            self._commit(self._create_repo(repo_id, private), "main", dict(files or {}))

    def client_env(
        self, cache_dir: str | os.PathLike | None = None, token: str | bool | None = True
    ) -> dict[str, str]:
        """Env vars pointing a NEW process's huggingface_hub / transformers / peft here; merge over ``os.environ``.
        ``token``: True = the server's token, a string = that token, False / None = none (``HF_TOKEN=""``; with
        ``cache_dir``, ``HF_HOME`` is a fresh folder, so no saved login is found either)."""
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_TOKEN": self._token_value(token),
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }
        if cache_dir is not None:
            env["HF_HOME"] = os.path.join(cache_dir, "hf_home")
            env["HF_HUB_CACHE"] = str(cache_dir)
        return env

    @contextlib.contextmanager
    def patch_client(
        self, cache_dir: str | os.PathLike | None = None, token: str | bool | None = True
    ) -> Iterator[None]:
        """Point this process's already-imported huggingface_hub (so transformers / peft) here, online, for the
        block; ``token`` as in :meth:`client_env`. Everything is restored on exit."""
        import huggingface_hub.constants as constants
        import huggingface_hub.hf_api as hf_api

        patched = {
            "ENDPOINT": self.url,
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
            # hf_hub_url(..., endpoint=X) only swaps X in when the template starts with constants.ENDPOINT
            "HUGGINGFACE_CO_URL_TEMPLATE": self.url + "/{repo_id}/resolve/{revision}/{filename}",
        }
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_TOKEN": self._token_value(token),
        }
        if cache_dir is not None:
            patched["HF_HUB_CACHE"] = env["HF_HUB_CACHE"] = str(cache_dir)
        saved = {name: getattr(constants, name) for name in patched}
        saved_env = {k: os.environ.get(k) for k in env}
        saved_endpoint = hf_api.api.endpoint  # module-level functions (peft's file_exists) are bound to it
        try:
            for name, value in patched.items():
                setattr(constants, name, value)
            hf_api.api.endpoint = self.url
            os.environ.update(env)
            yield
        finally:
            for name, value in saved.items():
                setattr(constants, name, value)
            hf_api.api.endpoint = saved_endpoint
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _token_value(self, token: str | bool | None) -> str:
        return self.token if token is True else (token or "")

    # ------------------------------------------------------------------ state (with the lock held)

    def _create_repo(self, repo_id: str, private: bool) -> _Repo:
        repo = self._repos[repo_id] = _Repo(private)
        self._commit(repo, "main", {})  # like the Hub, a new repo has a main branch to commit to
        return repo

    def _commit(self, repo: _Repo, branch: str, files: dict[str, bytes]) -> str:
        self._commit_count += 1
        oid = hashlib.sha1(f"{id(repo)}:{self._commit_count}".encode()).hexdigest()
        repo.commits[oid] = files
        repo.branches[branch] = oid
        return oid


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive like the Hub: every response carries a Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no per-request stderr line
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_GET

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def _dispatch(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise NotImplementedError("hub_server: chunked request bodies are not supported")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = unquote(urlsplit(self.path).path)
        self._record = RecordedRequest(self.command, path, {k.lower(): v for k, v in self.headers.items()}, body)
        with self.hub._lock:
            self.hub.requests.append(self._record)
            failure = next((f for f in self.hub._failures if f[0] in path and f[2] > 0), None)
            if failure is not None:
                failure[2] -= 1
        try:
            if failure is not None:
                raise _HubError(failure[1], f"injected failure (HTTP {failure[1]})")
            with self.hub._lock:
                self._route([unquote(s) for s in urlsplit(self.path).path.split("/")[1:]])
        except _HubError as e:
            headers = {**e.headers, "X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
            self._send_json(e.status, {"error": e.message, **e.body}, headers)
        except Exception as e:  # noqa: BLE001 - a server bug must surface as a 500, not a hang
            self._send_json(500, {"error": f"hub_server internal error: {type(e).__name__}: {e}"})

    def _send(
        self, status: int, body: bytes, headers: dict[str, str] | None = None, content_type: str = "application/json"
    ) -> None:
        self._record.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    # -------------------------------------------------------------- auth

    def _authed(self) -> bool:
        """True with the server's token, False with none; a wrong token is a 401 on any route."""
        header = self.headers.get("Authorization")
        if header is not None and header != f"Bearer {self.hub.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")
        return header is not None

    def _repo(self, repo_id: str, *, write: bool = False) -> _Repo:
        authed = self._authed()
        if write and not authed:
            raise _HubError(401, "You must be authenticated to write to a repo")
        repo = self.hub._repos.get(repo_id)
        if repo is None or (repo.private and not authed):  # the Hub hides private repos: 401, not 403
            raise _HubError(404 if authed else 401, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _commit_of(repo: _Repo, revision: str) -> str:
        oid = repo.resolve(revision)
        if oid is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid

    # -------------------------------------------------------------- routes (see the module docstring)

    def _route(self, seg: list[str]) -> None:
        m, body = self.command, self._record.body
        self._authed()
        if m == "POST" and seg == ["api", "validate-yaml"]:
            return self._send_json(200, {"errors": [], "warnings": []})
        if m == "POST" and seg == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            repo_id, action, arg = "/".join(seg[2:4]), seg[4:5], "/".join(seg[5:])
            if m == "GET" and (not action or (action == ["revision"] and arg)):
                return self._info(repo_id, arg or "main")
            if m == "POST" and action == ["branch"] and arg:
                return self._branch(repo_id, arg, json.loads(body) if body else {})
            if m == "POST" and action == ["preupload"] and arg:
                return self._preupload(repo_id, arg, json.loads(body))
            if m == "POST" and action == ["commit"] and arg:
                return self._commit(repo_id, arg, body)
        if m in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            return self._resolve_file("/".join(seg[:2]), seg[3], "/".join(seg[4:]))
        raise _HubError(404, f"hub_server: no route for {m} {self._record.path}")

    def _create_repo(self, payload: dict[str, Any]) -> None:
        if not self._authed():
            raise _HubError(401, "You must be authenticated to create a repo")
        if payload.get("type", "model") != "model":
            raise _HubError(400, "hub_server: model repos only")
        repo_id = f"{payload.get('organization') or self.hub.username}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub._repos:  # the client's exist_ok=True reads the url from the 409 body
            raise _HubError(409, "You already created this model repo", body={"url": url})
        self.hub._create_repo(repo_id, bool(payload.get("private")) or payload.get("visibility") == "private")
        self._send_json(200, {"url": url, "name": repo_id})

    def _info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        oid = self._commit_of(repo, revision)
        self._send_json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": oid,
                "private": repo.private,
                "siblings": [{"rfilename": p} for p in sorted(repo.commits[oid])],
            },
        )

    def _branch(self, repo_id: str, branch: str, payload: dict[str, Any]) -> None:
        repo = self._repo(repo_id, write=True)
        if branch in repo.branches:  # create_branch(exist_ok=True) tolerates the 409
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = self._commit_of(repo, payload.get("startingPoint") or "main")
        self._send_json(200, {})

    def _preupload(self, repo_id: str, revision: str, payload: dict[str, Any]) -> None:
        repo = self._repo(repo_id, write=True)
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}  # no dedup
            for f in payload.get("files", [])
        ]
        self._send_json(200, {"files": files, "commitOid": self._commit_of(repo, revision)})

    def _commit(self, repo_id: str, branch: str, body: bytes) -> None:
        repo = self._repo(repo_id, write=True)
        if branch not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        header, *items = [json.loads(line) for line in body.splitlines() if line.strip()]
        if header.get("key") != "header":
            raise _HubError(400, "The first line of a commit payload must be the header")
        files = dict(repo.commits[repo.branches[branch]])
        for item in items:
            if item.get("key") != "file":  # lfsFile, deletedFile, ...: push never sends them
                raise _HubError(400, f"hub_server: unsupported commit item {item.get('key')!r}")
            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"], validate=True)
        oid = self.hub._commit(repo, branch, files)
        self._send_json(
            200,
            {
                "success": True,
                "commitOid": oid,
                "pullRequestUrl": None,
                "commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}",
            },
        )

    def _resolve_file(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        oid = self._commit_of(repo, revision)
        data = repo.commits[oid].get(path)
        if data is None:  # X-Repo-Commit lets the client cache the miss
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        self._send(
            200,
            data,
            {"X-Repo-Commit": oid, "ETag": f'"{git_blob_sha1(data)}"'},
            content_type="application/octet-stream",
        )


def start_hub_server(token: str, **kwargs: Any) -> HubServer:
    """A started :class:`HubServer`; call ``close()`` when done."""
    return HubServer(token, **kwargs).start()
