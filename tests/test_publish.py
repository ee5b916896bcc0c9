"""Gated release publishing: a real S3 API over HTTP (moto's server, started here) and the file:// store."""

import json
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from vlm_factory.config import load_params
from vlm_factory.errors import GateFailed, UserError
from vlm_factory.publish.release import check_release, files_root, read_manifest
from vlm_factory.publish.run import publish_tiers, split_release_uri
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
def release_inputs(tmp_path, root, synthetic_data, random_checkpoint):
    """One tier (android_budget: gguf + onnx) with small export directories, passing verdicts and a budget."""
    params = OmegaConf.load(root / "params.yaml")
    params.tiers = {TIER: params.tiers[TIER]}
    params.targets = {fmt: ({TIER: by_tier[TIER]} if TIER in by_tier else {}) for fmt, by_tier in params.targets.items()}
    params_path = tmp_path / "params.yaml"
    OmegaConf.save(params, params_path)
    rng = np.random.default_rng(0)
    exports, parity, budgets = tmp_path / "export", tmp_path / "parity", tmp_path / "budget"
    for fmt, files in {"gguf": {"llm-Q4_K_M.gguf": 3000, "mmproj-Q8_0.gguf": 2000},
                       "onnx": {"text.onnx": 11 * 2**20, "vision.onnx": 1500, "genai_config.json": 100}}.items():
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
    assert sorted(store.keys(prefix)) == sorted([f"{prefix}/manifest.json"]
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
