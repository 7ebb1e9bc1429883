"""A Hugging Face Hub on loopback, for `charbuild export --push`: the HTTP API as the
installed huggingface_hub (2.4, with hf_xet 1.8) uses it to create repos and upload
folders, over a real socket (aiohttp.web, 127.0.0.1, a free port) from a thread.

    with HubServer() as hub:
        hub.env                              # HF_ENDPOINT and HF_TOKEN, for a child process
        hub.repo("test-org/name-data", "dataset").files   # {path: bytes}, as committed
        hub.repo(...).commits, hub.repo(...).uploaded      # each commit; how each file came

What a real Hub does and this one does too:

- a bearer token on every write; a wrong one is answered 401 "Invalid credentials in
  Authorization header" (read or write), none on a write 401; a namespace the token's
  user does not write to 403;
- `repos/create` gives the repo its `.gitattributes` (the LFS patterns), 409 when it exists;
- `validate-yaml` rejects a card whose front matter is not a YAML mapping;
- `preupload` calls a file "regular" when it is text under 10 MiB that no LFS pattern
  matches, else "lfs", and gives the oid of what the path holds now (so an unchanged file
  is not sent again);
- an "lfs" file's bytes go to storage before the commit names them by sha256: with hf_xet
  installed the client always takes Xet (`xet-write-token`, then the CAS: xorbs and a
  shard, `POST /v2/shards` answered in NDJSON frames), without it (HF_HUB_DISABLE_XET=1)
  the git LFS batch API and a presigned PUT. Both are served; the CAS decodes the xorbs
  (LZ4 frames, byte grouping) and rebuilds each file from the shard, so a commit's
  `lfsFile` must name bytes that really arrived, or it is refused (400), as on the Hub;
- `commit` applies its NDJSON lines at once and refuses a binary or >10 MiB file sent
  inline (400); `tree` lists what a repo holds (the client reads it to delete the files an
  export no longer has); `whoami-v2` and `agent-harnesses` answer as the Hub does.

Xet or LFS is the client's choice, not the Hub's: nothing a Hub answers makes this client
(hf_xet installed) take LFS, so a Hub "without Xet" would only make its uploads fail.

Not served: pull requests, branches other than main, downloads, global dedup (chunks are
never found, so the client uploads them) and xorb upload grants (404: the client then
uploads xorbs to the CAS itself).
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import hashlib
import json
import re
import secrets
import struct
import time
from dataclasses import dataclass, field
from urllib.parse import unquote

import yaml
from aiohttp import web

from support.loopback import ServedApp

TEN_MIB = 10 * 1024 * 1024
# A new repo's .gitattributes on the Hub: what it stores with LFS whatever the size.
LFS_PATTERNS = ("*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
                "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
                "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
                "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*")
DATASET_LFS_PATTERNS = ("*.mds", "*.mp3", "*.ogg", "*.wav", "*.flac", "*.jpg", "*.jpeg", "*.png", "*.webp", "*.mp4")
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
BAD_TOKEN = "Invalid credentials in Authorization header"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# -- Xet formats (xet-core's xorb and MDB shard, as hf_xet 1.8 writes them) -------------


def xet_hex(h: bytes) -> str:
    """A 32-byte Xet hash as its URLs spell it: four little-endian u64, each in hex."""
    return "".join(f"{int.from_bytes(h[i:i + 8], 'little'):016x}" for i in range(0, 32, 8))


def lz4_block(src: bytes, out: bytearray) -> None:
    """Decode one LZ4 block onto `out` (matches may reach into earlier blocks)."""
    i, n = 0, len(src)
    while i < n:
        token = src[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            while True:
                b = src[i]
                i += 1
                lit += b
                if b != 255:
                    break
        out += src[i:i + lit]
        i += lit
        if i >= n:  # the last sequence has literals only
            return
        offset = src[i] | src[i + 1] << 8
        i += 2
        mlen = token & 15
        if mlen == 15:
            while True:
                b = src[i]
                i += 1
                mlen += b
                if b != 255:
                    break
        mlen += 4
        start = len(out) - offset
        if offset <= 0 or start < 0:
            raise ValueError("LZ4 match before the start of the data")
        if offset >= mlen:
            out += out[start:start + mlen]
        else:  # an overlapping match repeats the last `offset` bytes
            pattern = bytes(out[start:])
            out += (pattern * (mlen // offset + 1))[:mlen]


def lz4_frame(data: bytes) -> bytes:
    if data[:4] != b"\x04\x22\x4d\x18":
        raise ValueError("not an LZ4 frame")
    flg = data[4]
    i = 6 + (8 if flg & 0x08 else 0) + (4 if flg & 0x01 else 0) + 1  # FLG BD [size] [dict] HC
    out = bytearray()
    while True:
        size = int.from_bytes(data[i:i + 4], "little")
        i += 4
        if size == 0:
            return bytes(out)
        raw, size = size & 0x80000000, size & 0x7FFFFFFF
        block = data[i:i + size]
        if raw:
            out += block
        else:
            lz4_block(block, out)
        i += size + (4 if flg & 0x10 else 0)


def ungroup4(data: bytes) -> bytes:
    """Undo byte grouping: the data was split into 4 groups (byte k of every 4 in group k)."""
    n = len(data)
    out = bytearray(n)
    pos = 0
    for k in range(4):
        size = n // 4 + (1 if k < n % 4 else 0)
        out[k::4] = data[pos:pos + size]
        pos += size
    return bytes(out)


def xorb_chunks(xorb: bytes) -> list[bytes]:
    """The chunks of a serialized xorb, decompressed: each behind an 8-byte header (version,
    compressed size u24, scheme: 0 none, 1 LZ4, 2 byte grouping + LZ4; uncompressed size u24)."""
    chunks, i = [], 0
    while i + 8 <= len(xorb):
        version, scheme = xorb[i], xorb[i + 4]
        csize = int.from_bytes(xorb[i + 1:i + 4], "little")
        usize = int.from_bytes(xorb[i + 5:i + 8], "little")
        if version != 0 or scheme > 2 or i + 8 + csize > len(xorb):
            break  # a footer (hashes and boundaries), not a chunk
        body = xorb[i + 8:i + 8 + csize]
        data = body if scheme == 0 else lz4_frame(body)
        if scheme == 2:
            data = ungroup4(data)
        if len(data) != usize:
            raise ValueError(f"xorb chunk at {i}: {len(data)} bytes, header says {usize}")
        chunks.append(data)
        i += 8 + csize
    return chunks


@dataclass
class ShardFile:
    file_hash: str
    terms: list[tuple[str, int, int, int]]  # (xorb hash, first chunk, end chunk, bytes)
    sha256: str | None


def shard_files(shard: bytes) -> list[ShardFile]:
    """The file-info section of an MDB shard: per file, the xorb chunk ranges it is made of."""
    if not shard.startswith(b"HFRepoMetaData\0"):
        raise ValueError("not an MDB shard")
    i, files = 48, []
    while True:
        h = shard[i:i + 32]
        flags, n = struct.unpack_from("<II", shard, i + 32)
        i += 48
        if h == b"\xff" * 32:
            return files
        terms = []
        for _ in range(n):
            cas, _cflags, nbytes, start, end = struct.unpack_from("<32sIIII", shard, i)
            terms.append((xet_hex(cas), start, end, nbytes))
            i += 48
        if flags & 0x80000000:  # a verification hash per term
            i += 48 * n
        sha = None
        if flags & 0x40000000:  # metadata extension: the file's sha256 (spelled as the hashes are)
            sha = xet_hex(shard[i:i + 32])
            i += 48
        files.append(ShardFile(xet_hex(h), terms, sha))


# -- the Hub ------------------------------------------------------------------------------


@dataclass
class Repo:
    repo_id: str
    type: str
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)  # paths stored as LFS pointers
    uploaded: dict[str, str] = field(default_factory=dict)  # path -> "regular" | "xet" | "lfs", last commit
    commits: list[dict] = field(default_factory=list)
    sha: str = ""

    def lfs_patterns(self) -> tuple[str, ...]:
        return LFS_PATTERNS + (DATASET_LFS_PATTERNS if self.type == "dataset" else ())

    def matches_lfs(self, path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(path if "/" in p else name, p) for p in self.lfs_patterns())

    def oid(self, path: str) -> str | None:
        if path not in self.files:
            return None
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if path in self.lfs else git_blob_oid(data)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    def __init__(self, user: str = "charbuild-tester", orgs: tuple[str, ...] = ("test-org",),
                 token: str | None = None):
        self.user, self.orgs = user, orgs
        self.token = token or "hf_" + secrets.token_urlsafe(24).replace("-", "a").replace("_", "b")
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), in arrival order
        self.auth_seen: list[str] = []  # every Authorization header, as sent
        self.telemetry: list[bytes] = []
        self._cas_token = "cas_" + secrets.token_hex(16)
        self._xorbs: dict[str, bytes] = {}
        self._stored: dict[str, bytes] = {}  # sha256 -> file bytes, from the CAS or LFS storage
        self._how_stored: dict[str, str] = {}  # sha256 -> "xet" | "lfs"
        self._lfs_signatures: dict[str, str] = {}
        self._served: ServedApp | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.url: str | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.url, "HF_TOKEN": self.token}

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def commit_by_hand(self, repo_id: str, repo_type: str, files: dict[str, bytes], summary: str) -> None:
        """A commit made some other way (the web editor, an older tool): regular files only."""
        repo = self.repo(repo_id, repo_type)
        repo.files.update(files)
        repo.sha = hashlib.sha1(repo.sha.encode() + summary.encode()).hexdigest()
        repo.commits.append({"oid": repo.sha, "summary": summary, "added": sorted(files), "deleted": []})

    # -- requests -----------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.auth_seen.append(request.headers.get("Authorization", ""))
        try:
            resp = await self._route(request)
        except HTTPError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            resp = web.json_response({"error": e.message}, status=e.status, headers=headers)
        self.requests.append((request.method, request.path, resp.status))
        return resp

    def _user(self, request: web.Request, write: bool) -> str | None:
        auth = request.headers.get("Authorization")
        if auth is None:
            if write:
                raise HTTPError(401, "You must be authenticated to access this resource")
            return None
        if auth != f"Bearer {self.token}":
            raise HTTPError(401, BAD_TOKEN)
        return self.user

    def _writable(self, request: web.Request, repo_id: str, repo_type: str) -> Repo:
        self._user(request, write=True)
        ns = repo_id.split("/")[0]
        if ns not in (self.user, *self.orgs):
            raise HTTPError(403, f'You don\'t have the rights to write to the namespace "{ns}"')
        return self._existing(repo_id, repo_type)

    def _existing(self, repo_id: str, repo_type: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HTTPError(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _main(rev: str) -> None:
        if unquote(rev) != "main":
            raise HTTPError(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")

    async def _route(self, request: web.Request) -> web.StreamResponse:
        m, path = request.method, request.path
        if path.startswith("/api/"):
            if (m, path) == ("GET", "/api/agent-harnesses"):  # what the client reads into its user agent
                return web.json_response({"standardEnvVars": [], "harnesses": {}})
            if (m, path) == ("GET", "/api/whoami-v2"):
                self._user(request, write=True)
                return web.json_response({"type": "user", "name": self.user, "orgs": [{"name": o} for o in self.orgs],
                                          "auth": {"type": "access_token",
                                                   "accessToken": {"displayName": "tests", "role": "write"}}})
            if (m, path) == ("POST", "/api/repos/create"):
                return await self._create(request)
            if (m, path) == ("POST", "/api/validate-yaml"):
                return await self._validate_yaml(request)
            hit = re.fullmatch(r"/api/(model|dataset|space)s/([^/]+/[^/]+)(?:/(.*))?", path)
            if hit:
                kind, repo_id, rest = hit.group(1), hit.group(2), hit.group(3) or ""
                return await self._repo_api(request, kind, repo_id, rest)
        hit = re.fullmatch(r"/(datasets/|spaces/)?([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)", path)
        if hit and m == "POST":
            kind = {None: "model", "datasets/": "dataset", "spaces/": "space"}[hit.group(1)]
            return await (self._lfs_batch if hit.group(3) == "batch" else self._lfs_verify)(request, kind, hit.group(2))
        hit = re.fullmatch(r"/lfs-storage/([0-9a-f]{64})", path)
        if hit and m == "PUT":
            return await self._lfs_put(request, hit.group(1))
        if path.startswith(("/v1/", "/v2/")):
            return await self._cas(request)
        raise HTTPError(404, f"no route for {m} {path}")

    async def _create(self, request: web.Request) -> web.Response:
        self._user(request, write=True)
        body = await request.json()
        kind = body.get("type") or "model"
        ns = body.get("organization") or self.user
        if ns not in (self.user, *self.orgs):
            raise HTTPError(403, f'You don\'t have the rights to create a {kind} under the namespace "{ns}"')
        repo_id = f"{ns}/{body['name']}"
        url = f"{self.url}/{PREFIX[kind]}{repo_id}"
        if (kind, repo_id) in self.repos:
            return web.json_response({"error": f"You already created this {kind} repo", "url": url}, status=409)
        repo = Repo(repo_id, kind)
        repo.files[".gitattributes"] = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n"
                                               for p in repo.lfs_patterns()).encode()
        repo.sha = hashlib.sha1(f"{kind}/{repo_id}/initial".encode()).hexdigest()
        self.repos[(kind, repo_id)] = repo
        return web.json_response({"url": url, "name": repo_id, "id": secrets.token_hex(12)})

    async def _validate_yaml(self, request: web.Request) -> web.Response:
        self._user(request, write=False)
        content = (await request.json()).get("content", "")
        hit = re.match(r"---\n(.*?)\n---\n", content, re.S)
        if hit:
            try:
                meta = yaml.safe_load(hit.group(1))
            except yaml.YAMLError as e:
                return web.json_response({"errors": [{"message": f"Invalid YAML: {e}"}]}, status=400)
            if meta is not None and not isinstance(meta, dict):
                return web.json_response({"errors": [{"message": "metadata must be a YAML mapping"}]}, status=400)
        return web.json_response({"errors": [], "warnings": []})

    async def _repo_api(self, request: web.Request, kind: str, repo_id: str, rest: str) -> web.StreamResponse:
        m = request.method
        if m == "GET" and (rest == "" or rest.startswith("revision/")):
            self._user(request, write=False)
            repo = self._existing(repo_id, kind)
            return web.json_response({"id": repo_id, "sha": repo.sha, "private": False,
                                      "siblings": [{"rfilename": p} for p in sorted(repo.files)]})
        verb, _, rev = rest.partition("/")
        if m == "GET" and verb == "tree":
            self._user(request, write=False)
            repo = self._existing(repo_id, kind)
            self._main(rev.split("/")[0])
            return web.json_response(self._tree(repo))
        if m == "POST" and verb == "preupload":
            repo = self._writable(request, repo_id, kind)
            self._main(rev)
            files = (await request.json())["files"]
            return web.json_response({"files": [
                {"path": f["path"], "uploadMode": self._mode(repo, f["path"], base64.b64decode(f["sample"]), f["size"]),
                 "shouldIgnore": False, "oid": repo.oid(f["path"])} for f in files], "commitOid": repo.sha})
        if m == "GET" and verb == "xet-write-token":
            self._writable(request, repo_id, kind)
            exp = int(time.time()) + 3600
            return web.json_response(
                {"accessToken": self._cas_token, "exp": exp, "casUrl": self.url},
                headers={"X-Xet-Cas-Url": self.url, "X-Xet-Access-Token": self._cas_token,
                         "X-Xet-Token-Expiration": str(exp)})
        if m == "POST" and verb == "commit":
            repo = self._writable(request, repo_id, kind)
            self._main(rev)
            return self._commit(repo, await request.read())
        raise HTTPError(404, f"no route for {m} {request.path}")

    @staticmethod
    def _mode(repo: Repo, path: str, sample: bytes, size: int) -> str:
        binary = b"\0" in sample
        return "lfs" if size >= TEN_MIB or binary or repo.matches_lfs(path) else "regular"

    def _tree(self, repo: Repo) -> list[dict]:
        out, dirs = [], set()
        for path in sorted(repo.files):
            parts = path.split("/")
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
            data = repo.files[path]
            entry = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
            if path in repo.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        out += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d} for d in sorted(dirs)]
        return out

    def _commit(self, repo: Repo, body: bytes) -> web.Response:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HTTPError(400, "the first line of a commit must be its header")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, repo.sha):
            raise HTTPError(412, "A commit has happened since. Please refresh and try again.")
        files, lfs, uploaded, deleted, rejected = dict(repo.files), set(repo.lfs), {}, [], []
        for line in lines[1:]:
            key, v = line["key"], line["value"]
            path = v["path"]
            if key == "file":
                data = base64.b64decode(v["content"])
                if self._mode(repo, path, data[:512], len(data)) == "lfs":
                    rejected.append(path)
                    continue
                files[path] = data
                lfs.discard(path)
                uploaded[path] = "regular"
            elif key == "lfsFile":
                data = self._stored.get(v["oid"])
                if data is None or ("size" in v and v["size"] != len(data)):
                    raise HTTPError(400, "Your push was rejected because an LFS pointer pointed to a file that "
                                         f"does not exist. Offending file: - {path}")
                files[path] = data
                lfs.add(path)
                uploaded[path] = self._how_stored[v["oid"]]
            elif key == "deletedFile":
                if path not in files:
                    raise HTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
                lfs.discard(path)
                deleted.append(path)
            elif key == "deletedFolder":
                gone = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                for p in gone:
                    del files[p]
                    lfs.discard(p)
                deleted += gone
            else:
                raise HTTPError(400, f"unknown commit operation {key!r}")
        if rejected:
            raise HTTPError(400, "Your push was rejected because it contains binary files or files larger than "
                                 "10 MiB; use Xet or LFS. Offending files: " + ", ".join(rejected))
        repo.files, repo.lfs, repo.uploaded = files, lfs, uploaded
        repo.sha = hashlib.sha1(repo.sha.encode() + body).hexdigest()
        repo.commits.append({"oid": repo.sha, "summary": header.get("summary"), "added": sorted(uploaded),
                             "deleted": sorted(deleted)})
        return web.json_response({"success": True, "commitOid": repo.sha, "pullRequestUrl": None,
                                  "commitUrl": f"{self.url}/{PREFIX[repo.type]}{repo.repo_id}/commit/{repo.sha}"})

    # -- LFS (the client without hf_xet) --------------------------------------------------
    def _store(self, data: bytes, how: str) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self._stored[sha] = data
        self._how_stored[sha] = how
        return sha

    async def _lfs_batch(self, request: web.Request, kind: str, repo_id: str) -> web.Response:
        self._writable(request, repo_id, kind)
        body = await request.json()
        objects = []
        for o in body["objects"]:
            if o["oid"] in self._stored:
                objects.append({"oid": o["oid"], "size": o["size"]})  # no actions: nothing to send
                continue
            sig = self._lfs_signatures.setdefault(o["oid"], secrets.token_hex(8))
            objects.append({"oid": o["oid"], "size": o["size"], "authenticated": True, "actions": {
                "upload": {"href": f"{self.url}/lfs-storage/{o['oid']}?X-Amz-Signature={sig}"},
                "verify": {"href": f"{self.url}/{PREFIX[kind]}{repo_id}.git/info/lfs/objects/verify"}}})
        return web.json_response({"transfer": "basic", "objects": objects},
                                 content_type="application/vnd.git-lfs+json")

    async def _lfs_put(self, request: web.Request, oid: str) -> web.Response:
        # presigned, as S3's: the signature is the credential, no Authorization
        if request.query.get("X-Amz-Signature") != self._lfs_signatures.get(oid):
            raise HTTPError(403, "SignatureDoesNotMatch")
        data = await request.read()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HTTPError(400, "the uploaded bytes do not match the oid")
        self._store(data, "lfs")
        return web.Response(status=200)

    async def _lfs_verify(self, request: web.Request, kind: str, repo_id: str) -> web.Response:
        self._writable(request, repo_id, kind)
        o = await request.json()
        if o["oid"] not in self._stored or len(self._stored[o["oid"]]) != o["size"]:
            raise HTTPError(404, f"object {o['oid']} not found")
        return web.json_response({})

    # -- Xet CAS ------------------------------------------------------------------------
    async def _cas(self, request: web.Request) -> web.StreamResponse:
        m, path = request.method, request.path
        if (m, path) == ("POST", "/v1/telemetry"):
            self.telemetry.append(await request.read())
            return web.json_response({})
        if request.headers.get("Authorization") != f"Bearer {self._cas_token}":
            raise HTTPError(401, "invalid CAS token")
        if m == "GET" and path.startswith("/v1/chunks/"):
            raise HTTPError(404, "chunk not found")  # no global dedup here
        if m == "POST" and path.startswith("/v1/xorb-grants/"):
            raise HTTPError(404, "no upload grants here")
        hit = re.fullmatch(r"/v1/xorbs/default/([0-9a-f]{64})", path)
        if m == "POST" and hit:
            new = hit.group(1) not in self._xorbs
            self._xorbs[hit.group(1)] = await request.read()
            return web.json_response({"was_inserted": new})
        if m == "POST" and path in ("/v2/shards", "/v1/shards"):
            try:
                files = shard_files(await request.read())
                for f in files:
                    self._rebuild(f)
            except (ValueError, KeyError, IndexError, struct.error) as e:
                if path == "/v1/shards":
                    raise HTTPError(400, f"bad shard: {e}")
                frame = {"type": "error", "message": f"bad shard: {e}", "retryable": False}
                return web.Response(body=json.dumps(frame) + "\n", content_type="application/x-ndjson")
            if path == "/v1/shards":
                return web.json_response({"result": 1})
            frames = [{"type": "validating", "verified": len(files), "total": len(files)}, {"type": "result"}]
            return web.Response(body="".join(json.dumps(f) + "\n" for f in frames),
                                content_type="application/x-ndjson")
        raise HTTPError(404, f"no route for {m} {path}")

    def _rebuild(self, f: ShardFile) -> None:
        """A file, from the xorb chunks its shard entry names; kept by its sha256."""
        parts = []
        for xorb, start, end, nbytes in f.terms:
            if xorb not in self._xorbs:
                raise KeyError(f"file {f.file_hash} names xorb {xorb}, never uploaded")
            seg = b"".join(xorb_chunks(self._xorbs[xorb])[start:end])
            if len(seg) != nbytes:
                raise ValueError(f"xorb {xorb} chunks {start}-{end}: {len(seg)} bytes, shard says {nbytes}")
            parts.append(seg)
        sha = self._store(b"".join(parts), "xet")
        if f.sha256 is not None and f.sha256 != sha:
            raise ValueError(f"file {f.file_hash}: rebuilt bytes have sha256 {sha}, shard says {f.sha256}")

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> str:
        def app() -> web.Application:
            app = web.Application(client_max_size=1 << 30)  # a commit carries its small files inline
            app.router.add_route("*", "/{tail:.*}", self._handle)
            return app

        self._served = ServedApp(app, "hub-server")
        self._loop = self._served.loop
        self.url = f"http://127.0.0.1:{self._served.port}"
        return self.url

    def stop(self) -> None:
        if self._served is not None:
            self._served.stop()
        self._served = self._loop = None

    def __enter__(self) -> "HubServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
