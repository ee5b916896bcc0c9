"""Try an artifact in its runtime in a child process first, so a native crash is an error, not our death.

llama.cpp, onnxruntime, LiteRT and coremltools' weight readers are C/C++: a file they do not expect can
segfault or hang them (one renamed byte in an mmproj tensor name once crashed libmtmd on the first
image), and no Python handler survives that. `check_in_child` opens the artifact exactly as
`open_runtime` would and answers one question about one small non-square image in a fresh interpreter;
only when that child exits cleanly does the calling process load the same files itself. A child killed
by a signal, timed out, or failing in any other way becomes a one-line UserError naming the artifact.
A clean one-line error from the child (exit 2) is passed on as it is.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from vlm_factory.errors import UserError, exits_cleanly

# A real 0.5B-class artifact loads and answers one question in well under a minute on 2 cores; ten
# times that is a hang, not a slow machine.
CHECK_TIMEOUT_S = 600


def _child_error(stderr: str) -> str | None:
    """The child's own one-line `error: ...` (exits_cleanly prints it last), if it printed one."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    return lines[-1].removeprefix("error: ") if lines else None


def check_in_child(fmt: str, artifact_dir: Path | str, *, context_tokens: int, kv_cache: str,
                   timeout_s: float = CHECK_TIMEOUT_S) -> float:
    """Open `artifact_dir` and answer one question in a child process; seconds it took, or UserError."""
    command = [sys.executable, "-m", "vlm_factory.runtime.isolated", fmt, str(artifact_dir),
               "--context-tokens", str(context_tokens), "--kv-cache", kv_cache]
    started = time.perf_counter()
    try:
        child = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise UserError(f"{artifact_dir}: the {fmt} runtime did not load and answer within {timeout_s:.0f} s "
                        f"(a hang on a malformed file?); re-export it") from None
    if child.returncode == 0:
        return time.perf_counter() - started
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        raise UserError(f"{artifact_dir}: the {fmt} runtime crashed ({name}) loading it or answering one question; "
                        "the files are corrupt or not what its report says (re-export it)")
    own = _child_error(child.stderr)
    if child.returncode == 2 and own:
        raise UserError(own)
    last = (own or next((line for line in reversed(child.stderr.splitlines()) if line.strip()), "no output"))[:200]
    raise UserError(f"{artifact_dir}: the {fmt} runtime failed loading it (exit {child.returncode}: {last}); "
                    "re-export it")


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    from PIL import Image

    from vlm_factory.runtime.open import open_runtime

    parser = argparse.ArgumentParser(description="open an artifact and answer one question (a child's check)")
    parser.add_argument("format")
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--context-tokens", type=int, required=True)
    parser.add_argument("--kv-cache", required=True)
    args = parser.parse_args(argv)
    image = Image.new("RGB", (48, 32), (120, 90, 60))  # non-square: the letterbox path runs too
    with open_runtime(args.format, args.artifact, context_tokens=args.context_tokens, kv_cache=args.kv_cache,
                      isolated=False) as runtime:
        runtime.answer([image], ["What color is this?"])


if __name__ == "__main__":
    main()
