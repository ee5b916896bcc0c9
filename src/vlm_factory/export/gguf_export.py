"""One tier's llama.cpp package: LLM GGUF + mmproj GGUF, quantized per the tier, with an export report.

Both files are first written at full precision by our gguf-py writers (LLM in F16, mmproj in F32),
then quantized by llama.cpp itself: the LLM to the tier's `llm` file type, the mmproj's vision
blocks to `vision` and its projector (`mm.*`) to `projector`, except the few tensors the mmproj
writer had to write in the one type llama.cpp runs them in (`pinned_types`), which keep it. The
report lists every tensor with its type and bits per weight, the fallbacks llama.cpp chose, file
sizes and tool versions, and the model family's prompt (`prompt`, what the runtime renders
questions with) and preprocessing.
"""

from __future__ import annotations

import logging
import re
import time
from importlib.metadata import version
from pathlib import Path

from vlm_factory.artifacts import EXPORT_REPORT
from vlm_factory.errors import UserError
from vlm_factory.export.gguf_llm import write_llm_gguf
from vlm_factory.export.gguf_mmproj import write_mmproj_gguf
from vlm_factory.export.gguf_quantize import quantize
from vlm_factory.io import atomic_dir, scratch_dir, write_json
from vlm_factory.model.checkpoint import check_weights_match_config
from vlm_factory.runtime.gguf_check import open_gguf

log = logging.getLogger(__name__)

DEFAULTS = {"vision": "F16", "projector": "F16"}


def package_files(settings: dict) -> tuple[str, str]:
    """File names of the LLM and mmproj for a target's settings (what the parity stage loads)."""
    return f"llm-{settings['llm'].upper()}.gguf", f"mmproj-{settings['vision'].upper()}.gguf"


def gguf_settings(settings: dict, tier: str) -> dict:
    """The tier's gguf settings with defaults filled in; `llm` is required."""
    unknown = set(settings) - {"llm", *DEFAULTS}
    if unknown or "llm" not in settings:
        raise UserError(f"key 'targets.gguf.{tier}' must set llm (and optionally vision, projector); "
                        f"got {', '.join(sorted(settings)) or 'nothing'}")
    return {**DEFAULTS, **{k: str(v).upper() for k, v in settings.items()}}


def pinned_types(written: dict[str, str]) -> dict[str, str]:
    """Overrides keeping the tensors the F32 mmproj writer wrote in another type in that type.

    Such a tensor is one llama.cpp runs in that type only (ldpv2's depthwise-convolution kernel: F16);
    a tier's `projector: F32` would otherwise convert it, which aborts llama.cpp's quantizer."""
    return {f"^{re.escape(name)}$": kind for name, kind in written.items() if kind != "F32"}


def ggml_commit() -> str:
    """The llama.cpp/ggml commit llama-cpp-python was built from (ggml_commit() in libggml-base)."""
    import ctypes

    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_commit.restype = ctypes.c_char_p
    return lib.ggml_commit().decode()


def describe_gguf(path: Path) -> dict:
    """Tensors of a GGUF file with their types and bits per weight, read back from the file itself."""
    reader = open_gguf(path)
    tensors, by_type = [], {}
    total_bytes = total_elements = 0
    for t in reader.tensors:
        n_bytes, n_elements = int(t.n_bytes), int(t.n_elements)
        kind = t.tensor_type.name
        tensors.append({"name": t.name, "type": kind, "shape": [int(d) for d in t.shape],
                        "bits_per_weight": round(8 * n_bytes / n_elements, 3)})
        entry = by_type.setdefault(kind, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += n_bytes
        total_bytes += n_bytes
        total_elements += n_elements
    return {"file": path.name, "file_bytes": path.stat().st_size, "parameters": total_elements,
            "bits_per_weight": round(8 * total_bytes / total_elements, 3), "by_type": by_type, "tensors": tensors}


def export_gguf(model_dir: Path, out_dir: Path, tier: str, settings: dict) -> dict:
    """Write `out_dir` (atomically) with the tier's LLM + mmproj and export_report.json; return the report."""
    from vlm_factory.families import family_of

    settings = gguf_settings(settings, tier)
    llm_name, mmproj_name = package_files(settings)
    started = time.perf_counter()
    family = family_of(model_dir)
    family.require_format("gguf")
    processor = family.load_processor(model_dir)  # contained, processor files checked
    check_weights_match_config(family, sorted(Path(model_dir).glob("*.safetensors")))  # before any tensor is read
    prompt = family.prompt(processor)
    with atomic_dir(out_dir) as staging, scratch_dir(out_dir) as scratch:
        full_llm, full_mmproj = scratch / "llm-F16.gguf", scratch / "mmproj-F32.gguf"
        write_llm_gguf(model_dir, full_llm, "F16", family=family)
        written = write_mmproj_gguf(model_dir, full_mmproj, family=family, processor=processor)
        log.info("quantizing the LLM to %s and the mmproj to %s (projector %s) with llama.cpp",
                 settings["llm"], settings["vision"], settings["projector"])
        fallbacks = quantize(full_llm, staging / llm_name, settings["llm"], key=f"targets.gguf.{tier}.llm")
        # llama.cpp applies the first pattern that matches a tensor: the pinned ones come first.
        fallbacks += quantize(full_mmproj, staging / mmproj_name, settings["vision"],
                              {**pinned_types(written), r"^mm\.": settings["projector"], r"^v\.": settings["vision"]},
                              key=f"targets.gguf.{tier}.vision")
        for f in fallbacks:
            log.warning("%s: wanted %s, llama.cpp used %s (%s)", f.tensor, f.wanted, f.used, f.reason)
        files = {role: describe_gguf(staging / name) for role, name in (("llm", llm_name), ("mmproj", mmproj_name))}
        report = {
            "format": "gguf", "tier": tier, "settings": settings, "files": files,
            "total_bytes": sum(f["file_bytes"] for f in files.values()),
            "fallbacks": [vars(f) for f in fallbacks],
            "model": family.summary(),
            "prompt": prompt.as_dict(),
            # What llama.cpp gets from the mmproj is mean, std and size; the processor's full recipe is
            # kept for the record (clip.cpp letterboxes an "mlp" or "ldpv2" projector's images whatever it says).
            "vision": {"preprocessing": family.preprocessing(processor)},
            "tools": {"gguf": version("gguf"), "llama_cpp_python": version("llama_cpp_python"),
                      "llama_cpp_commit": ggml_commit()},
        }
        write_json(report, staging / EXPORT_REPORT)
    log.info("gguf for %s: %s + %s, %.1f MiB, %d fallback(s), in %.1fs", tier, llm_name, mmproj_name,
             report["total_bytes"] / 2**20, len(fallbacks), time.perf_counter() - started)
    return report


def report_summary(report: dict) -> dict:
    """The small, committed part of the export report (no per-tensor list)."""
    return {
        "format": report["format"], "tier": report["tier"], "settings": report["settings"],
        "total_bytes": report["total_bytes"], "fallbacks": len(report["fallbacks"]), "tools": report["tools"],
        "files": {role: {k: f[k] for k in ("file", "file_bytes", "parameters", "bits_per_weight", "by_type")}
                  for role, f in report["files"].items()},
    }
