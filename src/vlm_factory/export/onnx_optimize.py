"""Graph optimisation of the exported ONNX graphs, saved to file, and what it changed.

Two passes, in this order:

1. Transformer fusions with onnxscript's `optimize_for_ort` (the rewriter made for torch's dynamo
   exporter). On the dynamo-exported graphs of the bundled model (onnxscript 0.7.2) it fuses:
   - vision: both SigLIP attention blocks into `com.microsoft::Attention` (Q/K/V packed), three
     residual-add + LayerNorm pairs into `SkipLayerNormalization`, the projector's bias + GELU into
     `BiasGelu`;
   - text (Llama): RMSNorms into `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization`
     and one of the two layers' scaled-dot-product attention into `com.microsoft::MultiHeadAttention`
     (the other layer's pattern, which also computes the shared causal mask, is not matched); it
     reports rotary-embedding matches, but no `RotaryEmbedding` node survives into the written graph.
   `onnxruntime.transformers.optimizer` (model types vit, clip, bert) finds no attention in the
   dynamo vision graph at all (only SkipLayerNormalization and BiasGelu), hence onnxscript.
2. onnxruntime's own offline optimisation at ORT_ENABLE_EXTENDED, written out with
   `SessionOptions.optimized_model_filepath`: constant folding, `FusedMatMul` (transpose/scale folded
   into Q·Kᵀ), `FastGelu` / `BiasGelu` (tanh GELU), `QuickGelu` (x·sigmoid(x), Llama's SiLU), and on
   quantized graphs `MatMulIntegerToFloat` / `DynamicQuantizeMatMul` / `QLinearMatMul`. Not
   ORT_ENABLE_ALL: its layout transforms (NCHWc) depend on the CPU that runs the export.

The result only runs in onnxruntime (contrib ops), which is what this artifact is for. The same
session API writes the ORT format (`.ort`, for ONNX Runtime Mobile) with
`session.save_model_format=ORT`, which is what `onnxruntime.tools.convert_onnx_models_to_ort` does.

`op_histogram` / `fusions_applied` compare op types before and after, for the export report.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# Op types whose appearance means a fusion (or a quantized-op fusion) happened; names without domain.
FUSED_OP_TYPES = frozenset({
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
    "EmbedLayerNormalization", "LayerNormalization", "BiasGelu", "FastGelu", "Gelu", "QuickGelu", "BiasAdd",
    "FusedMatMul", "FusedConv", "FusedGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul",
    "QLinearConv", "QAttention", "MatMulNBits",
})


def _op_name(node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain and node.domain != "ai.onnx" else node.op_type


def _nodes(graph) -> Iterator:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _nodes(subgraph)


def op_histogram(model) -> dict[str, int]:
    """Node count per op type (`com.microsoft::Attention` for non-ONNX domains), sorted by name.

    `model` is a ModelProto or a path to an .onnx file (read without its external data).
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return dict(sorted(Counter(_op_name(n) for n in _nodes(model.graph)).items()))


def histogram_diff(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """after - before per op type, only where it changed."""
    return {op: after.get(op, 0) - before.get(op, 0) for op in sorted(set(before) | set(after))
            if after.get(op, 0) != before.get(op, 0)}


def fusions_applied(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Fused op types the rewrites added: {op: how many more than before} (e.g. {"com.microsoft::Attention": 2})."""
    return {op: delta for op, delta in histogram_diff(before, after).items()
            if delta > 0 and op.split("::")[-1] in FUSED_OP_TYPES}


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise these loggers to WARNING for the block ("" is the root logger, which onnxruntime's quantizer
    logs every tensor to at INFO; onnxscript and onnx_ir log every rewrite): keeps the stage log readable."""
    loggers = [logging.getLogger(name or None) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def transformer_fusions(src: Path, dst: Path) -> dict[str, int]:
    """onnxscript's `optimize_for_ort` on `src`, written to `dst`; its own count of each fusion it matched.

    The counts are pattern matches as onnxscript reports them (a later rule may rewrite a match
    again); what the written graph really contains is what `fusions_applied` on the histograms says.
    """
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with quiet_loggers("onnxscript", "onnx_ir"):
        model = ir.load(str(src))
        model, counts = optimize_for_ort(model)
        ir.save(model, str(dst))
    return {name: int(count) for name, count in sorted(counts.items()) if count}


def _session_options(level, optimized_path: Path | None = None, ort_format: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns about unused initializers after folding: noise here
    options.graph_optimization_level = level
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if ort_format:
        options.add_session_config_entry("session.save_model_format", "ORT")
    return options


def ort_optimize(src: Path, dst: Path, *, ort_format: bool = False) -> None:
    """onnxruntime's offline optimisation at ORT_ENABLE_EXTENDED (CPU EP), saved to `dst` (.onnx or .ort)."""
    import onnxruntime as ort

    options = _session_options(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, dst, ort_format)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    if not dst.is_file():
        raise RuntimeError(f"onnxruntime did not write the optimised model {dst}")


def to_ort_format(src: Path, dst: Path) -> None:
    """`src` (.onnx) as an ORT-format model `dst` (.ort) for ONNX Runtime Mobile, at ORT_ENABLE_EXTENDED."""
    ort_optimize(src, dst, ort_format=True)


def cpu_fallback_ops(path: Path, scratch: Path) -> dict[str, int]:
    """Op types of a float16 graph that onnxruntime's CPU EP runs in float32 (it inserts casts around them).

    The CPU EP has float16 kernels for few ops; for the others it wraps the node in Cast nodes named
    `InsertedPrecisionFreeCast_*` when the session is created. Saving the session's graph without
    optimisations and counting the consumers of those casts names them. {} on a float32 graph.
    """
    import onnx
    import onnxruntime as ort

    saved = scratch / f"{path.stem}.cpu-casts.onnx"
    ort.InferenceSession(str(path), _session_options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL, saved),
                         providers=["CPUExecutionProvider"])
    graph = onnx.load(str(saved)).graph
    saved.unlink()
    inserted = {n.output[0] for n in graph.node
                if n.op_type == "Cast" and n.name.startswith("InsertedPrecisionFreeCast")}
    return dict(sorted(Counter(_op_name(n) for n in graph.node
                               if n.op_type != "Cast" and inserted.intersection(n.input)).items()))


def run_graph(path: Path, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = _session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, dict(feed))


def max_abs_diff(reference: Path, candidate: Path, feed: Mapping[str, np.ndarray]) -> float:
    """Largest |difference| over all outputs of two graphs with the same interface, on one feed."""
    expected, actual = run_graph(reference, feed), run_graph(candidate, feed)
    if len(expected) != len(actual) or any(e.shape != a.shape for e, a in zip(expected, actual)):
        return float("inf")
    return max(float(np.abs(e.astype(np.float32) - a.astype(np.float32)).max()) for e, a in zip(expected, actual))
