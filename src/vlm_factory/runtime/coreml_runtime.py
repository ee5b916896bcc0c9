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
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlm_factory.artifacts import read_artifact_json
from vlm_factory.errors import UserError
from vlm_factory.hf_files import load_pretrained
from vlm_factory.paths import contained, contained_tree
from vlm_factory.runtime.coreml_weights import read_package_weights
from vlm_factory.runtime.preprocess import preprocess
from vlm_factory.runtime.prompting import prompt_from_config, prompt_token_ids

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


def _fit(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A package array in the parameter's shape: folded gathers add leading unit dims (SigLIP's positions)."""
    extra = value.ndim - len(shape)
    if extra > 0 and all(d == 1 for d in value.shape[:extra]):
        value = value.reshape(value.shape[extra:])
    return value


class CoreMLRuntime:
    """A Core ML export behind the adapter interface (PyTorch with the artifact's weights on Linux)."""

    def __init__(self, artifact_dir: Path | str):
        from transformers import AutoProcessor

        from vlm_factory.families import family_of

        self.artifact_dir = Path(artifact_dir)
        self.config, config_path = read_artifact_json(self.artifact_dir, COREML_CONFIG, "a Core ML export")
        if "vision" not in self.config or "prompt" not in self.config:
            raise UserError(f"{config_path}: written by an older exporter (no 'vision'/'prompt'); re-run its export")
        # Every package and array the config names is contained before coremltools or numpy opens it.
        self._files = {role: self._package_path(role) for role in self.config["packages"]}
        self._embedding_file = contained(self.artifact_dir, self.config["embedding"]["file"], what=config_path,
                                         key="embedding.file")
        self.prompt = prompt_from_config(self.config["prompt"], config_path)
        self.processor = load_pretrained(AutoProcessor, self.artifact_dir, "the export's processor files")
        self.family = family_of(self.artifact_dir)
        model = self.family.empty_model()
        self.loaded = self._load_weights(model)
        self.model = model.float().eval()

    # -- weights -----------------------------------------------------------------------------------

    def _package_path(self, role: str) -> Path:
        config_path, key = self.artifact_dir / COREML_CONFIG, f"packages.{role}.file"
        package = contained(self.artifact_dir, self.config["packages"][role]["file"], what=config_path, key=key,
                            kind="dir")
        if not package.is_dir():
            raise UserError(f"{package}: missing from the Core ML export; re-run its export")
        contained_tree(self.artifact_dir, package, what=config_path, key=key)  # no link inside leads out
        return package

    def _package(self, role: str) -> dict[str, tuple[np.ndarray, str]]:
        return read_package_weights(self._files[role])

    def _load_weights(self, model) -> dict[str, np.ndarray]:
        params = dict(model.named_parameters())
        values: dict[str, np.ndarray] = {}
        found = {role: self._package(role) for role in self.config["packages"]}
        for role, entry in self.config["packages"].items():
            for mil_name, torch_name in entry["weights"].items():
                if mil_name not in found[role]:
                    raise UserError(f"{self.artifact_dir / entry['file']}: weight {mil_name!r} ({torch_name}) "
                                    "is not in the package")
                values[torch_name] = found[role][mil_name][0]
        embedding = self.config["embedding"]
        if not self._embedding_file.is_file():
            raise UserError(f"{self._embedding_file}: missing from the Core ML export; re-run its export")
        values[embedding["parameter"]] = np.load(self._embedding_file)
        for name, fill in self.config.get("constant_parameters", {}).items():
            if name in params:  # one repeated value the converter removed as an identity (a norm of ones)
                values[name] = np.full(tuple(params[name].shape), fill, dtype=np.float32)
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
                value = values[name] = _fit(value, tuple(params[name].shape))
                if tuple(params[name].shape) != value.shape:
                    raise UserError(f"{self.artifact_dir}: {name} has shape {value.shape} in the package, "
                                    f"{tuple(params[name].shape)} in the model")
                params[name].copy_(torch.from_numpy(value))
        self.output_projection = None
        head = self.config.get("output_projection")
        if head:  # tied embeddings: logits from the package's copy, lookups from the float table
            module = self.family.decoder_parts(model).lm_head
            value = _fit(found[head["package"]][head["weight"]][0], tuple(module.weight.shape))
            module.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(value)), requires_grad=False)
            self.output_projection = value
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
        if self.output_projection is not None:
            head = self.config["output_projection"]
            diff = float(np.abs(self.output_projection - ref[head["tied_to"]].detach().numpy()).max())
            errors[head["package"]] = max(errors.get(head["package"], 0.0), diff)
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
        pixels = self.pixel_values(image).numpy()
        return mlmodel.predict({"pixel_values": pixels})["image_features"][0]

    # -- the adapter interface -----------------------------------------------------------------------

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """[1, 3, H, W] float32, preprocessed as coreml_config.json's spec says (what the app implements)."""
        vision = self.config["vision"]
        pixels = preprocess(image, vision["preprocessing"])[None]
        if list(pixels.shape[2:]) != list(vision["image_size"]):
            raise UserError(f"{self.artifact_dir / COREML_CONFIG}: preprocessing makes {pixels.shape[2:]} images, "
                            f"the vision package takes {vision['image_size']}")
        return torch.from_numpy(pixels)

    @torch.inference_mode()
    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        return self.family.image_features(self.model, self.pixel_values(image))[0].numpy()

    @torch.inference_mode()
    def first_token_logits(self, image: Image.Image, question: str) -> np.ndarray:
        input_ids = torch.tensor([prompt_token_ids(self.prompt, self.processor.tokenizer, question)])
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
