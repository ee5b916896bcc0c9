"""setup_logging(): the dependencies' noise of every stage log is gone or one line, real warnings still show,
VLM_FACTORY_LOG=DEBUG shows everything, and progress bars are drawn only on a terminal."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import pytest

# What a stage does that makes the noise, in a child process whose stderr is a pipe (as under dvc repro).
NOISY = textwrap.dedent("""
    import copy, logging, warnings
    from vlm_factory.logs import native_stderr_filtered, progress_bar, setup_logging
    setup_logging()

    with native_stderr_filtered():  # as the Core ML and TFLite exporters import them
        import coremltools  # TensorFlow's loading lines; coremltools' proxy and version notices
        import litert_torch  # torchao's optional kernels, torch's enum deprecations
    import torch
    from torch.utils import _pytree

    # litert-torch: its progress tree, "Use JAX lowering" on the root logger, jax's TPU probe, TF's op count
    litert_torch.convert(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()).eval(), (torch.zeros(1, 4),))
    copy.deepcopy(_pytree.treespec_leaf())  # torch's LeafSpec FutureWarning (from copyreg.py)
    from transformers.utils import logging as hf_logging
    print("hf bars", hf_logging.is_progress_bar_enabled())
    from tqdm import tqdm
    for _ in tqdm(range(3), desc="third-party bar"):
        pass
    for _ in progress_bar(range(3), desc="our bar", unit="img"):
        pass
    for name in ("a", "b"):  # as torchao says it for each missing library
        logging.getLogger("torchao").warning(f"Failed to load /x/torchao/_C_{name}.so: Could not load this library")
    logging.getLogger("coremltools").info("Converting op 1 : constant")

    logging.getLogger("vlm_factory.export.x").warning("REAL WARNING OF OURS")
    logging.getLogger("coremltools").warning("REAL COREMLTOOLS WARNING")
    logging.getLogger("torchao").warning("REAL TORCHAO WARNING")
    logging.warning("REAL ROOT WARNING")
    warnings.warn("REAL FUTURE WARNING", FutureWarning)
""")

GONE = ("absl::InitializeLog", "port.cc", "cudart_stub.cc", "cpu_feature_guard", "flatbuffer_export.cc",
        "Use JAX lowering", "Unable to initialize backend", "is an Enum subclass", "LeafSpec", "scikit-learn version",
        "TensorFlow version", "INFO coremltools", "Converting op", "third-party bar", "LiteRT-Torch Convert", "\r")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    child_env = {k: v for k, v in os.environ.items()
                 if k not in ("VLM_FACTORY_LOG", "TF_CPP_MIN_LOG_LEVEL", "TQDM_DISABLE", "LITERT_TORCH_SHOW_PROGRESS")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**child_env, **env})


@pytest.mark.slow
def test_stage_noise_is_gone_and_real_warnings_stay():
    result = _run(NOISY)
    assert result.returncode == 0, result.stderr[-3000:]
    log, out = result.stderr, result.stdout
    for noise in GONE:
        assert noise not in log + out, (noise, log)
    lines = log.splitlines()
    torchao = [line for line in lines if "Failed to load" in line and "_C_" in line or "Detected no triton" in line]
    assert len(torchao) == 1 and "VLM_FACTORY_LOG=DEBUG" in torchao[0], torchao
    assert sum("libcoremlpython" in line for line in lines) <= 1
    for real in ("REAL WARNING OF OURS", "REAL COREMLTOOLS WARNING", "REAL TORCHAO WARNING", "REAL ROOT WARNING",
                 "REAL FUTURE WARNING"):
        assert sum(real in line for line in lines) == 1, (real, log)
    assert sum("Torch version" in line for line in lines) <= 1  # coremltools' torch version notice is kept
    ours = [line for line in lines if "our bar" in line]
    assert len(ours) == 1 and "INFO vlm_factory.progress: our bar: 3 img in 00:00" in ours[0], ours
    assert "hf bars False" in out
    assert len(lines) <= 12, log  # the lines above and the few real ones a run may add


@pytest.mark.slow
def test_debug_shows_everything():
    result = _run(NOISY, VLM_FACTORY_LOG="DEBUG")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    for noise in ("Use JAX lowering", "INFO coremltools", "Converting op 1", "LeafSpec"):  # the filters' work is real
        assert noise in log, noise
    assert log.count("Failed to load /x/torchao/_C_") == 2 and "VLM_FACTORY_LOG=DEBUG" not in log
    assert "REAL WARNING OF OURS" in log and "DEBUG" in log


def test_the_users_environment_wins():
    code = textwrap.dedent("""
        import os
        from vlm_factory.logs import setup_logging
        setup_logging()
        print(os.environ.get("TF_CPP_MIN_LOG_LEVEL"), os.environ.get("TQDM_DISABLE"))
    """)
    assert _run(code).stdout.split() == ["1", "1"]
    assert _run(code, TF_CPP_MIN_LOG_LEVEL="0", TQDM_DISABLE="0").stdout.split() == ["0", "0"]
    assert _run(code, VLM_FACTORY_LOG="DEBUG").stdout.split() == ["None", "1"]  # bars follow the terminal only


def test_bars_are_drawn_on_a_terminal():
    pty = pytest.importorskip("pty")
    fcntl, termios = pytest.importorskip("fcntl"), pytest.importorskip("termios")
    code = textwrap.dedent("""
        from tqdm import tqdm
        from vlm_factory.logs import progress_bar, setup_logging
        setup_logging()
        for _ in tqdm(range(3), desc="third-party bar"):
            pass
        for _ in progress_bar(range(3), desc="our bar", unit="img"):
            pass
    """)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "VLM_FACTORY_LOG")}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    drawn = b""
    try:
        while chunk := os.read(leader, 65536):
            drawn += chunk
    except OSError:  # EIO: the child's end of the terminal is closed, all read
        pass
    finally:
        os.close(leader)
    assert child.wait(timeout=120) == 0, drawn[-3000:]
    text = drawn.decode(errors="replace")
    assert "third-party bar: 100%" in text and "our bar: 100%" in text, text
    assert "vlm_factory.progress" not in text
