"""A small Hugging Face Hub for tests: the endpoints the real huggingface_hub client calls, on 127.0.0.1.

Model info, resolve (HEAD and ranged GET, with X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size),
repo and branch creation, preupload, the LFS batch API with basic PUT uploads, NDJSON commits and
YAML validation. Errors carry the X-Error-Code headers the client maps to its exceptions. Repos are
a dict: repo id -> refs (branch -> commit) and commits (commit -> path -> bytes). Private and gated
repos want `Authorization: Bearer <token>`. Every request is logged in `requests`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(".safetensors")


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> bytes
    history: list[tuple[str, list[str]]] = field(default_factory=list)  # (commit, paths it added), oldest first


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorized: bool


class FakeHub:
    def __init__(self, token: str = "hf_fake_token_0123456789"):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # uploaded LFS objects by sha256
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- content ---------------------------------------------------------------------------

    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", replace: bool = False) -> str:
        """Adds a commit with `files` (on top of the branch's files unless `replace`); returns its sha."""
        repo = self.repos.setdefault(repo_id, Repo())
        parent = repo.refs.get(branch)
        content = {} if replace or parent is None else dict(repo.commits[parent])
        content.update(files)
        digest = hashlib.sha1(json.dumps([parent, sorted((p, git_blob_id(b)) for p, b in content.items())]).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = content
        repo.refs[branch] = sha
        repo.history.append((sha, sorted(files)))
        return sha

    def add_folder(self, repo_id: str, folder: str | Path, *, private: bool = False, gated: bool = False, branch: str = "main") -> str:
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        sha = self.commit(repo_id, files, branch=branch, replace=True)
        self.repos[repo_id].private, self.repos[repo_id].gated = private, gated
        return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision, revision)]

    def weight_reads(self) -> list[Request]:
        """Whole-file GETs of .safetensors files (header probes are ranged): weight downloads."""
        return [r for r in self.requests
                if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(".safetensors") and r.range is None]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        # ---- plumbing ----------------------------------------------------------------

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _log(self) -> list[str]:
            path = urlsplit(self.path).path
            with hub.lock:
                hub.requests.append(Request(self.command, path, self.headers.get("Range"), self._authorized()))
            return [unquote(p) for p in path.strip("/").split("/")]

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)) if "Content-Length" not in (headers or {}) else headers["Content-Length"])
            self.end_headers()
            if not head:
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        def _json(self, status: int, data: object, headers: dict | None = None) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str | None, message: str, headers: dict | None = None) -> None:
            extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
            self._json(status, {"error": message}, extra)

        def _repo(self, repo_id: str, *, write: bool = False) -> Repo | None:
            """The repo when the caller may see it; else answers the error and returns None."""
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()) or (write and not self._authorized()):
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            if repo.gated and not self._authorized():
                self._error(403, "GatedRepo", "Access to this model is restricted")
                return None
            return repo

        def _commit_of(self, repo: Repo, revision: str) -> str | None:
            sha = repo.refs.get(revision, revision if revision in repo.commits else None)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return sha

        # ---- reads ------------------------------------------------------------------------

        def do_HEAD(self) -> None:
            self._resolve(head=True)

        def do_GET(self) -> None:
            parts = self._log()
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                return self._model_info(parts)
            return self._resolve(head=False, parts=parts)

        def _model_info(self, parts: list[str]) -> None:
            repo_id = "/".join(parts[2:4])
            repo = self._repo(repo_id)
            if repo is None:
                return
            revision = "/".join(parts[5:]) if len(parts) > 5 and parts[4] == "revision" else "main"
            sha = self._commit_of(repo, revision)
            if sha is None:
                return
            siblings = []
            for path, data in sorted(repo.commits[sha].items()):
                entry = {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
                if is_lfs(path):
                    entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                siblings.append(entry)
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                             "gated": "auto" if repo.gated else False, "siblings": siblings})

        def _resolve(self, *, head: bool, parts: list[str] | None = None) -> None:
            parts = parts if parts is not None else self._log()
            if len(parts) < 5 or parts[2] != "resolve":
                return self._error(404, None, "Not found")
            repo = self._repo("/".join(parts[:2]))
            if repo is None:
                return
            sha = self._commit_of(repo, parts[3])
            if sha is None:
                return
            path = "/".join(parts[4:])
            data = repo.commits[sha].get(path)
            if data is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": sha})
            headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "ETag": f'"{git_blob_id(data)}"'}
            if is_lfs(path):
                headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": len(data)})
            status, body = 200, data
            byte_range = self.headers.get("Range")
            if byte_range and not head:
                first, _, last = byte_range.removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
                status, body = 206, data[start:end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            if head:
                headers["Content-Length"] = len(data)
            self._send(status, body, headers, head=head)

        # ---- writes -----------------------------------------------------------------------

        def do_PUT(self) -> None:
            parts = self._log()
            body = self._body()
            if parts[0] != "_lfs" or hashlib.sha256(body).hexdigest() != parts[1]:
                return self._error(400, None, "bad LFS upload")
            hub.lfs[parts[1]] = body
            self._send(200)

        def do_POST(self) -> None:
            parts = self._log()
            body = self._body()
            if parts == ["api", "validate-yaml"]:
                return self._json(200, {})
            if parts == ["api", "repos", "create"]:
                return self._create_repo(json.loads(body))
            if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                return self._lfs_batch(f"{parts[0]}/{parts[1].removesuffix('.git')}", json.loads(body))
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo_id, action, revision = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
                repo = self._repo(repo_id, write=True)
                if repo is None:
                    return
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "lfs" if is_lfs(f["path"]) else "regular",
                                                       "shouldIgnore": False} for f in files]})
                if action == "branch":
                    if revision in repo.refs:
                        return self._error(409, None, "Reference already exists")
                    start = json.loads(body or b"{}").get("startingPoint") or "main"
                    repo.refs[revision] = repo.refs.get(start, start)
                    return self._json(200, {})
                if action == "commit":
                    return self._commit(repo_id, repo, revision, body)
            self._error(404, None, f"no route for POST {self.path}")

        def _create_repo(self, payload: dict) -> None:
            if not self._authorized():
                return self._error(401, None, "Invalid credentials in Authorization header")
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                                  {"X-Error-Message": "You already created this model repo"})
            hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private" or payload.get("private") is True)
            hub.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _lfs_batch(self, repo_id: str, payload: dict) -> None:
            if hub.repos.get(repo_id) is None or not self._authorized():
                return self._error(401, "RepoNotFound", "Repository not found")
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs:
                    entry["actions"] = {"upload": {"href": f"{hub.url}/_lfs/{obj['oid']}"}}
                objects.append(entry)
            self._json(200, {"transfer": "basic", "objects": objects})

        def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes) -> None:
            if revision not in repo.refs:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            files: dict[str, bytes] = {}
            for line in body.splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return self._error(400, None, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = hub.lfs[value["oid"]]
            sha = hub.commit(repo_id, files, branch=revision)
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    return Handler
