"""Gated release publishing: a real S3 API over HTTP (moto's server, started here) and the file:// store."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from vlm_factory.config import load_params
from vlm_factory.errors import GateFailed, UserError
from vlm_factory.publish.release import check_release, files_root, read_manifest
from vlm_factory.publish.run import publish_tiers, split_release_uri
from vlm_factory.publish.signing import generate_key
from vlm_factory.publish.store import FileStore, S3Store

from conftest import moto_s3_endpoint

boto3 = pytest.importorskip("boto3", reason="the s3 extra is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")

TIER = "android_budget"
BUCKET = "releases"


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3_endpoint() as url:
        yield url


@pytest.fixture
def bucket(s3_endpoint, request):
    name = f"{BUCKET}-{request.node.name.replace('_', '-')[:40].lower()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def signing_key(tmp_path):
    """A P-256 key pair of this test's own (publish.signing.key points at it)."""
    key = tmp_path / "keys" / "release.pem"
    generate_key(key)
    return key


@pytest.fixture
def release_inputs(tmp_path, root, synthetic_data, random_checkpoint, signing_key, monkeypatch):
    """One tier (android_budget: gguf + onnx) with small export directories, passing verdicts and a budget,
    signed with the test's key (never a developer's $VLM_FACTORY_SIGNING_KEY)."""
    monkeypatch.delenv("VLM_FACTORY_SIGNING_KEY", raising=False)
    params = OmegaConf.load(root / "params.yaml")
    params.publish.signing = {"key": str(signing_key), "key_env": "VLM_FACTORY_SIGNING_KEY", "password_env": None,
                              "generate": False, "required": True}
    params.tiers = {TIER: params.tiers[TIER]}
    params.targets = {fmt: ({TIER: by_tier[TIER]} if TIER in by_tier else {}) for fmt, by_tier in params.targets.items()}
    params_path = tmp_path / "params.yaml"
    OmegaConf.save(params, params_path)
    rng = np.random.default_rng(0)
    exports, parity, budgets = tmp_path / "export", tmp_path / "parity", tmp_path / "budget"
    for fmt, files in {"gguf": {"llm-Q4_K_M.gguf": 3000, "mmproj-Q8_0.gguf": 2000},
                       "onnx": {"text.onnx": 11 * 2**20, "vision.onnx": 1500, "onnx_config.json": 100}}.items():
        out = exports / TIER / fmt
        out.mkdir(parents=True)
        for name, size in files.items():
            (out / name).write_bytes(rng.bytes(size))
        (out / "export_report.json").write_text(json.dumps({"format": fmt, "tools": {fmt: "1.0"}}))
        parity.mkdir(exist_ok=True)
        (parity / f"{TIER}-{fmt}.json").write_text(json.dumps(_verdict(fmt, passed=True)))
    budgets.mkdir()
    (budgets / f"{TIER}.json").write_text(json.dumps({"memory_budget_mb": 1200, "effective_context_tokens": 256,
                                                      "kv_cache_dtype": "f16", "visual_tokens_per_image": 16}))
    return {"params_path": params_path, "export_root": exports, "parity_dir": parity, "budget_dir": budgets,
            "model_dir": random_checkpoint, "data_dir": synthetic_data, "repo": root}


def _verdict(fmt, passed):
    return {"format": fmt, "tier": TIER, "passed": passed, "vqa_accuracy": 86.0, "reference_accuracy": 87.0,
            "drift": -1.0 if passed else -3.0, "drift_ci95": [-1.5, -0.5], "flip_rate": 0.01,
            "agreement": {"answers": 0.99, "first_token_top1": 0.99, "first_token_kl": 0.002},
            "threshold": {"max_drop": 2.0, "min_embedding_cosine": 0.99}, "image_embedding_cosine": {"mean": 0.999},
            **({} if passed else {"failure_reason": "drift -3 below -2"})}


def _publish(inputs, store, **overrides):
    params = load_params(inputs["params_path"])
    for key, value in overrides.items():
        setattr(params.publish, key, value)
    return publish_tiers(params, store=store, params_path=inputs["params_path"],
                         **{k: v for k, v in inputs.items() if k != "params_path"})


def _s3(endpoint, bucket):
    return S3Store(bucket, "vlm", endpoint_url=endpoint, multipart_threshold_mb=5)


def test_full_publish_to_s3_is_verified_and_moves_latest(release_inputs, s3_endpoint, bucket):
    store = _s3(s3_endpoint, bucket)
    record = _publish(release_inputs, store)
    release = record["releases"][TIER]
    prefix = split_release_uri(release["uri"])[1]
    assert release["uri"] == f"s3://{bucket}/vlm/{prefix}" and release["formats"] == ["gguf", "onnx"]
    assert check_release(store, prefix) == []
    manifest = json.loads(store.get_bytes(f"{prefix}/manifest.json"))
    root = f"{prefix}/{manifest['upload']}"  # the release's files live below its upload prefix
    local = release_inputs["export_root"] / TIER / "onnx" / "text.onnx"  # 11 MiB: a multipart upload
    assert manifest["files"]["onnx/text.onnx"]["size"] == local.stat().st_size == 11 * 2**20
    assert store.sha256(f"{root}/onnx/text.onnx") == manifest["files"]["onnx/text.onnx"]["sha256"]
    assert {"README.md", "budget.json", "parity/gguf.json", "parity/onnx.json"} <= set(manifest["files"])
    assert manifest["parity"]["gguf"]["passed"] is True and manifest["model"]["sha256"]
    assert manifest["tools"] == {"gguf": {"gguf": "1.0"}, "onnx": {"onnx": "1.0"}}
    latest = json.loads(store.get_bytes(f"{TIER}/latest.json"))
    assert latest == {"version": release["version"], "manifest": f"{prefix}/manifest.json", "files": root}
    assert sorted(store.keys(prefix)) == sorted([f"{prefix}/manifest.json", f"{root}/manifest.sig"]
                                                + [f"{root}/{name}" for name in manifest["files"]])
    card = store.get_bytes(f"{root}/README.md").decode()
    assert "| gguf | 86.00 % | 87.00 % | -1.00" in card and "llm-Q4_K_M.gguf" in card


def test_identical_content_is_a_no_op_and_different_content_is_refused(release_inputs, s3_endpoint, bucket):
    store = _s3(s3_endpoint, bucket)
    first = _publish(release_inputs, store, version="1.0.0")["releases"][TIER]
    again = _publish(release_inputs, store, version="1.0.0")["releases"][TIER]
    assert again == first
    (release_inputs["export_root"] / TIER / "gguf" / "llm-Q4_K_M.gguf").write_bytes(b"retrained weights")
    with pytest.raises(UserError, match="already published with different content.*publish.version"):
        _publish(release_inputs, store, version="1.0.0")
    assert check_release(store, f"{TIER}/1.0.0") == []  # the published release is untouched
    # Without a pinned version, new content is simply a new, content-named version.
    assert _publish(release_inputs, store)["releases"][TIER]["version"] != "1.0.0"


class _DiesAfter:
    """A store whose connection drops after `n` uploads (as a killed publish would)."""

    def __init__(self, store, n):
        self.store, self.left = store, n
        self.uri = store.uri

    def put_file(self, *args, **kwargs):
        if self.left == 0:
            raise ConnectionError("connection reset")
        self.left -= 1
        return self.store.put_file(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_an_interrupted_upload_leaves_no_visible_release(release_inputs, s3_endpoint, bucket):
    store = _s3(s3_endpoint, bucket)
    with pytest.raises(ConnectionError):
        _publish(release_inputs, _DiesAfter(store, 3), version="2.0.0")
    assert store.keys(f"{TIER}/2.0.0")  # some objects made it...
    assert check_release(store, f"{TIER}/2.0.0") == [f"{TIER}/2.0.0/manifest.json: missing (no release here, "
                                                     "or an unfinished upload)"]  # ...but no release exists
    assert store.get_bytes(f"{TIER}/latest.json") is None
    _publish(release_inputs, store, version="2.0.0")  # the retry completes it
    assert check_release(store, f"{TIER}/2.0.0") == []


def test_verify_catches_a_corrupted_object(release_inputs, s3_endpoint, bucket):
    store = _s3(s3_endpoint, bucket)
    uri = _publish(release_inputs, store)["releases"][TIER]["uri"]
    prefix = split_release_uri(uri)[1]
    cli = [sys.executable, "-m", "vlm_factory.cli", "verify", uri, "--endpoint-url", s3_endpoint]
    ok = subprocess.run(cli, capture_output=True, text=True)
    assert ok.returncode == 0 and "every file matches" in ok.stdout
    root = files_root(prefix, read_manifest(store, prefix))
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=bucket, Key=f"vlm/{root}/gguf/mmproj-Q8_0.gguf",
                                                           Body=b"tampered")
    bad = subprocess.run(cli, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "gguf/mmproj-Q8_0.gguf: sha256" in bad.stderr and "Traceback" not in bad.stderr


def test_a_failed_or_missing_gate_blocks_publishing(release_inputs, s3_endpoint, bucket):
    store = _s3(s3_endpoint, bucket)
    (release_inputs["parity_dir"] / f"{TIER}-onnx.json").write_text(json.dumps(_verdict("onnx", passed=False)))
    with pytest.raises(GateFailed, match=f"publishing refused: {TIER}-onnx") as failed:
        _publish(release_inputs, store)
    assert "FAIL" in str(failed.value) and "-3.00" in str(failed.value)
    (release_inputs["parity_dir"] / f"{TIER}-onnx.json").unlink()
    with pytest.raises(GateFailed, match="MISSING"):
        _publish(release_inputs, store)
    assert store.keys(TIER) == []  # nothing was uploaded


def test_file_store_release_and_tampering(release_inputs, tmp_path):
    store = FileStore(tmp_path / "releases")
    prefix = split_release_uri(_publish(release_inputs, store)["releases"][TIER]["uri"])[1]
    assert check_release(store, prefix) == []
    root = tmp_path / "releases" / files_root(prefix, read_manifest(store, prefix))
    (root / "gguf" / "extra.bin").write_bytes(b"x")
    (root / "budget.json").write_text("{}")
    problems = check_release(store, prefix)
    assert any("budget.json: sha256" in p for p in problems)
    assert any("gguf/extra.bin: not in the manifest" in p for p in problems)


def test_a_release_from_before_upload_prefixes_still_verifies(tmp_path):
    """Older releases keep their files directly in <tier>/<version>/ and have no "upload" in the manifest."""
    from vlm_factory.publish.bundle import Bundle
    from vlm_factory.publish.release import manifest_bytes_of, publish_bundle

    store = FileStore(tmp_path / "releases")
    (tmp_path / "budget.json").write_text("{}")
    bundle = Bundle(TIER, files={"budget.json": tmp_path / "budget.json"}, generated={"README.md": b"card"})
    manifest = {"tier": TIER, "version": "0.9.0", "files": bundle.entries()}
    store.put_file(f"{TIER}/0.9.0/budget.json", tmp_path / "budget.json")
    store.put_bytes(f"{TIER}/0.9.0/README.md", b"card")
    store.put_bytes(f"{TIER}/0.9.0/manifest.json", manifest_bytes_of(manifest))
    assert check_release(store, f"{TIER}/0.9.0") == []
    assert publish_bundle(store, bundle, manifest) == "unchanged"
    assert json.loads(store.get_bytes(f"{TIER}/latest.json"))["files"] == f"{TIER}/0.9.0"
    store.put_bytes(f"{TIER}/0.9.0/extra.bin", b"x")
    assert check_release(store, f"{TIER}/0.9.0") == ["extra.bin: not in the manifest"]


# -- signatures ---------------------------------------------------------------------------------------

def _verify_cli(uri, *args):
    return subprocess.run([sys.executable, "-m", "vlm_factory.cli", "verify", uri, *args],
                          capture_output=True, text=True)


def test_a_signed_release_verifies_with_its_key_and_with_the_standard_tool(release_inputs, s3_endpoint, bucket,
                                                                           signing_key, tmp_path):
    from cryptography.hazmat.primitives import serialization

    from vlm_factory.publish.signing import public_key_sha256

    store = _s3(s3_endpoint, bucket)
    release = _publish(release_inputs, store)["releases"][TIER]
    assert release["signed"] is True
    prefix = split_release_uri(release["uri"])[1]
    manifest = read_manifest(store, prefix)
    public = signing_key.with_name("release.pem.pub")
    assert manifest["signature"]["public_key_sha256"] == public_key_sha256(public.read_bytes())
    ok = _verify_cli(release["uri"], "--endpoint-url", s3_endpoint, "--public-key", str(public))
    assert ok.returncode == 0 and f"its signature verifies with {public}" in ok.stdout
    # The signature is OpenSSF model signing's own format: its CLI verifies the downloaded manifest.
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "manifest.json").write_bytes(store.get_bytes(f"{prefix}/manifest.json"))
    (tmp_path / "manifest.sig").write_bytes(store.get_bytes(f"{files_root(prefix, manifest)}/manifest.sig"))
    tool = subprocess.run([str(Path(sys.executable).parent / "model_signing"), "verify", "key", "--signature",
                           str(tmp_path / "manifest.sig"), "--public_key", str(public),
                           str(tmp_path / "dl" / "manifest.json")], capture_output=True, text=True)
    assert tool.returncode == 0, tool.stderr[-2000:]
    # Another key's public half does not verify it; the private key's file is not a public key.
    other = tmp_path / "other.pem"
    generate_key(other)
    wrong = _verify_cli(release["uri"], "--endpoint-url", s3_endpoint, "--public-key", f"{other}.pub")
    assert wrong.returncode == 1 and "manifest.sig: does not verify manifest.json" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    not_public = _verify_cli(release["uri"], "--endpoint-url", s3_endpoint, "--public-key", str(signing_key))
    assert not_public.returncode == 2 and f"{signing_key}: not a PEM public key" in not_public.stderr
    assert serialization.load_pem_private_key(signing_key.read_bytes(), None)  # (it is the private key)


def test_a_tampered_manifest_or_signature_fails_verification(release_inputs, tmp_path, signing_key):
    from vlm_factory.publish.release import manifest_bytes_of
    from vlm_factory.publish.signing import resolve_key, sign_manifest

    store = FileStore(tmp_path / "releases")
    uri = _publish(release_inputs, store)["releases"][TIER]["uri"]
    prefix = split_release_uri(uri)[1]
    uri = f"file://{tmp_path / 'releases'}/{prefix}"
    public = f"{signing_key}.pub"
    manifest = read_manifest(store, prefix)
    signature_key = f"{files_root(prefix, manifest)}/manifest.sig"
    original, signature = store.get_bytes(f"{prefix}/manifest.json"), store.get_bytes(signature_key)

    # Files and manifest replaced together (a consistent forgery): hashes match, only the signature tells.
    forged_budget = b'{"memory_budget_mb": 99999}'
    store.put_bytes(f"{files_root(prefix, manifest)}/budget.json", forged_budget)
    import hashlib
    forged = {**manifest, "files": {**manifest["files"], "budget.json": {
        "sha256": hashlib.sha256(forged_budget).hexdigest(), "size": len(forged_budget)}}}
    store.put_bytes(f"{prefix}/manifest.json", manifest_bytes_of(forged))
    unchecked = _verify_cli(uri)
    assert unchecked.returncode == 0 and "signature not checked (pass --public-key" in unchecked.stdout
    checked = _verify_cli(uri, "--public-key", public)
    assert checked.returncode == 1
    assert checked.stderr.splitlines()[1].strip().startswith("manifest.sig: does not verify manifest.json")

    # The forger's own signature over the forged manifest: valid, but not with the publisher's key.
    forger = tmp_path / "forger.pem"
    generate_key(forger)
    forger_key = resolve_key(key=str(forger), key_env=None, password_env=None, generate=False, required=True)
    store.put_bytes(signature_key, sign_manifest(manifest_bytes_of(forged), forger_key))
    assert _verify_cli(uri, "--public-key", f"{forger}.pub").returncode == 0
    assert "manifest.sig: does not verify" in _verify_cli(uri, "--public-key", public).stderr

    # The original manifest back, its signature deleted: missing, with or without a key.
    store.put_bytes(f"{prefix}/manifest.json", original)
    (tmp_path / "releases" / signature_key).unlink()
    assert "manifest.sig: missing (the release is not signed)" in _verify_cli(uri, "--public-key", public).stderr
    assert "manifest.sig: missing (the manifest says" in _verify_cli(uri).stderr
    store.put_bytes(signature_key, signature)
    assert "budget.json: sha256" in _verify_cli(uri, "--public-key", public).stderr  # the forged file remains


def test_signing_keys_come_from_config_or_environment_and_are_never_logged(tmp_path, monkeypatch, caplog):
    from vlm_factory.publish.signing import public_key_sha256, resolve_key

    generated = tmp_path / "dev" / "release.pem"
    key = resolve_key(key=str(generated), key_env="TEST_SIGNING_KEY", password_env=None, generate=True,
                      required=True)
    assert generated.stat().st_mode & 0o777 == 0o600 and (tmp_path / "dev" / "release.pem.pub").is_file()
    assert public_key_sha256(key.public_pem()) == public_key_sha256((tmp_path / "dev" / "release.pem.pub").read_bytes())
    pem = generated.read_text()
    monkeypatch.setenv("TEST_SIGNING_KEY", pem)  # the PEM itself, as a CI secret holds it
    from_env = resolve_key(key=None, key_env="TEST_SIGNING_KEY", password_env=None, generate=False, required=True)
    assert from_env.origin == "$TEST_SIGNING_KEY" and from_env.pem == pem.encode()
    monkeypatch.setenv("TEST_SIGNING_KEY", str(tmp_path / "nowhere.pem"))
    with pytest.raises(UserError, match=r"^\$TEST_SIGNING_KEY: names no file"):
        resolve_key(key=str(generated), key_env="TEST_SIGNING_KEY", password_env=None, generate=False, required=True)
    monkeypatch.delenv("TEST_SIGNING_KEY")
    with pytest.raises(UserError, match="publish.signing.key: .*missing.pem does not exist"):
        resolve_key(key=str(tmp_path / "missing.pem"), key_env=None, password_env=None, generate=False, required=True)
    with pytest.raises(UserError, match=r"publish.signing: no key .* publish.signing.required is true"):
        resolve_key(key=None, key_env="TEST_SIGNING_KEY", password_env=None, generate=False, required=True)
    assert resolve_key(key=None, key_env=None, password_env=None, generate=False, required=False) is None
    (tmp_path / "rsa.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(UserError, match="rsa.pem: not a usable PEM private key"):
        resolve_key(key=str(tmp_path / "rsa.pem"), key_env=None, password_env=None, generate=False, required=True)
    body = pem.splitlines()[1]
    assert all(body not in record.getMessage() for record in caplog.records)


def test_key_material_in_params_is_refused(tmp_path, root):
    params = OmegaConf.load(root / "params.yaml")
    params.publish.signing.key = "-----BEGIN PRIVATE KEY-----"
    OmegaConf.save(params, tmp_path / "params.yaml")
    with pytest.raises(UserError, match="'publish.signing.key' holds key material"):
        load_params(tmp_path / "params.yaml")
    params.publish.signing.key = None
    params.publish.signing.key_env = "not a variable"
    OmegaConf.save(params, tmp_path / "params.yaml")
    with pytest.raises(UserError, match="publish.signing.key_env"):
        load_params(tmp_path / "params.yaml")


def test_fetching_a_release_checks_its_signature_first_and_every_file(release_inputs, tmp_path, signing_key):
    from vlm_factory.publish.fetch import fetch_release

    store = FileStore(tmp_path / "releases")
    release = _publish(release_inputs, store)["releases"][TIER]
    public = signing_key.with_name("release.pem.pub").read_bytes()
    folder = fetch_release(store, TIER, "latest", tmp_path / "cache", public)
    assert folder == tmp_path / "cache" / TIER / release["version"]
    local = release_inputs["export_root"] / TIER / "gguf" / "llm-Q4_K_M.gguf"
    assert (folder / "gguf" / "llm-Q4_K_M.gguf").read_bytes() == local.read_bytes()
    assert (folder / "manifest.sig").is_file() and (folder / ".complete").is_file()
    assert fetch_release(store, TIER, release["version"], tmp_path / "cache", public) == folder  # re-hashed only
    other = tmp_path / "other.pem"
    generate_key(other)
    with pytest.raises(UserError, match="manifest.sig: does not verify.*not fetched"):
        fetch_release(store, TIER, "latest", tmp_path / "cache2", (tmp_path / "other.pem.pub").read_bytes())
    assert not (tmp_path / "cache2").exists()  # refused before any file was fetched
    prefix = split_release_uri(release["uri"])[1]
    root = tmp_path / "releases" / files_root(prefix, read_manifest(store, prefix))
    (root / "budget.json").write_text("{}")
    with pytest.raises(UserError, match="budget.json: sha256 .* differs from the manifest's; the release is damaged"):
        fetch_release(store, TIER, "latest", tmp_path / "cache3", public)
    (folder / "budget.json").write_text("{}")
    with pytest.raises(UserError, match="budget.json: changed since it was fetched"):
        fetch_release(store, TIER, release["version"], tmp_path / "cache", None)


def test_a_release_fetched_from_s3_is_what_was_published(release_inputs, s3_endpoint, bucket, signing_key, tmp_path):
    """`ask --artifact s3://...` fetches through S3Store.get_file (streamed to a temporary file, hashed)."""
    from vlm_factory.publish.fetch import fetch_release

    store = _s3(s3_endpoint, bucket)
    release = _publish(release_inputs, store)["releases"][TIER]
    folder = fetch_release(store, TIER, "latest", tmp_path / "cache", signing_key.with_name("release.pem.pub").read_bytes())
    for fmt, name in (("onnx", "text.onnx"), ("gguf", "mmproj-Q8_0.gguf")):  # text.onnx: 11 MiB, several chunks
        assert (folder / fmt / name).read_bytes() == (release_inputs["export_root"] / TIER / fmt / name).read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"] == release["version"] and set(manifest["files"]) == {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in (
            "manifest.json", "manifest.sig", ".complete")}
