"""Shared fixtures: tiny models built on the fly, the bundled base, the repository root."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_BASE = ROOT / "models" / "tiny-llava-siglip"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def small_arch():
    """A shrunk copy of the default architecture: same shapes of things, a fraction of the work."""
    from vlm_factory.config import ArchitectureConfig

    return ArchitectureConfig(vision_hidden=64, vision_intermediate=128, vision_layers=1, vision_heads=2,
                            text_hidden=64, text_intermediate=128, text_layers=1, text_heads=2, text_kv_heads=2)


@pytest.fixture(scope="session")
def random_llava(small_arch):
    from vlm_factory.model.tiny import build_model

    return build_model(small_arch, seed=0)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory, random_llava) -> Path:
    from vlm_factory.model.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "random-llava"
    save_checkpoint(*random_llava, path)
    return path


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small synthetic dataset on disk, as the download stage writes it."""
    from vlm_factory.data.synthetic import build_dataset

    out = tmp_path_factory.mktemp("data") / "data"
    build_dataset(out, seed=7, splits={"train": (90, 4), "eval": (36, 2)}, cell_px=32)
    return out


@contextlib.contextmanager
def moto_s3_endpoint():
    """moto in server mode on a free localhost port (boto3 talks HTTP to it like to S3), with test
    credentials in the environment for as long as it runs."""
    from moto import server as moto_server

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Hang(BaseException):
    """A test body ran past its deadline. A BaseException, so that no `except Exception` in the code under
    test can turn a hang into a UserError and pass."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging) when the body runs past `seconds` (SIGALRM, main thread)."""
    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
