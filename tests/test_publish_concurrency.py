"""Publishing under races and faults, against a real S3 API over HTTP (moto's server) and the file:// store.

- many publishers of one pinned version at once: exactly one wins, every loser gets the one-line
  error (or "unchanged" for the same content), and the release verifies;
- replies lost on the way back (a fault-injecting HTTP proxy in front of moto forwards a request
  and then drops the connection): boto3 retries, and the publish still succeeds, a retried
  conditional manifest write that finds its own manifest included;
- transport errors that outlast the retries are one-line UserErrors naming the bucket and key;
- `vlm-factory gc` lists and removes uploads no manifest references, and keeps everything else.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pytest

from vlm_factory.cli import main
from vlm_factory.errors import UserError, exits_cleanly
from vlm_factory.publish.bundle import Bundle, artifact_entries
from vlm_factory.publish.gc import collect_garbage
from vlm_factory.publish.release import check_release, files_root, new_upload_id, publish_bundle, read_manifest
from vlm_factory.publish.store import FileStore, S3Store

from conftest import moto_s3_endpoint

boto3 = pytest.importorskip("boto3", reason="the s3 extra is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
moto_s3_responses = pytest.importorskip("moto.s3.responses")

TIER = "android_budget"
VERSION = "1.0.0"
PUBLISHERS = 20


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto in server mode on a free localhost port, its conditional writes made atomic.

    moto checks If-None-Match and then writes without a lock, so two racing conditional writes
    can both succeed there; S3 itself guarantees one winner. Serialising moto's PutObject gives
    these tests S3's guarantee, so that they test this project's side of the race, not moto's."""
    lock = threading.Lock()
    unlocked = moto_s3_responses.S3Response.put_object

    def put_object(self):
        with lock:
            return unlocked(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(moto_s3_responses.S3Response, "put_object", put_object)
        with moto_s3_endpoint() as url:
            yield url


@pytest.fixture
def bucket(s3_endpoint, request):
    name = f"race-{request.node.name.replace('_', '-').replace('[', '-').replace(']', '')[:50].lower()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def _s3(endpoint, bucket, **kwargs):
    return S3Store(bucket, "vlm", endpoint_url=endpoint, multipart_threshold_mb=5, **kwargs)


def _make_store(kind, s3_endpoint, bucket_name, tmp_path):
    return _s3(s3_endpoint, bucket_name) if kind == "s3" else FileStore(tmp_path / "releases")


def _bundle(tmp_path, tag: str, seed: int, big: bool = False) -> tuple[Bundle, dict]:
    """A small release: two exports, a parity verdict, a budget and a card; `seed` decides the content."""
    rng = np.random.default_rng(seed)
    sizes = {"gguf/llm-Q4_K_M.gguf": 4000, "gguf/mmproj-Q8_0.gguf": 1500, "onnx/text.onnx": 6 * 2**20 if big else 2500,
             "parity/gguf.json": 200, "budget.json": 100}
    bundle = Bundle(TIER)
    for name, size in sizes.items():
        path = tmp_path / "src" / tag / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(size))
        bundle.files[name] = path
    bundle.generated["README.md"] = f"# card of {tag}\n".encode()
    manifest = {"tier": TIER, "version": VERSION, "created": datetime.now(timezone.utc).isoformat(),
                "publisher": tag, "files": bundle.entries()}
    return bundle, manifest


class _Racer:
    """A publisher's view of the store: records the keys it writes, and holds its manifest write until
    every publisher has staged its files, so that all of them race for the commit at once."""

    def __init__(self, store, barrier, written):
        self.store, self.barrier, self.written = store, barrier, written
        self.uri = store.uri

    def put_file(self, key, path, only_if_absent=False):
        self.written.append(key)
        return self.store.put_file(key, path, only_if_absent)

    def put_bytes(self, key, data, only_if_absent=False):
        if only_if_absent:
            self.barrier.wait(timeout=60)
        self.written.append(key)
        return self.store.put_bytes(key, data, only_if_absent)

    def __getattr__(self, name):
        return getattr(self.store, name)


@pytest.mark.parametrize("kind", ["s3", "file"])
@pytest.mark.parametrize("content", ["different", "identical"])
def test_concurrent_publishers_of_one_version(kind, content, s3_endpoint, bucket, tmp_path, capsys):
    stores = [_make_store(kind, s3_endpoint, bucket, tmp_path) for _ in range(PUBLISHERS)]  # a client each
    bundles = [_bundle(tmp_path, f"p{i}", seed=i if content == "different" else 0) for i in range(PUBLISHERS)]
    barrier = threading.Barrier(PUBLISHERS)
    written = [[] for _ in range(PUBLISHERS)]
    outcomes: list = [None] * PUBLISHERS

    def publish(i):
        try:
            outcomes[i] = publish_bundle(_Racer(stores[i], barrier, written[i]), *bundles[i])
        except Exception as error:  # noqa: BLE001 - the test looks at every outcome
            outcomes[i] = error

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(PUBLISHERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    winners = [i for i, outcome in enumerate(outcomes) if outcome == "published"]
    assert len(winners) == 1, outcomes
    losers = [outcome for i, outcome in enumerate(outcomes) if i not in winners]
    if content == "different":
        for error in losers:
            assert isinstance(error, UserError), repr(error)
            assert "\n" not in str(error)
            assert f"version {VERSION} already published with different content" in str(error)
    else:
        assert losers == ["unchanged"] * (PUBLISHERS - 1)

    store, prefix = stores[0], f"{TIER}/{VERSION}"
    assert check_release(store, prefix) == []
    manifest = read_manifest(store, prefix)
    winner_bundle, winner_manifest = bundles[winners[0]]
    assert manifest["publisher"] == winner_manifest["publisher"]
    assert artifact_entries(manifest) == artifact_entries(winner_manifest)
    assert json.loads(store.get_bytes(f"{TIER}/latest.json"))["version"] == VERSION
    # No two publishers ever wrote the same object (the manifest and latest.json aside).
    counts = Counter(key for keys in written for key in set(keys))
    shared = {key for key, n in counts.items() if n > 1} - {f"{prefix}/manifest.json", f"{TIER}/latest.json"}
    assert shared == set()
    # The losers removed their own uploads: nothing is left for gc, and the store holds just the release.
    report = collect_garbage(store, grace=timedelta(0))
    assert report.orphans == [] and report.in_flight == [] and len(report.referenced) == 1
    root = files_root(prefix, manifest)
    assert sorted(store.keys(TIER)) == sorted([f"{prefix}/manifest.json", f"{TIER}/latest.json"]
                                              + [f"{root}/{name}" for name in manifest["files"]])
    if content == "different":  # what a loser sees from an entry point (the publish stage): one line, exit 2
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            exits_cleanly(publish_bundle)(store, *_bundle(tmp_path, "late", seed=99))
        assert exited.value.code == 2
        assert capsys.readouterr().err == (f"error: {store.uri}/{prefix}: version {VERSION} already published with "
                                           "different content; releases are immutable: set a new publish.version\n")


class FaultyProxy:
    """An HTTP proxy in front of moto that, for chosen requests, forwards the request and then drops
    the reply (closes the connection without an answer), as a network that loses a reply does."""

    HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
           "proxy-connection"}

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.rules: list[list] = []  # [name, predicate, how many more replies to drop]
        self.dropped: list[str] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def relay(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy.HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                drop = proxy._should_drop(self.command, self.path, self.headers)
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    reply = upstream.getresponse()
                    data = reply.read()
                finally:
                    upstream.close()
                if drop:  # the request was carried out; its answer never arrives
                    self.close_connection = True
                    return
                self.send_response(reply.status, reply.reason)
                for key, value in reply.getheaders():
                    if key.lower() not in proxy.HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                length = reply.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def drop(self, name, predicate, times=1):
        self.rules.append([name, predicate, times])

    def _should_drop(self, method, path, headers) -> bool:
        with self.lock:
            for rule in self.rules:
                name, predicate, left = rule
                if left > 0 and predicate(method, urlsplit(path), headers):
                    rule[2] -= 1
                    self.dropped.append(name)
                    return True
        return False

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(s3_endpoint):
    faulty = FaultyProxy(s3_endpoint)
    yield faulty
    faulty.close()


def _is(method, suffix, **query):
    def predicate(m, url, headers):
        return m == method and url.path.endswith(suffix) and all(f"{k}=" in url.query for k in query)
    return predicate


def test_lost_replies_are_retried_and_the_publish_succeeds(proxy, s3_endpoint, bucket, tmp_path):
    conditional = _is("PUT", "/manifest.json")
    proxy.drop("manifest commit", lambda m, url, h: conditional(m, url, h) and h.get("If-None-Match") == "*")
    proxy.drop("object write", _is("PUT", "/budget.json"))
    proxy.drop("read-back", _is("GET", "/gguf/llm-Q4_K_M.gguf"))
    proxy.drop("multipart part", _is("PUT", "/onnx/text.onnx", partNumber=1))
    proxy.drop("multipart complete", _is("POST", "/onnx/text.onnx", uploadId=1))
    store = _s3(proxy.url, bucket)
    bundle, manifest = _bundle(tmp_path, "lossy", seed=1, big=True)
    assert publish_bundle(store, bundle, manifest) == "published"
    assert sorted(proxy.dropped) == sorted(["manifest commit", "object write", "read-back", "multipart part",
                                            "multipart complete"])
    direct = _s3(s3_endpoint, bucket)
    prefix = f"{TIER}/{VERSION}"
    assert check_release(direct, prefix) == []
    assert read_manifest(direct, prefix)["publisher"] == "lossy"
    assert json.loads(direct.get_bytes(f"{TIER}/latest.json"))["version"] == VERSION
    assert direct.pending_uploads("") == []


def test_transport_errors_after_retries_are_one_line_errors(proxy, s3_endpoint, bucket, tmp_path):
    proxy.drop("always", _is("PUT", "/budget.json"), times=10**6)
    store = _s3(proxy.url, bucket, max_attempts=2)
    bundle, manifest = _bundle(tmp_path, "doomed", seed=2)
    with pytest.raises(UserError) as failed:
        publish_bundle(store, bundle, manifest)
    message = str(failed.value)
    assert message.startswith(f"s3://{bucket}/vlm/{TIER}/{VERSION}/upload-")
    assert "/budget.json: upload failed after 2 attempts: Connection was closed" in message
    assert "\n" not in message
    assert proxy.dropped == ["always", "always"]
    assert read_manifest(_s3(s3_endpoint, bucket), f"{TIER}/{VERSION}") is None  # no release came of it

    with socket_closed_port() as port:
        dead = S3Store(bucket, "vlm", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2)
        with pytest.raises(UserError, match=rf"^s3://{bucket}/vlm/{TIER}/latest.json: read failed after 2 attempts: "
                                            "Could not connect"):
            dead.get_bytes(f"{TIER}/latest.json")


class socket_closed_port:
    """A localhost port nothing listens on."""

    def __enter__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]  # bound, never listening: connections are refused

    def __exit__(self, *exc):
        self.sock.close()


class _DiesAfter:
    """A store whose connection drops after `n` uploads (as a killed publish would)."""

    def __init__(self, store, n):
        self.store, self.left, self.uri = store, n, store.uri

    def put_file(self, *args, **kwargs):
        if self.left == 0:
            raise ConnectionError("killed")
        self.left -= 1
        return self.store.put_file(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.store, name)


def _gc(capsys, uri, *flags, s3_endpoint=None):
    argv = ["gc", uri, *flags] + (["--endpoint-url", s3_endpoint] if s3_endpoint else [])
    main(argv)
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", ["s3", "file"])
def test_gc_removes_orphans_and_keeps_releases(kind, s3_endpoint, bucket, tmp_path, capsys):
    store = _make_store(kind, s3_endpoint, bucket, tmp_path)
    endpoint = s3_endpoint if kind == "s3" else None
    bundle, manifest = _bundle(tmp_path, "release", seed=3)
    assert publish_bundle(store, bundle, manifest) == "published"
    prefix = f"{TIER}/{VERSION}"
    released = sorted(store.keys(TIER))
    # Orphans: a killed publish of another version, and a killed loser of this one.
    killed, killed_manifest = _bundle(tmp_path, "killed", seed=4)
    with pytest.raises(ConnectionError):
        publish_bundle(_DiesAfter(store, 3), killed, {**killed_manifest, "version": "2.0.0"})
    loser = f"{prefix}/{new_upload_id()}"
    store.put_bytes(f"{loser}/gguf/llm-Q4_K_M.gguf", b"half a loser")
    if kind == "s3":  # a multipart upload the killed process never finished
        client = boto3.client("s3", endpoint_url=s3_endpoint)
        up = client.create_multipart_upload(Bucket=bucket, Key=f"vlm/{loser}/onnx/text.onnx")
        client.upload_part(Bucket=bucket, Key=f"vlm/{loser}/onnx/text.onnx", UploadId=up["UploadId"], PartNumber=1,
                           Body=b"x" * 1024)
    else:  # a temporary file a killed write left
        (tmp_path / "releases" / loser / "gguf" / ".mmproj-Q8_0.gguf.abc.tmp").write_bytes(b"partial")
    orphans = sorted(set(store.keys(TIER)) - set(released))
    assert len(orphans) == 4
    # Within the grace period they may still be uploading: listed as kept, nothing deleted.
    out = _gc(capsys, store.uri, "--delete", s3_endpoint=endpoint)
    assert "0 orphan uploads" in out and out.count("may still be uploading") == 2
    # A dry run lists them and deletes nothing.
    objects = 4 if kind == "s3" else 5  # S3: the open multipart upload is no object; file: the .tmp file is one
    out = _gc(capsys, store.uri, "--grace-hours", "0", s3_endpoint=endpoint)
    assert f"2 orphan uploads, {objects} objects" in out and "dry run" in out
    assert f"orphan   {loser}/" in out and f"orphan   {TIER}/2.0.0/upload-" in out
    assert files_root(prefix, read_manifest(store, prefix)) not in out
    assert sorted(store.keys(TIER)) == sorted(released + orphans)
    # --delete removes exactly the orphans; the release still verifies and latest.json is where it was.
    out = _gc(capsys, store.uri, "--grace-hours", "0", "--delete", s3_endpoint=endpoint)
    assert f"deleted 2 orphan uploads, {objects} objects" in out
    assert sorted(store.keys(TIER)) == released
    assert check_release(store, prefix) == []
    assert json.loads(store.get_bytes(f"{TIER}/latest.json"))["version"] == VERSION
    assert store.pending_uploads("") == []
    if kind == "file":
        assert not (tmp_path / "releases" / TIER / "2.0.0").exists()  # emptied directories go too
    assert "0 orphan uploads" in _gc(capsys, store.uri, "--grace-hours", "0", s3_endpoint=endpoint)


def test_gc_leaves_a_version_with_an_unreadable_manifest_alone(tmp_path):
    store = FileStore(tmp_path / "releases")
    orphan = f"{TIER}/3.0.0/{new_upload_id()}/budget.json"
    store.put_bytes(orphan, b"{}")
    store.put_bytes(f"{TIER}/3.0.0/manifest.json", b"{not json")
    report = collect_garbage(store, grace=timedelta(0), delete=True)
    assert report.orphans == [] and report.unreadable == [f"{TIER}/3.0.0"]
    assert store.get_bytes(orphan) == b"{}"
    # ...and an upload is in flight while anything below it is younger than the grace period.
    store.put_bytes(f"{TIER}/4.0.0/{new_upload_id()}/budget.json", b"{}")
    report = collect_garbage(store, grace=timedelta(hours=1), now=datetime.now(timezone.utc) + timedelta(minutes=59))
    assert len(report.in_flight) == 1 and report.orphans == []
    report = collect_garbage(store, grace=timedelta(hours=1), now=datetime.now(timezone.utc) + timedelta(minutes=61))
    assert len(report.orphans) == 1


def test_a_missing_bucket_is_a_one_line_error(s3_endpoint, capsys, tmp_path):
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(SystemExit) as exited:
        main(["gc", "s3://no-such-bucket/vlm", "--endpoint-url", s3_endpoint])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: s3://no-such-bucket/vlm: list failed:") and "NoSuchBucket" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(UserError, match=r"^s3://no-such-bucket/vlm/x.bin: upload failed: .*NoSuchBucket") as failed:
        _s3(s3_endpoint, "no-such-bucket").put_file("x.bin", tmp_path / "x.bin")
    assert "attempts" not in str(failed.value) and "\n" not in str(failed.value)
