"""One entry point for every export format: what the export stage calls for a (format, tier) target."""

from __future__ import annotations

from pathlib import Path

from vlm_factory.config import ExportConfig
from vlm_factory.errors import UserError
from vlm_factory.families import family_of
from vlm_factory.io import atomic_dir, write_json

# Formats the factory builds today (each has an export and a parity stage in dvc.yaml). Targets of
# other formats in conf/tier/ are planned work: publishing reports them as not built.
BUILT_FORMATS = ("gguf", "onnx", "coreml", "tflite")
# What a refused target's export directory holds instead of an artifact.
REFUSED_FILE = "refused.json"


def refused_target(fmt: str, tier: str, reason: str, out_dir: Path | None = None) -> dict:
    """The record of a target the model's family cannot go to (a tier lists the format, this model cannot
    take it: e.g. llama.cpp runs MobileVLM's projector on one patch grid only). Its stages still run, so
    the DAG's outputs exist: the export directory holds only this record, parity reports it, publishing
    leaves it out and lists it with its reason."""
    record = {"format": fmt, "tier": tier, "refused": reason}
    if out_dir is not None:
        with atomic_dir(out_dir) as tmp:
            write_json(record, tmp / REFUSED_FILE)
    return record


def export_target(fmt: str, *, model_dir: Path, out_dir: Path, tier: str, settings: dict, data_dir: Path,
                  export_cfg: ExportConfig, context_tokens: int) -> tuple[dict, dict]:
    """Export one target into `out_dir`; return (full report, its small summary for metrics/).

    The model family is asked first: an unsupported (family, format) pair stops here, in one line.
    `context_tokens` is the tier's context; formats with a fixed-size KV cache size it from this
    (bounded by the model's own maximum)."""
    family_of(model_dir).require_format(fmt)
    if fmt == "gguf":
        from vlm_factory.export.gguf_export import export_gguf, report_summary

        report = export_gguf(model_dir, out_dir, tier, settings)
    elif fmt == "onnx":
        from vlm_factory.export.onnx_export import export_onnx, report_summary

        report = export_onnx(model_dir, out_dir, tier, settings, data_dir, export_cfg.calibration_images)
    elif fmt == "coreml":
        from vlm_factory.export.coreml_export import export_coreml, report_summary

        report = export_coreml(model_dir, out_dir, tier, settings, data_dir, context_tokens=context_tokens)
    elif fmt == "tflite":
        from vlm_factory.export.tflite_export import export_tflite, report_summary

        report = export_tflite(model_dir, out_dir, tier, settings, data_dir, context_tokens=context_tokens)
    else:
        raise UserError(f"format {fmt!r} has no exporter yet (targets.{fmt}.{tier})")
    return report, report_summary(report)
