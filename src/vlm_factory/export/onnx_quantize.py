"""INT8 and FP16 versions of the ONNX graphs, with onnxruntime's own tools.

INT8 (`precision: int8`):

- decoder (`text.onnx`): dynamic quantization (`quantize_dynamic`), weights QInt8 per output
  channel, activations quantized per call from their observed range (DynamicQuantizeLinear), so
  no calibration is needed and long-context activations are never clipped to a calibrated range.
  All 15 weight MatMuls of the bundled model (q, k, v, o, gate, up, down x 2 layers + LM head) are
  quantized. `quant_pre_process` runs first with `skip_symbolic_shape=True`: onnxruntime's symbolic
  shape inference fails on the dynamo decoder's shape arithmetic.
- vision (`vision.onnx`): static QDQ (`quantize_static`) calibrated on pixel values of N images of
  the training split, preprocessed exactly as the artifact's onnx_config.json says (runtime/preprocess.py
  `image_views`, what the runtime adapter runs): every view of each image, so a family that cuts images
  into tiles (Idefics3/SmolVLM) calibrates on its tiles and global views, one view per call. Weights QInt8 per channel, activations QUInt8 per tensor (MinMax), only
  at the inputs of MatMul and Conv: the outputs of those ops are left in float
  (`OpTypesToExcludeOutputQuantization`), which onnxruntime runs as MatMulIntegerToFloat. Measured
  on the bundled model (36 images): quantizing those outputs too, i.e. the patch embedding's output,
  which starts SigLIP's residual stream (values up to ~120 with outliers), cost most of the error
  (per-image feature cosine vs fp32 min 0.986 -> 0.9993 without it), for no size gain.
  The quantized graph is the unfused export: onnxscript's fused `Attention` packs Q/K/V weights in an
  op the QDQ quantizer does not handle, so they would stay float (2.6 MB instead of 1.5 MB).
- embedding (`embedding.onnx`) stays float32: it is a Gather from the token table, there is no
  arithmetic to speed up; int8 would only save size, at the cost of an error in every input token's
  embedding, and ORT GenAI keeps this table in the model's float type as well.

FP16 (`precision: fp16`): `onnxruntime.transformers.float16.convert_float_to_float16` with
`keep_io_types=True` (inputs, outputs and the KV cache stay float32, so the same app code and the
runtime adapter feed the graphs unchanged), on the graphs after fusions and ORT optimisation.
The graphs load and run on CPUExecutionProvider without an op_block_list: for the many ops the CPU
EP has no float16 kernel for (MatMul, Add, Attention, ... on x86) onnxruntime inserts casts and runs
them in float32 (`cpu_fallback_ops` lists them). That is a CPU-only effect, so the ops are not blocked
in the file: on a GPU (the fp16 tier's Jetson) they run in float16.

Per component (`vision` / `projector` of vision.onnx, onnx_export.py): the family places each node in
a component (`node_components`), and the conversion is restricted to the reduced component's nodes:
`nodes_to_quantize` of quantize_static, `node_block_list` (the other nodes) of convert_float_to_float16.
A node no component can be found for stays float32 (see `graph_components`).
"""

from __future__ import annotations

import ast
import logging
import tempfile
from collections import Counter, defaultdict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from vlm_factory.data.images import load_image
from vlm_factory.errors import UserError
from vlm_factory.export.onnx_optimize import quiet_loggers
from vlm_factory.runtime.preprocess import image_views

log = logging.getLogger(__name__)

VISION_OP_TYPES = ("MatMul", "Conv")
DECODER_OP_TYPES = ("MatMul",)
# Quantized op -> the float op it replaces, to count quantized nodes in any of the formats.
QUANTIZED_OPS = {
    "MatMulInteger": "MatMul", "DynamicQuantizeMatMul": "MatMul", "MatMulIntegerToFloat": "MatMul",
    "QLinearMatMul": "MatMul", "ConvInteger": "Conv", "QLinearConv": "Conv", "QGemm": "Gemm", "QAttention": "Attention",
}
FLOAT_OPS_WITH_WEIGHTS = ("MatMul", "Conv", "Gemm", "Attention")
# The torch module path(s) each node of a dynamo export was traced in, outermost first, then the op's own
# name: ['', 'model.<tower path>', ..., 'model.<connector path>.<its layer>', 'linear_12'].
# onnxscript's fusions keep it; onnxruntime's optimiser drops it (but keeps the names of nodes it leaves).
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
WRAPPER = "model."  # onnx_graphs.VisionGraph holds the loaded model as `.model`


def _scope_component(node, family) -> str | None:
    """The family's component of the deepest module a node was traced in (None: no metadata, or no component)."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            for scope in reversed(ast.literal_eval(prop.value)):  # a Python list literal, deepest module last
                if scope.startswith(WRAPPER) and (component := family.component_of(scope[len(WRAPPER):])):
                    return component
    return None


def node_components(path: Path, family) -> dict[str, str]:
    """{node name: "vision" | "projector" | "llm"} for the nodes of a dynamo-exported (or onnxscript-fused)
    graph whose traced module the family places in a component; nodes it does not place are left out."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    found = {node.name: _scope_component(node, family) for node in graph.node}
    return {name: component for name, component in found.items() if component}


def graph_components(path: Path, known: Mapping[str, str]) -> dict[str, str | None]:
    """Component of every node of `path` (a graph whose names follow `known`'s graph, e.g. the ORT-optimised
    graph of a fused one): by name, else the one component all its producers and consumers have (a node
    onnxruntime fused inside a component, such as FastGelu between two MLP MatMuls), else None.

    None means the node is kept in float32 by a per-component conversion (it is neither quantized nor
    block-listed out of fp32): that is safe, because float32 is what the export is checked against,
    so an unplaced node can only keep the graph closer to the fp32 export and never reduces a component
    set to fp32; the cost is a few casts, and the report's per-component counts show what was converted.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {output: node.name for node in graph.node for output in node.output}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node.name)
    components = {}
    for node in graph.node:
        if node.name in known:
            components[node.name] = known[node.name]
            continue
        # One pass over `known` only (no propagation): a chain of unplaced nodes between two components stays None.
        around = {known.get(producer.get(name)) for name in node.input}
        around |= {known.get(consumer) for output in node.output for consumer in consumers[output]}
        around.discard(None)
        components[node.name] = around.pop() if len(around) == 1 else None
    return components


def _component_nodes(components: Mapping[str, str | None], reduced: Collection[str], path: Path) -> list[str]:
    """The nodes of the `reduced` components, refusing an empty answer either way: an empty list means
    "every node" to onnxruntime's tools, and a mixed graph with nothing left in float32 is a wrong map."""
    nodes = [name for name, component in components.items() if component in reduced]
    if not nodes or len(nodes) == len(components):
        raise RuntimeError(f"{path}: {len(nodes)} of {len(components)} nodes belong to {', '.join(sorted(reduced))}: "
                           "the family's component_of does not split this graph")
    return nodes


def calibration_pixels(records: Sequence, data_dir: Path, preprocessing: dict,
                       count: int) -> tuple[np.ndarray, list[int]]:
    """([views, 3, H, W] float32, views per image): every view of `count` distinct images of `records`,
    spread evenly over the split, preprocessed (one view per image unless the spec cuts images into tiles).

    `records` are VQA records (several questions share an image; each image is used once) whose
    `.image` is relative to `data_dir`; `preprocessing` is onnx_config.json's vision preprocessing.
    """

    images = list(dict.fromkeys(r.image for r in records))
    if not images:
        raise UserError(f"{data_dir}: the training split has no images to calibrate the INT8 vision graph with")
    picks = np.unique(np.linspace(0, len(images) - 1, num=min(count, len(images))).round().astype(int))
    views = [image_views(load_image(data_dir / images[i]), preprocessing)[0] for i in picks]
    return np.concatenate(views), [len(v) for v in views]


def _calibration_reader(pixels: np.ndarray, input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class PixelReader(CalibrationDataReader):
        """One image per call, batch 1, as the app runs the vision graph."""

        def __init__(self):
            self._rows = iter(pixels)

        def get_next(self):
            row = next(self._rows, None)
            return None if row is None else {input_name: row[None]}

    return PixelReader()


def _counts(counter: Counter) -> dict[str, int]:
    return dict(sorted(counter.items()))


def quantization_summary(path: Path, components: Mapping[str, str | None] | None = None) -> dict:
    """What a quantizer's output graph (before ORT fuses it) quantized: nodes per float op type, and what is left.

    Counts QOperator / dynamic nodes (MatMulInteger...) and QDQ nodes (a node with an input produced by
    DequantizeLinear), `float_left` the weight-bearing op types still computed on float inputs, and
    the int8 initializers (count and bytes). With `components` ({node name: component} of the quantized
    graph, which QDQ keeps the names of), the same two counts per component ("unplaced" for None).
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized, float_left = Counter(), Counter()
    per_component = defaultdict(lambda: {"quantized_nodes": Counter(), "float_left": Counter()})
    for node in graph.node:
        if node.op_type in QUANTIZED_OPS:
            kind, op = "quantized_nodes", QUANTIZED_OPS[node.op_type]
        elif node.op_type not in ("QuantizeLinear", "DequantizeLinear") and dequantized.intersection(node.input):
            kind, op = "quantized_nodes", node.op_type
        elif node.op_type in FLOAT_OPS_WITH_WEIGHTS:
            kind, op = "float_left", node.op_type
        else:
            continue
        (quantized if kind == "quantized_nodes" else float_left)[op] += 1
        if components is not None:
            per_component[components.get(node.name) or "unplaced"][kind][op] += 1
    int8 = [t for t in graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.UINT8)]
    summary = {"quantized_nodes": _counts(quantized), "float_left": _counts(float_left),
               "int8_initializers": len(int8), "int8_bytes": int(sum(numpy_helper.to_array(t).nbytes for t in int8))}
    if components is not None:
        summary["components"] = {component: {kind: _counts(counts) for kind, counts in kinds.items()}
                                 for component, kinds in sorted(per_component.items())}
    return summary


def _pre_process(src: Path, dst: Path, skip_symbolic_shape: bool) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic_shape)


def quantize_vision_static(src: Path, dst: Path, pixels: np.ndarray, input_name: str = "pixel_values",
                           images: int | None = None, components: Mapping[str, str | None] | None = None,
                           only: Collection[str] | None = None) -> dict:
    """Static QDQ INT8 of the vision graph, calibrated on `pixels` ([views, 3, H, W], the views of `images`
    images: as many as views when not given); returns what it did.

    `components` ({node name: component} of `src`) adds per-component counts to the summary; with `only`
    (component names) just those components' nodes are quantized, the rest of the graph stays float32.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    nodes = None if only is None else _component_nodes(components, only, src)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quant-vision.") as scratch:
        prepared = Path(scratch) / "vision.pre.onnx"
        _pre_process(src, prepared, skip_symbolic_shape=False)
        with quiet_loggers(""):
            quantize_static(
                str(prepared), str(dst), _calibration_reader(pixels, input_name), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(VISION_OP_TYPES), per_channel=True, reduce_range=False,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, nodes_to_quantize=nodes,
                extra_options={"OpTypesToExcludeOutputQuantization": list(VISION_OP_TYPES)},
            )
    return {"method": "static", "format": "QDQ", "weights": "QInt8 per channel",
            "activations": "QUInt8 per tensor, MinMax, inputs of MatMul/Conv only",
            "op_types": list(VISION_OP_TYPES), "calibration_images": int(len(pixels) if images is None else images),
            "calibration_views": int(len(pixels)), "components_quantized": sorted(only) if only else "all",
            **quantization_summary(dst, components)}


def quantize_decoder_dynamic(src: Path, dst: Path) -> dict:
    """Dynamic INT8 of the decoder: per-channel QInt8 weights for every MatMul with a constant weight."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quant-text.") as scratch:
        prepared = Path(scratch) / "text.pre.onnx"
        _pre_process(src, prepared, skip_symbolic_shape=True)
        with quiet_loggers(""):
            quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=list(DECODER_OP_TYPES), per_channel=True,
                             reduce_range=False, weight_type=QuantType.QInt8,
                             extra_options={"MatMulConstBOnly": True})
    return {"method": "dynamic", "format": "IntegerOps", "weights": "QInt8 per channel",
            "activations": "QUInt8 per call (DynamicQuantizeLinear)", "op_types": list(DECODER_OP_TYPES),
            **quantization_summary(dst)}


def _tidy_block_listed(graph) -> int:
    """Undo what convert_float_to_float16 does wrong around block-listed nodes; returns the round trips removed.

    The converter declares every float tensor float16, then casts each block-listed node's inputs to float32
    and its outputs to float16: between two block-listed nodes (a float32 component is many) every tensor
    makes a float32 -> float16 -> float32 round trip, and so do the graph's inputs and outputs (keep_io_types)
    beside a float32 component, rounding what should stay float32. Each such pair that starts at a tensor the
    graph declares float32 (a graph input, a block-listed node's output) becomes an Identity of that tensor.
    It also declares the float32 initializers only block-listed nodes use float16 (the data stays float32),
    and adds the cast of a tensor to float32 once per block-listed node that reads it, each one defining the
    same tensor under the same name (an invalid graph): both fixed here.
    """
    from onnx import TensorProto, helper

    float32_initializers = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    for value in graph.value_info:
        if value.name in float32_initializers:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    float32 = {v.name for v in (*graph.input, *graph.value_info) if v.type.tensor_type.elem_type == TensorProto.FLOAT}

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {output: node for node in graph.node for output in node.output}
    replaced = 0
    for node in graph.node:
        first = producer.get(node.input[0]) if cast_to(node) == TensorProto.FLOAT else None
        if first is not None and cast_to(first) == TensorProto.FLOAT16 and first.input[0] in float32:
            node.CopyFrom(helper.make_node("Identity", [first.input[0]], list(node.output), name=node.name))
            replaced += 1
        elif cast_to(node) == TensorProto.FLOAT and node.input[0] in float32:  # a float32 initializer "to float32"
            node.CopyFrom(helper.make_node("Identity", list(node.input), list(node.output), name=node.name))
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if cast_to(n) == TensorProto.FLOAT16 and not used.intersection(n.output)]:
        graph.node.remove(node)
    produced = {}
    for node in list(graph.node):
        earlier = next((produced[o] for o in node.output if o in produced), None)
        if earlier is not None and earlier.SerializeToString() == node.SerializeToString():
            graph.node.remove(node)  # the same cast again (same name, input, output): the first one defines it
        produced.update(dict.fromkeys(node.output, node))
    return replaced


def convert_fp16(src: Path, dst: Path, op_block_list: Sequence[str] | None = None,
                 components: Mapping[str, str | None] | None = None, only: Collection[str] | None = None) -> dict:
    """float16 weights and compute, float32 inputs/outputs (keep_io_types); returns what it did.

    `op_block_list` (op types kept in float32) extends onnxruntime's default list when given. `components`
    ({node name: component} of `src`) adds per-component counts of the weight-bearing ops converted; with
    `only` just those components' nodes are converted: every other node goes into `node_block_list`.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(op_block_list or ()))
    model = onnx.load(str(src))
    kept = set() if only is None else set(components) - set(_component_nodes(components, only, src))
    counts = defaultdict(lambda: {"float16": Counter(), "float32": Counter()})
    for node in model.graph.node:
        if components is not None and node.op_type in FLOAT_OPS_WITH_WEIGHTS:
            precision = "float32" if node.op_type in block or node.name in kept else "float16"
            counts[components.get(node.name) or "unplaced"][precision][node.op_type] += 1
    # Weights beyond float16's range are clamped to ±65504 (logged at debug level); the export compares outputs.
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=block,
                                         node_block_list=sorted(kept) or None)
    round_trips = _tidy_block_listed(converted.graph) if kept else 0
    onnx.save(converted, str(dst))
    result = {"method": "convert_float_to_float16", "keep_io_types": True,
              "op_block_list_added": sorted(set(op_block_list or ())),
              "fp16_initializers": sum(t.data_type == onnx.TensorProto.FLOAT16 for t in converted.graph.initializer)}
    if only is not None:
        result.update(components_converted=sorted(only), nodes_kept_float32=len(kept),
                      round_trip_casts_skipped=round_trips)
    if components is not None:
        result["components"] = {component: {kind: _counts(c) for kind, c in kinds.items()}
                                for component, kinds in sorted(counts.items())}
    return result
