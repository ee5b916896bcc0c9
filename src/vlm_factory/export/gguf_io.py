"""What both GGUF exporters share: checkpoint tensors read lazily, a file written atomically.

gguf-py's writer keeps every tensor it is given until it writes the file. Giving it deferred
tensors (gguf's own LazyNumpyTensor) means each one is read from the memory-mapped safetensors
file, converted and written in turn, and dropped after writing: one tensor in memory at a time,
never the model twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm_factory.io import atomic_path


@dataclass(frozen=True)
class CheckpointTensor:
    file: Path
    key: str
    shape: tuple[int, ...]

    def load(self) -> np.ndarray:
        """The tensor as float32 (through torch, so bfloat16 checkpoints read as well)."""
        import torch
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as f:
            return f.get_tensor(self.key).to(torch.float32).numpy()


def checkpoint_tensors(model_dir: Path, prefixes: tuple[str, ...]) -> Iterator[CheckpointTensor]:
    """Every tensor whose name starts with one of `prefixes`, in file and key order, not yet loaded."""
    from safetensors import safe_open

    for weights in sorted(model_dir.glob("*.safetensors")):
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefixes):
                    yield CheckpointTensor(weights, key, tuple(f.get_slice(key).get_shape()))


def deferred(shape: tuple[int, ...], dtype, compute: Callable[[], np.ndarray]):
    """A tensor the GGUF writer computes only when it writes it."""
    from gguf import LazyNumpyTensor

    meta = LazyNumpyTensor.meta_with_dtype_and_shape(np.dtype(dtype), shape)
    return LazyNumpyTensor(meta=meta, func=compute)


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
