"""What both GGUF exporters share: checkpoint tensors placed by the model family, read lazily, atomic files.

gguf-py's writer keeps every tensor it is given until it writes the file. Giving it deferred
tensors (gguf's own LazyNumpyTensor) means each one is read from the memory-mapped safetensors
file, converted and written in turn, and dropped after writing: one tensor in memory at a time,
never the model twice.

Which tensors belong to the LLM, the vision tower or the connector, and under which local name,
is the family's answer (`family.checkpoint_key`): the exporters never guess a checkpoint's prefixes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm_factory.errors import UserError
from vlm_factory.io import atomic_path
from vlm_factory.model.checkpoint import read_safetensors_header


@dataclass(frozen=True)
class CheckpointTensor:
    file: Path
    key: str                  # the safetensors key
    local: str                # its name inside its component (family.checkpoint_key)
    shape: tuple[int, ...]

    def load(self) -> np.ndarray:
        """The tensor as float32 (through torch, so bfloat16 and float16 checkpoints read as well)."""
        import torch
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as f:
            return f.get_tensor(self.key).to(torch.float32).numpy()


def component_tensors(model_dir: Path, family, component: str) -> Iterator[CheckpointTensor]:
    """Every tensor the family places in `component` ("llm", "vision", "connector"), in file and key order.

    Keys and shapes come from each file's header, checked against the file (model.checkpoint), so a
    malformed safetensors file is a one-line error before any tensor is read."""
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    if not weights:
        raise UserError(f"{model_dir}: no .safetensors weights; run the stage that produces the checkpoint")
    for path in weights:
        for key, shape in sorted(read_safetensors_header(path).items()):
            placed = family.checkpoint_key(key)
            if placed is not None and placed.component == component:
                yield CheckpointTensor(path, key, placed.local, shape)


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
