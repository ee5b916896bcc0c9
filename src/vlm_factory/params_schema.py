"""Typed schema of params.yaml: one dataclass per section (see config.py for loading and composing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

FORMATS = ("gguf", "onnx", "coreml", "tflite")


@dataclass
class ArchitectureConfig:
    # llava (SigLIP + MLP + Llama) | mobilevlm (CLIP + LDPv2 + Llama: its tower's feature layer is the
    # second-to-last, and 2x2 pooling leaves (image_size / patch_size / 2)^2 image tokens) | idefics3
    # (SmolVLM: SigLIP-style tower on image_size tiles, pixel shuffle, linear connector, Llama)
    family: str = "llava"
    image_size: int = 64  # the tower's input: the whole (letterboxed) image, or one idefics3 tile
    patch_size: int = 16
    vision_hidden: int = 256
    vision_intermediate: int = 512
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 256
    text_intermediate: int = 768
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 4
    vocab_size: int = 512
    max_positions: int = 256
    # idefics3 only: pixel shuffle folds scale_factor x scale_factor patches into one token, and an image is
    # resized to tiles_per_side tiles on its longest side (cut into tiles, plus the whole image as one tile).
    scale_factor: int = 2
    tiles_per_side: int = 2


@dataclass
class PretrainConfig:
    seed: int = 1234
    n_images: int = 24000
    questions_per_image: int = 4
    cell_px: int = 32
    steps: int = 5000
    batch_images: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    eval_images: int = 540
    eval_every: int = 500


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = "local"
    path: Optional[str] = None
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    architecture: Optional[ArchitectureConfig] = None
    pretrain: Optional[PretrainConfig] = None


@dataclass
class DataConfig:
    source: str = "synthetic"
    seed: int = 0
    cell_px: int = 32
    train_images: int = 6000
    train_questions_per_image: int = 4
    eval_images: int = 540
    eval_questions_per_image: int = 2
    hub_dataset: Optional[str] = None
    hub_revision: Optional[str] = None
    local_path: Optional[str] = None
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "eval": "validation"})
    max_questions: Optional[dict[str, int]] = None


@dataclass
class TrainConfig:
    # Where the connector starts: reinit (a new one, the bundled bases) | continue (the checkpoint's own)
    # | frozen (no training: evaluate and export the model as downloaded).
    projector: str = "reinit"
    llm: str = "frozen"
    seed: int = 0
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0
    lora_rank: int = 8
    lora_alpha: int = 16
    log_every: int = 25


@dataclass
class EvalConfig:
    batch_size: int = 64
    vqa_metric: str = "official"  # official | normalized (eval/vqa_metric.py)
    max_answer_tokens: int = 8
    # Gate thresholds (eval/gates.py): per format and precision setting...
    max_drop: dict[str, dict[str, float]] = field(default_factory=dict)
    max_aspect_drop: dict[str, dict[str, float]] = field(default_factory=dict)
    max_flip_rate: dict[str, dict[str, float]] = field(default_factory=dict)
    min_answer_agreement: dict[str, dict[str, float]] = field(default_factory=dict)
    min_first_token_agreement: dict[str, dict[str, float]] = field(default_factory=dict)
    max_first_token_kl: dict[str, dict[str, float]] = field(default_factory=dict)
    # ...and per format
    min_embedding_cosine: dict[str, float] = field(default_factory=dict)
    min_aspect_embedding_cosine: dict[str, float] = field(default_factory=dict)
    min_preprocessing_cosine: dict[str, float] = field(default_factory=dict)
    min_informative_margin: float = 10.0
    embedding_images: int = 64
    # Parity stages also build and run one variant per reduced component (eval/attribution.py).
    attribution: bool = True


@dataclass
class TierConfig:
    description: str = MISSING
    memory_budget_mb: int = MISSING
    context_tokens: int = MISSING
    kv_cache_dtype: str = "f16"
    # The context must hold this many images plus this much text, or the tier's gate fails.
    images_per_prompt: int = 1
    min_text_tokens: int = 64
    # Not written in params.yaml: load_params fills it from `targets.<format>.<tier>`.
    formats: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ExportConfig:
    coreml_minimum_target: str = "iOS18"
    calibration_images: int = 32


@dataclass
class SigningConfig:
    """The key that signs every release's manifest (publish/signing.py); the key itself never goes in params."""
    key: Optional[str] = None               # path of a PEM elliptic-curve private key
    key_env: Optional[str] = "VLM_FACTORY_SIGNING_KEY"  # a variable holding a key path or the PEM; wins over key
    password_env: Optional[str] = None      # a variable holding the key's password, if it is encrypted
    generate: bool = False                  # create `key` (and key.pub) when missing: local development only
    required: bool = True                   # refuse to publish unsigned


@dataclass
class PublishConfig:
    uri: str = "file://artifacts/releases"
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    # None: each release is named by its content; set it to pin a version (then refused if it exists differently).
    version: Optional[str] = None
    multipart_threshold_mb: int = 64
    signing: SigningConfig = field(default_factory=SigningConfig)


@dataclass
class SearchTarget:
    tier: str = MISSING
    format: str = MISSING
    evaluate: Optional[str] = None  # until_pass | all; default search.evaluate


@dataclass
class SearchConfig:
    """The precision search (eval/search.py): one stage search@<key> per entry of `targets`."""
    targets: dict[str, SearchTarget] = field(default_factory=dict)
    # format -> component -> the precisions to try (the format's own names: Q4_K_M, int8, 6, fp16...)
    grid: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    evaluate: str = "until_pass"  # until_pass | all


@dataclass
class Params:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tiers: dict[str, TierConfig] = field(default_factory=dict)
    # targets.<format>.<tier>: what each tier ships in each format (one export + parity stage each).
    targets: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    export: ExportConfig = field(default_factory=ExportConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
