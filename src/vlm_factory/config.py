"""Typed schema of params.yaml. Unknown keys, wrong types and missing values are one-line errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlm_factory.errors import UserError

FORMATS = ("gguf", "onnx", "coreml", "tflite")


@dataclass
class ArchitectureConfig:
    image_size: int = 64
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
    max_drop: dict[str, dict[str, float]] = field(default_factory=dict)
    min_embedding_cosine: dict[str, float] = field(default_factory=dict)
    embedding_images: int = 64


@dataclass
class TierConfig:
    description: str = MISSING
    memory_budget_mb: int = MISSING
    context_tokens: int = MISSING
    kv_cache_dtype: str = "f16"
    # Not written in params.yaml: load_params fills it from `targets.<format>.<tier>`.
    formats: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ExportConfig:
    coreml_minimum_target: str = "iOS18"
    calibration_images: int = 32


@dataclass
class PublishConfig:
    uri: str = "file://artifacts/releases"
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    # None: each release is named by its content; set it to pin a version (then refused if it exists differently).
    version: Optional[str] = None
    multipart_threshold_mb: int = 64


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


_CHOICES = {
    "model.source": ("local", "hub"),
    "data.source": ("synthetic", "hub", "local"),
    "train.llm": ("frozen", "lora", "full"),
    "train.projector": ("reinit", "continue", "frozen"),
}
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _one_line(exc: OmegaConfBaseException, path: Path) -> UserError:
    key = getattr(exc, "full_key", None) or ""
    message = str(exc).splitlines()[0]
    where = f"{path}: key '{key}'" if key else str(path)
    return UserError(f"{where}: {message}; fix it in conf/ and recompose (see README)")


def _validate(params: Params, path: Path) -> None:
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(params, section), name)
        if value not in allowed:
            raise UserError(f"{path}: key '{key}' is {value!r}; expected one of {', '.join(allowed)}")
    data = params.data
    if data.source == "hub" and not data.hub_dataset:
        raise UserError(f"{path}: key 'data.hub_dataset' is required when data.source=hub")
    if data.source == "local" and not data.local_path:
        raise UserError(f"{path}: key 'data.local_path' is required when data.source=local")
    model = params.model
    if model.source == "local" and not model.path:
        raise UserError(f"{path}: key 'model.path' must name a local model directory when model.source=local")
    if model.source == "hub":
        if not model.repo_id:
            raise UserError(f"{path}: key 'model.repo_id' is required when model.source=hub")
        if not model.revision or not _COMMIT.match(model.revision):
            raise UserError(f"{path}: key 'model.revision' must pin a 40-hex commit of {model.repo_id} "
                            f"(got {model.revision!r}); a branch name is not reproducible")
    unknown = set(params.targets) - set(FORMATS)
    if unknown:
        raise UserError(f"{path}: key 'targets' names unknown format(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(FORMATS)}")
    for fmt, by_tier in params.targets.items():
        for tier_name, settings in by_tier.items():
            if tier_name not in params.tiers:
                raise UserError(f"{path}: key 'targets.{fmt}.{tier_name}' names no tier under 'tiers'; "
                                f"known: {', '.join(params.tiers)}")
            params.tiers[tier_name].formats[fmt] = settings


def target_settings(params: Params, fmt: str, tier: str, path: Path | str = "params.yaml") -> dict[str, Any]:
    """The settings of one export target, or a one-line error naming the missing key."""
    if tier not in params.targets.get(fmt, {}):
        listed = ", ".join(params.targets.get(fmt, {})) or "none"
        raise UserError(f"{path}: no key 'targets.{fmt}.{tier}'; tiers listing {fmt}: {listed}")
    return dict(params.targets[fmt][tier])


def load_params(path: Path | str = "params.yaml") -> Params:
    """Parse and validate params.yaml into typed sections."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; run from the project root (compose it with `vlm-factory compose`)")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); recompose it with `vlm-factory compose`") from None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Params), raw)
        params: Params = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _one_line(exc, path) from None
    _validate(params, path)
    return params


def compose(overrides: list[str] | None = None, config_dir: Path | str = "conf") -> DictConfig:
    """Compose conf/ exactly as DVC's Hydra integration does before `dvc exp run`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides or [])
    except HydraException as exc:
        reason = str(exc).splitlines()[0]
        if exc.__cause__ is not None:
            reason += f" ({str(exc.__cause__).splitlines()[0]})"
        raise UserError(f"{config_dir}: {reason}") from None
    OmegaConf.resolve(cfg)
    return cfg


def compose_to_yaml(overrides: list[str] | None = None, config_dir: Path | str = "conf") -> str:
    return OmegaConf.to_yaml(compose(overrides, config_dir))
