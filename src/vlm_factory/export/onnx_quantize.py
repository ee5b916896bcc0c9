"""INT8 and FP16 versions of the ONNX graphs, with onnxruntime's own tools.

INT8 (`precision: int8`):

- decoder (`text.onnx`): dynamic quantization (`quantize_dynamic`), weights QInt8 per output
  channel, activations quantized per call from their observed range (DynamicQuantizeLinear), so
  no calibration is needed and long-context activations are never clipped to a calibrated range.
  All 15 weight MatMuls of the bundled model (q, k, v, o, gate, up, down x 2 layers + LM head) are
  quantized. `quant_pre_process` runs first with `skip_symbolic_shape=True`: onnxruntime's symbolic
  shape inference fails on the dynamo decoder's shape arithmetic.
- vision (`vision.onnx`): static QDQ (`quantize_static`) calibrated on pixel values of N images of
  the training split, preprocessed exactly as the artifact's genai_config.json says (runtime/preprocess.py
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
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Sequence
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


def calibration_pixels(records: Sequence, data_dir: Path, preprocessing: dict,
                       count: int) -> tuple[np.ndarray, list[int]]:
    """([views, 3, H, W] float32, views per image): every view of `count` distinct images of `records`,
    spread evenly over the split, preprocessed (one view per image unless the spec cuts images into tiles).

    `records` are VQA records (several questions share an image; each image is used once) whose
    `.image` is relative to `data_dir`; `preprocessing` is genai_config.json's vision preprocessing.
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


def quantization_summary(path: Path) -> dict:
    """What a quantizer's output graph (before ORT fuses it) quantized: nodes per float op type, and what is left.

    Counts QOperator / dynamic nodes (MatMulInteger...) and QDQ nodes (a node with an input produced by
    DequantizeLinear), `float_left` the weight-bearing op types still computed on float inputs, and
    the int8 initializers (count and bytes).
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized, float_left = Counter(), Counter()
    for node in graph.node:
        if node.op_type in QUANTIZED_OPS:
            quantized[QUANTIZED_OPS[node.op_type]] += 1
        elif node.op_type not in ("QuantizeLinear", "DequantizeLinear") and dequantized.intersection(node.input):
            quantized[node.op_type] += 1
        elif node.op_type in FLOAT_OPS_WITH_WEIGHTS:
            float_left[node.op_type] += 1
    int8 = [t for t in graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.UINT8)]
    return {"quantized_nodes": dict(sorted(quantized.items())), "float_left": dict(sorted(float_left.items())),
            "int8_initializers": len(int8), "int8_bytes": int(sum(numpy_helper.to_array(t).nbytes for t in int8))}


def _pre_process(src: Path, dst: Path, skip_symbolic_shape: bool) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic_shape)


def quantize_vision_static(src: Path, dst: Path, pixels: np.ndarray, input_name: str = "pixel_values",
                           images: int | None = None) -> dict:
    """Static QDQ INT8 of the vision graph, calibrated on `pixels` ([views, 3, H, W], the views of `images`
    images: as many as views when not given); returns what it did."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quant-vision.") as scratch:
        prepared = Path(scratch) / "vision.pre.onnx"
        _pre_process(src, prepared, skip_symbolic_shape=False)
        with quiet_loggers(""):
            quantize_static(
                str(prepared), str(dst), _calibration_reader(pixels, input_name), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(VISION_OP_TYPES), per_channel=True, reduce_range=False,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"OpTypesToExcludeOutputQuantization": list(VISION_OP_TYPES)},
            )
    return {"method": "static", "format": "QDQ", "weights": "QInt8 per channel",
            "activations": "QUInt8 per tensor, MinMax, inputs of MatMul/Conv only",
            "op_types": list(VISION_OP_TYPES), "calibration_images": int(len(pixels) if images is None else images),
            "calibration_views": int(len(pixels)), **quantization_summary(dst)}


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


def convert_fp16(src: Path, dst: Path, op_block_list: Sequence[str] | None = None) -> dict:
    """float16 weights and compute, float32 inputs/outputs (keep_io_types); returns what it did.

    `op_block_list` (op types kept in float32) extends onnxruntime's default list when given.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(op_block_list or ()))
    # Weights beyond float16's range are clamped to ±65504 (logged at debug level); the export compares outputs.
    converted = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=block)
    onnx.save(converted, str(dst))
    return {"method": "convert_float_to_float16", "keep_io_types": True,
            "op_block_list_added": sorted(set(op_block_list or ())),
            "fp16_initializers": sum(t.data_type == onnx.TensorProto.FLOAT16 for t in converted.graph.initializer)}
