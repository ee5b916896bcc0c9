"""Answer VQA questions with an ONNX export (vision / embedding / text graphs) in onnxruntime.

Everything the adapter needs comes from the artifact directory, as on a device: the graphs,
`onnx_config.json` (the package contract, export/onnx_graphs.py: tensor names, dtypes and shapes,
token ids, the model's prompt, image preprocessing) and the tokenizer files. Preprocessing is done
with PIL and numpy from that config (runtime/preprocess.py) rather than by transformers' processor,
so the parity gate measures what a device app would compute; the prompt is the exported PromptSpec
(runtime/prompting.py), whatever the model's chat template is. The package's own answer.py follows
the same contract without this project (tests/test_onnx_package.py: both answer alike).

An image is one view (LLaVA) or, with a tiling spec (Idefics3/SmolVLM), `rows x cols` tiles + a global
view (runtime/preprocess.py `image_views`): the vision graph runs once on all views as one batch (its
batch axis is dynamic), the features are concatenated view by view, and the prompt's image token is
expanded for that grid (`PromptSpec.expanded(question, rows, cols)`), `num_image_tokens` per view.

The config's `format` and `schema_version` are checked first (a version this runtime does not know is
refused as such), then the whole file is validated (runtime/artifact_schema.py `OnnxConfig`: every
tensor's dtype and shape is the contract's), then checked against the graphs themselves: every
tensor name exists, each graph takes exactly what the adapter feeds, dtypes and ranks agree, and the
static dims (image size, KV heads, head size, hidden size, vocabulary) are the config's. A mismatch
is one line naming onnx_config.json and the key, not an onnxruntime error in the middle of a run.

Decoding is batch 1 and greedy, like the reference: the prompt (image features merged at the
image-token positions) is prefilled against an empty (zero-length) KV cache, then one token at a
time until an EOS id (the config's `eos_token_ids`) or MAX_ANSWER_TOKENS.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vlm_factory.errors import UserError, first_line
from vlm_factory.families.processor_files import check_processor_files
from vlm_factory.hf_files import load_pretrained
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS
from vlm_factory.runtime.artifact_schema import (FIX, ONNX_CONFIG, ONNX_DTYPES, OnnxConfig, OnnxHeader, OnnxModel,
                                                 TensorContract, read_runtime_config)
from vlm_factory.runtime.declared_io import DeclaredIO
from vlm_factory.runtime.onnx_check import check_external_data
from vlm_factory.runtime.preprocess import config_image_views
from vlm_factory.runtime.prompting import (Decoded, TokenizerAnswers, check_special_tokens, greedy_decode,
                                          prompt_token_ids)

ROLES = ("vision", "embedding", "decoder")
TOKENIZER = "the export's tokenizer (tokenizer.json, tokenizer_config.json)"


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


def _run_errors() -> tuple[type[BaseException], ...]:
    """What InferenceSession.run raises for inputs a graph refuses (its own types derive from Exception)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return (ValueError, RuntimeError, *(getattr(state, n) for n in names if hasattr(state, n)))


class _GraphCheck(DeclaredIO):
    """One graph's declared inputs and outputs against what onnx_config.json says about them."""

    def __init__(self, session, path: Path, config_path: Path):
        super().__init__({arg.name: arg for arg in session.get_inputs()},
                         {arg.name: arg for arg in session.get_outputs()}, path, config_path, "the graph")

    def tensor(self, entry: TensorContract, name: str) -> None:
        """The graph's `name` has the contract's dtype, rank and fixed sizes (symbolic dims pass)."""
        arg = (self.outputs if entry.output else self.inputs)[name]
        if arg.type != ONNX_DTYPES[entry.dtype]:
            raise self.fail(f"{entry.key}.dtype", f"{entry.dtype}, but {name!r} is {arg.type}")
        shape = arg.shape if isinstance(arg.shape, list) else []
        if not shape:  # no shape declared: nothing to compare (onnxruntime checks at run time)
            return
        if len(shape) != len(entry.shape):
            raise self.fail(f"{entry.key}.shape", f"has {len(entry.shape)} dims, but {name!r} has {len(shape)}")
        for axis, (found, expected) in enumerate(zip(shape, entry.shape)):
            if isinstance(expected, tuple) and isinstance(found, int) and found != expected[0]:
                raise self.fail(expected[1], f"{expected[0]}, but {name!r} has {found} on axis {axis}")


def _names(entries: list[TensorContract], layers: int) -> dict[str, str]:
    """{the key to blame (and the layer, for a cache tensor): the graph's tensor name} of these tensors."""
    named = {}
    for entry in entries:
        for layer, name in enumerate(entry.names(layers)):
            named[f"{entry.key}.name" + (f" (layer {layer})" if entry.per_layer else "")] = name
    return named


def check_graphs(sessions: dict, paths: dict[str, Path], model: OnnxModel, config_path: Path) -> None:
    """Every tensor onnx_config.json names exists in its graph with the contract's dtype and sizes, and each
    graph takes exactly the inputs the adapter feeds: a one-line error naming the key otherwise."""
    layers = model.decoder.num_hidden_layers  # at most MAX_LAYERS (artifact_schema)
    for role in ROLES:
        check = _GraphCheck(sessions[role], paths[role], config_path)
        entries = [entry for entry in model.contract() if entry.role == role]
        check.takes_exactly(_names([e for e in entries if not e.output], layers),
                            "model.decoder.num_hidden_layers" if role == "decoder" else f"model.{role}.inputs")
        check.gives(_names([e for e in entries if e.output], layers))
        for entry in entries:
            for name in entry.names(layers):
                check.tensor(entry, name)


class OnnxRuntime(TokenizerAnswers):
    """The three graphs of an ONNX export, one InferenceSession each, behind the adapter interface."""

    def __init__(self, artifact_dir: Path | str, providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int | None = None):
        from transformers import AutoTokenizer

        self.artifact_dir = Path(artifact_dir)
        # Every graph name is contained before onnxruntime (or onnx.load) opens anything.
        self.config, self.typed_config, graphs, config_path = read_runtime_config(
            self.artifact_dir, ONNX_CONFIG, "an ONNX export", OnnxConfig, ROLES, header=OnnxHeader)
        model = self.typed_config.model
        check_processor_files(self.artifact_dir, fix=FIX)  # tokenizer/processor files: cheap, before any graph opens
        options = _session_options(intra_op_threads)
        self._graphs = graphs
        self._sessions = {role: _open_session(path, options, providers) for role, path in graphs.items()}
        check_graphs(self._sessions, graphs, model, config_path)
        self.tokenizer = load_pretrained(AutoTokenizer, self.artifact_dir, TOKENIZER)
        self.prompt = self.typed_config.prompt.spec()
        self._eos = set(model.eos_token_ids)
        check_special_tokens(self.prompt, self.tokenizer, config_path, image_token_id=model.image_token_id,
                             image_key="model.image_token_id", eos=self._eos, eos_key="model.eos_token_ids")
        decoder = model.decoder
        self._kv_shape = (decoder.num_key_value_heads, decoder.head_size)
        self._past_names = decoder.past_names()
        self._outputs = [decoder.outputs.logits.name] + decoder.present_names()
        self._image_token_id = model.image_token_id

    def close(self) -> None:
        self._sessions.clear()

    def __enter__(self) -> "OnnxRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- building blocks -------------------------------------------------------------------------

    def _run(self, role: str, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._sessions[role].run(outputs, feed)
        except _run_errors() as exc:
            raise UserError(f"{self._graphs[role]}: onnxruntime cannot run this graph ({first_line(exc)}); "
                            "re-run its export") from None

    def views(self, image: Image.Image) -> tuple[np.ndarray, int, int]:
        """[views, 3, H, W] float32 and the grid of tiles (rows, cols), as the artifact's config describes."""
        return config_image_views(self.typed_config.model.vision, image, self.artifact_dir / ONNX_CONFIG)

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """[views, 3, H, W] float32 (one view unless the spec cuts images into tiles), as the config describes."""
        return self.views(image)[0]

    def _prompt_ids(self, question: str, rows: int = 0, cols: int = 0) -> np.ndarray:
        return np.asarray([prompt_token_ids(self.prompt, self.tokenizer, question, rows, cols)], dtype=np.int64)

    def _features(self, pixels: np.ndarray) -> np.ndarray:
        """Every view through the vision graph in one batch: [views * image tokens, LLM hidden], view by view."""
        io = self.typed_config.model.vision
        features = self._run("vision", [io.outputs.image_features.name], {io.inputs.pixel_values.name: pixels})[0]
        return features.reshape(-1, features.shape[-1])

    def _embed(self, input_ids: np.ndarray) -> np.ndarray:
        io = self.typed_config.model.embedding
        return self._run("embedding", [io.outputs.inputs_embeds.name], {io.inputs.input_ids.name: input_ids})[0]

    def _empty_cache(self) -> dict[str, np.ndarray]:
        """A zero-length past: the prefill step's cache (the graph takes past length 0)."""
        empty = np.zeros((1, self._kv_shape[0], 0, self._kv_shape[1]), dtype=np.float32)
        return dict.fromkeys(self._past_names, empty)

    def _decode(self, inputs_embeds: np.ndarray, past: dict[str, np.ndarray], past_length: int):
        """One decoder call: logits of the last position and the cache extended by this call's tokens."""
        sequence = inputs_embeds.shape[1]
        names = self.typed_config.model.decoder.inputs
        feed = {names.inputs_embeds.name: inputs_embeds, **past,
                names.attention_mask.name: np.ones((1, past_length + sequence), dtype=np.int64),
                names.position_ids.name: np.arange(past_length, past_length + sequence, dtype=np.int64)[None]}
        logits, *present = self._run("decoder", self._outputs, feed)
        return logits[0, -1], dict(zip(self._past_names, present))

    def _prefill(self, image: Image.Image, question: str):
        pixels, rows, cols = self.views(image)
        ids = self._prompt_ids(question, rows, cols)
        embeds = self._embed(ids)
        slots = ids[0] == self._image_token_id
        features = self._features(pixels)
        if int(slots.sum()) != features.shape[0]:
            raise UserError(f"{self.artifact_dir}: the prompt has {int(slots.sum())} image tokens, the vision graph "
                            f"makes {features.shape[0]} features for {len(pixels)} views (onnx_config.json "
                            "disagrees with vision.onnx)")
        embeds[0, slots] = features
        logits, past = self._decode(embeds, self._empty_cache(), 0)
        return logits, past, ids.shape[1]

    # -- the adapter interface -------------------------------------------------------------------

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """The vision graph's output for every view of one image, concatenated in view order:
        (views * image tokens, LLM hidden size), as the LLM receives it (one view: (image tokens, hidden))."""
        return self._features(self.pixel_values(image))

    def first_token_logits(self, image: Image.Image, question: str) -> np.ndarray:
        """Logits over the vocabulary for the first answer token."""
        return self._prefill(image, question)[0].copy()

    def decode(self, image: Image.Image, question: str, max_new_tokens: int = MAX_ANSWER_TOKENS) -> Decoded:
        """The greedy answer for one (image, question), stopped at EOS or after `max_new_tokens`."""
        logits, past, length = self._prefill(image, question)
        state = {"past": past, "length": length}

        def step(token: int) -> np.ndarray:
            logits, state["past"] = self._decode(self._embed(np.asarray([[token]], dtype=np.int64)),
                                                 state["past"], state["length"])
            state["length"] += 1
            return logits

        return greedy_decode(logits, step, self._eos, max_new_tokens)
