"""Answer VQA questions with a Core ML export.

On macOS the packages could run through `MLModel.predict()` (the `predict` path below). On Linux
coremltools cannot predict, so the adapter reads the packages' weights back instead (milproto load +
`materialized_val_inference()` of every `constexpr_lut_to_dense` op, i.e. the palettized values the
device computes with) into the model family's own model built from the saved config.json
(`family.empty_model()`), and runs it in PyTorch. Every parameter must come from a package (by the
name map in coreml_config.json) or, for the token-embedding table only, from embed_tokens.npy:
anything missing raises, so parity always measures the artifact's weights, never the checkpoint's.

With tied embeddings the device looks rows up in the float table and computes logits with the text
package's palettized copy; the adapter unties the two the same way (`output_projection` in the config).
Prompts and preprocessing come from coreml_config.json (the family's PromptSpec and spec), as on a device.
An image is one view (LLaVA) or, with a tiling spec (Idefics3/SmolVLM), `rows x cols` tiles + a global view
(runtime/preprocess.py `image_views`); the vision package takes one [1, 3, H, W] view, so it runs once per
view and the features are concatenated view by view, and the prompt is expanded for that grid.

coreml_config.json is validated before anything opens (runtime/artifact_schema.py `CoremlConfig`), then
checked against what the export's own files build: the tokenizer's image and EOS ids, the family, variant,
image size and image tokens of config.json's model, and every parameter name the weight maps give (each a
parameter of that model, each parameter given a source) before any package is read. A mismatch is one line
naming coreml_config.json and the key; a package coremltools cannot read is one line naming the package.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlm_factory.artifacts import config_files, read_artifact_json, read_npy
from vlm_factory.errors import UserError, first_line
from vlm_factory.families.base import ImageViews
from vlm_factory.families.processor_files import check_processor_files
from vlm_factory.hf_files import load_pretrained
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS, Answer
from vlm_factory.runtime.artifact_schema import FIX, CoremlConfig, config_error, parse_config
from vlm_factory.runtime.coreml_weights import read_package_weights
from vlm_factory.runtime.preprocess import config_image_views
from vlm_factory.runtime.prompting import check_special_tokens, prompt_token_ids

COREML_CONFIG = "coreml_config.json"  # as export/coreml_export.py writes it; runtimes never import exporters
PROCESSOR = "the export's processor files (processor_config.json, tokenizer.json, tokenizer_config.json)"


def predict_available() -> tuple[bool, str]:
    """Whether Core ML's own predict() can run here, and why not."""
    if platform.system() != "Darwin":
        return False, f"Core ML predict() needs macOS (this is {platform.system()}); weights are read back instead"
    try:
        import coremltools  # noqa: F401
    except ImportError:
        return False, "coremltools is not installed"
    return True, ""


def _fit(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A package array in the parameter's shape: folded gathers add leading unit dims (SigLIP's positions)."""
    extra = value.ndim - len(shape)
    if extra > 0 and all(d == 1 for d in value.shape[:extra]):
        value = value.reshape(value.shape[extra:])
    return value


def _read_package(package: Path) -> dict[str, tuple[np.ndarray, str]]:
    """The package's weights, or a one-line error naming it (coremltools raises anything on a corrupt one)."""
    try:
        return read_package_weights(package)
    except Exception as exc:  # protobuf, coremltools and numpy errors alike
        raise UserError(f"{package}: coremltools cannot read this package ({first_line(exc)}); re-run its export") \
            from None


class CoreMLRuntime:
    """A Core ML export behind the adapter interface (PyTorch with the artifact's weights on Linux)."""

    def __init__(self, artifact_dir: Path | str):
        from transformers import AutoProcessor

        from vlm_factory.families import family_of

        self.artifact_dir = Path(artifact_dir)
        self.config, config_path = read_artifact_json(self.artifact_dir, COREML_CONFIG, "a Core ML export")
        self._config_path = config_path
        # Every package and array the config names is contained before anything else reads the config,
        # and before coremltools or numpy opens it.
        self._files, self._embedding_file = self._named_files()
        self.typed_config = cfg = parse_config(CoremlConfig, self.config, config_path)
        self.prompt = cfg.prompt.spec()
        check_processor_files(self.artifact_dir, fix=FIX)  # tokenizer/processor files, named
        self.processor = load_pretrained(AutoProcessor, self.artifact_dir, PROCESSOR)
        self._check_tokens()
        self.family = family_of(self.artifact_dir)
        self._check_family()
        model = self.family.empty_model()
        self.loaded = self._load_weights(model)
        self.model = model.float().eval()

    def _named_files(self) -> tuple[dict[str, Path], Path | None]:
        """({role: package directory}, embedding array) for the names the config gives: contained (every
        package with everything inside it: no link leads out) and present. Names that are missing or not
        strings are left to the schema."""
        packages = self.config.get("packages")
        roles = list(packages) if isinstance(packages, dict) else []
        kinds = {f"packages.{role}.file": "dir" for role in roles}
        named = config_files(self.artifact_dir, self.config, [*kinds, "embedding.file"], self._config_path, kinds)
        files = {role: named[f"packages.{role}.file"] for role in roles if named[f"packages.{role}.file"]}
        return files, named["embedding.file"]

    def _check_tokens(self) -> None:
        cfg, tokenizer = self.typed_config, self.processor.tokenizer
        check_special_tokens(self.prompt, tokenizer, self._config_path, image_token_id=cfg.image_token_id,
                             image_key="image_token_id", eos=None, eos_key="eos_token_id")
        if cfg.eos_token_id != tokenizer.eos_token_id:
            raise config_error(self._config_path, "eos_token_id",
                               f"{cfg.eos_token_id}, but the export's tokenizer (tokenizer.json, "
                               f"tokenizer_config.json) ends with {tokenizer.eos_token_id}")

    def _check_family(self) -> None:
        """The config describes the model the export's config.json builds (the weights go into that model)."""
        cfg, family = self.typed_config, self.family
        for key, written, built in (("family", cfg.family, family.name), ("variant", cfg.variant, family.variant),
                                    ("image_size", cfg.image_size, family.vision.image_size),
                                    ("image_tokens", cfg.image_tokens, family.image_tokens)):
            if written != built:
                raise config_error(self._config_path, key, f"{written!r}, but the export's config.json builds "
                                                           f"{built!r}")
        if cfg.max_context > family.text.max_positions:
            raise config_error(self._config_path, "max_context", f"{cfg.max_context} is beyond the model's "
                                                                 f"{family.text.max_positions} positions")

    # -- weights -----------------------------------------------------------------------------------

    def _sources(self, params: dict) -> dict[str, str]:
        """{parameter: the config key its value comes from}; every name the config gives is a parameter of
        the model and every parameter has a source (checked before any package is read)."""
        cfg = self.typed_config
        sources: dict[str, str] = {}

        def claim(name: str, key: str) -> None:
            if name not in params:
                raise config_error(self._config_path, key, f"names {name[:80]!r}, which the model built from "
                                                           "config.json has no parameter of")
            sources.setdefault(name, key)

        for role, entry in (("vision", cfg.packages.vision), ("text", cfg.packages.text)):
            for mil_name, torch_name in entry.weights.items():
                claim(torch_name, f"packages.{role}.weights.{mil_name}")
        claim(cfg.embedding.parameter, "embedding.parameter")
        for name in cfg.constant_parameters:
            claim(name, f"constant_parameters.{name}")
        for index, name in enumerate(cfg.unused_parameters):
            claim(name, f"unused_parameters.{index}")
        if cfg.output_projection is not None:
            claim(cfg.output_projection.tied_to, "output_projection.tied_to")
        missing = sorted(set(params) - set(sources))
        if missing:
            raise config_error(self._config_path, "packages / unused_parameters",
                               f"{len(missing)} model parameters are in neither (e.g. {missing[:3]}); "
                               "the export is incomplete")
        return sources

    def _load_weights(self, model) -> dict[str, np.ndarray]:
        cfg = self.typed_config
        params = dict(model.named_parameters())
        sources = self._sources(params)
        values: dict[str, np.ndarray] = {}
        embedding = cfg.embedding.parameter  # the cheap file first: its header is checked before the packages
        table = read_npy(self._embedding_file, shape=tuple(params[embedding].shape), dtype="float32",
                         what=f"the model's {embedding}")
        found = {role: _read_package(self._files[role]) for role in ("vision", "text")}
        for role, entry in (("vision", cfg.packages.vision), ("text", cfg.packages.text)):
            for mil_name, torch_name in entry.weights.items():
                if mil_name not in found[role]:
                    raise config_error(self._config_path, f"packages.{role}.weights.{mil_name}",
                                       f"names {mil_name!r} ({torch_name}), which {entry.file} does not hold")
                values[torch_name] = found[role][mil_name][0]
        values[embedding] = table
        for name, fill in cfg.constant_parameters.items():
            # one repeated value the converter removed as an identity (a norm of ones)
            values[name] = np.full(tuple(params[name].shape), fill, dtype=np.float32)
        for name in cfg.unused_parameters:
            if name not in values:
                # not in any graph (e.g. SigLIP's post_layernorm); NaN makes any use of it visible at once
                values[name] = np.full(tuple(params[name].shape), np.nan, dtype=np.float32)
        with torch.no_grad():
            for name, value in values.items():
                value = values[name] = _fit(value, tuple(params[name].shape))
                if tuple(params[name].shape) != value.shape:
                    raise config_error(self._config_path, sources[name], f"{name} has shape {value.shape} in the "
                                                                         f"package, {tuple(params[name].shape)} in "
                                                                         "the model")
                params[name].copy_(torch.from_numpy(value))
        self.output_projection = None
        head = cfg.output_projection
        if head is not None:  # tied embeddings: logits from the package's copy, lookups from the float table
            if head.weight not in found[head.package]:
                raise config_error(self._config_path, "output_projection.weight",
                                   f"names {head.weight!r}, which the {head.package} package does not hold")
            module = self.family.decoder_parts(model).lm_head
            value = _fit(found[head.package][head.weight][0], tuple(module.weight.shape))
            if value.shape != tuple(module.weight.shape):
                raise config_error(self._config_path, "output_projection.weight",
                                   f"has shape {value.shape}, the LM head {tuple(module.weight.shape)}")
            module.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(value)), requires_grad=False)
            self.output_projection = value
        return values

    def weight_errors(self, reference_model) -> dict[str, float]:
        """Max abs difference of the artifact's weights from `reference_model`'s, per package + embedding."""
        cfg = self.typed_config
        ref = dict(reference_model.named_parameters())
        errors = {}
        for role, entry in (("vision", cfg.packages.vision), ("text", cfg.packages.text)):
            errors[role] = max(float(np.abs(self.loaded[t] - ref[t].detach().numpy()).max())
                               for t in entry.weights.values())
        name = cfg.embedding.parameter
        errors["embedding"] = float(np.abs(self.loaded[name] - ref[name].detach().numpy()).max())
        if self.output_projection is not None:
            head = cfg.output_projection
            diff = float(np.abs(self.output_projection - ref[head.tied_to].detach().numpy()).max())
            errors[head.package] = max(errors.get(head.package, 0.0), diff)
        return errors

    def close(self) -> None:
        self.loaded = {}

    def __enter__(self) -> "CoreMLRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- macOS ---------------------------------------------------------------------------------------

    def predict_vision(self, image: Image.Image) -> np.ndarray:
        """image_features from vision.mlpackage through Core ML itself (macOS only)."""
        ok, why = predict_available()
        if not ok:
            raise UserError(why)
        import coremltools as ct

        mlmodel = ct.models.MLModel(str(self._files["vision"]))
        return np.concatenate([mlmodel.predict({"pixel_values": view[None]})["image_features"][0]
                               for view in self.pixel_values(image).numpy()])

    # -- the adapter interface -----------------------------------------------------------------------

    def views(self, image: Image.Image) -> ImageViews:
        """The image as coreml_config.json's spec prepares it (what the app implements): [views, 3, H, W]
        float32 (one view unless the spec cuts images into tiles) and the grid of tiles."""
        pixels, rows, cols = config_image_views(self.typed_config.vision, image, self.artifact_dir / COREML_CONFIG)
        return ImageViews(torch.from_numpy(pixels), rows, cols)

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """[views, 3, H, W] float32, preprocessed as coreml_config.json's spec says."""
        return self.views(image).pixel_values

    @torch.inference_mode()
    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """The vision package's features for every view, one view per call as the app runs it, concatenated
        in view order: (views * image tokens, LLM hidden size) (one view: (image tokens, hidden))."""
        features = [self.family.image_features(self.model, view[None])[0] for view in self.pixel_values(image)]
        return torch.cat(features).numpy()

    @torch.inference_mode()
    def first_token_logits(self, image: Image.Image, question: str) -> np.ndarray:
        views = self.views(image)
        input_ids = torch.tensor([prompt_token_ids(self.prompt, self.processor.tokenizer, question, views.rows,
                                                   views.cols)])
        out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         **self.family.generation_pixels([views]))
        return out.logits[0, -1].numpy().copy()

    def iter_answers(self, images: Sequence[Image.Image], questions: Sequence[str], progress=None,
                     max_new_tokens: int = MAX_ANSWER_TOKENS) -> Iterator[Answer]:
        """Greedy answers, exactly as the reference computes them, with the artifact's weights."""
        from vlm_factory.eval.generate import generate_answers

        answers = generate_answers(self.model, self.processor, images, questions, max_new_tokens=max_new_tokens)
        if progress is not None:
            progress.update(len(answers))
        yield from answers

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], progress=None) -> list[str]:
        return [a.text for a in self.iter_answers(images, questions, progress)]
