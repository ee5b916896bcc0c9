"""What both GGUF exporters share: reading checkpoint tensors one at a time, writing a file atomically."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from vlm_factory.io import atomic_path


def checkpoint_tensors(model_dir: Path, prefixes: tuple[str, ...]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor whose name starts with one of `prefixes`.

    Tensors come one at a time from the memory-mapped safetensors files, in file and key order.
    """
    from safetensors import safe_open

    for weights in sorted(model_dir.glob("*.safetensors")):
        with safe_open(weights, framework="np") as f:
            for key in f.keys():
                if key.startswith(prefixes):
                    yield key, f.get_tensor(key).astype(np.float32)


def write_gguf(out_path: Path, arch: str, fill: Callable[[object], None]) -> None:
    """Create a GGUFWriter for `arch` on a temporary path, let `fill` add keys and tensors, then rename."""
    import gguf

    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
