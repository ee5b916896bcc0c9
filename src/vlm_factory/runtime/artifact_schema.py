"""Typed schemas of the JSON files an export keeps beside its model files, validated where they are read.

onnx_config.json, tflite_config.json, coreml_config.json and export_report.json are written by our
exporters but read back from a directory anyone may have edited, truncated or crafted. Indexed
directly, a missing key was a KeyError, a list where a mapping belongs a TypeError, and
`num_hidden_layers: 1e9` a hang (the ONNX adapter built two billion input names). Every reader
therefore validates the whole file once, before any runtime object exists, with the pydantic models
below: strict types (no "1", 1.0 or true for 1), positive and bounded sizes, finite floats, token ids
that are non-negative ints, name templates with exactly one `%d`, and the cross-field facts the
exporters always keep (the prompt's image tokens and the vision model's, the preprocessing's output
size and the model's input size, ...).

`parse_config` turns the first validation error into one line naming the file and the dotted key;
`config_error` builds the same line for what only the model files can tell (a graph without the
input the config names, a cache shape the file disagrees with), which the adapters check next.

Bounds are generous for real models and small enough that nothing an adapter builds from them
(names, caches, prompt strings, pixel buffers) can exhaust memory or time; each says why.
File names are only typed here: `paths.contained` keeps them inside the artifact directory.
"""

from __future__ import annotations

import json
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      model_validator)

from vlm_factory.artifacts import FIX
from vlm_factory.errors import UserError
from vlm_factory.params_schema import FORMATS

# -- bounds --------------------------------------------------------------------------------------------
# The deepest open LLMs have ~128 decoder layers; the ONNX adapter builds 4 names per layer and feeds
# one cache tensor per name, so this bounds both without refusing any real model.
MAX_LAYERS = 1024
MAX_HEADS = 1024            # attention and KV heads: real models have at most a few hundred
MAX_HEAD_SIZE = 4096        # 64..256 in practice
MAX_HIDDEN = 65536          # 16384 for the largest open LLMs
MAX_VOCAB = 1 << 22         # 4M; real vocabularies stay under 300k. Token ids are below it.
MAX_CONTEXT = 1 << 20       # positions; real contexts reach 128k-1M
# Vision towers take <= ~1500 px; the adapters allocate a [1, 3, side, side] float32 buffer (<= 200 MB).
MAX_IMAGE_SIDE = 4096
# LLaVA-1.5 uses 576 image tokens, LLaVA-NeXT up to 2880; the prompt repeats the image token this often
# before tokenizing, so an absurd count would be a huge string, not an error.
MAX_IMAGE_TOKENS = 16384
MAX_EOS_IDS = 64            # the tokenizer's EOS and the LLM config's: one id or a short list
MAX_NAME = 512              # tensor, signature, parameter and file names
MAX_TEXT = 1 << 16          # templates, notes, descriptions
MAX_WEIGHTS = 1 << 20       # entries of a Core ML package's weight map (one per parameter)
MAX_SIGNATURE_TENSORS = 64

# What the TFLite adapter feeds each decoder signature and reads back (runtime/tflite_runtime.py).
TFLITE_DECODER_INPUTS = ("inputs_embeds", "input_pos", "k_cache", "v_cache")
TFLITE_DECODER_OUTPUTS = ("logits", "k_cache", "v_cache")


class FieldProblem(ValueError):
    """A cross-field check's failure, with the field (relative to the model it is raised in) to blame,
    so the one-line error names the key as a type error would."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key = key


# -- error lines ---------------------------------------------------------------------------------------

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 2, 40, 40, 4, 4


def config_error(path: Path | str, key: str, reason: str) -> UserError:
    """The one-line error for a wrong `key` of the JSON file `path`."""
    line = f"{path}: {key}: {reason}; {FIX}"
    return UserError(" ".join(line.split()))  # one line whatever the parts hold


def _reason(error: dict) -> str:
    if error["type"] == "missing":
        return "missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":
        return message
    return f"{message}; got {_SHORT.repr(error.get('input'))}"


def _dotted(error: dict, prefix: str) -> str:
    parts = [prefix] if prefix else []
    # A union's tag ("<tiling spec>") is pydantic's, not a key of the file.
    parts += [str(part) for part in error["loc"] if part != "[key]" and not str(part).startswith("<")]
    problem = (error.get("ctx") or {}).get("error")
    if isinstance(problem, FieldProblem) and problem.key:
        parts.append(problem.key)
    return ".".join(parts) or "(top level)"


M = TypeVar("M", bound=BaseModel)


def parse_config(model_cls: type[M], data, path: Path | str, prefix: str = "") -> M:
    """`data` validated as `model_cls`, or a one-line UserError naming `path` and the first wrong key
    (`prefix` is where `data` sits in the file, e.g. "prompt")."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise config_error(path, _dotted(first, prefix), _reason(first)) from None


def read_runtime_config(artifact_dir: Path, name: str, kind: str, model_cls: type[M],
                        roles: tuple[str, ...], header: type[BaseModel] | None = None
                        ) -> tuple[dict, M, dict[str, Path], Path]:
    """(raw JSON, validated config, {role: file}, path) of an export's runtime config whose
    `model.<role>.filename` name its model files: every name contained in `artifact_dir` before anything
    else reads the config (artifacts.config_files), then `header` (the format and its version, so a file
    of another version is refused as such, not for the first key it lays out differently), then the
    whole file validated as `model_cls`."""
    from vlm_factory.artifacts import config_files, read_artifact_json

    raw, path = read_artifact_json(artifact_dir, name, kind)
    named = config_files(artifact_dir, raw, [f"model.{role}.filename" for role in roles], path)
    files = {role: named[f"model.{role}.filename"] for role in roles}
    if header is not None:
        parse_config(header, raw, path)
    return raw, parse_config(model_cls, raw, path), files, path


# -- field types ---------------------------------------------------------------------------------------

def _bounded(low: int, high: int):
    return Annotated[int, Field(ge=low, le=high)]


TokenId = Annotated[int, Field(ge=0, lt=MAX_VOCAB)]
Layers = _bounded(1, MAX_LAYERS)
Heads = _bounded(1, MAX_HEADS)
HeadSize = _bounded(1, MAX_HEAD_SIZE)
Hidden = _bounded(1, MAX_HIDDEN)
Vocab = _bounded(1, MAX_VOCAB)
Context = _bounded(1, MAX_CONTEXT)
Side = _bounded(1, MAX_IMAGE_SIDE)
ImageTokens = _bounded(1, MAX_IMAGE_TOKENS)
Channel = _bounded(0, 255)
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
FileName = Name  # contained in the artifact directory by paths.contained, not here
Text = Annotated[str, Field(max_length=MAX_TEXT)]
ImageSize = Annotated[list[Side], Field(min_length=2, max_length=2)]
Rgb = Annotated[list[Channel], Field(min_length=3, max_length=3)]


def _one_layer_placeholder(template: str) -> str:
    """A per-layer name pattern the adapter fills with `template % layer`: one %d and no other % directive."""
    if template.count("%d") != 1 or template.replace("%d", "").count("%"):
        raise ValueError(f"must hold exactly one %d and no other % directive; got {template[:60]!r}")
    return template


LayerTemplate = Annotated[Name, AfterValidator(_one_layer_placeholder)]


def _exactly(value: bool | int):
    """A field that must hold exactly `value`, of its type (a Literal would take 0 for false and 3.0 for 3)."""
    def check(found):
        if found != value:
            raise ValueError(f"must be {json.dumps(value)}")
        return found
    return Annotated[type(value), AfterValidator(check)]


RGB_CHANNELS = _exactly(3)   # the preprocessing makes RGB
FALSE = _exactly(False)
ONE = _exactly(1)


def _one_or_list(value):
    """`eos_token_id` (TFLite) is one id or a list; one id becomes a list of one."""
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


EosIds = Annotated[list[TokenId], BeforeValidator(_one_or_list), Field(max_length=MAX_EOS_IDS)]


class Schema(BaseModel):
    """Strict (no coercion), immutable; keys the runtime does not read are ignored."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")


ALLOW_MORE = ConfigDict(extra="allow")  # sections where an exporter records more than a runtime reads


# -- the prompt ----------------------------------------------------------------------------------------

def _tile_pattern(pattern: str) -> str:
    """A tile marker pattern the adapter fills with `pattern.format(row=r, col=c)`: exactly those two fields."""
    import string

    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(pattern) if field is not None]
    except ValueError as exc:
        raise ValueError(f"is not a format pattern ({exc}); got {pattern[:60]!r}") from None
    if sorted(fields) != ["col", "row"]:
        raise ValueError(f"must hold {{row}} and {{col}} once each and no other field; got {pattern[:60]!r}")
    return pattern


class ImageLayout(Schema):
    """The marker tokens around each view's image tokens (runtime/tiling.py `prompt_layout`), for families
    that cut images into tiles."""

    kind: Literal["idefics3_prompt"]
    image_token: Name
    fake_image_token: Name
    global_image_token: Name
    tile_token_pattern: Annotated[Name, AfterValidator(_tile_pattern)]
    tokens_per_tile: ImageTokens


class PromptSection(Schema):
    """The family's PromptSpec as exporters write it (`prompt` of every runtime config, and of a GGUF report)."""

    template: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
    image_token: Name
    image_token_repeat: ImageTokens
    answer: Text
    add_special_tokens: bool
    note: Text | None = None  # the steps in words, for app developers
    image_layout: ImageLayout | None = None

    @model_validator(mode="after")
    def _placeholders(self) -> PromptSection:
        if self.template.count("{question}") != 1:
            raise FieldProblem("template", "must hold '{question}' exactly once")
        if self.template.count(self.image_token) != 1:
            raise FieldProblem("image_token", f"{self.image_token[:40]!r} is not in the template exactly once")
        if "{answer}" not in self.answer:
            raise FieldProblem("answer", "must hold '{answer}'")
        layout = self.image_layout
        if layout is not None and layout.image_token != self.image_token:
            raise FieldProblem("image_layout.image_token", f"{layout.image_token[:40]!r}, but image_token is "
                                                           f"{self.image_token[:40]!r}")
        if layout is not None and layout.tokens_per_tile != self.image_token_repeat:
            raise FieldProblem("image_layout.tokens_per_tile", f"{layout.tokens_per_tile}, but image_token_repeat "
                                                               f"is {self.image_token_repeat}")
        return self

    def spec(self):
        """The families' PromptSpec (imported here: the families package loads torch and transformers)."""
        from vlm_factory.families.base import PromptSpec

        return PromptSpec(template=self.template, image_token=self.image_token,
                          image_token_repeat=self.image_token_repeat, answer=self.answer,
                          add_special_tokens=self.add_special_tokens,
                          image_layout=self.image_layout.model_dump() if self.image_layout else None)


# -- image preprocessing -------------------------------------------------------------------------------

class Resize(Schema):
    """`shortest_edge` (CLIP) or a fixed `height` and `width` (SigLIP); nothing else runtime/preprocess.py implements."""

    model_config = ConfigDict(extra="forbid")  # e.g. a `longest_edge` would be silently ignored otherwise

    shortest_edge: Side | None = None
    height: Side | None = None
    width: Side | None = None

    @model_validator(mode="after")
    def _one_form(self) -> Resize:
        sized = (self.height is not None, self.width is not None)
        if sized != ((False, False) if self.shortest_edge is not None else (True, True)):
            raise FieldProblem("", "must hold shortest_edge, or height and width")
        return self

    def of_square(self) -> tuple[int, int]:
        """(height, width) a square image is resized to."""
        if self.shortest_edge is not None:
            return self.shortest_edge, self.shortest_edge
        return self.height, self.width


class CropSize(Schema):
    model_config = ConfigDict(extra="forbid")

    height: Side
    width: Side


PixelMean = Annotated[float, Field(ge=0, le=255, allow_inf_nan=False)]
PixelStd = Annotated[float, Field(gt=0, le=255, allow_inf_nan=False)]  # a divisor: never 0


class Preprocessing(Schema):
    """The family's image preprocessing spec (families/llava.py `image_preprocessing`), as runtime/preprocess.py runs it."""

    convert_rgb: bool
    pad_to_square: bool
    pad_color: Rgb
    # Always set: the adapters take images of any size, and only a resize gives them the model's.
    resize: Resize
    resample: Literal["nearest", "bilinear", "bicubic"]
    center_crop: CropSize | None
    rescale_factor: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # 1/255, or 1 without rescaling
    mean: Annotated[list[PixelMean], Field(min_length=3, max_length=3)]
    std: Annotated[list[PixelStd], Field(min_length=3, max_length=3)]
    layout: Literal["NCHW"]     # what the adapters compute; a spec asking for more is not what they run
    dtype: Literal["float32"]

    @model_validator(mode="after")
    def _fixed_output(self) -> Preprocessing:
        if self.center_crop is None and self.resize.shortest_edge is not None and not self.pad_to_square:
            raise FieldProblem("center_crop", "a shortest_edge resize without pad_to_square or a centre crop "
                                              "leaves non-square images non-square")
        if self.center_crop is not None:
            height, width = self.resize.of_square()
            if self.center_crop.height > height or self.center_crop.width > width:
                raise FieldProblem("center_crop", f"{self.center_crop.height}x{self.center_crop.width} is larger "
                                                  f"than the resized image ({height}x{width})")
        return self

    def output_size(self) -> tuple[int, int]:
        """(height, width) of every preprocessed image (fixed: see `_fixed_output`)."""
        if self.center_crop is not None:
            return self.center_crop.height, self.center_crop.width
        return self.resize.of_square()


MAX_VIEWS = 1024  # tiles of one image: SmolVLM makes <= 17, a 4096 px image of 128 px tiles 1025 - 1


class Tiling(Schema):
    """An Idefics3/SmolVLM image split into tiles + a global view (runtime/tiling.py `tiling_spec`)."""

    kind: Literal["idefics3_tiling"]
    convert_rgb: bool
    resize_longest_edge: Side | None
    max_resolution: Side
    resample: Literal["nearest", "lanczos", "bilinear", "bicubic", "box", "hamming"]
    split: bool
    tile_size: Side
    rescale_factor: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    mean: Annotated[list[PixelMean], Field(min_length=3, max_length=3)]
    std: Annotated[list[PixelStd], Field(min_length=3, max_length=3)]
    pad_batch: bool
    layout: Literal["NCHW"]
    dtype: Literal["float32"]

    @model_validator(mode="after")
    def _bounded_views(self) -> Tiling:
        longest = min(self.resize_longest_edge or self.max_resolution, self.max_resolution)
        per_side = -(-longest // self.tile_size)
        if self.split and per_side * per_side + 1 > MAX_VIEWS:
            raise FieldProblem("tile_size", f"{self.tile_size} px tiles of a {longest} px image make "
                                            f"{per_side * per_side} tiles, more than {MAX_VIEWS - 1}")
        return self

    def output_size(self) -> tuple[int, int]:
        return self.tile_size, self.tile_size


def _preprocessing_kind(value) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return "<tiling spec>" if kind is not None else "<resize spec>"


ImagePreprocessing = Annotated[Union[Annotated[Preprocessing, Tag("<resize spec>")],
                                     Annotated[Tiling, Tag("<tiling spec>")]], Discriminator(_preprocessing_kind)]


class VisionSection(Schema):
    """What every runtime config says about the vision model's input."""

    image_size: ImageSize
    num_channels: RGB_CHANNELS
    preprocessing: ImagePreprocessing

    @model_validator(mode="after")
    def _preprocessing_fits(self) -> VisionSection:
        height, width = self.preprocessing.output_size()
        if [height, width] != self.image_size:
            raise FieldProblem("image_size", f"is {self.image_size}, but the preprocessing makes {height}x{width} "
                                             "images")
        return self


class VisionInputs(Schema):
    model_config = ALLOW_MORE
    pixel_values: Name


class VisionOutputs(Schema):
    model_config = ALLOW_MORE
    image_features: Name


class Search(Schema):
    """Generation settings an app follows; parity measured greedy decoding, so that is all an export may ask for."""

    model_config = ALLOW_MORE
    do_sample: FALSE
    num_beams: ONE
    max_new_tokens: Context
    max_length: Context


class LanguageModel(Schema):
    """What the TFLite config says about the LLM under `model`: its vocabulary, context and special token ids
    (the ONNX config's `OnnxModel` says the same under its own names)."""

    type: Text
    vocab_size: Vocab
    context_length: Context
    bos_token_id: TokenId | None
    eos_token_id: EosIds
    pad_token_id: TokenId | None
    image_token_id: TokenId

    def _check_token_ids(self) -> None:
        _check_ids_below_vocabulary(self, ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_id"))


def _check_ids_below_vocabulary(model, keys: tuple[str, ...]) -> None:
    """Every special token id (an id, a list of ids or None) of these keys below the model's `vocab_size`."""
    for key in keys:
        value = getattr(model, key)
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token >= model.vocab_size:
                raise FieldProblem(key, f"{token} is not below vocab_size {model.vocab_size}")


def _check_prompt_and_search(config) -> None:
    """A runtime config's prompt repeats the image token as often as its vision model makes features, and
    its generation settings fit the model's context."""
    if config.model.vision.num_image_tokens != config.prompt.image_token_repeat:
        raise FieldProblem("model.vision.num_image_tokens",
                           f"{config.model.vision.num_image_tokens}, but prompt.image_token_repeat is "
                           f"{config.prompt.image_token_repeat}")
    if config.search.max_length > config.model.context_length:
        raise FieldProblem("search.max_length", f"{config.search.max_length} is beyond model.context_length "
                                                f"{config.model.context_length}")


# -- onnx_config.json (ONNX) -----------------------------------------------------------------------------
# The ONNX package's own format: export/onnx_graphs.py documents the contract and writes it. A reader that
# meets another `format` or a `schema_version` it does not know refuses the file rather than guess.

ONNX_CONFIG = "onnx_config.json"
ONNX_FORMAT = "vlm-factory-onnx"
ONNX_SCHEMA_VERSION = 1
# The symbolic dims the contract names (the graphs' own dim names, except total_sequence, which the
# exporter spells `past_sequence + sequence` in the present outputs).
BATCH, SEQUENCE, PAST_SEQUENCE, TOTAL_SEQUENCE = "batch", "sequence", "past_sequence", "total_sequence"
MAX_RANK = 8  # the contract's tensors have 2 to 4 dims
ONNX_DTYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}  # contract dtype -> onnxruntime's name


def _onnx_format(value: str) -> str:
    if value != ONNX_FORMAT:
        raise ValueError(f"{value[:60]!r} is not {ONNX_FORMAT!r}: not an ONNX package this runtime reads")
    return value


def _known_onnx_version(value: int) -> int:
    if value != ONNX_SCHEMA_VERSION:
        raise ValueError(f"{value} is not a schema version this runtime reads (it reads {ONNX_SCHEMA_VERSION} "
                         "only): export the package with this vlm-factory, or read it with the one that wrote it")
    return value


class OnnxHeader(Schema):
    """What a reader checks before anything else: the file is this format, at a version it knows."""

    format: Annotated[str, Field(max_length=MAX_NAME), AfterValidator(_onnx_format)]
    schema_version: Annotated[int, AfterValidator(_known_onnx_version)]


class Tensor(Schema):
    """One graph input or output: its name in the graph, its element type and its shape (an int is a fixed
    size, a string a symbolic dim). What each must be is the contract's (`OnnxModel.contract`)."""

    name: Name
    dtype: Literal["float32", "int64"]
    shape: Annotated[list, Field(min_length=1, max_length=MAX_RANK)]


class LayerTensor(Tensor):
    """The per-layer cache tensors: `name` holds one %d, the layer index (0 .. num_hidden_layers - 1)."""

    name: LayerTemplate


class OnnxVisionInputs(Schema):
    pixel_values: Tensor


class OnnxVisionOutputs(Schema):
    image_features: Tensor


class OnnxVision(VisionSection):
    filename: FileName
    num_image_tokens: ImageTokens
    inputs: OnnxVisionInputs
    outputs: OnnxVisionOutputs
    precision: Text | None = None        # written per tier (export/onnx_export.py); a record, never read
    ort_filename: FileName | None = None  # the same graph for ONNX Runtime Mobile; the runtime opens the .onnx


class EmbeddingInputs(Schema):
    input_ids: Tensor


class EmbeddingOutputs(Schema):
    inputs_embeds: Tensor


class OnnxEmbedding(Schema):
    filename: FileName
    inputs: EmbeddingInputs
    outputs: EmbeddingOutputs
    precision: Text | None = None
    ort_filename: FileName | None = None


def _check_distinct(model, keys: tuple[str, ...]) -> None:
    """No two of these tensors named alike: the adapter would feed one tensor for two inputs."""
    seen: dict[str, str] = {}
    for key in keys:
        value = getattr(model, key).name
        if value in seen:
            raise FieldProblem(f"{key}.name", f"{value[:60]!r} is also {seen[value]}.name")
        seen[value] = key


class DecoderInputs(Schema):
    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    past_key: LayerTensor
    past_value: LayerTensor

    @model_validator(mode="after")
    def _distinct(self) -> DecoderInputs:
        _check_distinct(self, ("inputs_embeds", "attention_mask", "position_ids", "past_key", "past_value"))
        return self


class DecoderOutputs(Schema):
    logits: Tensor
    present_key: LayerTensor
    present_value: LayerTensor

    @model_validator(mode="after")
    def _distinct(self) -> DecoderOutputs:
        _check_distinct(self, ("logits", "present_key", "present_value"))
        return self


class OnnxDecoder(Schema):
    filename: FileName
    hidden_size: Hidden
    head_size: HeadSize
    num_attention_heads: Heads
    num_key_value_heads: Heads
    num_hidden_layers: Layers
    inputs: DecoderInputs
    outputs: DecoderOutputs
    precision: Text | None = None
    ort_filename: FileName | None = None

    @model_validator(mode="after")
    def _grouped_heads(self) -> OnnxDecoder:
        if self.num_attention_heads % self.num_key_value_heads:
            raise FieldProblem("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                                                      f"num_attention_heads {self.num_attention_heads}")
        return self

    def _layer_names(self, first: LayerTensor, second: LayerTensor) -> list[str]:
        return [tensor.name % layer for layer in range(self.num_hidden_layers) for tensor in (first, second)]

    def past_names(self) -> list[str]:
        """The cache inputs in the graph's order: layer 0 key, layer 0 value, layer 1 key, ..."""
        return self._layer_names(self.inputs.past_key, self.inputs.past_value)

    def present_names(self) -> list[str]:
        return self._layer_names(self.outputs.present_key, self.outputs.present_value)


# A fixed size in the contract: its value and the key of the config it comes from (named in errors).
Size = tuple[int, str]


@dataclass(frozen=True)
class TensorContract:
    """What the contract says one config tensor is: `key` is its dotted key, `role` its graph."""

    key: str
    role: Literal["vision", "embedding", "decoder"]
    output: bool
    tensor: Tensor
    dtype: str
    shape: tuple[str | Size, ...]

    @property
    def per_layer(self) -> bool:
        return isinstance(self.tensor, LayerTensor)

    def names(self, layers: int) -> list[str]:
        """The graph's names for it: one, or one per layer for a cache tensor."""
        if self.per_layer:
            return [self.tensor.name % layer for layer in range(layers)]
        return [self.tensor.name]


def _same(found, expected) -> bool:
    return type(found) is type(expected) and found == expected  # JSON true is not the size 1


class OnnxModel(Schema):
    """`model`: the LLM's vocabulary, context and special token ids, and the three graphs."""

    family: Name  # the model family that exported it (families/): a label, nothing reads it
    vocab_size: Vocab
    context_length: Context
    bos_token_id: TokenId | None
    eos_token_ids: Annotated[list[TokenId], Field(max_length=MAX_EOS_IDS)]
    pad_token_id: TokenId | None
    image_token_id: TokenId
    vision: OnnxVision
    embedding: OnnxEmbedding
    decoder: OnnxDecoder

    def contract(self) -> list[TensorContract]:
        """Every tensor of the three graphs with the dtype and shape the contract gives it."""
        vision, embedding, decoder = self.vision, self.embedding, self.decoder
        height, width = vision.image_size
        hidden: Size = (decoder.hidden_size, "model.decoder.hidden_size")

        def cache(length: str) -> tuple:
            return (BATCH, (decoder.num_key_value_heads, "model.decoder.num_key_value_heads"), length,
                    (decoder.head_size, "model.decoder.head_size"))

        float32, int64 = "float32", "int64"
        rows = [
            ("vision", False, "pixel_values", vision.inputs.pixel_values, float32,
             (BATCH, (vision.num_channels, "model.vision.num_channels"), (height, "model.vision.image_size"),
              (width, "model.vision.image_size"))),
            ("vision", True, "image_features", vision.outputs.image_features, float32,
             (BATCH, (vision.num_image_tokens, "model.vision.num_image_tokens"), hidden)),
            ("embedding", False, "input_ids", embedding.inputs.input_ids, int64, (BATCH, SEQUENCE)),
            ("embedding", True, "inputs_embeds", embedding.outputs.inputs_embeds, float32, (BATCH, SEQUENCE, hidden)),
            ("decoder", False, "inputs_embeds", decoder.inputs.inputs_embeds, float32, (BATCH, SEQUENCE, hidden)),
            ("decoder", False, "attention_mask", decoder.inputs.attention_mask, int64, (BATCH, TOTAL_SEQUENCE)),
            ("decoder", False, "position_ids", decoder.inputs.position_ids, int64, (BATCH, SEQUENCE)),
            ("decoder", False, "past_key", decoder.inputs.past_key, float32, cache(PAST_SEQUENCE)),
            ("decoder", False, "past_value", decoder.inputs.past_value, float32, cache(PAST_SEQUENCE)),
            ("decoder", True, "logits", decoder.outputs.logits, float32,
             (BATCH, SEQUENCE, (self.vocab_size, "model.vocab_size"))),
            ("decoder", True, "present_key", decoder.outputs.present_key, float32, cache(TOTAL_SEQUENCE)),
            ("decoder", True, "present_value", decoder.outputs.present_value, float32, cache(TOTAL_SEQUENCE)),
        ]
        return [TensorContract(f"model.{role}.{'outputs' if output else 'inputs'}.{name}", role, output, tensor,
                               dtype, shape) for role, output, name, tensor, dtype, shape in rows]

    @model_validator(mode="after")
    def _consistent(self) -> OnnxModel:
        _check_ids_below_vocabulary(self, ("bos_token_id", "eos_token_ids", "pad_token_id", "image_token_id"))
        for entry in self.contract():
            key = entry.key.removeprefix("model.")  # relative to this section, as the error line adds `model`
            if entry.tensor.dtype != entry.dtype:
                raise FieldProblem(f"{key}.dtype", f"{entry.tensor.dtype!r}, but the contract says {entry.dtype!r}")
            shape = entry.tensor.shape
            if len(shape) != len(entry.shape):
                raise FieldProblem(f"{key}.shape", f"has {len(shape)} dims, the contract says {len(entry.shape)}")
            for axis, (found, expected) in enumerate(zip(shape, entry.shape)):
                if isinstance(expected, str) and not _same(found, expected):
                    raise FieldProblem(f"{key}.shape.{axis}", f"{_SHORT.repr(found)}, but the contract names this "
                                                              f"dim {expected!r}")
                if isinstance(expected, tuple) and not _same(found, expected[0]):
                    raise FieldProblem(f"{key}.shape.{axis}", f"{_SHORT.repr(found)}, but {expected[1]} is "
                                                              f"{expected[0]}")
        return self


class Generation(Schema):
    """How the answer is decoded: greedily (parity measured that and nothing else), at most max_new_tokens."""

    do_sample: FALSE
    num_beams: ONE
    max_new_tokens: Context


class OnnxConfig(Schema):
    """onnx_config.json as export/onnx_graphs.py `onnx_config` writes it (and onnx_export.py extends it)."""

    format: Annotated[str, Field(max_length=MAX_NAME), AfterValidator(_onnx_format)]
    schema_version: Annotated[int, AfterValidator(_known_onnx_version)]
    model: OnnxModel
    prompt: PromptSection
    generation: Generation

    @model_validator(mode="after")
    def _consistent(self) -> OnnxConfig:
        if self.model.vision.num_image_tokens != self.prompt.image_token_repeat:
            raise FieldProblem("model.vision.num_image_tokens",
                               f"{self.model.vision.num_image_tokens}, but prompt.image_token_repeat is "
                               f"{self.prompt.image_token_repeat}")
        if self.generation.max_new_tokens >= self.model.context_length:
            raise FieldProblem("generation.max_new_tokens", f"{self.generation.max_new_tokens} leaves no room for "
                                                            f"the prompt in model.context_length "
                                                            f"{self.model.context_length}")
        return self


# -- tflite_config.json --------------------------------------------------------------------------------

class TfliteVision(VisionSection):
    filename: FileName
    signature: Name
    num_image_tokens: ImageTokens
    inputs: VisionInputs
    outputs: VisionOutputs


class TfliteEmbedding(Schema):
    filename: FileName
    format: Literal["npy"]
    dtype: Literal["float16", "float32"]
    shape: Annotated[list[Vocab], Field(min_length=2, max_length=2)]  # [vocab, hidden]


class SignatureTensors(Schema):
    inputs: Annotated[list[Name], Field(min_length=1, max_length=MAX_SIGNATURE_TENSORS)]
    outputs: Annotated[list[Name], Field(min_length=1, max_length=MAX_SIGNATURE_TENSORS)]

    @model_validator(mode="after")
    def _what_the_adapter_uses(self) -> SignatureTensors:
        if sorted(self.inputs) != sorted(TFLITE_DECODER_INPUTS):
            raise FieldProblem(_first_stranger("inputs", self.inputs, TFLITE_DECODER_INPUTS),
                               f"must be {', '.join(TFLITE_DECODER_INPUTS)} (what the runtime feeds)")
        if not set(TFLITE_DECODER_OUTPUTS) <= set(self.outputs):
            raise FieldProblem(_first_stranger("outputs", self.outputs, TFLITE_DECODER_OUTPUTS),
                               f"must hold {', '.join(TFLITE_DECODER_OUTPUTS)} (what the runtime reads)")
        return self


def _first_stranger(key: str, names: list[str], known: tuple[str, ...]) -> str:
    """`key.<index>` of the first name not in `known` (the one to blame), else `key` (one is missing)."""
    return next((f"{key}.{index}" for index, name in enumerate(names) if name not in known), key)


class TfliteSignatures(Schema):
    prefill: SignatureTensors
    decode: SignatureTensors


class TfliteDecoder(Schema):
    filename: FileName
    hidden_size: Hidden
    max_context: Context
    prefill_length: Context
    kv_cache_shape: Annotated[list[Context], Field(min_length=4, max_length=4)]  # [layers, kv heads, context, head]
    kv_cache_dtype: Literal["float32"]
    signatures: TfliteSignatures
    input_pos_dtype: Literal["int32"]
    note: Text

    @model_validator(mode="after")
    def _cache(self) -> TfliteDecoder:
        layers, heads, context, head_size = self.kv_cache_shape
        if layers > MAX_LAYERS or heads > MAX_HEADS or head_size > MAX_HEAD_SIZE:
            raise FieldProblem("kv_cache_shape", f"{self.kv_cache_shape} is beyond {MAX_LAYERS} layers, "
                                                 f"{MAX_HEADS} heads or head size {MAX_HEAD_SIZE}")
        if context != self.max_context:
            raise FieldProblem("kv_cache_shape", f"holds {context} positions, max_context is {self.max_context}")
        if self.prefill_length > self.max_context:
            raise FieldProblem("prefill_length", f"{self.prefill_length} is beyond max_context {self.max_context}")
        return self


TflitePrecision = Literal["fp32", "fp16", "int8"]


class TfliteComponents(Schema):
    vision: TflitePrecision
    projector: TflitePrecision
    llm: TflitePrecision


class TfliteModel(LanguageModel):
    variant: Text
    precision: TflitePrecision  # the target's setting; each component's is in `components`
    components: TfliteComponents
    vision: TfliteVision
    embedding: TfliteEmbedding
    decoder: TfliteDecoder

    @model_validator(mode="after")
    def _consistent(self) -> TfliteModel:
        if self.context_length != self.decoder.max_context:
            raise FieldProblem("context_length", f"{self.context_length}, but decoder.max_context is "
                                                 f"{self.decoder.max_context}")
        if self.embedding.shape != [self.vocab_size, self.decoder.hidden_size]:
            raise FieldProblem("embedding.shape", f"{self.embedding.shape}, not [vocab_size, decoder.hidden_size] = "
                                                  f"{[self.vocab_size, self.decoder.hidden_size]}")
        llm = self.components.llm
        expected_dtype = "float32" if llm == "fp32" else "float16"  # the table is the llm's, float16 unless fp32
        if self.embedding.dtype != expected_dtype:
            raise FieldProblem("embedding.dtype", f"{self.embedding.dtype}, but an export with an {llm} llm keeps "
                                                  f"{expected_dtype}")
        self._check_token_ids()
        return self


class TfliteConfig(Schema):
    """tflite_config.json as export/tflite_export.py `tflite_config` writes it."""

    model: TfliteModel
    prompt: PromptSection
    search: Search

    @model_validator(mode="after")
    def _consistent(self) -> TfliteConfig:
        _check_prompt_and_search(self)
        return self


# -- coreml_config.json --------------------------------------------------------------------------------

class CoremlVision(VisionSection):
    package: FileName


class PackageEntry(Schema):
    file: FileName
    weights: Annotated[dict[Name, Name], Field(min_length=1, max_length=MAX_WEIGHTS)]  # MIL const -> parameter


class Packages(Schema):
    model_config = ConfigDict(extra="forbid")  # the adapter reads every role listed; these are the two there are
    vision: PackageEntry
    text: PackageEntry


class OutputProjection(Schema):
    package: Literal["vision", "text"]
    weight: Name
    tied_to: Name


class CoremlEmbedding(Schema):
    file: FileName
    parameter: Name
    dtype: Literal["float32"]
    palettized: FALSE  # the adapter and apps look rows up in a float table


class CoremlConfig(Schema):
    """coreml_config.json as export/coreml_export.py `export_coreml` writes it."""

    format: Literal["coreml"]
    family: Name
    variant: Text
    max_context: Context
    image_size: Side
    image_tokens: ImageTokens
    image_token_id: TokenId
    eos_token_id: TokenId | None
    vision: CoremlVision
    preprocessing_text: Text
    prompt: PromptSection
    packages: Packages
    output_projection: OutputProjection | None
    constant_parameters: Annotated[dict[Name, Annotated[float, Field(allow_inf_nan=False)]],
                                   Field(max_length=MAX_WEIGHTS)]
    unused_parameters: Annotated[list[Name], Field(max_length=MAX_WEIGHTS)]
    embedding: CoremlEmbedding

    @model_validator(mode="after")
    def _consistent(self) -> CoremlConfig:
        if self.vision.image_size != [self.image_size, self.image_size]:
            raise FieldProblem("image_size", f"{self.image_size}, but vision.image_size is {self.vision.image_size}")
        if self.image_tokens != self.prompt.image_token_repeat:
            raise FieldProblem("image_tokens", f"{self.image_tokens}, but prompt.image_token_repeat is "
                                               f"{self.prompt.image_token_repeat}")
        if self.vision.package != self.packages.vision.file:
            raise FieldProblem("vision.package", f"{self.vision.package!r}, but packages.vision.file is "
                                                 f"{self.packages.vision.file!r}")
        return self


# -- export_report.json --------------------------------------------------------------------------------

class ReportFile(Schema):
    model_config = ALLOW_MORE
    file: FileName


class ExportReport(Schema):
    """The parts of an export report that code reads back: the format, each file's name, GGUF's prompt, tools."""

    model_config = ALLOW_MORE
    format: Literal[FORMATS]  # type: ignore[valid-type]
    files: Annotated[dict[Name, ReportFile], Field(min_length=1, max_length=64)]
    prompt: PromptSection | None = None  # GGUF only: llama.cpp takes the prompt from nowhere else
    tools: dict[Name, Text | None] = {}  # publish/bundle.py copies them into the release manifest

    @model_validator(mode="after")
    def _gguf_needs(self) -> ExportReport:
        # GGUF's runtime opens these two; its prompt is required where it is read (runtime/open.py).
        if self.format == "gguf":
            for role in ("llm", "mmproj"):
                if role not in self.files:
                    raise FieldProblem(f"files.{role}", "missing")
        return self
