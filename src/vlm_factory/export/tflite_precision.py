"""Per-component weight precision of a TFLite graph: litert-torch converts at fp32, then ai-edge-quantizer
stores each op's weights at the precision of the model component (`family.component_of`) they belong to.

    fp32   weights as converted
    fp16   float16 weights dequantized to float32 in the graph (FLOAT_CASTING: exactly what litert-torch's
           `quant_recipes.full_fp16_recipe()` asks ai-edge-quantizer for, so a uniform fp16 file is the same)
    int8   dynamic range: per-channel symmetric int8 weights, float activations quantized on the fly by the
           kernels (ai-edge-quantizer's `dynamic_wi8_afp32`)

Both touch only the ops ai-edge-quantizer quantizes (fully connected, convolutions, embedding lookups);
norms, biases of other ops and the decoder's rope tables stay float32.

Which component a weight belongs to comes from its name. litert-torch names a tensor after the torch
modules whose forward made it, one location per use, `;`-joined:

    <wrapper class>/<module class>_<attribute>/.../torch.nn.modules.linear.Linear_linear_1;1

Module lists drop out (`...<Tower>Encoder_encoder/...<Tower>EncoderLayer_0/...`), constants folded
together carry several locations, and q/k/v weights may be named after their attention module only, so a
name is no module path; but every segment is one module of the converted wrapper (its class and the
attribute that holds it), and the wrapper's modules are the loaded model's, whose paths the family places.
A location takes the component of its innermost placed segment.

ai-edge-quantizer selects ops by a regex over the op's scope (its output tensors' names), and the op that
makes a signature output is named after that output only (`serving_default_image_features_output`), so each
op is placed by its weight's name and selected by its own exact scope. Afterwards every placed weight is
checked to be stored at its component's precision.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import defaultdict

from vlm_factory.logs import interactive

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
# What each precision stores a quantized weight as (the flatbuffer's tensor type, as numpy names it).
STORED_DTYPE = {"fp32": "float32", "fp16": "float16", "int8": "int8"}


def segment_components(family, model, wrapper) -> dict[str, str | None]:
    """{'<module class>_<attribute>': component} for each module of `wrapper` (None where the loaded model's
    modules of that class and attribute are in several components, or in none)."""
    paths = {id(module): name for name, module in model.named_modules()}
    found: dict[str, set] = defaultdict(set)
    for name, module in wrapper.named_modules():
        if name and id(module) in paths:
            cls = type(module)
            found[f"{cls.__module__}.{cls.__qualname__}_{name.rsplit('.', 1)[-1]}"].add(
                family.component_of(paths[id(module)]))
    return {segment: next(iter(c)) if len(c) == 1 else None for segment, c in found.items()}


def tensor_component(name: str, segments: dict[str, str | None]) -> str | None:
    """The component every location of a tensor name is in (None if unplaced or in several)."""
    placed = set()
    for location in name.split(";"):
        parts = location.split("/")
        component = next((segments[p] for p in reversed(parts) if segments.get(p)), None)
        if len(parts) > 1 and component is None:
            return None  # a module location we cannot place: do not guess from the others
        if component is not None:
            placed.add(component)
    return placed.pop() if len(placed) == 1 else None


# The ops whose input 1 is a learned weight, the ones a component's precision is about.
WEIGHT_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "EMBEDDING_LOOKUP")


def _weight_op_codes() -> set[int]:
    from ai_edge_litert.schema_py_generated import BuiltinOperator

    return {getattr(BuiltinOperator, name) for name in WEIGHT_OPS}


def _weighted_ops(model):
    """(subgraph, op, weight tensor) for every op of WEIGHT_OPS with a constant weight."""
    codes = _weight_op_codes()
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if model.operatorCodes[op.opcodeIndex].builtinCode in codes and len(op.inputs) > 1 \
                    and _constant(model, subgraph.tensors[op.inputs[1]]):
                yield subgraph, op, subgraph.tensors[op.inputs[1]]


def _constant(model, tensor) -> bool:
    buffer = model.buffers[tensor.buffer]
    return bool((buffer.data is not None and len(buffer.data)) or getattr(buffer, "size", 0))


def _name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def _add_config(manager, regex: str, precision: str) -> None:
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    every_op = qtyping.TFLOperationName.ALL_SUPPORTED
    if precision == "fp32":
        manager.add_quantization_config(regex, every_op, algorithm_key=AlgorithmName.NO_QUANTIZE)
    elif precision == "fp16":  # litert-torch's full_fp16_recipe, as its translate_recipe spells it
        manager.add_quantization_config(regex, every_op, algorithm_key=AlgorithmName.FLOAT_CASTING,
                                        op_config=qtyping.OpQuantizationConfig(
                                            weight_tensor_config=qtyping.TensorQuantizationConfig(
                                                num_bits=16, symmetric=True, dtype=qtyping.TensorDataType.FLOAT,
                                                granularity=qtyping.QuantGranularity.CHANNELWISE),
                                            compute_precision=qtyping.ComputePrecision.FLOAT,
                                            explicit_dequantize=True))
    elif precision == "int8":
        manager.add_dynamic_config(regex, every_op, num_bits=8, granularity=qtyping.QuantGranularity.CHANNELWISE)
    else:
        raise ValueError(f"unknown precision {precision!r}")


def quantize(model_bytes: bytes, segments: dict, precisions: dict[str, str], file: str) -> bytes:
    """The fp32 graph with each component's weights at `precisions[component]` ({component: precision} for
    the components this file holds; the first is the file's main one)."""
    from ai_edge_quantizer import quantizer, recipe_manager
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    main = next(iter(precisions))
    if set(precisions.values()) == {"fp32"}:
        return model_bytes
    float_model = tfl.read_model(model_bytes)
    # Every op at the main component's precision; the ops of the others by their own exact scope after it
    # (ai-edge-quantizer lets the last matching rule win). A uniform file gets the one '.*' rule.
    manager = recipe_manager.RecipeManager()
    _add_config(manager, ".*", precisions[main])
    if len(set(precisions.values())) > 1:
        for subgraph, op, weight in _weighted_ops(float_model):
            component = tensor_component(_name(weight), segments)
            if component is None:
                raise RuntimeError(f"{file}: cannot tell which component weight {_name(weight)[:160]!r} belongs "
                                   "to, so its components cannot take different precisions")
            if precisions.get(component, precisions[main]) != precisions[main]:
                scope = tfl.get_op_scope(op, subgraph.tensors)
                _add_config(manager, f"^{re.escape(scope)}$", precisions[component])
    run = quantizer.Quantizer(model_bytes, manager.get_quantization_recipe())
    # No size/time report printed on stdout (ours logs the files); its bars only where bars are drawn.
    with _shared_buffer_notices(file, len(float_model.signatureDefs or ())), _bars_follow_terminal():
        result = run.quantize(enable_progress_bar=None if interactive() else False, enable_progress_report=False)
    return bytes(result.quantized_model)


@contextlib.contextmanager
def _bars_follow_terminal():
    """ai-edge-quantizer (0.10) passes quantize(enable_progress_bar=) on to its "Generating Quantization
    Parameters" bar but not to its "Applying Transformations to tensors" one, which draws itself for 100+
    tensors: off where stderr is no terminal, through its ProgressBar's own `enable` argument."""
    from ai_edge_quantizer.utils import progress_utils

    if interactive():
        yield
        return
    original = progress_utils.ProgressBar.__init__

    def quiet(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "enable": False})

    progress_utils.ProgressBar.__init__ = quiet
    try:
        yield
    finally:
        progress_utils.ProgressBar.__init__ = original


OVERRIDING = "Quantized data for tensor %s is overriding other previously quantized data"  # its format string


class _SharedBufferNotices(logging.Filter):
    """Counts (and drops) ai-edge-quantizer's warning that a tensor's quantized data overrides a buffer's."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(OVERRIDING):
            self.count += 1
            return False
        return True


@contextlib.contextmanager
def _shared_buffer_notices(file: str, signatures: int):
    """A graph of several signatures (the decoder's prefill and decode) shares each weight's buffer between
    them, and ai-edge-quantizer warns for every shared weight when the second signature's op stores it again
    (through the root logger, one line per weight): one line says how many. With one signature such a
    warning would be news, and passes."""
    if signatures < 2:
        yield
        return
    notices = _SharedBufferNotices()
    logging.getLogger().addFilter(notices)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notices)
    if notices.count:
        log.info("%s: %d weight buffers its %d signatures share were quantized once per signature "
                 "(ai-edge-quantizer's 'overriding previously quantized data' warnings; each weight's stored "
                 "type is checked next)", file, notices.count, signatures)


def weight_bytes(model_bytes: bytes, segments: dict, main: str) -> dict[str, dict[str, int]]:
    """{component: {dtype: bytes}} of the graph's constant tensors, each buffer counted once (the decoder's
    signatures share theirs). Constants no module made (rope tables, masks, shapes) and what cannot be
    placed count for `main`, the component the file is."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    model = tfl.read_model(model_bytes)
    seen, counts = set(), defaultdict(lambda: defaultdict(int))
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            if tensor.buffer in seen or not _constant(model, tensor):
                continue
            seen.add(tensor.buffer)
            buffer = model.buffers[tensor.buffer]
            size = len(buffer.data) if buffer.data is not None and len(buffer.data) else int(buffer.size)
            counts[tensor_component(_name(tensor), segments) or main][_dtype(tensor)] += size
    return {component: dict(by_dtype) for component, by_dtype in counts.items()}


def _dtype(tensor) -> str:
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    return str(tfl.TENSOR_CODE_TO_TYPE[tensor.type]).lower()  # "FLOAT16" -> "float16", as numpy names it


def check_weights(model_bytes: bytes, segments: dict, precisions: dict[str, str], file: str) -> None:
    """Every weight of WEIGHT_OPS is stored as its component's precision says (an fp16 weight sits behind a
    DEQUANTIZE op, so the weight such an op reads is followed back to it)."""
    from ai_edge_litert.schema_py_generated import BuiltinOperator as Op
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    main = next(iter(precisions))
    model = tfl.read_model(model_bytes)
    weighted = _weight_op_codes()
    for subgraph in model.subgraphs:
        ops = [(model.operatorCodes[op.opcodeIndex].builtinCode, op) for op in subgraph.operators]
        dequantized = {op.outputs[0]: op.inputs[0] for code, op in ops if code == Op.DEQUANTIZE}
        for code, op in ops:
            if code not in weighted or len(op.inputs) < 2:
                continue
            weight = subgraph.tensors[dequantized.get(op.inputs[1], op.inputs[1])]
            if not _constant(model, weight):
                continue
            component = tensor_component(_name(weight), segments) or main
            wanted = STORED_DTYPE[precisions.get(component, precisions[main])]
            if _dtype(weight) != wanted:
                raise RuntimeError(f"{file}: {component} weight {_name(weight)[:120]!r} is stored as "
                                   f"{_dtype(weight)}, its precision wants {wanted}")
