"""What every model family answers, so exporters, runtimes, training and the budget never guess.

A family (one module each: llava.py, ...) is registered by the HF `model_type` of its checkpoints
(registry.py). An instance is bound to one checkpoint's config and answers in three vocabularies:

- facts: normalised numbers of the LLM (`TextFacts`) and the vision tower (`VisionFacts`), the way
  optimum's NormalizedConfig maps each model's own keys onto common names;
- torch: where the tower, connector and LLM live in a loaded model and how to call them
  (`image_features`, `decoder_parts`, `merge_image_features`, ...);
- files: which checkpoint tensors belong to which component, the preprocessing spec and the prompt
  layout every runtime config is written from, and the llama.cpp names of the model's parts.

A (family, format) pair is either supported or refused with a reason (`format_refusal`), checked
before any work starts. A config whose numbers no real checkpoint has (a zero patch, a billion layers,
heads that do not divide) is refused when a family is bound to it (`validate`, bounds in facts_bounds.py),
in one line naming config.json and the key; `check_config_json` applies the same rules to config.json
before transformers reads it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from vlm_factory.errors import UserError

FORMATS = ("gguf", "onnx", "coreml", "tflite")
# The parts of a VLM a precision is chosen for (per-component settings, attribution, search), in
# pipeline order. "projector" is what CheckpointKey calls the connector.
COMPONENTS = ("vision", "projector", "llm")


@dataclass(frozen=True)
class TextFacts:
    """The LLM, normalised: what a decoder exporter or the budget needs, whatever the config calls it."""

    arch: str                 # decoder flavour: "llama" | "qwen2" (llama.cpp's LLM arch of the same name)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool
    tied_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VisionFacts:
    """The vision tower, normalised."""

    tower: str                # "siglip" | "clip"
    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    hidden_act: str
    has_cls_token: bool
    feature_layer: int        # non-negative index into hidden_states (0 = the embeddings)
    drop_cls: bool            # the connector sees patches only

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PromptSpec:
    """The model's own prompt for one image and one question, as plain text a device can fill in.

    `template` holds `{question}` and one `image_token`; a runtime repeats the image token
    `image_token_repeat` times per view of the image (or hands the image to its own media marker) and
    tokenizes with `add_special_tokens` (the BOS a checkpoint's tokenizer adds, or not). `answer` holds
    `{answer}`: what follows the prompt in training, up to and including the end-of-turn token.

    `image_layout` is set by families that cut an image into tiles (Idefics3/SmolVLM): the marker tokens
    around each tile's block (runtime/tiling.py `prompt_layout`); the expansion then depends on the
    image's grid of tiles (`rows`, `cols`; 0, 0 for an image that was not split).
    """

    template: str
    image_token: str
    image_token_repeat: int
    answer: str
    add_special_tokens: bool = True
    image_layout: dict | None = None

    def render(self, question: str) -> str:
        """The prompt with the question in and a single image token (for runtimes with media markers)."""
        return self.template.replace("{question}", question.strip())

    def image_text(self, rows: int = 0, cols: int = 0) -> str:
        """What the processor puts in place of the prompt's one image token, for an image of rows x cols tiles."""
        if self.image_layout is None:
            return self.image_token * self.image_token_repeat
        from vlm_factory.runtime.tiling import expand_image_tokens

        return expand_image_tokens(rows, cols, self.image_token_repeat, self.image_layout)

    def expanded(self, question: str, rows: int = 0, cols: int = 0) -> str:
        """The prompt with one image token per visual token, as the model's processor expands it."""
        return self.render(question).replace(self.image_token, self.image_text(rows, cols), 1)

    def answer_text(self, answer: str) -> str:
        return self.answer.replace("{answer}", answer.strip())

    def as_dict(self) -> dict[str, Any]:
        """What exporters write as a config's `prompt`; no `image_layout` key for a family that does not cut
        images (its configs stay as they were before tiling existed; the key is optional when read back)."""
        data = asdict(self)
        if data["image_layout"] is None:
            del data["image_layout"]
        return data


@dataclass(frozen=True)
class CheckpointKey:
    """One safetensors key of a checkpoint, placed in a component under the component's own name.

    `local` is the name the tensor has in the component's HF module: `model.layers.0.mlp.up_proj.weight`
    or `lm_head.weight` for the LLM (a *ForCausalLM state dict), `embeddings.patch_embedding.weight` for
    the tower (a *VisionTransformer state dict), `linear_1.weight` for the connector.
    """

    component: str            # "llm" | "vision" | "connector"
    local: str


class ModelFamily(ABC):
    """Base of every family; one instance per checkpoint config (see registry.family_for)."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    description: ClassVar[str]
    # format -> None (supported) or why this family is refused there, for every checkpoint of it.
    format_support: ClassVar[dict[str, str | None]]
    # format -> a caveat shown in the support matrix; and checkpoint variants refused for every format.
    format_notes: ClassVar[dict[str, str]] = {}
    variants_refused: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config, source: Path | str | None = None):
        self.config = config
        self.source = str(source) if source is not None else "model config"
        # What errors about the config's values name: the file a user edits.
        self.config_file = str(Path(source) / "config.json") if source is not None else "config.json"
        self.validate()

    @classmethod
    def config_class(cls):
        """The class that reads this family's config.json (transformers' AutoConfig unless the family brings
        its own model code, as MobileVLM does)."""
        from transformers import AutoConfig

        return AutoConfig

    # -- bounds ---------------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def check_config_json(cls, raw: dict, where: str) -> None:
        """Refuse, in one line naming `where` and the key, a value of config.json (parsed, not yet read by
        transformers) of the wrong JSON type or out of bounds (see facts_bounds.py)."""

    @abstractmethod
    def validate(self) -> None:
        """Refuse a bound config whose facts are out of bounds or disagree with each other, in one line
        naming config.json and the key to edit. Runs when the family is bound, before any model is built."""

    # -- identity -----------------------------------------------------------------------------------

    @property
    @abstractmethod
    def variant(self) -> str:
        """A short description of this checkpoint's parts, e.g. 'siglip + mlp + qwen2'."""

    def format_refusal(self, fmt: str) -> str | None:
        """Why this checkpoint cannot go to `fmt` (None: it can). Subclasses add per-variant reasons."""
        if fmt not in FORMATS:
            return f"unknown format (known: {', '.join(FORMATS)})"
        return self.format_support.get(fmt, "no exporter registered")

    def known_issue(self, fmt: str) -> str | None:
        """A defect of `fmt`'s runtime this checkpoint is known to hit: exported anyway, the gate measures it,
        and a failed verdict names it. None when there is none."""
        return None

    def require_format(self, fmt: str) -> None:
        """Refuse an unsupported (family, format) pair in one line, before any work starts."""
        reason = self.format_refusal(fmt)
        if reason is not None:
            supported = [f for f in FORMATS if self.format_refusal(f) is None]
            raise UserError(f"{self.source}: model family {self.name!r} ({self.variant}) cannot be exported to "
                            f"{fmt}: {reason}; supported here: {', '.join(supported) or 'none'}")

    # -- facts ----------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def text(self) -> TextFacts: ...

    @property
    @abstractmethod
    def vision(self) -> VisionFacts: ...

    @property
    @abstractmethod
    def image_tokens(self) -> int:
        """Visual tokens one view of an image adds to the LLM's context (a family without tiles: one view
        per image)."""

    def largest_grid(self, processor=None) -> tuple[int, int]:
        """The most tiles (rows, cols) the processor cuts one image into; (0, 0): images are not cut."""
        return 0, 0

    def max_views(self, processor=None) -> int:
        """The most views (tiles + the global image) one image can become."""
        rows, cols = self.largest_grid(processor)
        return rows * cols + 1 if rows * cols else 1

    def visual_tokens(self, processor=None) -> int:
        """The most visual tokens one image adds to the context: what the budget plans for."""
        return self.max_views(processor) * self.image_tokens

    @property
    @abstractmethod
    def image_token_id(self) -> int: ...

    @property
    @abstractmethod
    def connector_type(self) -> str:
        """The connector, as llama.cpp's mmproj names its projector type (e.g. 'mlp')."""

    @abstractmethod
    def param_counts(self) -> dict[str, int]:
        """Exact parameters by part, from the config alone (the budget planner's input):
        vision_tower, projector, llm_embeddings, llm_lm_head (0 when tied), llm_rest."""

    # -- torch ------------------------------------------------------------------------------------------

    @abstractmethod
    def load(self, path: Path) -> tuple[Any, Any]:
        """(model in float32, eval mode; processor) from an HF directory of safetensors."""

    @abstractmethod
    def load_processor(self, path: Path):
        """The checkpoint's processor alone (tokenizer, image processor, chat template)."""

    @abstractmethod
    def empty_model(self):
        """A randomly initialised model of this config (weights to be filled in by the caller)."""

    @abstractmethod
    def tower_features(self, model, pixel_values):
        """[batch, tokens, vision hidden]: what the connector reads (frozen, cacheable in training)."""

    @abstractmethod
    def project(self, model, features):
        """[batch, tokens, text hidden]: the connector applied to tower features."""

    def image_features(self, model, pixel_values):
        """[views, image tokens, text hidden]: what replaces the image tokens of a prompt, view by view
        (`pixel_values` [views, 3, H, W]: one per image, or every tile of `image_views`)."""
        return self.project(model, self.tower_features(model, pixel_values))

    def image_views(self, image_processor, images) -> list["ImageViews"]:
        """Each image as the reference processor prepares it: pixels [views, 3, H, W] and its tile grid."""
        pixels = image_processor(list(images), return_tensors="pt").pixel_values
        return [ImageViews(pixels[i:i + 1], 0, 0) for i in range(len(images))]

    def view_rectangles(self, image_processor, width: int, height: int, rows: int = 0,
                        cols: int = 0) -> list[tuple[float, float, float, float]]:
        """Where each view of a `width` x `height` image (as `image_views` makes them) lies in the image:
        (x0, y0, x1, y1) in the image's normalised coordinates, beyond [0, 1) where a view shows padding.
        One view: the letterboxed square (pad-to-square processors), else the centre-cropped one."""
        side = max(width, height) if getattr(image_processor, "do_pad", False) else min(width, height)
        x0, y0 = (width - side) / 2 / width, (height - side) / 2 / height
        return [(x0, y0, x0 + side / width, y0 + side / height)]

    def generation_pixels(self, views: list["ImageViews"]) -> dict:
        """The keyword arguments the model's `generate` takes for a batch of images with equal view counts."""
        import torch

        return {"pixel_values": torch.cat([v.pixel_values for v in views])}

    def alternative_preprocessing(self, image_processor) -> tuple[str, str, Any] | None:
        """(name, gain metric name, image processor) of the preprocessing the reference eval measures
        against the model's own, to show what getting it wrong costs; None when there is none."""
        return None

    @abstractmethod
    def connector(self, model):
        """The connector module (what projector fine-tuning trains)."""

    @abstractmethod
    def connector_output_layer(self, model):
        """The connector's last nn.Linear, whose scale sets the norm of image embeddings."""

    @abstractmethod
    def decoder_parts(self, model) -> "DecoderParts":
        """The LLM split as a static-cache decoder or a graph exporter needs it."""

    @abstractmethod
    def input_embeddings(self, model):
        """The token-embedding module."""

    def merge_image_features(self, model, input_ids, image_embeds):
        """Token embeddings with each image-token position replaced by one image feature, in order."""
        embeds = self.input_embeddings(model)(input_ids)
        mask = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        n_slots = int(mask[..., 0].sum())
        if n_slots != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ValueError(f"prompt has {n_slots} image tokens but {image_embeds.shape[0]} images of "
                             f"{image_embeds.shape[1]} features were given")
        return embeds.masked_scatter(mask, image_embeds.to(embeds.dtype))

    @property
    @abstractmethod
    def llm_module_pattern(self) -> str:
        """Regex of the LLM's attention projections (LoRA targets) in the loaded model."""

    # -- files --------------------------------------------------------------------------------------------

    @abstractmethod
    def checkpoint_key(self, key: str) -> CheckpointKey | None:
        """Place a safetensors key in its component (None: not part of what is exported)."""

    def component_of(self, name: str) -> str | None:
        """"vision" | "projector" | "llm" for a parameter name or a module path of the loaded model (the
        names torch and the exporters' metadata carry), None for what belongs to no component. The loaded
        model's names take the same prefixes as the checkpoint's keys, so `checkpoint_key` decides."""
        placed = self.checkpoint_key(name if name.endswith(".") else name + ".")
        if placed is None:
            return None
        return "projector" if placed.component == "connector" else placed.component

    @abstractmethod
    def preprocessing(self, processor) -> dict:
        """The image preprocessing as plain data (see runtime/preprocess.py), from the processor's config."""

    @abstractmethod
    def prompt(self, processor) -> PromptSpec:
        """The prompt layout, from the checkpoint's own chat template."""

    def summary(self) -> dict:
        """What reports and model cards say about the model."""
        return {"family": self.name, "variant": self.variant, "image_tokens": self.image_tokens,
                "text": self.text.as_dict(), "vision": self.vision.as_dict(), "connector": self.connector_type}


@dataclass(frozen=True)
class ImageViews:
    """One image as the vision tower takes it: `pixel_values` [views, 3, H, W] (torch or numpy) and the
    grid of tiles (`rows`, `cols`; 0, 0 when the image is one view) the prompt's expansion follows."""

    pixel_values: Any
    rows: int = 0
    cols: int = 0

    @property
    def count(self) -> int:
        return int(self.pixel_values.shape[0])


@dataclass
class DecoderParts:
    """The LLM of a loaded model, as exporters need it.

    `core` is the HF decoder stack (called with inputs_embeds, attention_mask, position_ids,
    past_key_values); `layers` its blocks, each with `input_layernorm`, `self_attn.{q,k,v,o}_proj`,
    `post_attention_layernorm` and `mlp` (the layout Llama, Mistral and Qwen2 share); `norm` the final
    norm; `lm_head` the output projection (the embedding table itself when tied); `rotary` the rotary
    embedding module (its `inv_freq` and `attention_scaling`).
    """

    core: Any
    embed_tokens: Any
    layers: Any
    norm: Any
    lm_head: Any
    rotary: Any
    facts: TextFacts
