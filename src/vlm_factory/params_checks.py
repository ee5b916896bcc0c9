"""Bounds and cross-checks of params.yaml, run by `compose` before it writes and by `load_params`.

Every failure is one line naming the file and the key, what the value is and what is allowed. Environment
interpolations are refused outright: params.yaml is committed, so a resolved secret would be too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlm_factory.errors import UserError
from vlm_factory.params_schema import FORMATS, ArchitectureConfig, Params

_CHOICES = {
    "model.source": ("local", "hub"),
    "data.source": ("synthetic", "hub", "local"),
    "train.llm": ("frozen", "lora", "full"),
    "model.architecture.family": ("llava", "mobilevlm", "idefics3"),
    "train.projector": ("reinit", "continue", "frozen"),
    "eval.vqa_metric": ("official", "normalized"),
}
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# One path segment (release prefixes, artifact directories, DVC stage names): no separator, no leading dot.
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
SAFE_NAME_RULE = "1-128 characters of [A-Za-z0-9._-], not starting with '.'"


def is_safe_name(value: object) -> bool:
    return isinstance(value, str) and bool(_SAFE_NAME.fullmatch(value)) and not value.startswith(".")


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Bound:
    """The allowed values of a numeric key: finite, `>= low` (`> low` when `low_open`), `<= high`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    integer: bool = False

    def allows(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        what = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None and not self.low_open:
            return f"{what} in [{_num(self.low)}, {_num(self.high)}]"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_num(self.low)}")
        if self.high is not None:
            parts.append(f"<= {_num(self.high)}")
        return " ".join([what, " and ".join(parts)]).strip()


_COUNT = Bound(1, integer=True)         # steps, batch sizes, image counts, model sizes: at least one
_NON_NEGATIVE_INT = Bound(0, integer=True)  # seeds (numpy refuses negative ones), warmup steps
_RATE = Bound(0, low_open=True)         # learning rates
_NON_NEGATIVE = Bound(0)                # weight decay, loss weights
_FRACTION = Bound(0, 1)
_CELL_PX = Bound(2, 1024, integer=True)  # the digit font is int(0.85 * cell_px) px; images are 4 cells a side
_TRAIN_KEYS = ("steps", "batch_size", "lora_rank", "lora_alpha", "log_every")

# Every numeric key and its bounds, in one place: `*` is any key of a mapping.
BOUNDS: dict[str, Bound] = {
    **{f"model.architecture.{name}": _COUNT for name in ArchitectureConfig.__dataclass_fields__ if name != "family"},
    "model.pretrain.seed": _NON_NEGATIVE_INT,
    "model.pretrain.n_images": _COUNT,
    "model.pretrain.questions_per_image": _COUNT,
    "model.pretrain.cell_px": _CELL_PX,
    "model.pretrain.steps": _COUNT,
    "model.pretrain.batch_images": _COUNT,
    "model.pretrain.lr": _RATE,
    "model.pretrain.min_lr_ratio": _FRACTION,
    "model.pretrain.warmup_steps": _NON_NEGATIVE_INT,
    "model.pretrain.weight_decay": _NON_NEGATIVE,
    "model.pretrain.aux_weight": _NON_NEGATIVE,
    "model.pretrain.eval_images": _COUNT,
    "model.pretrain.eval_every": _COUNT,
    "data.seed": _NON_NEGATIVE_INT,
    "data.cell_px": _CELL_PX,
    # 0 is what a hub / local source writes (the counts are synthetic-only); synthetic needs >= 1 (below).
    "data.train_images": _NON_NEGATIVE_INT,
    "data.train_questions_per_image": _NON_NEGATIVE_INT,
    "data.eval_images": _NON_NEGATIVE_INT,
    "data.eval_questions_per_image": _NON_NEGATIVE_INT,
    "data.max_questions.*": _COUNT,
    "train.seed": _NON_NEGATIVE_INT,
    **{f"train.{name}": _COUNT for name in _TRAIN_KEYS},
    "train.lr": _RATE,
    "train.warmup_steps": _NON_NEGATIVE_INT,
    "train.weight_decay": _NON_NEGATIVE,
    "eval.batch_size": _COUNT,
    "eval.embedding_images": _COUNT,
    "eval.max_answer_tokens": _COUNT,
    "eval.max_drop.*.*": Bound(0, 100),  # accuracy points: 100 leaves a gate open
    "eval.max_aspect_drop.*.*": Bound(0, 100),
    "eval.max_flip_rate.*.*": _FRACTION,
    "eval.min_answer_agreement.*.*": _FRACTION,
    "eval.min_first_token_agreement.*.*": _FRACTION,
    "eval.max_first_token_kl.*.*": _NON_NEGATIVE,
    "eval.min_embedding_cosine.*": _FRACTION,
    "eval.min_aspect_embedding_cosine.*": _FRACTION,
    "eval.min_preprocessing_cosine.*": _FRACTION,
    "eval.min_informative_margin": Bound(0, 100),
    "tiers.*.memory_budget_mb": _COUNT,
    "tiers.*.context_tokens": _COUNT,
    "tiers.*.images_per_prompt": _COUNT,
    "tiers.*.min_text_tokens": _NON_NEGATIVE_INT,
    "export.calibration_images": _COUNT,
    # S3 parts (the threshold is also the part size) are 5 MiB to 5 GiB.
    "publish.multipart_threshold_mb": Bound(5, 5120, integer=True),
}
_SYNTHETIC_COUNTS = ("train_images", "train_questions_per_image", "eval_images", "eval_questions_per_image")
_DIVISIBLE = (("image_size", "patch_size"), ("vision_hidden", "vision_heads"), ("text_hidden", "text_heads"),
              ("text_heads", "text_kv_heads"))


def show_value(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse(path: Path | str, key: str, value: object, allowed: str) -> UserError:
    return UserError(f"{path}: key '{key}' is {show_value(value)}; must be {allowed}")


def one_line_error(exc: OmegaConfBaseException, path: Path) -> UserError:
    key = getattr(exc, "full_key", None) or ""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    where = f"{path}: key '{key}'" if key else str(path)
    return UserError(f"{where}: {message}; fix it in conf/ and recompose (see README)")


def _at(obj: Any, parts: list[str], key: str) -> Iterator[tuple[str, Any]]:
    """(full key, value) of every value under `obj` that the dotted pattern `parts` names."""
    if not parts:
        yield key, obj
        return
    if obj is None:  # an optional section that is not set (model.architecture of a hub model)
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        for name, value in obj.items():
            yield from _at(value, rest, f"{key}.{name}")
    else:
        yield from _at(obj[head] if isinstance(obj, dict) else getattr(obj, head), rest, f"{key}.{head}".lstrip("."))


def _validate_bounds(params: Params, path: Path) -> None:
    for pattern, bound in BOUNDS.items():
        for key, value in _at(params, pattern.split("."), ""):
            if not bound.allows(value):
                raise _refuse(path, key, value, bound.describe())


def _validate_names(params: Params, path: Path) -> None:
    if not params.tiers:
        raise UserError(f"{path}: key 'tiers' is empty; must name at least one device tier "
                        f"(e.g. tier=[jetson_orin], a file in conf/tier/)")
    for name in params.tiers:
        if not is_safe_name(name):
            raise UserError(f"{path}: key 'tiers' names tier {show_value(name)}; a tier name must be {SAFE_NAME_RULE}")
    if not is_safe_name(params.model.name):
        raise _refuse(path, "model.name", params.model.name, SAFE_NAME_RULE)
    version = params.publish.version
    if version is not None and not is_safe_name(version):
        raise _refuse(path, "publish.version", version, f"null (named by content) or {SAFE_NAME_RULE}")


def _validate_data(params: Params, path: Path) -> None:
    data, train = params.data, params.train
    for name in ("train", "eval"):
        split = data.splits.get(name)
        if not isinstance(split, str) or not split:
            raise _refuse(path, f"data.splits.{name}", split, "the name of the source's split to use")
    if data.max_questions:
        unknown = sorted(set(data.max_questions) - set(data.splits))
        if unknown:
            raise UserError(f"{path}: key 'data.max_questions.{unknown[0]}' names no split under 'data.splits'; "
                            f"known: {', '.join(data.splits)}")
    if data.source == "synthetic":
        for name in _SYNTHETIC_COUNTS:
            value = getattr(data, name)
            if value < 1:
                raise _refuse(path, f"data.{name}", value, "an integer >= 1 with data.source=synthetic")
        questions = data.train_images * data.train_questions_per_image
        source = "data.train_images x data.train_questions_per_image"
    else:
        questions = (data.max_questions or {}).get("train")
        source = "data.max_questions.train"
    # Fine-tuning drops a last partial batch: fewer questions than a batch would never take a step.
    if train.projector != "frozen" and questions is not None and train.batch_size > questions:
        raise _refuse(path, "train.batch_size", train.batch_size,
                      f"at most the {questions} training questions {source} gives")


def _validate_model(params: Params, path: Path) -> None:
    arch = params.model.architecture
    if arch is None:
        return
    for whole, part in _DIVISIBLE:
        if getattr(arch, whole) % getattr(arch, part):
            raise _refuse(path, f"model.architecture.{part}", getattr(arch, part),
                          f"a divisor of model.architecture.{whole} ({getattr(arch, whole)})")
    if arch.family == "mobilevlm" and (arch.image_size // arch.patch_size) % 2:
        raise _refuse(path, "model.architecture.patch_size", arch.patch_size,
                      f"one that makes an even patch grid of image_size {arch.image_size} (LDPv2 pools 2x2 patches)")
    if arch.family == "idefics3" and (arch.image_size // arch.patch_size) % arch.scale_factor:
        raise _refuse(path, "model.architecture.scale_factor", arch.scale_factor,
                      f"a divisor of the tile's patch grid ({arch.image_size // arch.patch_size} per side): pixel "
                      "shuffle folds scale_factor x scale_factor patches into one token")


def _validate_devices(params: Params, path: Path) -> None:
    from vlm_factory.budget import KV_DTYPE_BYTES

    for name, tier in params.tiers.items():
        if tier.kv_cache_dtype not in KV_DTYPE_BYTES:
            raise _refuse(path, f"tiers.{name}.kv_cache_dtype", tier.kv_cache_dtype,
                          f"one of {', '.join(KV_DTYPE_BYTES)}")
    from vlm_factory.eval.gates import PER_FORMAT, PER_SETTING

    for table in (*PER_SETTING, *PER_FORMAT):
        unknown = sorted(set(getattr(params.eval, table)) - set(FORMATS))
        if unknown:
            raise UserError(f"{path}: key 'eval.{table}.{unknown[0]}' names no format; known: {', '.join(FORMATS)}")


def _validate_publish(params: Params, path: Path) -> None:
    from urllib.parse import urlsplit

    publish = params.publish
    uri = urlsplit(publish.uri)
    if uri.scheme not in ("file", "s3") or not (uri.netloc + uri.path).strip("/"):
        raise _refuse(path, "publish.uri", publish.uri, "file://<dir> or s3://<bucket>/<prefix>")
    if "@" in uri.netloc:
        raise UserError(f"{path}: key 'publish.uri' holds credentials; params.yaml is committed: "
                        "credentials come only from the AWS chain (environment, profile, instance role)")
    if publish.endpoint_url is not None:
        endpoint = urlsplit(publish.endpoint_url)
        if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
            raise _refuse(path, "publish.endpoint_url", publish.endpoint_url, "null or an http(s):// URL")
        if "@" in endpoint.netloc:
            raise UserError(f"{path}: key 'publish.endpoint_url' holds credentials; params.yaml is committed: "
                            "credentials come only from the AWS chain (environment, profile, instance role)")
    signing = publish.signing
    if signing.key is not None and "BEGIN" in signing.key:
        raise UserError(f"{path}: key 'publish.signing.key' holds key material; params.yaml is committed: "
                        "give a path, or put the PEM in the variable publish.signing.key_env names")
    for name in ("key_env", "password_env"):
        variable = getattr(signing, name)
        if variable is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", variable):
            raise _refuse(path, f"publish.signing.{name}", variable, "null or an environment variable's name")


def validate_params(params: Params, path: Path) -> None:
    """Every check of params.yaml's values beyond their types: `load_params` and `compose` both run it."""
    for key, allowed in _CHOICES.items():
        value = params
        for name in key.split("."):
            value = getattr(value, name)
            if value is None:  # an optional section that is not set (model.architecture of a hub model)
                break
        if value is not None and value not in allowed:
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
    _validate_names(params, path)
    _validate_bounds(params, path)
    _validate_data(params, path)
    _validate_model(params, path)
    _validate_devices(params, path)
    _validate_publish(params, path)
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


# --- interpolations: params.yaml is committed, so it holds plain values only -----------------------------

_ENV_RESOLVERS = ("oc.env", "env")


def string_leaves(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(full key, value) of every string in a plain container (OmegaConf.to_container, resolve=False)."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield from string_leaves(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from string_leaves(value, f"{key}[{index}]")
    elif isinstance(node, str):
        yield key, node


def _interpolations(value: str) -> tuple[list[str], bool]:
    """(the resolvers `value` calls, whether it interpolates at all); GrammarParseError if malformed."""
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser as Grammar
    from omegaconf.grammar_parser import parse

    resolvers: list[str] = []
    found = False
    stack = [parse(value)]
    while stack:
        ctx = stack.pop()
        if isinstance(ctx, Grammar.InterpolationResolverContext):
            resolvers.append(ctx.resolverName().getText())
        found = found or isinstance(ctx, Grammar.InterpolationContext)
        stack.extend(getattr(ctx, "children", None) or [])
    return resolvers, found


def _resolver_error(path: Path | str, key: str, resolver: str) -> UserError:
    if resolver in _ENV_RESOLVERS:
        what = f"reads the environment (${{{resolver}:...}})"
    else:
        what = f"calls the resolver ${{{resolver}:...}} (only plain ${{path.to.key}} references are composed)"
    return UserError(f"{path}: key '{key}' {what}; params.yaml is committed, so it never holds a value resolved at "
                     "compose time: set it through the environment at run time, or in .dvc/config.local / "
                     "a non-committed file, instead")


def check_interpolations(cfg: DictConfig, path: Path | str, *, allow_references: bool) -> None:
    """Refuse every resolver (`${oc.env:...}`, ...) in `cfg`; with `allow_references` False, any interpolation."""
    from omegaconf.errors import GrammarParseError

    for key, value in string_leaves(OmegaConf.to_container(cfg, resolve=False)):
        if "${" not in value:
            continue
        try:
            resolvers, found = _interpolations(value)
        except GrammarParseError:
            raise _refuse(path, key, value, "a plain value or a well-formed ${path.to.key} reference") from None
        if resolvers:
            raise _resolver_error(path, key, resolvers[0])
        if found and not allow_references:
            raise UserError(f"{path}: key '{key}' is the unresolved interpolation {show_value(value)}; params.yaml "
                            "holds plain values only: recompose it with `vlm-factory compose`")
