"""ONNX export of a vision-language checkpoint: three graphs and the config a device needs to run them.

An ONNX package (this module's fp32 export, and every tier's, export/onnx_export.py) holds:

    vision.onnx, embedding.onnx, text.onnx   the three graphs (below), weights inside each file
    onnx_config.json      the package contract: graph files, tensor names, dtypes and shapes, special
                          token ids, the prompt, the image preprocessing, how to decode
    answer.py             the contract as a runnable example: onnxruntime, numpy, tokenizers and Pillow
                          only (`python answer.py IMAGE "QUESTION"`; export/onnx_example/answer.py)
    tokenizer.json, tokenizer_config.json, processor_config.json, chat_template.jinja
                          the model's own processor files, copied as transformers saves them

Why our own config and not ONNX Runtime GenAI's genai_config.json: GenAI's multimodal runtimes are per
model type (phi3v, phi4mm, qwen2_5_vl, gemma3, fara, mistral3 in onnxruntime-genai 0.18) and none of this
project's families (LLaVA with Llama or Qwen2, Idefics3/SmolVLM, MobileVLM) is among them, so a file
borrowing that name promised what GenAI cannot load. The layout below is ours and versioned.

The package contract (onnx_config.json, `format` "vlm-factory-onnx", `schema_version` 1)
-----------------------------------------------------------------------------------------
A reader checks `format` and `schema_version` before anything else and refuses a version it does not
know: a new version is written whenever a key changes meaning or a reader must do something new.

    model.family                  the family that exported it (a label)
    model.vocab_size              the logits' last dim
    model.context_length          prompt + answer tokens never exceed it (the decoder's positions)
    model.eos_token_ids           stop at any of them (the tokenizer's EOS first, then the LLM config's)
    model.image_token_id          the id of prompt.image_token: where image features go
    model.bos_token_id, pad_token_id   for reference: the tokenizer adds BOS itself, batch 1 pads nothing
    model.<graph>                 vision, embedding, decoder: `filename`, `inputs` and `outputs` as
                                  {role: {name, dtype, shape}} (an int is a fixed size, a string a
                                  symbolic dim); per tier also `precision` and, with ort_format,
                                  `ort_filename` (the same graph for ONNX Runtime Mobile)
    model.vision.preprocessing    image -> pixels (runtime/preprocess.py, runtime/tiling.py)
    prompt                        template with {question} and one image_token, image_token_repeat,
                                  add_special_tokens, answer (the training target's form), and for
                                  families that cut images into tiles `image_layout`
    generation                    greedy (do_sample false, num_beams 1), at most max_new_tokens tokens

Symbolic dims: `batch`; `sequence`, the tokens of this call; `past_sequence`, the tokens already in the
cache; `total_sequence` = past_sequence + sequence. Roles and their default names (the config's are
authoritative):

    vision.onnx     pixel_values    float32 [batch, 3, H, W]  -> image_features float32 [batch, image tokens, hidden]
                    (batch = the views of one image: 1, or rows x cols tiles + a global view; the
                    family's `image_features`: tower at its feature layer + connector)
    embedding.onnx  input_ids       int64   [batch, sequence] -> inputs_embeds  float32 [batch, sequence, hidden]
    text.onnx       inputs_embeds   float32 [batch, sequence, hidden]
                    attention_mask  int64   [batch, total_sequence]   ones: every past and present token
                    position_ids    int64   [batch, sequence]         past_sequence .. total_sequence - 1
                    past_key_values.%d.key, past_key_values.%d.value  float32 [batch, kv heads, past_sequence,
                                    head size], %d the layer (0-based), fed in the order layer 0 key, layer 0
                                    value, layer 1 key, ...
                    -> logits       float32 [batch, sequence, vocab]
                    -> present.%d.key, present.%d.value  float32 [batch, kv heads, total_sequence, head size]:
                                    the cache, fed back as the next call's past

Answering one question (answer.py, and the project's runtime/onnx_runtime.py, step for step):

1. preprocess the image as `model.vision.preprocessing` says: [views, 3, H, W] float32 and the grid of
   tiles rows x cols (0 x 0: one view, always so without a tiling spec);
2. the prompt: `template` with {question} replaced by the stripped question, its image_token replaced by
   image_token x image_token_repeat (with `image_layout`: one block of image_token_repeat image tokens
   per view, between the layout's marker tokens: runtime/tiling.py `expand_image_tokens`); tokenized
   with tokenizer.json, special tokens added only if `add_special_tokens`;
3. vision.onnx on all views as one batch; its features, view by view, are [views x image tokens, hidden];
4. embedding.onnx on the prompt's ids; the rows at the positions whose id is image_token_id are replaced
   by the features, in order (there are exactly as many);
5. prefill: text.onnx on the whole prompt (batch 1) with an empty cache (past_sequence 0: float32 zeros
   [1, kv heads, 0, head size] for every past input), a mask of ones and positions 0 .. n - 1;
6. greedy decoding: the argmax of the last position's logits is the next token; an EOS id ends the
   answer (and is not part of it), as does reaching max_new_tokens; otherwise the token goes through
   embedding.onnx and text.onnx (sequence 1, positions and mask extended by one, presents as pasts);
7. the answer is tokenizer.json's decoding of the tokens, special tokens skipped, stripped.

Everything model-specific comes from the model family (families/): where the tower, connector,
embedding table and decoder live, and the facts (heads, KV heads, head size, vocabulary). The
decoder's output projection is applied as a matrix product with the family's LM-head weight, so a
checkpoint with tied embeddings (the LM head *is* the embedding table) exports the same way.

Why three graphs and not one: the vision graph runs once per image and the embedding lookup once
per token, while the decoder runs once per generated token; the app merges image features into the
token embeddings at the image-token positions between the first two and the third, which is also where
a device can cache an image's features. Quantizers treat the three differently too.

Exporter: `torch.onnx.export(dynamo=True)` for all three (torch.export traces the transformers
modules, DynamicCache included). torch.export specialises any dimension whose sample size is 1 (or
0), so the samples use batch 2, sequence 3 and past 4, and every dynamic axis is named; the names
become the graphs' symbolic dims. A past length of 0 (the prompt's prefill) is not a special case:
the app feeds empty [batch, kv heads, 0, head dim] tensors, and `self_check` runs each written graph
in onnxruntime at batch 1, sequence 1 and past 0 against PyTorch before the export is accepted.

Checkpoints stored in float16 or bfloat16 (hub snapshots) are exported from float32: the family
loads every checkpoint in float32, and the tier's precision is applied afterwards (onnx_export.py).
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from vlm_factory.artifacts import EXPORT_REPORT
from vlm_factory.errors import UserError
from vlm_factory.export.tool_versions import package_versions
from vlm_factory.families import ModelFamily, family_for
from vlm_factory.io import atomic_dir, write_json
from vlm_factory.model.checkpoint import load_model
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS
from vlm_factory.runtime.artifact_schema import (BATCH, ONNX_CONFIG, ONNX_FORMAT, ONNX_SCHEMA_VERSION, PAST_SEQUENCE,
                                                 SEQUENCE, TOTAL_SEQUENCE)

log = logging.getLogger(__name__)

VISION_FILE, EMBEDDING_FILE, TEXT_FILE = "vision.onnx", "embedding.onnx", "text.onnx"
# The standalone example every package carries (kept in the library so it is linted and tested).
EXAMPLE = Path(__file__).resolve().parent / "onnx_example" / "answer.py"
# Pinned rather than torch's default, so a torch upgrade cannot silently change what devices must run.
OPSET = 20
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
# Sample sizes for tracing: none may be 1 (torch.export would fix that axis to 1).
SAMPLE_BATCH, SAMPLE_SEQUENCE, SAMPLE_PAST = 2, 3, 4
# onnxruntime vs PyTorch at fp32, for the self-check at unseen shapes. Measured on the bundled base:
# ~5e-5 on vision features (SigLIP activations before the post-layernorm reach ~100) and ~1e-5 on logits.
SELF_CHECK_ATOL = 1e-3
ONNX_TOOLS = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")
PROMPT_NOTE = ("replace {question} with the stripped question, repeat image_token image_token_repeat times, "
               "tokenize with tokenizer.json (special tokens only if add_special_tokens), put image_features "
               "at the positions of image_token_id; answer.py does it step by step")
# For families that cut images into tiles (a `kind` in vision.preprocessing, `image_layout` in the prompt).
TILED_PROMPT_NOTE = ("cut the image into rows x cols tiles + a global view as vision.preprocessing says; run "
                     "vision.onnx on all views (batch = views) and concatenate their image_features in order; "
                     "replace {question} with the stripped question and image_token with one block per view as "
                     "image_layout says (image_token_repeat image tokens each; rows = cols = 0: the global block "
                     "only); tokenize with tokenizer.json (special tokens only if add_special_tokens) and put the "
                     "features at the positions of image_token_id; answer.py does it step by step")


def kv_names(n_layers: int, key: str, value: str) -> list[str]:
    """Flat per-layer names in the order the graphs take them: layer 0 key, layer 0 value, layer 1 key..."""
    return [pattern % i for i in range(n_layers) for pattern in (key, value)]


def _family(model, family: ModelFamily | None) -> ModelFamily:
    """The family the caller has, or the one of the model's config (callers holding only a model)."""
    return family if family is not None else family_for(model.config)


class VisionGraph(torch.nn.Module):
    """pixel_values -> image features, exactly the family's `image_features(model, pixels)`."""

    def __init__(self, model, family: ModelFamily | None = None):
        super().__init__()
        self.model = model
        self.family = _family(model, family)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.family.image_features(self.model, pixel_values)


class EmbeddingGraph(torch.nn.Module):
    def __init__(self, model, family: ModelFamily | None = None):
        super().__init__()
        self.embed_tokens = _family(model, family).input_embeddings(model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class TextGraph(torch.nn.Module):
    """The decoder stack + LM head over flat KV-cache tensors (a DynamicCache is built inside the trace).

    The LM head is applied as `hidden @ weight.T (+ bias)` with the weight of the family's `lm_head`:
    an nn.Linear, or the embedding table itself when the checkpoint ties them (calling an embedding
    module on hidden states would be a lookup, not a projection).
    """

    def __init__(self, model, family: ModelFamily | None = None):
        super().__init__()
        parts = _family(model, family).decoder_parts(model)
        self.decoder = parts.core
        self.lm_head = parts.lm_head

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(key, value) for key, value in past_key_values])
        out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        logits = torch.nn.functional.linear(out.last_hidden_state, self.lm_head.weight,
                                            getattr(self.lm_head, "bias", None))
        return (logits, *present)


def _export(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_shapes) -> None:
    # Weights stay inside the .onnx file: the graphs are small and a single file is what apps bundle.
    # torch.onnx logs one warning per torchvision op it cannot register; torchvision is not used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # Noise, not problems: a pytree deprecation inside torch.export, and the note that axes given the
        # same name (e.g. every past_sequence) were found equal and share that name.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used", category=UserWarning)
        torch.onnx.export(module.eval(), args, str(path), dynamo=True, opset_version=OPSET, external_data=False,
                          input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
                          verbose=False)


def export_vision(model, path: Path, family: ModelFamily | None = None) -> None:
    vision = _family(model, family).vision
    pixels = torch.randn(SAMPLE_BATCH, vision.num_channels, vision.image_size, vision.image_size)
    _export(VisionGraph(model, family), (pixels,), path, ["pixel_values"], ["image_features"],
            {"pixel_values": {0: "batch"}})


def export_embedding(model, path: Path, family: ModelFamily | None = None) -> None:
    ids = torch.randint(0, _family(model, family).text.vocab_size, (SAMPLE_BATCH, SAMPLE_SEQUENCE))
    _export(EmbeddingGraph(model, family), (ids,), path, ["input_ids"], ["inputs_embeds"],
            {"input_ids": {0: "batch", 1: "sequence"}})


def sample_text_inputs(model, batch: int, sequence: int, past: int, generator: torch.Generator | None = None,
                       family: ModelFamily | None = None) -> tuple:
    """Random decoder inputs in TextGraph's argument order (no padding: the mask is all ones)."""
    text = _family(model, family).text
    kv_shape = (batch, text.num_kv_heads, past, text.head_dim)
    past_kv = [(torch.randn(kv_shape, generator=generator), torch.randn(kv_shape, generator=generator))
               for _ in range(text.num_layers)]
    return (torch.randn(batch, sequence, text.hidden_size, generator=generator),
            torch.ones(batch, past + sequence, dtype=torch.int64),
            torch.arange(past, past + sequence).repeat(batch, 1), past_kv)


def export_text(model, path: Path, family: ModelFamily | None = None) -> None:
    n_layers = _family(model, family).text.num_layers
    args = sample_text_inputs(model, SAMPLE_BATCH, SAMPLE_SEQUENCE, SAMPLE_PAST, family=family)
    kv_axes = {0: "batch", 2: "past_sequence"}
    dynamic = {"inputs_embeds": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
               "position_ids": {0: "batch", 1: "sequence"},
               "past_key_values": [(kv_axes, kv_axes) for _ in range(n_layers)]}
    inputs = ["inputs_embeds", "attention_mask", "position_ids", *kv_names(n_layers, PAST_KEY, PAST_VALUE)]
    _export(TextGraph(model, family), args, path, inputs,
            ["logits", *kv_names(n_layers, PRESENT_KEY, PRESENT_VALUE)], dynamic)


def eos_token_ids(tokenizer, family: ModelFamily) -> list[int]:
    """The tokenizer's EOS first, then the LLM config's EOS id(s) where they differ (generation stops at any)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    config_eos = family.text.eos_token_id
    for token in config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]:
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    return ids


def _tensor(name: str, dtype: str, shape: list) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape}


def onnx_config(model, processor, family: ModelFamily | None = None) -> dict:
    """The package contract (module docstring) for this model: the three graphs' tensors, the special
    token ids, the prompt and preprocessing they assume, and how to decode.

    `num_image_tokens` is per view: a family that cuts images into tiles (a tiling spec in `preprocessing`,
    `image_layout` in the prompt) feeds the vision graph every view of an image as one batch.
    """
    family = _family(model, family)
    text, vision, tokenizer = family.text, family.vision, processor.tokenizer
    prompt = family.prompt(processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text.pad_token_id
    hidden, size = text.hidden_size, vision.image_size
    cache = [BATCH, text.num_kv_heads, PAST_SEQUENCE, text.head_dim]
    present = [BATCH, text.num_kv_heads, TOTAL_SEQUENCE, text.head_dim]
    return {
        "format": ONNX_FORMAT, "schema_version": ONNX_SCHEMA_VERSION,
        "model": {
            "family": family.name, "vocab_size": text.vocab_size, "context_length": text.max_positions,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_ids": eos_token_ids(tokenizer, family),
            "pad_token_id": pad, "image_token_id": family.image_token_id,
            "vision": {
                "filename": VISION_FILE, "num_image_tokens": family.image_tokens,
                "image_size": [size, size], "num_channels": vision.num_channels,
                "inputs": {"pixel_values": _tensor("pixel_values", "float32",
                                                   [BATCH, vision.num_channels, size, size])},
                "outputs": {"image_features": _tensor("image_features", "float32",
                                                      [BATCH, family.image_tokens, hidden])},
                "preprocessing": family.preprocessing(processor),
            },
            "embedding": {
                "filename": EMBEDDING_FILE,
                "inputs": {"input_ids": _tensor("input_ids", "int64", [BATCH, SEQUENCE])},
                "outputs": {"inputs_embeds": _tensor("inputs_embeds", "float32", [BATCH, SEQUENCE, hidden])},
            },
            "decoder": {
                "filename": TEXT_FILE, "hidden_size": hidden, "head_size": text.head_dim,
                "num_attention_heads": text.num_heads, "num_key_value_heads": text.num_kv_heads,
                "num_hidden_layers": text.num_layers,
                "inputs": {"inputs_embeds": _tensor("inputs_embeds", "float32", [BATCH, SEQUENCE, hidden]),
                           "attention_mask": _tensor("attention_mask", "int64", [BATCH, TOTAL_SEQUENCE]),
                           "position_ids": _tensor("position_ids", "int64", [BATCH, SEQUENCE]),
                           "past_key": _tensor(PAST_KEY, "float32", cache),
                           "past_value": _tensor(PAST_VALUE, "float32", cache)},
                "outputs": {"logits": _tensor("logits", "float32", [BATCH, SEQUENCE, text.vocab_size]),
                            "present_key": _tensor(PRESENT_KEY, "float32", present),
                            "present_value": _tensor(PRESENT_VALUE, "float32", present)},
            },
        },
        "prompt": {**prompt.as_dict(), "note": TILED_PROMPT_NOTE if prompt.image_layout else PROMPT_NOTE},
        "generation": {"do_sample": False, "num_beams": 1, "max_new_tokens": MAX_ANSWER_TOKENS},
    }


def export_graphs(model, out_dir: Path, family: ModelFamily | None = None) -> None:
    for name, export in ((VISION_FILE, export_vision), (EMBEDDING_FILE, export_embedding), (TEXT_FILE, export_text)):
        started = time.perf_counter()
        export(model, out_dir / name, family)
        log.info("exported %s in %.1fs", name, time.perf_counter() - started)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _max_diff(actual: list[np.ndarray], expected) -> float:
    expected = [expected] if isinstance(expected, torch.Tensor) else expected
    if len(actual) != len(expected) or any(a.shape != tuple(e.shape) for a, e in zip(actual, expected)):
        return float("inf")
    return max(float(np.abs(a - e.numpy()).max()) for a, e in zip(actual, expected))


@torch.no_grad()
def self_check(model, out_dir: Path, family: ModelFamily | None = None) -> dict:
    """Max abs diff onnxruntime vs PyTorch per graph at shapes the trace did not see (batch 1, past 0)."""
    family = _family(model, family)
    vision, text = family.vision, family.text
    generator = torch.Generator().manual_seed(0)  # the same inputs every time, and the global RNG left alone
    pixels = torch.randn(1, vision.num_channels, vision.image_size, vision.image_size, generator=generator)
    ids = torch.randint(0, text.vocab_size, (1, 5), generator=generator)
    text_args = sample_text_inputs(model, 1, 1, 0, generator, family)
    text_feed = dict(zip(["inputs_embeds", "attention_mask", "position_ids"], (t.numpy() for t in text_args[:3])))
    text_feed.update(zip(kv_names(text.num_layers, PAST_KEY, PAST_VALUE),
                         (t.numpy() for kv in text_args[3] for t in kv)))
    diffs = {
        VISION_FILE: _max_diff(_session(out_dir / VISION_FILE).run(None, {"pixel_values": pixels.numpy()}),
                               VisionGraph(model, family)(pixels)),
        EMBEDDING_FILE: _max_diff(_session(out_dir / EMBEDDING_FILE).run(None, {"input_ids": ids.numpy()}),
                                  EmbeddingGraph(model, family)(ids)),
        TEXT_FILE: _max_diff(_session(out_dir / TEXT_FILE).run(None, text_feed), TextGraph(model, family)(*text_args)),
    }
    bad = {name: diff for name, diff in diffs.items() if not diff <= SELF_CHECK_ATOL}
    if bad:
        raise RuntimeError(f"exported ONNX graphs disagree with PyTorch at batch 1 / past 0: {bad} "
                           f"(max abs diff, atol {SELF_CHECK_ATOL})")
    return diffs


def describe_onnx(path: Path) -> dict:
    """File size, opset and the symbolic input/output shapes, read back from the written graph."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def shapes(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    return {"file": path.name, "file_bytes": path.stat().st_size,
            "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
            "inputs": shapes(proto.graph.input), "outputs": shapes(proto.graph.output)}


def export_onnx_fp32(model_dir: Path | str, out_dir: Path | str) -> dict:
    """Write `out_dir` (atomically): three fp32 graphs, onnx_config.json, answer.py, processor files,
    export_report.json."""

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UserError(f"ONNX export needs the onnx extra ({exc.name} is missing): "
                        "pip install -c constraints.txt -e '.[onnx]'") from None
    family, model, processor = load_model(model_dir)  # float32 whatever the checkpoint's dtype
    started = time.perf_counter()
    with atomic_dir(out_dir) as staging:
        export_graphs(model, staging, family)
        diffs = self_check(model, staging, family)
        processor.save_pretrained(staging)
        write_json(onnx_config(model, processor, family), staging / ONNX_CONFIG)
        shutil.copy2(EXAMPLE, staging / EXAMPLE.name)
        files = {role: describe_onnx(staging / name)
                 for role, name in (("vision", VISION_FILE), ("embedding", EMBEDDING_FILE), ("text", TEXT_FILE))}
        report = {
            "format": "onnx", "precision": "fp32", "family": family.name, "variant": family.variant,
            "exporter": "torch.onnx.export(dynamo=True)", "opset": OPSET,
            "files": files, "total_bytes": sum(f["file_bytes"] for f in files.values()),
            "self_check_max_abs_diff": diffs, "tools": package_versions(*ONNX_TOOLS),
        }
        write_json(report, staging / EXPORT_REPORT)
    log.info("onnx fp32: %.1f MiB in 3 graphs, in %.1fs", report["total_bytes"] / 2**20, time.perf_counter() - started)
    return report
