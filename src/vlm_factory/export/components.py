"""Per-component precision of an export target, the same way for every format.

Every format's settings name a precision per component (`vision`, `projector`, `llm`): GGUF always did
(its `llm`, `vision`, `projector` types); ONNX, Core ML and TFLite default each one to their global
`precision` / `nbits`. Each format also has a full precision, what its files hold when nothing is
reduced: unquantized F16 GGUF, fp32 ONNX and TFLite graphs, and unpalettized Core ML (a Core ML program
computes in float16, so that is its full precision). Attribution builds variants with one component
at the target's precision and the others full; the precision search builds candidates from per-component
choices; both go through the format's own settings check, so a variant is a target like any other.
"""

from __future__ import annotations

from vlm_factory.families import COMPONENTS

FULL_PRECISION = {"gguf": "F16", "onnx": "fp32", "coreml": "fp16", "tflite": "fp32"}


def validated_settings(fmt: str, settings: dict, tier: str) -> dict:
    """The format's own check of a target's settings, every component's precision filled in."""
    if fmt == "gguf":
        from vlm_factory.export.gguf_export import gguf_settings

        return gguf_settings(settings, tier)
    if fmt == "onnx":
        from vlm_factory.export.onnx_export import onnx_settings

        return onnx_settings(settings, tier)
    if fmt == "coreml":
        from vlm_factory.export.coreml_export import coreml_settings

        return coreml_settings(settings, tier)
    if fmt == "tflite":
        from vlm_factory.export.tflite_export import tflite_settings

        return tflite_settings(settings, tier)
    raise ValueError(f"no per-component settings for format {fmt!r}")


def component_precisions(fmt: str, settings: dict, tier: str) -> dict[str, str]:
    """{component: precision} of a target, e.g. {"vision": "Q8_0", "projector": "F16", "llm": "Q4_K_M"}."""
    checked = validated_settings(fmt, settings, tier)
    return {c: str(checked[c]) for c in COMPONENTS}


def with_precisions(fmt: str, settings: dict, tier: str, precisions: dict[str, str]) -> dict:
    """The target's settings with the given components' precisions replaced (the rest kept)."""
    checked = validated_settings(fmt, settings, tier)
    replaced = {**checked, **{c: (int(p) if fmt == "coreml" and str(p).isdigit() else p) for c, p in precisions.items()}}
    return validated_settings(fmt, replaced, tier)


def full_precision(fmt: str, settings: dict, tier: str) -> dict:
    """The target's settings with every component at the format's full precision."""
    return with_precisions(fmt, settings, tier, dict.fromkeys(COMPONENTS, FULL_PRECISION[fmt]))


def only(fmt: str, settings: dict, tier: str, component: str) -> dict:
    """The target's settings with only `component` at its precision, the others full."""
    own = component_precisions(fmt, settings, tier)[component]
    return with_precisions(fmt, settings, tier, {**dict.fromkeys(COMPONENTS, FULL_PRECISION[fmt]), component: own})
