"""Answer VQA questions with a TFLite export (vision.tflite, decoder.tflite, embedding.npy) in LiteRT.

Everything comes from the artifact directory, as on a device: `tflite_config.json` (file, signature
and tensor names, cache shape, token ids, the model family's prompt and image preprocessing spec) and
the tokenizer files. Preprocessing is runtime/preprocess.py's numpy/PIL implementation of the spec.

Decoding is batch 1 and greedy, like the reference: the prompt (image features merged at the
`<image>` positions) is prefilled in static chunks of `prefill_length` positions into a zeroed
fixed-size KV cache, then the `decode` signature runs one token at a time until EOS or
MAX_ANSWER_TOKENS.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vlm_factory.artifacts import read_artifact_json
from vlm_factory.errors import UserError
from vlm_factory.hf_files import load_pretrained
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS
from vlm_factory.paths import contained
from vlm_factory.runtime.preprocess import config_pixel_values
from vlm_factory.runtime.prompting import eos_ids, greedy_tokens, prompt_from_config, prompt_token_ids

TFLITE_CONFIG = "tflite_config.json"  # the exporter's name for it; runtimes never import exporters


def _interpreter(path: Path, threads: int | None):
    from ai_edge_litert.interpreter import Interpreter

    if not path.is_file():
        raise UserError(f"{path}: missing from the TFLite export; re-run its export")
    try:
        return Interpreter(model_path=str(path), num_threads=threads)
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError with multi-line messages
        raise UserError(f"{path}: LiteRT cannot load this model ({str(exc).splitlines()[0][:200]})") from None


class TFLiteRuntime:
    """The TFLite export behind the adapter interface: signature runners for vision, prefill, decode."""

    def __init__(self, artifact_dir: Path | str, num_threads: int | None = 2):
        from transformers import AutoTokenizer

        self.artifact_dir = Path(artifact_dir)
        self.config, config_path = read_artifact_json(self.artifact_dir, TFLITE_CONFIG, "a TFLite export")
        model = self.config["model"]
        vision, decoder = model["vision"], model["decoder"]
        # Every file name is contained before LiteRT or numpy opens anything.
        files = {role: contained(self.artifact_dir, model[role]["filename"], what=config_path,
                                 key=f"model.{role}.filename") for role in ("vision", "decoder", "embedding")}
        self._vision_interp = _interpreter(files["vision"], num_threads)
        self._vision = self._vision_interp.get_signature_runner(vision["signature"])
        self._decoder_interp = _interpreter(files["decoder"], num_threads)
        self._prefill_runner = self._decoder_interp.get_signature_runner("prefill")
        self._decode_runner = self._decoder_interp.get_signature_runner("decode")
        table_path = files["embedding"]
        if not table_path.is_file():
            raise UserError(f"{table_path}: missing from the TFLite export; re-run its export")
        self._table = np.load(table_path).astype(np.float32)
        self.tokenizer = load_pretrained(AutoTokenizer, self.artifact_dir, "the export's tokenizer")
        self.prompt = prompt_from_config(self.config.get("prompt"), config_path)
        self._cache_shape = tuple(decoder["kv_cache_shape"])
        self._chunk = int(decoder["prefill_length"])
        self._max_context = int(decoder["max_context"])
        self._eos = eos_ids(model.get("eos_token_id"), config_path)
        self._image_token_id = model["image_token_id"]

    def close(self) -> None:
        self._vision = self._prefill_runner = self._decode_runner = None
        self._vision_interp = self._decoder_interp = None

    def __enter__(self) -> "TFLiteRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- building blocks -------------------------------------------------------------------------

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """[1, 3, H, W] float32, preprocessed as the artifact's config describes."""
        return config_pixel_values(self.config, image, self.artifact_dir / TFLITE_CONFIG)

    def _prompt_ids(self, question: str) -> np.ndarray:
        return np.asarray(prompt_token_ids(self.prompt, self.tokenizer, question), dtype=np.int64)

    def _prefill(self, image: Image.Image, question: str):
        ids = self._prompt_ids(question)
        if len(ids) + MAX_ANSWER_TOKENS > self._max_context:
            raise UserError(f"question too long for the TFLite decoder's context of {self._max_context} "
                            f"positions ({len(ids)} prompt tokens)")
        embeds = self._table[ids]
        slots = ids == self._image_token_id
        features = self.image_embeddings(image)
        if int(slots.sum()) != features.shape[0]:
            raise UserError(f"{self.artifact_dir}: the prompt has {int(slots.sum())} image tokens, the vision model "
                            f"makes {features.shape[0]} features ({TFLITE_CONFIG} disagrees with the vision file)")
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
            out = self._prefill_runner(inputs_embeds=padded,
                                       input_pos=np.arange(start, start + self._chunk, dtype=np.int32),
                                       k_cache=k_cache, v_cache=v_cache)
            k_cache, v_cache = out["k_cache"], out["v_cache"]
            logits = out["logits"][0, len(chunk) - 1]
        return logits, (k_cache, v_cache), len(ids)

    def _decode(self, token: int, cache, position: int):
        out = self._decode_runner(inputs_embeds=self._table[[token]][None],
                                  input_pos=np.asarray([position], dtype=np.int32), k_cache=cache[0], v_cache=cache[1])
        return out["logits"][0, -1], (out["k_cache"], out["v_cache"])

    # -- the adapter interface -------------------------------------------------------------------

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """The vision model's output for one image: (image tokens, LLM hidden size), as the LLM receives it."""
        io = self.config["model"]["vision"]
        out = self._vision(**{io["inputs"]["pixel_values"]: self.pixel_values(image)})
        return out[io["outputs"]["image_features"]][0]

    def first_token_logits(self, image: Image.Image, question: str) -> np.ndarray:
        """Logits over the vocabulary for the first answer token."""
        return np.array(self._prefill(image, question)[0], copy=True)

    def answer_tokens(self, image: Image.Image, question: str) -> list[int]:
        """Greedy answer token ids for one (image, question), EOS excluded, at most MAX_ANSWER_TOKENS."""
        logits, cache, length = self._prefill(image, question)
        state = {"cache": cache, "length": length}

        def step(token: int) -> np.ndarray:
            logits, state["cache"] = self._decode(token, state["cache"], state["length"])
            state["length"] += 1
            return logits

        return greedy_tokens(logits, step, self._eos)

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], progress=None) -> list[str]:
        """Greedy answers, one per (image, question), at most MAX_ANSWER_TOKENS tokens each."""
        answers = []
        for image, question in zip(images, questions, strict=True):
            tokens = self.answer_tokens(image, question)
            answers.append(self.tokenizer.decode(tokens, skip_special_tokens=True).strip())
            if progress is not None:
                progress.update(1)
        return answers
