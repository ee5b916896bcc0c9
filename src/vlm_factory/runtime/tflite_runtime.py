"""Answer VQA questions with a TFLite export (vision.tflite, decoder.tflite, embedding.npy) in LiteRT.

Everything comes from the artifact directory, as on a device: `tflite_config.json` (file, signature
and tensor names, cache shape, token ids, the model family's prompt and image preprocessing spec) and
the tokenizer files. Preprocessing is runtime/preprocess.py's numpy/PIL implementation of the spec.

An image is one view (LLaVA) or, with a tiling spec (Idefics3/SmolVLM), `rows x cols` tiles + a global
view (runtime/preprocess.py `image_views`): the vision signature takes one [1, 3, H, W] view, so it runs
once per view, the features are concatenated view by view, and the prompt's image token is expanded for
that grid (`PromptSpec.expanded(question, rows, cols)`), `num_image_tokens` per view.

The config is validated before anything opens (runtime/artifact_schema.py `TfliteConfig`), then
checked against the models: the signatures it names exist and take the tensors the adapter feeds,
with the cache shape, prefill length, hidden size and vocabulary the config says; the embedding
table's header matches its entry before any data is read. A mismatch is one line naming
tflite_config.json and the key, never a LiteRT exception in the middle of a run.

Decoding is batch 1 and greedy, like the reference: the prompt (image features merged at the
`<image>` positions) is prefilled in static chunks of `prefill_length` positions into a zeroed
fixed-size KV cache, then the `decode` signature runs one token at a time until EOS or
MAX_ANSWER_TOKENS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vlm_factory.artifacts import read_npy
from vlm_factory.errors import UserError, first_line
from vlm_factory.families.processor_files import check_processor_files
from vlm_factory.hf_files import load_pretrained
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS
from vlm_factory.runtime.artifact_schema import FIX, TfliteConfig, TfliteModel, config_error, read_runtime_config
from vlm_factory.runtime.declared_io import DeclaredIO
from vlm_factory.runtime.preprocess import config_image_views
from vlm_factory.runtime.prompting import (Decoded, TokenizerAnswers, check_special_tokens, greedy_decode,
                                          prompt_token_ids)

TFLITE_CONFIG = "tflite_config.json"  # the exporter's name for it; runtimes never import exporters
TOKENIZER = "the export's tokenizer (tokenizer.json, tokenizer_config.json)"
ROLES = ("vision", "decoder", "embedding")


def _interpreter(path: Path, threads: int | None):
    from ai_edge_litert.interpreter import Interpreter

    if not path.is_file():
        raise UserError(f"{path}: missing from the TFLite export; re-run its export")
    try:
        return Interpreter(model_path=str(path), num_threads=threads)
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError with multi-line messages
        raise UserError(f"{path}: LiteRT cannot load this model ({str(exc).splitlines()[0][:200]})") from None


class _SignatureCheck(DeclaredIO):
    """One signature of a .tflite file against what tflite_config.json says about it."""

    def __init__(self, interpreter, path: Path, name: str, config_path: Path, key: str):
        signatures = interpreter.get_signature_list()
        if name not in signatures:
            raise config_error(config_path, key, f"{name!r} is not a signature of the file "
                                                 f"(it has {sorted(signatures)[:4]}) ({path.name})")
        self.name = name
        self.runner = interpreter.get_signature_runner(name)
        super().__init__(self.runner.get_input_details(), self.runner.get_output_details(), path, config_path,
                         f"signature {name!r}")

    def shape(self, name: str, expected: list[tuple[str, int]], output: bool = False) -> None:
        """The tensor's shape is exactly `expected` ([(key to blame, size)], one per axis)."""
        details = (self.outputs if output else self.inputs)[name]
        shape = [int(d) for d in details.get("shape_signature", details["shape"])]
        if len(shape) != len(expected):
            raise self.fail(expected[0][0], f"{[v for _, v in expected]}, but {name!r} of signature {self.name!r} "
                                            f"has shape {shape}")
        for size, (key, value) in zip(shape, expected):
            if size != value:  # -1 (dynamic) never matches: every tensor the exporter writes is static
                raise self.fail(key, f"{value}, but {name!r} of signature {self.name!r} has shape {shape}")

    def dtype(self, name: str, key: str, wanted) -> None:
        if np.dtype(self.inputs[name]["dtype"]) != np.dtype(wanted):
            raise self.fail(key, f"{np.dtype(wanted)}, but {name!r} of signature {self.name!r} is "
                                 f"{np.dtype(self.inputs[name]['dtype'])}")


def _vision_signature(interpreter, path: Path, model: TfliteModel, config_path: Path):
    vision = model.vision
    check = _SignatureCheck(interpreter, path, vision.signature, config_path, "model.vision.signature")
    pixels, features = vision.inputs.pixel_values, vision.outputs.image_features
    check.takes_exactly({"model.vision.inputs.pixel_values": pixels}, "model.vision.inputs")
    check.gives({"model.vision.outputs.image_features": features})
    height, width = vision.image_size
    check.shape(pixels, [("model.vision.image_size", 1), ("model.vision.num_channels", vision.num_channels),
                         ("model.vision.image_size", height), ("model.vision.image_size", width)])
    check.dtype(pixels, "model.vision.inputs.pixel_values", np.float32)
    check.shape(features, [("model.vision.outputs.image_features", 1),
                           ("model.vision.num_image_tokens", vision.num_image_tokens),
                           ("model.decoder.hidden_size", model.decoder.hidden_size)], output=True)
    return check.runner


def _decoder_signature(interpreter, path: Path, model: TfliteModel, config_path: Path, name: str, positions: int):
    decoder, key = model.decoder, f"model.decoder.signatures.{name}"
    check = _SignatureCheck(interpreter, path, name, config_path, key)
    tensors = getattr(decoder.signatures, name)
    check.takes_exactly({f"{key}.inputs.{i}": tensor for i, tensor in enumerate(tensors.inputs)}, f"{key}.inputs")
    check.gives({f"{key}.outputs.{i}": tensor for i, tensor in enumerate(tensors.outputs)})
    length_key = "model.decoder.prefill_length" if name == "prefill" else key
    check.shape("inputs_embeds", [(key, 1), (length_key, positions), ("model.decoder.hidden_size",
                                                                      decoder.hidden_size)])
    check.shape("input_pos", [(length_key, positions)])
    check.dtype("input_pos", "model.decoder.input_pos_dtype", np.int32)
    for cache in ("k_cache", "v_cache"):
        check.shape(cache, [("model.decoder.kv_cache_shape", size) for size in decoder.kv_cache_shape])
        check.shape(cache, [("model.decoder.kv_cache_shape", size) for size in decoder.kv_cache_shape], output=True)
        check.dtype(cache, "model.decoder.kv_cache_dtype", np.float32)
    check.dtype("inputs_embeds", f"{key}.inputs", np.float32)
    check.shape("logits", [(key, 1), (length_key, positions), ("model.vocab_size", model.vocab_size)], output=True)
    return check.runner


class TFLiteRuntime(TokenizerAnswers):
    """The TFLite export behind the adapter interface: signature runners for vision, prefill, decode."""

    def __init__(self, artifact_dir: Path | str, num_threads: int | None = 2):
        from transformers import AutoTokenizer

        self.artifact_dir = Path(artifact_dir)
        # Every file name is contained before LiteRT or numpy opens it.
        self.config, self.typed_config, files, config_path = read_runtime_config(
            self.artifact_dir, TFLITE_CONFIG, "a TFLite export", TfliteConfig, ROLES)
        model = self.typed_config.model
        check_processor_files(self.artifact_dir, fix=FIX)  # tokenizer/processor files: cheap, before any model opens
        self._files = files
        self._vision_interp = _interpreter(files["vision"], num_threads)
        self._vision = _vision_signature(self._vision_interp, files["vision"], model, config_path)
        self._decoder_interp = _interpreter(files["decoder"], num_threads)
        self._prefill_runner = _decoder_signature(self._decoder_interp, files["decoder"], model, config_path,
                                                  "prefill", model.decoder.prefill_length)
        self._decode_runner = _decoder_signature(self._decoder_interp, files["decoder"], model, config_path,
                                                 "decode", 1)
        self._table = read_npy(files["embedding"], shape=tuple(model.embedding.shape), dtype=model.embedding.dtype,
                               what=f"{TFLITE_CONFIG} model.embedding").astype(np.float32)
        self.tokenizer = load_pretrained(AutoTokenizer, self.artifact_dir, TOKENIZER)
        self.prompt = self.typed_config.prompt.spec()
        self._eos = set(model.eos_token_id)
        check_special_tokens(self.prompt, self.tokenizer, config_path, image_token_id=model.image_token_id,
                             image_key="model.image_token_id", eos=self._eos, eos_key="model.eos_token_id")
        self._cache_shape = tuple(model.decoder.kv_cache_shape)
        self._chunk = model.decoder.prefill_length
        self._max_context = model.decoder.max_context
        self._image_token_id = model.image_token_id

    def close(self) -> None:
        self._vision = self._prefill_runner = self._decode_runner = None
        self._vision_interp = self._decoder_interp = None

    def __enter__(self) -> "TFLiteRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- building blocks -------------------------------------------------------------------------

    def _call(self, runner, role: str, **inputs) -> dict[str, np.ndarray]:
        try:
            return runner(**inputs)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"{self._files[role]}: LiteRT cannot run this model ({first_line(exc)}); "
                            "re-run its export") from None

    def views(self, image: Image.Image) -> tuple[np.ndarray, int, int]:
        """[views, 3, H, W] float32 and the grid of tiles (rows, cols), as the artifact's config describes."""
        return config_image_views(self.typed_config.model.vision, image, self.artifact_dir / TFLITE_CONFIG)

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """[views, 3, H, W] float32 (one view unless the spec cuts images into tiles), as the config describes."""
        return self.views(image)[0]

    def _prompt_ids(self, question: str, rows: int = 0, cols: int = 0) -> np.ndarray:
        return np.asarray(prompt_token_ids(self.prompt, self.tokenizer, question, rows, cols), dtype=np.int64)

    def _features(self, pixels: np.ndarray) -> np.ndarray:
        """The vision signature on each view ([1, 3, H, W] each): [views * image tokens, LLM hidden], in view order."""
        io = self.typed_config.model.vision
        features = [self._call(self._vision, "vision", **{io.inputs.pixel_values: view[None]})
                    [io.outputs.image_features][0] for view in pixels]
        return np.concatenate(features)

    def _prefill(self, image: Image.Image, question: str):
        pixels, rows, cols = self.views(image)
        ids = self._prompt_ids(question, rows, cols)
        if len(ids) + MAX_ANSWER_TOKENS > self._max_context:
            raise UserError(f"question too long for the TFLite decoder's context of {self._max_context} "
                            f"positions ({len(ids)} prompt tokens)")
        if len(ids) and int(ids.max()) >= len(self._table):
            raise UserError(f"{self.artifact_dir}: the tokenizer makes token id {int(ids.max())}, the embedding "
                            f"table has {len(self._table)} rows; re-run its export")
        embeds = self._table[ids]
        slots = ids == self._image_token_id
        features = self._features(pixels)
        if int(slots.sum()) != features.shape[0]:
            raise UserError(f"{self.artifact_dir}: the prompt has {int(slots.sum())} image tokens, the vision model "
                            f"makes {features.shape[0]} features for {len(pixels)} views ({TFLITE_CONFIG} disagrees "
                            "with the vision file)")
        embeds[slots] = features
        k_cache = np.zeros(self._cache_shape, dtype=np.float32)
        v_cache = np.zeros(self._cache_shape, dtype=np.float32)
        logits = None
        for start in range(0, len(ids), self._chunk):
            chunk = embeds[start:start + self._chunk]
            padded = np.zeros((1, self._chunk, embeds.shape[1]), dtype=np.float32)
            padded[0, :len(chunk)] = chunk
            # Padded positions continue after the prompt: they write slots no real query can see yet,
            # which later steps overwrite (and positions past the cache write nothing).
            out = self._call(self._prefill_runner, "decoder", inputs_embeds=padded,
                             input_pos=np.arange(start, start + self._chunk, dtype=np.int32),
                             k_cache=k_cache, v_cache=v_cache)
            k_cache, v_cache = out["k_cache"], out["v_cache"]
            logits = out["logits"][0, len(chunk) - 1]
        return logits, (k_cache, v_cache), len(ids)

    def _decode(self, token: int, cache, position: int):
        out = self._call(self._decode_runner, "decoder", inputs_embeds=self._table[[token]][None],
                         input_pos=np.asarray([position], dtype=np.int32), k_cache=cache[0], v_cache=cache[1])
        return out["logits"][0, -1], (out["k_cache"], out["v_cache"])

    # -- the adapter interface -------------------------------------------------------------------

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """The vision model's output for every view of one image, concatenated in view order:
        (views * image tokens, LLM hidden size), as the LLM receives it (one view: (image tokens, hidden))."""
        return self._features(self.pixel_values(image))

    def first_token_logits(self, image: Image.Image, question: str) -> np.ndarray:
        """Logits over the vocabulary for the first answer token."""
        return np.array(self._prefill(image, question)[0], copy=True)

    def decode(self, image: Image.Image, question: str, max_new_tokens: int = MAX_ANSWER_TOKENS) -> Decoded:
        """The greedy answer for one (image, question), stopped at EOS or after `max_new_tokens`."""
        logits, cache, length = self._prefill(image, question)
        state = {"cache": cache, "length": length}

        def step(token: int) -> np.ndarray:
            logits, state["cache"] = self._decode(token, state["cache"], state["length"])
            state["length"] += 1
            return logits

        return greedy_decode(logits, step, self._eos, max_new_tokens)
