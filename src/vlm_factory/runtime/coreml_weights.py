"""A saved .mlpackage's weights as numpy arrays, read without the Core ML runtime (which needs macOS).

Shared by the exporter (to check what it wrote) and the Linux runtime (to compute with the
artifact's real, palettized weights).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def base_name(name: str) -> str:
    """A MIL const name without the suffixes conversion and palettization add (the parameter's own name)."""
    for suffix in ("_palettized", "_to_fp16"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def read_package_weights(package: Path) -> dict[str, tuple[np.ndarray, str]]:
    """{base const name: (float32 array, op type)} of every const / LUT weight in a saved .mlpackage.

    Loads the package's milproto spec with its weight file (no Core ML runtime needed) and materialises
    `constexpr_lut_to_dense` ops with `materialized_val_inference()`, i.e. exactly what the device computes.
    """
    from vlm_factory.logs import native_stderr_filtered

    with native_stderr_filtered():  # coremltools imports TensorFlow: its native libraries' loading chatter
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    package = Path(package)
    spec = ct.utils.load_spec(str(package))
    weights_dir = package / "Data" / "com.apple.CoreML" / "weights"
    program = milproto_load(spec, spec.specificationVersion, file_weights_dir=str(weights_dir))
    found: dict[str, tuple[np.ndarray, str]] = {}
    for op in program.functions["main"].operations:
        if op.op_type == "const":
            value = op.outputs[0].val
            if value is None or np.ndim(value) == 0:
                continue
        elif op.op_type.startswith("constexpr_"):
            value = op.materialized_val_inference()
        else:
            continue
        found[base_name(op.name)] = (np.asarray(value, dtype=np.float32), op.op_type)
    return found
