"""Answer VQA questions with a Core ML export.

On macOS the packages could run through `MLModel.predict()` (the `predict` path below). On Linux
coremltools cannot predict, so the adapter reads the packages' weights back instead (milproto load +
`materialized_val_inference()` of every `constexpr_lut_to_dense` op, i.e. the palettized values the
device computes with) into a `LlavaForConditionalGeneration` built from the saved config.json, and
runs it in PyTorch. Every torch parameter must come from a package (by the name map in
coreml_config.json) or, for the token-embedding table only, from embed_tokens.npy: anything missing
raises, so parity always measures the artifact's weights, never the original checkpoint's.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlm_factory.errors import UserError
from vlm_factory.runtime.coreml_weights import read_package_weights

COREML_CONFIG = "coreml_config.json"  # as export/coreml_export.py writes it; runtimes never import exporters


def predict_available() -> tuple[bool, str]:
    """Whether Core ML's own predict() can run here, and why not."""
    if platform.system() != "Darwin":
        return False, f"Core ML predict() needs macOS (this is {platform.system()}); weights are read back instead"
    try:
        import coremltools  # noqa: F401
    except ImportError:
        return False, "coremltools is not installed"
    return True, ""


class CoreMLRuntime:
    """A Core ML export behind the adapter interface (PyTorch with the artifact's weights on Linux)."""

    def __init__(self, artifact_dir: Path | str):
        from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

        self.artifact_dir = Path(artifact_dir)
        config_path = self.artifact_dir / COREML_CONFIG
        if not config_path.is_file():
            raise UserError(f"{config_path}: not found; {self.artifact_dir} is not a Core ML export (re-run its export)")
        self.config = json.loads(config_path.read_text(encoding="utf-8"))
        self.processor = AutoProcessor.from_pretrained(self.artifact_dir)
        model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(self.artifact_dir))
        self.loaded = self._load_weights(model)
        self.model = model.float().eval()

    # -- weights -----------------------------------------------------------------------------------

    def _load_weights(self, model) -> dict[str, np.ndarray]:

        params = dict(model.named_parameters())
        values: dict[str, np.ndarray] = {}
        for role, entry in self.config["packages"].items():
            package = self.artifact_dir / entry["file"]
            if not package.is_dir():
                raise UserError(f"{package}: missing from the Core ML export; re-run its export")
            found = read_package_weights(package)
            for mil_name, torch_name in entry["weights"].items():
                if mil_name not in found:
                    raise UserError(f"{package}: weight {mil_name!r} ({torch_name}) is not in the package")
                values[torch_name] = found[mil_name][0]
        embedding = self.config["embedding"]
        values[embedding["parameter"]] = np.load(self.artifact_dir / embedding["file"])
        for name in self.config.get("unused_parameters", []):
            if name in params and name not in values:
                # not in any graph (e.g. SigLIP's post_layernorm); NaN makes any use of it visible at once
                values[name] = np.full(tuple(params[name].shape), np.nan, dtype=np.float32)
        missing = sorted(set(params) - set(values))
        if missing:
            raise UserError(f"{self.artifact_dir}: {len(missing)} model parameters are not in the Core ML packages "
                            f"(e.g. {missing[:3]}); the export is incomplete, re-run it")
        unknown = sorted(set(values) - set(params))
        if unknown:
            raise UserError(f"{self.artifact_dir}: packages hold weights the model lacks: {unknown[:3]}")
        with torch.no_grad():
            for name, value in values.items():
                if value.ndim > params[name].ndim and all(d == 1 for d in value.shape[:value.ndim - params[name].ndim]):
                    value = value.reshape(value.shape[value.ndim - params[name].ndim:])  # folded gathers add a batch dim
                    values[name] = value
                if tuple(params[name].shape) != value.shape:
                    raise UserError(f"{self.artifact_dir}: {name} has shape {value.shape} in the package, "
                                    f"{tuple(params[name].shape)} in the model")
                params[name].copy_(torch.from_numpy(value))
        return values

    def weight_errors(self, reference_model) -> dict[str, float]:
        """Max abs difference of the artifact's weights from `reference_model`'s, per package + embedding."""
        ref = dict(reference_model.named_parameters())
        errors = {}
        for role, entry in self.config["packages"].items():
            errors[role] = max(float(np.abs(self.loaded[t] - ref[t].detach().numpy()).max())
                               for t in entry["weights"].values())
        name = self.config["embedding"]["parameter"]
        errors["embedding"] = float(np.abs(self.loaded[name] - ref[name].detach().numpy()).max())
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

        mlmodel = ct.models.MLModel(str(self.artifact_dir / self.config["packages"]["vision"]["file"]))
        pixels = self.pixel_values(image).numpy()
        return mlmodel.predict({"pixel_values": pixels})["image_features"][0]

    # -- the adapter interface -----------------------------------------------------------------------

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """[1, 3, H, W] float32, preprocessed by the saved processor (pad, bicubic resize, normalise)."""
        return self.processor.image_processor([image], return_tensors="pt").pixel_values.float()

    @torch.inference_mode()
    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        from vlm_factory.model.features import project, tower_features

        return project(self.model, tower_features(self.model, self.pixel_values(image)))[0].numpy()

    @torch.inference_mode()
    def first_token_logits(self, image: Image.Image, question: str) -> np.ndarray:
        from vlm_factory.model.prompt import expand_image_tokens, user_prompt

        text = expand_image_tokens(user_prompt(question), self.model.config.image_seq_length)
        input_ids = torch.tensor([self.processor.tokenizer(text).input_ids])
        out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         pixel_values=self.pixel_values(image))
        return out.logits[0, -1].numpy().copy()

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], progress=None) -> list[str]:
        """Greedy answers, exactly as the reference computes them, with the artifact's weights."""
        from vlm_factory.eval.generate import answer_questions

        answers = answer_questions(self.model, self.processor, images, questions)
        if progress is not None:
            progress.update(len(answers))
        return answers
