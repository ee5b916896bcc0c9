"""Answer VQA questions with an ONNX export (vision / embedding / text graphs) in onnxruntime.

Everything the adapter needs comes from the artifact directory, as on a device: the graphs,
`genai_config.json` (names, KV-cache shape, token ids, the model's prompt, image preprocessing) and
the tokenizer files. Preprocessing is done with PIL and numpy from that config (runtime/preprocess.py)
rather than by transformers' processor, so the parity gate measures what a device app would compute;
the prompt is the exported PromptSpec (runtime/prompting.py), whatever the model's chat template is.

Decoding is batch 1 and greedy, like the reference: the prompt (image features merged at the
image-token positions) is prefilled against an empty (zero-length) KV cache, then one token at a
time until an EOS id (the config's `eos_token_id`, one id or a list) or MAX_ANSWER_TOKENS.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vlm_factory.artifacts import read_artifact_json
from vlm_factory.errors import UserError
from vlm_factory.hf_files import load_pretrained
from vlm_factory.paths import contained
from vlm_factory.runtime.onnx_check import check_external_data
from vlm_factory.runtime.preprocess import config_pixel_values
from vlm_factory.runtime.prompting import eos_ids, greedy_tokens, prompt_from_config, prompt_token_ids

# The exporter's name for it (export/onnx_graphs.py); runtimes never import exporters.
GENAI_CONFIG = "genai_config.json"


def _session_options(intra_op_threads: int | None):
    import onnxruntime as ort

    if intra_op_threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # Graphs this size gain nothing past a few threads; more only contend with other processes.
        intra_op_threads = max(1, min(cores, 4))
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers and the like
    return options


def _open_session(path: Path, options, providers: Sequence[str]):
    import onnxruntime as ort

    if not path.is_file():
        raise UserError(f"{path}: missing from the ONNX export; re-run its export")
    check_external_data(path)  # before onnxruntime opens anything the graph points at
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise UserError(f"{path}: onnxruntime cannot load this graph ({str(exc).splitlines()[0][:200]})") from None


class OnnxRuntime:
    """The three graphs of an ONNX export, one InferenceSession each, behind the adapter interface."""

    def __init__(self, artifact_dir: Path | str, providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int | None = None):
        from transformers import AutoTokenizer

        self.artifact_dir = Path(artifact_dir)
        self.config, config_path = read_artifact_json(self.artifact_dir, GENAI_CONFIG, "an ONNX export")
        model = self.config["model"]
        # Every graph name is contained before onnxruntime (or onnx.load) opens anything.
        graphs = {role: contained(self.artifact_dir, model[role]["filename"], what=config_path,
                                  key=f"model.{role}.filename")
                  for role in ("vision", "embedding", "decoder")}
        options = _session_options(intra_op_threads)
        self._sessions = {role: _open_session(path, options, providers) for role, path in graphs.items()}
        self.tokenizer = load_pretrained(AutoTokenizer, self.artifact_dir, "the export's tokenizer")
        self.prompt = prompt_from_config(self.config.get("prompt"), config_path)
        decoder = model["decoder"]
        self._kv_shape = (decoder["num_key_value_heads"], decoder["head_size"])
        self._past_names = [decoder["inputs"][kind] % i for i in range(decoder["num_hidden_layers"])
                            for kind in ("past_key_names", "past_value_names")]
        self._outputs = [decoder["outputs"]["logits"]] + [
            decoder["outputs"][kind] % i for i in range(decoder["num_hidden_layers"])
            for kind in ("present_key_names", "present_value_names")]
        self._inputs = decoder["inputs"]
        self._eos = eos_ids(model.get("eos_token_id"), config_path)
        self._image_token_id = model["image_token_id"]

    def close(self) -> None:
        self._sessions.clear()

    def __enter__(self) -> "OnnxRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- building blocks -------------------------------------------------------------------------

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """[1, 3, H, W] float32, preprocessed as the artifact's config describes."""
        return config_pixel_values(self.config, image, self.artifact_dir / GENAI_CONFIG)

    def _prompt_ids(self, question: str) -> np.ndarray:
        return np.asarray([prompt_token_ids(self.prompt, self.tokenizer, question)], dtype=np.int64)

    def _embed(self, input_ids: np.ndarray) -> np.ndarray:
        io = self.config["model"]["embedding"]
        return self._sessions["embedding"].run([io["outputs"]["inputs_embeds"]], {io["inputs"]["input_ids"]: input_ids})[0]

    def _empty_cache(self) -> dict[str, np.ndarray]:
        """A zero-length past: the prefill step's cache (the graph takes past length 0)."""
        empty = np.zeros((1, self._kv_shape[0], 0, self._kv_shape[1]), dtype=np.float32)
        return dict.fromkeys(self._past_names, empty)

    def _decode(self, inputs_embeds: np.ndarray, past: dict[str, np.ndarray], past_length: int):
        """One decoder call: logits of the last position and the cache extended by this call's tokens."""
        sequence = inputs_embeds.shape[1]
        names = self._inputs
        feed = {names["inputs_embeds"]: inputs_embeds, **past,
                names["attention_mask"]: np.ones((1, past_length + sequence), dtype=np.int64),
                names["position_ids"]: np.arange(past_length, past_length + sequence, dtype=np.int64)[None]}
        logits, *present = self._sessions["decoder"].run(self._outputs, feed)
        return logits[0, -1], dict(zip(self._past_names, present))

    def _prefill(self, image: Image.Image, question: str):
        ids = self._prompt_ids(question)
        embeds = self._embed(ids)
        slots = ids[0] == self._image_token_id
        features = self.image_embeddings(image)
        if int(slots.sum()) != features.shape[0]:
            raise UserError(f"{self.artifact_dir}: the prompt has {int(slots.sum())} image tokens, the vision graph "
                            f"makes {features.shape[0]} features (genai_config.json disagrees with vision.onnx)")
        embeds[0, slots] = features
        logits, past = self._decode(embeds, self._empty_cache(), 0)
        return logits, past, ids.shape[1]

    # -- the adapter interface -------------------------------------------------------------------

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """The vision graph's output for one image: (image tokens, LLM hidden size), as the LLM receives it."""
        io = self.config["model"]["vision"]
        return self._sessions["vision"].run([io["outputs"]["image_features"]],
                                            {io["inputs"]["pixel_values"]: self.pixel_values(image)})[0][0]

    def first_token_logits(self, image: Image.Image, question: str) -> np.ndarray:
        """Logits over the vocabulary for the first answer token."""
        return self._prefill(image, question)[0].copy()

    def answer_tokens(self, image: Image.Image, question: str) -> list[int]:
        """The greedy answer's token ids (EOS not included), at most MAX_ANSWER_TOKENS."""
        logits, past, length = self._prefill(image, question)
        state = {"past": past, "length": length}

        def step(token: int) -> np.ndarray:
            logits, state["past"] = self._decode(self._embed(np.asarray([[token]], dtype=np.int64)),
                                                 state["past"], state["length"])
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
