"""A loopback Hugging Face Hub for offline tests.

`LoopbackHub` is a plain `http.server.ThreadingHTTPServer` bound to 127.0.0.1 on a free port. It
keeps every repository in memory (content-addressed, bounded by `max_storage_bytes`) and speaks the
part of the Hub's HTTP API that `huggingface_hub` 2.x (and through it `transformers`, `peft` and
`datasets`) uses to create repositories, upload (regular files inline, large/binary files through
the Git LFS batch API), list, resolve and download files, for model, dataset and space repos, at
a branch, tag or commit sha. It never talks to anything but its own clients.

Use it through the `hub_server` pytest fixture (tests/_hub_helpers.py), which also points the
clients at it. Stand-alone:

    with LoopbackHub() as hub:
        api = HfApi(endpoint=hub.url, token=hub.token)
        api.create_repo("me/demo")

Uploads need `HF_HUB_DISABLE_XET=1` (there is no Xet storage here): the fixture sets it.

What it answers (the endpoints `huggingface_hub` 2.4 calls; everything else is a 404 that is
recorded in `hub.unknown_routes`):

    GET    /api/whoami-v2                              POST /api/validate-yaml
    POST   /api/repos/create    (409 + `url` when it exists)    DELETE /api/repos/delete
    GET    /api/{type}s/{ns}/{name}[/revision/{rev}]   (`sha`, `siblings`, `cardData`, `expand`)
    GET    /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]?recursive=&expand=   (Link pagination)
    POST   /api/{type}s/{ns}/{name}/paths-info/{rev}
    POST   /api/{type}s/{ns}/{name}/preupload/{rev}    (`uploadMode` regular|lfs, `shouldIgnore`, `oid`)
    POST   /api/{type}s/{ns}/{name}/commit/{rev}       (NDJSON: header, file, lfsFile, deletedFile,
                                                        deletedFolder; `parentCommit`; `create_pr`)
    GET    /api/{type}s/{ns}/{name}/refs | /commits/{rev}
    POST/DELETE /api/{type}s/{ns}/{name}/branch/{branch} | tag/{rev}    PUT .../settings
    POST   /[{type}s/]{ns}/{name}.git/info/lfs/objects/batch   then PUT (and verify) the blob
    HEAD/GET /[{type}s/]{ns}/{name}/resolve/{rev}/{path}   (`X-Repo-Commit`, `ETag`,
             `Content-Length`, byte ranges; 404 + `X-Error-Code` RepoNotFound | RevisionNotFound |
             EntryNotFound)

Writes need `Authorization: Bearer <hub.token>`; private repos are invisible without it.
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import fnmatch
import hashlib
import http.server
import json
import re
import secrets
import threading
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

DEFAULT_TOKEN = "hf_loopback_test_token"
DEFAULT_USER = "loopback-user"
# The client treats files up to this size as "regular" (inline base64 in the commit).
REGULAR_FILE_MAX_BYTES = 5 * 1024 * 1024
TREE_PAGE_SIZE = 1000
REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_YAML_BLOCK_RE = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_LFS_SUFFIXES = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.mlmodel *.model *.msgpack *.npy *.npz "
    "*.onnx *.ot *.parquet *.pb *.pickle *.pkl *.png *.jpg *.jpeg *.tif *.tiff *.pt *.pth *.rar "
    "*.safetensors *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
).split()
INITIAL_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_SUFFIXES)


class HubError(Exception):
    """An HTTP error answered the way the Hub does (status, `X-Error-Code`, JSON `error`)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})
        self.body = body


def _now() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as `oid` for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file in a commit's tree. LFS files live in git as a pointer, as on the Hub: their git oid
    is the pointer's and their ETag the content's sha256; a regular file's ETag is its git oid."""

    size: int
    sha256: str
    lfs: bool
    git_oid: str

    @classmethod
    def regular(cls, data: bytes, sha256: str) -> "FileEntry":
        return cls(len(data), sha256, False, git_blob_oid(data))

    @classmethod
    def large(cls, size: int, sha256: str) -> "FileEntry":
        return cls(size, sha256, True, git_blob_oid(lfs_pointer(sha256, size)))

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclasses.dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, FileEntry]


@dataclasses.dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = dataclasses.field(default_factory=dict)
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    lfs_objects: set[str] = dataclasses.field(default_factory=set)  # sha256 uploaded to this repo
    pr_count: int = 0


@dataclasses.dataclass(frozen=True)
class HubRequest:
    method: str
    path: str
    status: int


class LoopbackHub:
    """In-memory Hugging Face Hub on 127.0.0.1 (see the module docstring for the API it serves).

    Args:
        token: the only token accepted for writes and for reading private repos.
        user: the namespace that `token` owns (repos created without a namespace go there).
        max_storage_bytes: total unique content the server keeps; uploads beyond it get 507.
        max_request_bytes: the largest request body accepted (413 beyond it).
        tree_page_size: entries per page of `/tree` listings (the Hub uses 1000).

    Attributes:
        url: the endpoint, e.g. `http://127.0.0.1:53817` (set once started).
        requests: every request served, as `HubRequest(method, path, status)` (bounded deque).
        unknown_routes: requests that matched no endpoint (a test can assert it stays empty).
    """

    def __init__(self, *, token: str = DEFAULT_TOKEN, user: str = DEFAULT_USER,
                 max_storage_bytes: int = 1 << 30, max_request_bytes: int = 512 << 20,
                 tree_page_size: int = TREE_PAGE_SIZE):
        self.token, self.user = token, user
        self.max_storage_bytes, self.max_request_bytes = max_storage_bytes, max_request_bytes
        self.tree_page_size = tree_page_size
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: collections.deque[HubRequest] = collections.deque(maxlen=20_000)
        self.unknown_routes: list[str] = []
        self._blobs: dict[str, bytes] = {}  # sha256 -> content, shared by every repo
        self._stored_bytes = 0
        self._tickets: dict[str, tuple[tuple[str, str], str, int]] = {}  # LFS upload tickets
        self._lock = threading.RLock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> "LoopbackHub":
        if self._server is not None:
            raise RuntimeError("LoopbackHub is already running")
        handler = type("_BoundHandler", (_HubHandler,), {"hub": self})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.block_on_close = False  # idle keep-alive connections must not hold up stop()
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------- inspection
    def count(self, method: str | None = None, path_contains: str = "") -> int:
        """Number of requests served with `method` (any if None) whose path contains the text."""
        return sum(1 for r in list(self.requests)
                   if (method is None or r.method == method) and path_contains in r.path)

    def repo_url(self, repo_id: str, repo_type: str = "model") -> str:
        return f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"

    def file_bytes(self, repo_id: str, path: str, *, repo_type: str = "model", revision: str = "main") -> bytes:
        """The content of a file as stored (for assertions), or KeyError."""
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            return self._blobs[self._resolve(repo, revision).files[path].sha256]

    @property
    def stored_bytes(self) -> int:
        """Unique content bytes held (what `max_storage_bytes` bounds)."""
        return self._stored_bytes

    # ----------------------------------------------------------------------------- storage
    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            if sha not in self._blobs:
                if self._stored_bytes + len(data) > self.max_storage_bytes:
                    raise HubError(507, f"storage limit of the loopback Hub ({self.max_storage_bytes} bytes) "
                                        "reached; start it with a larger max_storage_bytes")
                self._blobs[sha] = data
                self._stored_bytes += len(data)
        return sha

    def _regular_entry(self, data: bytes) -> FileEntry:
        return FileEntry.regular(data, self._store(data))

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, FileEntry], title: str,
                    message: str) -> Commit:
        seed = json.dumps([repo.repo_type, repo.repo_id, parent, title, message, secrets.token_hex(8),
                           sorted((p, e.git_oid) for p, e in files.items())])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, _now(), files)
        repo.commits[commit.oid] = commit
        return commit

    def _get_repo(self, repo_type: str, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HubError(404, f"Repository Not Found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        oid = repo.branches.get(revision) or repo.tags.get(revision)
        if oid is None and revision.startswith("refs/heads/"):
            oid = repo.branches.get(revision[len("refs/heads/"):])
        if oid is None and _COMMIT_RE.match(revision or "") and revision in repo.commits:
            oid = revision
        if oid is None and re.fullmatch(r"[0-9a-f]{7,39}", revision or ""):
            matches = [c for c in repo.commits if c.startswith(revision)]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    # ----------------------------------------------------------------------------- repo endpoints
    def create_repo(self, payload: dict, user: str) -> tuple[int, dict]:
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}: expected one of {REPO_TYPES}")
        name, namespace = payload.get("name"), payload.get("organization") or user
        for part in (name, namespace):
            if not isinstance(part, str) or not _NAME_RE.match(part):
                raise HubError(400, f"Invalid repo name {part!r}: use letters, digits, '-', '_', '.' "
                                    "(at most 96 characters, not starting or ending with '-' or '.')")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repo under the namespace {namespace!r}")
        repo_id = f"{namespace}/{name}"
        url = self.repo_url(repo_id, repo_type)
        private = payload.get("private") is True or payload.get("visibility") == "private"
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                return 409, {"error": f"You already created this {repo_type} repo", "url": url}
            repo = Repo(repo_type, repo_id, private, _now())
            initial = {".gitattributes": self._regular_entry(INITIAL_GITATTRIBUTES.encode())}
            repo.branches["main"] = self._new_commit(repo, None, initial, "initial commit", "").oid
            self.repos[(repo_type, repo_id)] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def delete_repo(self, payload: dict, user: str) -> None:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        with self._lock:
            self._get_repo(repo_type, repo_id, authorized=True)
            del self.repos[(repo_type, repo_id)]

    def repo_info(self, repo: Repo, revision: str | None, query: dict) -> dict:
        commit = self._resolve(repo, revision or "main")
        with_blobs = _flag(query.get("blobs"))
        siblings = []
        for path in sorted(commit.files):
            entry, sibling = commit.files[path], {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256,
                                      "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        card = self._card_data(commit)
        namespace = repo.repo_id.split("/")[0]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id, "author": namespace, "sha": commit.oid, "lastModified": commit.date,
            "createdAt": repo.created_at, "private": repo.private, "gated": False, "disabled": False,
            "downloads": 0, "downloadsAllTime": 0, "likes": 0, "siblings": siblings, "tags": _card_tags(card),
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if card is not None:
            info["cardData"] = card
        if repo.repo_type == "model":
            info["library_name"] = (card or {}).get("library_name")
            info["pipeline_tag"] = (card or {}).get("pipeline_tag")
            if card and "model-index" in card:
                info["model-index"] = card["model-index"]
            if "config.json" in commit.files:
                try:
                    info["config"] = json.loads(self._blobs[commit.files["config.json"].sha256])
                except ValueError:
                    pass
        expand = query.get("expand", []) + query.get("expand[]", [])
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        return info

    def _card_data(self, commit: Commit) -> dict | None:
        entry = commit.files.get("README.md")
        if entry is None:
            return None
        match = _YAML_BLOCK_RE.search(self._blobs[entry.sha256].decode("utf-8", "replace"))
        if match is None:
            return None
        try:
            data = yaml.safe_load(match.group(2))
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None

    def tree_entries(self, repo: Repo, commit: Commit, path: str, recursive: bool, expand: bool) -> list[dict]:
        path = path.strip("/")
        prefix = f"{path}/" if path else ""
        if path and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"Entry not found: {path} is not a folder at {commit.oid}", "EntryNotFound",
                           headers={"X-Repo-Commit": commit.oid})
        files, folders = [], set()
        for file_path in commit.files:
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                files.append(file_path)
        out = [self._path_info(repo, commit, p, expand) for p in sorted(folders)]
        return out + [self._path_info(repo, commit, p, expand) for p in sorted(files)]

    def _path_info(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        entry = commit.files.get(path)
        if entry is None:  # a folder: its oid hashes what it holds
            inside = sorted((p, e.git_oid) for p, e in commit.files.items() if p.startswith(path + "/"))
            info = {"type": "directory", "oid": hashlib.sha1(json.dumps(inside).encode()).hexdigest(),
                    "size": 0, "path": path}
        else:
            info = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
            if entry.lfs:
                info["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        if expand:
            last = self._last_commit_touching(repo, commit, path)
            info["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return info

    def _last_commit_touching(self, repo: Repo, commit: Commit, path: str) -> Commit:
        def state(c: Commit):
            return sorted((p, e.git_oid) for p, e in c.files.items() if p == path or p.startswith(path + "/"))

        current = commit
        while current.parent is not None and state(repo.commits[current.parent]) == state(current):
            current = repo.commits[current.parent]
        return current

    def preupload(self, repo: Repo, revision: str, payload: dict) -> dict:
        commit = self._resolve(repo, revision)
        files = payload.get("files")
        if not isinstance(files, list):
            raise HubError(400, "preupload: body must be {'files': [{'path', 'sample', 'size'}, ...]}")
        lfs_patterns = _lfs_patterns(self._text(commit, ".gitattributes"))
        ignore = payload.get("gitIgnore")
        ignore = ignore if isinstance(ignore, str) else self._text(commit, ".gitignore")
        answer = []
        for item in files:
            path, size = item.get("path"), item.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                raise HubError(400, f"preupload: each file needs a string 'path' and an int 'size', got {item!r}")
            sample = base64.b64decode(item.get("sample") or "")
            is_lfs = size > REGULAR_FILE_MAX_BYTES or b"\0" in sample or _matches_any(path, lfs_patterns)
            remote = commit.files.get(path)
            oid = None if remote is None else (remote.sha256 if remote.lfs else remote.git_oid)
            answer.append({"path": path, "uploadMode": "lfs" if is_lfs else "regular",
                           "shouldIgnore": _gitignored(path, ignore), "oid": oid})
        return {"files": answer, "commitOid": commit.oid}

    def _text(self, commit: Commit, path: str) -> str:
        entry = commit.files.get(path)
        return self._blobs[entry.sha256].decode("utf-8", "replace") if entry else ""

    def lfs_batch(self, repo: Repo, payload: dict) -> dict:
        if payload.get("operation") != "upload":
            raise HubError(400, f"LFS batch: only the 'upload' operation is served here, got "
                                f"{payload.get('operation')!r}")
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "oid must be a sha256 hex and size an int >= 0"}})
                continue
            if size > self.max_request_bytes:
                objects.append({"oid": oid, "size": size, "error": {
                    "code": 422, "message": f"object larger than the loopback Hub's {self.max_request_bytes} bytes"}})
                continue
            with self._lock:
                if oid in self._blobs and len(self._blobs[oid]) == size:
                    repo.lfs_objects.add(oid)
                    objects.append({"oid": oid, "size": size, "authenticated": True})
                    continue
                ticket = secrets.token_urlsafe(16)
                self._tickets[ticket] = ((repo.repo_type, repo.repo_id), oid, size)
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{self.url}/__lfs/upload/{ticket}", "header": {}},
                "verify": {"href": f"{self.url}/__lfs/verify/{ticket}", "header": {}},
            }})
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, ticket: str, data: bytes) -> None:
        with self._lock:
            target = self._tickets.get(ticket)
        if target is None:
            raise HubError(403, "unknown or used LFS upload ticket")
        repo_key, oid, size = target
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"LFS upload does not match its batch request (expected {size} bytes "
                                f"with sha256 {oid}, got {len(data)} bytes)")
        self._store(data)
        with self._lock:
            self._tickets.pop(ticket, None)
            if repo_key in self.repos:
                self.repos[repo_key].lfs_objects.add(oid)

    def lfs_verify(self, payload: dict) -> None:
        oid, size = payload.get("oid"), payload.get("size")
        with self._lock:
            if oid not in self._blobs or len(self._blobs[oid]) != size:
                raise HubError(404, f"LFS object {oid} ({size} bytes) was not uploaded")

    def commit(self, repo: Repo, revision: str, lines: list[dict], create_pr: bool) -> dict:
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit: the first NDJSON line must be {'key': 'header', 'value': {...}}")
        header = lines[0].get("value") or {}
        title = header.get("summary")
        if not isinstance(title, str) or not title.strip():
            raise HubError(400, "commit: the header needs a non-empty 'summary'")
        with self._lock:
            base = self._resolve(repo, revision)
            if not create_pr and revision not in repo.branches:
                raise HubError(400, f"Invalid rev id: {revision} is not a branch; commit to a branch")
            parent = header.get("parentCommit")
            if parent and not create_pr and not base.oid.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(base.files)
            for line in lines[1:]:
                self._apply(repo, files, line)
            commit = self._new_commit(repo, base.oid, files, title, header.get("description") or "")
            answer = {"success": True, "commitOid": commit.oid, "pullRequestUrl": None}
            if create_pr:
                repo.pr_count += 1
                branch = f"refs/pr/{repo.pr_count}"
                answer["pullRequestUrl"] = f"{self.repo_url(repo.repo_id, repo.repo_type)}/discussions/{repo.pr_count}"
                answer["pullRequestRevision"] = branch
            else:
                branch = revision
            repo.branches[branch] = commit.oid
        answer["commitUrl"] = f"{self.repo_url(repo.repo_id, repo.repo_type)}/commit/{commit.oid}"
        return answer

    def _apply(self, repo: Repo, files: dict[str, FileEntry], line: dict) -> None:
        key, value = line.get("key"), line.get("value") or {}
        path = value.get("path")
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
            raise HubError(400, f"commit: invalid path {path!r} in {key} operation")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"commit: unsupported encoding {value.get('encoding')!r} for {path}")
            files[path] = self._regular_entry(base64.b64decode(value.get("content") or ""))
        elif key == "lfsFile":
            oid = value.get("oid")
            if oid not in repo.lfs_objects or oid not in self._blobs:
                raise HubError(422, f"commit: LFS object {oid} for {path} was never uploaded to {repo.repo_id}")
            files[path] = FileEntry.large(len(self._blobs[oid]), oid)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"commit: unknown operation key {key!r} (expected file, lfsFile, "
                                "deletedFile or deletedFolder)")

    def resolve(self, repo: Repo, revision: str, path: str) -> tuple[Commit, FileEntry]:
        commit = self._resolve(repo, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path} at {commit.oid}", "EntryNotFound",
                           headers={"X-Repo-Commit": commit.oid})
        return commit, entry


# ------------------------------------------------------------------------------------ helpers
def _flag(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


def _card_tags(card: dict | None) -> list[str]:
    if not card:
        return []
    tags = [str(t) for t in card.get("tags") or []]
    for key, prefix in (("library_name", ""), ("license", "license:"), ("datasets", "dataset:"),
                        ("base_model", "base_model:")):
        values = card.get(key)
        for value in values if isinstance(values, list) else [values] if values else []:
            tags.append(f"{prefix}{value}")
    return tags


def _lfs_patterns(gitattributes: str) -> list[str]:
    return [line.split()[0] for line in gitattributes.splitlines()
            if line.strip() and not line.startswith("#") and "filter=lfs" in line]


def _matches_any(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(path, p) for p in patterns)


def _gitignored(path: str, gitignore: str) -> bool:
    """A small .gitignore matcher: basename globs, rooted globs, `dir/` patterns, `!` negation."""
    ignored = False
    parts = path.split("/")
    for raw in gitignore.splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern[1:] if negate else pattern
        dir_only = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        anchored = "/" in pattern  # `/build` or `a/b`: matched from the root
        pattern = pattern.lstrip("/")
        if anchored:
            candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + (0 if dir_only else 1))]
        else:
            candidates = parts[:-1] if dir_only else parts
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


def validate_card_metadata(content: str, repo_type: str) -> tuple[list[str], list[str]]:
    """Errors and warnings for a README's YAML metadata, in the spirit of the Hub's validator."""
    match = _YAML_BLOCK_RE.search(content)
    if match is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as err:
        return [f"YAML metadata could not be parsed: {err}"], []
    if data is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    if not isinstance(data, dict):
        return ["YAML metadata must be a mapping"], []
    errors = []

    def str_or_list(key):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value))):
            errors.append(f'"{key}" must be a string or a list of strings')

    for key in ("license", "language", "tags", "datasets", "base_model", "metrics", "task_categories"):
        str_or_list(key)
    for key in ("library_name", "pipeline_tag", "license_name", "pretty_name"):
        if data.get(key) is not None and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    if "model-index" in data:
        errors.extend(_model_index_errors(data["model-index"]))
    if repo_type == "dataset" and "configs" in data:
        configs = data["configs"]
        if not isinstance(configs, list) or not all(isinstance(c, dict) and isinstance(c.get("config_name"), str)
                                                    for c in configs):
            errors.append('"configs" must be a list of mappings, each with a "config_name"')
    return errors, []


def _model_index_errors(model_index: Any) -> list[str]:
    if not isinstance(model_index, list) or not model_index:
        return ['"model-index" must be a non-empty list']
    errors = []
    for i, model in enumerate(model_index):
        where = f'"model-index[{i}]"'
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append(f"{where} must be a mapping with a string \"name\"")
            continue
        results = model.get("results")
        if not isinstance(results, list):
            errors.append(f"{where}.results must be a list")
            continue
        for j, result in enumerate(results):
            here = f"{where}.results[{j}]"
            if not isinstance(result, dict):
                errors.append(f"{here} must be a mapping")
                continue
            if not isinstance(result.get("task"), dict) or not isinstance(result["task"].get("type"), str):
                errors.append(f"{here}.task.type is required (a string)")
            dataset = result.get("dataset")
            if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in ("type", "name")):
                errors.append(f"{here}.dataset needs string \"type\" and \"name\"")
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f"{here}.metrics must be a non-empty list")
                continue
            for k, metric in enumerate(metrics):
                if not isinstance(metric, dict) or not isinstance(metric.get("type"), str) or "value" not in metric:
                    errors.append(f"{here}.metrics[{k}] needs a string \"type\" and a \"value\"")
    return errors


# ------------------------------------------------------------------------------------ HTTP layer
class _HubHandler(http.server.BaseHTTPRequestHandler):
    hub: LoopbackHub  # set on the per-server subclass
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's httpx client expects
    timeout = 60  # an idle connection's thread ends after this many seconds
    server_version = "LoopbackHub/1.0"

    def log_message(self, format, *args):  # noqa: A002 - silence stderr; requests are recorded
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -------------------------------------------------------------------- plumbing
    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query, keep_blank_values=True)
        self.segments = [unquote(s) for s in split.path.split("/")[1:]]
        status = 500
        try:
            body = self._read_body()
            status = self._route(method, body)
        except HubError as err:
            status = err.status
            self._send_error(err)
        except (ValueError, KeyError, TypeError) as err:  # malformed client input
            status = 400
            self._send_error(HubError(400, f"bad request: {err}"))
        except Exception as err:  # noqa: BLE001 - answer instead of dropping the connection
            status = 500
            self._send_error(HubError(500, f"loopback Hub internal error: {type(err).__name__}: {err}"))
        self.hub.requests.append(HubRequest(method, split.path, status))

    def _read_body(self) -> bytes:
        limit = self.hub.max_request_bytes
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > limit:
                    self.close_connection = True
                    raise HubError(413, f"request body larger than {limit} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            self.close_connection = True
            raise HubError(413, f"request body larger than {limit} bytes")
        return self.rfile.read(length) if length else b""

    def _authorized(self) -> bool:
        return (self.headers.get("Authorization") or "") == f"Bearer {self.hub.token}"

    def _require_write(self) -> str:
        auth = self.headers.get("Authorization")
        if not auth:
            raise HubError(401, "You must be authenticated to do this (no Authorization header)")
        if auth != f"Bearer {self.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.user

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict | None = None, head_only: bool = False, length: int | None = None) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body and not head_only:
            self.wfile.write(body)
        return status

    def _json(self, obj: Any, status: int = 200, headers: dict | None = None) -> int:
        return self._send(status, json.dumps(obj).encode(), headers=headers)

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message.splitlines()[0][:200], **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        body = err.body if err.body is not None else {"error": err.message}
        try:
            self._send(err.status, json.dumps(body).encode(), headers=headers,
                       head_only=self.command == "HEAD")
        except OSError:
            self.close_connection = True

    def _json_body(self, body: bytes) -> dict:
        try:
            data = json.loads(body or b"{}")
        except ValueError as err:
            raise HubError(400, f"request body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise HubError(400, "request body must be a JSON object")
        return data

    # -------------------------------------------------------------------- routing
    def _route(self, method: str, body: bytes) -> int:
        seg = self.segments
        if seg[:1] == ["api"]:
            return self._route_api(method, seg[1:], body)
        if seg[:2] == ["__lfs", "upload"] and len(seg) == 3 and method == "PUT":
            self.hub.lfs_put(seg[2], body)
            return self._send(200, headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        if seg[:2] == ["__lfs", "verify"] and len(seg) == 3 and method == "POST":
            self._require_write()
            self.hub.lfs_verify(self._json_body(body))
            return self._json({"success": True})
        repo_type, rest = "model", seg
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, rest = seg[0][:-1], seg[1:]
        if len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"] \
                and method == "POST":
            self._require_write()
            repo = self.hub._get_repo(repo_type, f"{rest[0]}/{rest[1][:-4]}", authorized=True)
            return self._send(200, json.dumps(self.hub.lfs_batch(repo, self._json_body(body))).encode(),
                              content_type="application/vnd.git-lfs+json")
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            repo = self.hub._get_repo(repo_type, f"{rest[0]}/{rest[1]}", self._authorized())
            return self._serve_file(repo, rest[3], "/".join(rest[4:]), head_only=method == "HEAD")
        return self._unknown(method)

    def _unknown(self, method: str) -> int:
        self.hub.unknown_routes.append(f"{method} {self.path}")
        raise HubError(404, f"the loopback Hub does not serve {method} {urlsplit(self.path).path}")

    def _route_api(self, method: str, seg: list[str], body: bytes) -> int:
        hub = self.hub
        if seg == ["whoami-v2"] and method == "GET":
            self._require_write()
            return self._json({"type": "user", "id": "0" * 24, "name": hub.user, "fullname": "Loopback User",
                               "email": None, "emailVerified": False, "canPay": False, "isPro": False,
                               "periodEnd": None, "orgs": [],
                               "auth": {"type": "access_token",
                                        "accessToken": {"displayName": "loopback", "role": "write"}}})
        if seg == ["agent-harnesses"] and method == "GET":
            return self._json({"standardEnvVars": [], "harnesses": {}})
        if seg == ["validate-yaml"] and method == "POST":
            payload = self._json_body(body)
            errors, warnings = validate_card_metadata(str(payload.get("content") or ""),
                                                      payload.get("repoType") or "model")
            if errors:
                return self._json({"errors": [{"message": e} for e in errors],
                                   "warnings": [{"message": w} for w in warnings]}, status=400)
            return self._json({"warnings": [{"message": w} for w in warnings]})
        if seg == ["repos", "create"] and method == "POST":
            status, answer = hub.create_repo(self._json_body(body), self._require_write())
            return self._json(answer, status=status)
        if seg == ["repos", "delete"] and method == "DELETE":
            hub.delete_repo(self._json_body(body), self._require_write())
            return self._send(200)
        if len(seg) >= 3 and seg[0] in ("models", "datasets", "spaces"):
            return self._route_repo_api(method, seg[0][:-1], f"{seg[1]}/{seg[2]}", seg[3:], body)
        if len(seg) == 2 and seg[0] in ("models", "datasets", "spaces") and method == "GET":
            # A repo id without namespace names a canonical repo of the public Hub; there are none here.
            raise HubError(404, f"Repository Not Found: {seg[0][:-1]} {seg[1]}", "RepoNotFound")
        return self._unknown(method)

    def _route_repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str], body: bytes) -> int:
        hub = self.hub
        write = method in ("POST", "PUT", "DELETE") and rest[:1] != ["paths-info"]
        if write:
            self._require_write()
        repo = hub._get_repo(repo_type, repo_id, authorized=write or self._authorized())
        action = rest[0] if rest else None
        if method == "GET" and (not rest or (action == "revision" and len(rest) == 2)):
            return self._json(hub.repo_info(repo, rest[1] if rest else None, self.query))
        if method == "GET" and action == "tree" and len(rest) >= 2:
            commit = hub._resolve(repo, rest[1])
            entries = hub.tree_entries(repo, commit, "/".join(rest[2:]), _flag(self.query.get("recursive")),
                                       _flag(self.query.get("expand")))
            return self._paginated(entries)
        if method == "POST" and action == "paths-info" and len(rest) == 2:
            commit = hub._resolve(repo, rest[1])
            form = parse_qs(body.decode(), keep_blank_values=True) if body else {}
            if (self.headers.get("Content-Type") or "").startswith("application/json"):
                data = self._json_body(body)
                form = {"paths": data.get("paths") or [], "expand": [str(data.get("expand", False))]}
            expand = _flag(form.get("expand"))
            with hub._lock:
                infos = []
                for path in form.get("paths", []):
                    path = path.strip("/")
                    if path in commit.files or any(p.startswith(path + "/") for p in commit.files):
                        infos.append(hub._path_info(repo, commit, path, expand))
            return self._json(infos)
        if method == "POST" and action == "preupload" and len(rest) == 2:
            return self._json(hub.preupload(repo, rest[1], self._json_body(body)))
        if method == "POST" and action == "commit" and len(rest) == 2:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            return self._json(hub.commit(repo, rest[1], lines, _flag(self.query.get("create_pr"))))
        if method == "GET" and action == "refs" and len(rest) == 1:
            return self._json(self._refs(repo))
        if method == "GET" and action == "commits" and len(rest) == 2:
            return self._paginated(self._history(repo, rest[1]))
        if action == "branch" and len(rest) == 2 and method in ("POST", "DELETE"):
            return self._branch(repo, rest[1], method, self._json_body(body) if method == "POST" else {})
        if action == "tag" and len(rest) == 2 and method in ("POST", "DELETE"):
            return self._tag(repo, rest[1], method, self._json_body(body) if method == "POST" else {})
        if method == "PUT" and action == "settings" and len(rest) == 1:
            payload = self._json_body(body)
            with hub._lock:
                if "private" in payload:
                    repo.private = bool(payload["private"])
                if "visibility" in payload:
                    repo.private = payload["visibility"] == "private"
            return self._json({"private": repo.private})
        return self._unknown(method)

    def _paginated(self, entries: list) -> int:
        size = self.hub.tree_page_size
        start = int((self.query.get("cursor") or ["0"])[-1])
        page, headers = entries[start:start + size], {}
        if start + size < len(entries):
            query = "&".join(f"{k}={quote(v[-1])}" for k, v in self.query.items() if k != "cursor")
            next_url = f"{self.hub.url}{urlsplit(self.path).path}?{query}&cursor={start + size}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        return self._json(page, headers=headers)

    def _refs(self, repo: Repo) -> dict:
        def ref(name, kind, oid):
            return {"name": name, "ref": name if name.startswith("refs/") else f"refs/{kind}/{name}",
                    "targetCommit": oid}

        with self.hub._lock:
            branches = [ref(n, "heads", o) for n, o in repo.branches.items() if not n.startswith("refs/pr/")]
            prs = [ref(n, "pr", o) for n, o in repo.branches.items() if n.startswith("refs/pr/")]
            answer = {"branches": branches, "tags": [ref(n, "tags", o) for n, o in repo.tags.items()],
                      "converts": []}
        if _flag(self.query.get("include_prs")):
            answer["pullRequests"] = prs
        return answer

    def _history(self, repo: Repo, revision: str) -> list[dict]:
        with self.hub._lock:
            commit, out = self.hub._resolve(repo, revision), []
            while commit is not None:
                out.append({"id": commit.oid, "title": commit.title, "message": commit.message,
                            "authors": [{"user": self.hub.user, "avatar": ""}], "date": commit.date})
                commit = repo.commits.get(commit.parent) if commit.parent else None
        return out

    def _branch(self, repo: Repo, branch: str, method: str, payload: dict) -> int:
        with self.hub._lock:
            if method == "DELETE":
                if branch == "main" or repo.branches.pop(branch, None) is None:
                    raise HubError(404 if branch != "main" else 403, f"cannot delete branch {branch!r}",
                                   "RevisionNotFound" if branch != "main" else None)
                return self._send(200)
            if branch.startswith("refs/") or not branch:
                raise HubError(400, f"Invalid reference for a branch: {branch}")
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self.hub._resolve(repo, payload.get("startingPoint") or "main")
            repo.branches[branch] = start.oid
        return self._send(200)

    def _tag(self, repo: Repo, target: str, method: str, payload: dict) -> int:
        with self.hub._lock:
            if method == "DELETE":
                if repo.tags.pop(target, None) is None:
                    raise HubError(404, f"tag {target!r} not found", "RevisionNotFound")
                return self._send(200)
            name = payload.get("tag")
            if not isinstance(name, str) or not name:
                raise HubError(400, "tag: the body needs a 'tag' name")
            if name in repo.tags:
                raise HubError(409, f"Tag already exists: refs/tags/{name}")
            repo.tags[name] = self.hub._resolve(repo, target).oid
        return self._send(200)

    def _serve_file(self, repo: Repo, revision: str, path: str, head_only: bool) -> int:
        with self.hub._lock:
            commit, entry = self.hub.resolve(repo, revision, path)
            data = self.hub._blobs[entry.sha256]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        byte_range = self.headers.get("Range")
        if byte_range and not head_only:
            start, stop = _parse_range(byte_range, len(data))
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            return self._send(206, data[start:stop], "application/octet-stream", headers)
        return self._send(200, data, "application/octet-stream", headers, head_only=head_only,
                          length=len(data))


def _parse_range(header: str, total: int) -> tuple[int, int]:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` -> [start, stop); 416 when it cannot be served."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or match.groups() == ("", ""):
        raise HubError(416, f"unsupported Range header {header!r}", headers={"Content-Range": f"bytes */{total}"})
    first, last = match.groups()
    if first == "":
        start, stop = max(total - int(last), 0), total
    else:
        start, stop = int(first), min(int(last) + 1, total) if last else total
    if start >= total and total > 0 or start > stop:
        raise HubError(416, f"Range {header!r} outside a {total}-byte file",
                       headers={"Content-Range": f"bytes */{total}"})
    return start, stop
