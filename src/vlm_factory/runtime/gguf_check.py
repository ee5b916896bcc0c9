"""Read a GGUF file back before anything trusts it: a truncated or corrupt file is a one-line error.

llama.cpp would reject such a file too, but through a C++ log and a generic "failed to load";
gguf-py's reader checks the magic, version and that every tensor's data lies inside the file.

`check_llamacpp_pair` goes further for the files LlamaCppRuntime hands to llama.cpp: every tensor
name and shape is checked against what llama.cpp's loaders will look for, derived from the file's
own metadata (LLM: its arch's block count, embedding length, head counts, feed-forward length,
vocabulary; mmproj: the projector type, the tower's width, depth, patch and image size, the
projection dim, the projector's own keys such as Idefics3's scale factor, ldpv2's fixed grid and F16
convolution kernel, without which libmtmd aborts the process). libmtmd trusts an
mmproj's tensors: one renamed by a single byte loads as "absent" and the first image dereferences
it (a segfault), so a renamed, missing, extra or misshapen tensor is refused here as a one-line
error naming the file and the tensor.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vlm_factory.errors import UserError

# The LLM archs (our exporter's) and mmproj projector types the tensor checks know.
LLM_ARCHS = ("llama", "qwen2")
PROJECTOR_TYPES = ("mlp", "idefics3", "ldpv2")
# clip.cpp's ldpv2 graph reshapes the patches to this fixed grid (`int n_patch = 24`); any other count
# fails a GGML_ASSERT inside libmtmd, which aborts the process.
LDPV2_GRID = 24
_MAX_DIM = 1 << 24  # far beyond any real width/depth; a corrupt value would otherwise size allocations


def open_gguf(path: Path | str, expect_type: str | None = None):
    """A `gguf.GGUFReader` over `path`; `expect_type` ("model" or "mmproj") checks general.type."""
    import gguf

    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise UserError(f"{path}: GGUF file not found; run its export stage (dvc repro)") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: not a regular file (a directory, FIFO or device); a GGUF export is a plain file")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError, KeyError, UnicodeDecodeError) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"{path}: not a readable GGUF file (truncated or corrupt: {first}); "
                        "delete it and re-run its export stage") from None
    if expect_type is not None:
        field = reader.fields.get("general.type")
        try:
            actual = bytes(field.parts[field.data[0]]).decode() if field else "model"
        except UnicodeDecodeError:
            actual = "<not UTF-8>"
        if actual != expect_type:
            raise UserError(f"{path}: general.type is {actual!r}, expected {expect_type!r}; "
                            "were the LLM and mmproj files swapped?")
    return reader


# -- metadata --------------------------------------------------------------------------------------

def _value(reader, path: Path, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (UnicodeDecodeError, ValueError, IndexError):
        raise UserError(f"{path}: metadata key {key!r} is unreadable; re-export it") from None


def _int(reader, path: Path, key: str, default: int | None = None, minimum: int = 1) -> int:
    value = _value(reader, path, key)
    if value is None:
        if default is not None:
            return default
        raise UserError(f"{path}: metadata key {key!r} is missing (llama.cpp needs it); re-export it")
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _MAX_DIM:
        raise UserError(f"{path}: metadata key {key!r} is {value!r}, expected an integer in "
                        f"[{minimum}, {_MAX_DIM}]; re-export it")
    return value


def _str(reader, path: Path, key: str) -> str:
    value = _value(reader, path, key)
    if not isinstance(value, str):
        raise UserError(f"{path}: metadata key {key!r} is {'missing' if value is None else repr(value)}, "
                        "expected a string; re-export it")
    return value


def _divides(path: Path, what: str, a: int, b: int) -> None:
    if b % a:
        raise UserError(f"{path}: {what}: {b} is not a multiple of {a}; re-export it")


# -- tensors ---------------------------------------------------------------------------------------

def _tensor_shapes(reader, path: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in reader.tensors:
        if tensor.name in shapes:
            raise UserError(f"{path}: tensor {tensor.name!r} appears twice; re-export it")
        shapes[tensor.name] = tuple(int(d) for d in tensor.shape)
    return shapes


def _check_tensors(path: Path, shapes: dict, specs: list, n_blocks: int, what: str) -> None:
    """`specs`: (name or "…{i}…" template, expected ggml shape (ne0 first) or None, required, why).

    Every tensor must be one the loader looks for (a renamed one is not); every required one must be
    there; an optional per-block tensor is in every block or in none; each shape matches.
    """
    expected: dict[str, tuple] = {}
    for template, shape, required, why in specs:
        names = [template.format(i=i) for i in range(n_blocks)] if "{i}" in template else [template]
        present = [name for name in names if name in shapes]
        for name in names:
            expected[name] = (shape, why)
        if required or present:
            for name in names:
                if name not in shapes:
                    extra = "" if required else f" (present in {present[0]!r})"
                    raise UserError(f"{path}: tensor {name!r} is missing{extra}: llama.cpp's {what} loader needs "
                                    "it; re-export it")
    for name in shapes:
        if name not in expected:
            raise UserError(f"{path}: tensor {name!r} is not one llama.cpp's {what} loader reads (renamed, "
                            "foreign, or past the block count); re-export it")
    for name, (shape, why) in expected.items():
        if name in shapes and shape is not None and shapes[name] != tuple(shape):
            raise UserError(f"{path}: tensor {name!r} has shape {list(shapes[name])}, the metadata gives "
                            f"{list(shape)} ({why}); re-export it")


def trained_context(path: Path | str) -> int:
    """The context length the LLM GGUF at `path` was trained with (`<arch>.context_length`)."""
    path = Path(path)
    reader = open_gguf(path, "model")
    return _int(reader, path, f"{_str(reader, path, 'general.architecture')}.context_length")


def check_llm(reader, path: Path | str) -> int:
    """Check an LLM GGUF's tensors against its arch metadata; returns its embedding length."""
    path = Path(path)
    arch = _str(reader, path, "general.architecture")
    if arch not in LLM_ARCHS:
        raise UserError(f"{path}: general.architecture {arch!r}; the pre-checks know {', '.join(LLM_ARCHS)} (what is exported)")
    n_embd = _int(reader, path, f"{arch}.embedding_length")
    n_layer = _int(reader, path, f"{arch}.block_count")
    n_ff = _int(reader, path, f"{arch}.feed_forward_length")
    n_head = _int(reader, path, f"{arch}.attention.head_count")
    n_head_kv = _int(reader, path, f"{arch}.attention.head_count_kv", default=n_head)
    _divides(path, f"{arch}.attention.head_count over head_count_kv", n_head_kv, n_head)
    if reader.fields.get(f"{arch}.attention.key_length") is None:
        _divides(path, f"{arch}.embedding_length over head_count", n_head, n_embd)
    head_k = _int(reader, path, f"{arch}.attention.key_length", default=n_embd // n_head)
    head_v = _int(reader, path, f"{arch}.attention.value_length", default=n_embd // n_head)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or not len(tokens.data):
        raise UserError(f"{path}: no tokenizer.ggml.tokens (the vocabulary llama.cpp loads); re-export it")
    n_vocab = len(tokens.data)
    declared = _int(reader, path, f"{arch}.vocab_size", default=n_vocab)
    if declared != n_vocab:
        raise UserError(f"{path}: {arch}.vocab_size is {declared} but tokenizer.ggml.tokens has {n_vocab}; "
                        "re-export it")
    q, k, v = n_head * head_k, n_head_kv * head_k, n_head_kv * head_v
    qkv_bias = arch == "qwen2"  # qwen2's loader requires q/k/v biases; llama's takes them if present
    E, V, F = n_embd, n_vocab, n_ff
    emb, ff = f"embedding_length {E}", f"embedding_length {E}, feed_forward_length {F}"
    heads = f"embedding_length {E}, {n_head} heads, {n_head_kv} kv heads of {head_k}/{head_v}"
    specs = [
        ("token_embd.weight", (E, V), True, f"embedding_length {E}, vocabulary {V}"),
        ("output_norm.weight", (E,), True, emb),
        ("output.weight", (E, V), False, f"embedding_length {E}, vocabulary {V}"),  # absent: tied to token_embd
        ("blk.{i}.attn_norm.weight", (E,), True, emb),
        ("blk.{i}.attn_q.weight", (E, q), True, heads),
        ("blk.{i}.attn_k.weight", (E, k), True, heads),
        ("blk.{i}.attn_v.weight", (E, v), True, heads),
        ("blk.{i}.attn_output.weight", (n_head * head_v, E), True, heads),
        ("blk.{i}.attn_q.bias", (q,), qkv_bias, heads),
        ("blk.{i}.attn_k.bias", (k,), qkv_bias, heads),
        ("blk.{i}.attn_v.bias", (v,), qkv_bias, heads),
        ("blk.{i}.ffn_norm.weight", (E,), True, emb),
        ("blk.{i}.ffn_gate.weight", (E, F), True, ff),
        ("blk.{i}.ffn_up.weight", (E, F), True, ff),
        ("blk.{i}.ffn_down.weight", (F, E), True, ff),
    ]
    if arch == "llama":
        specs += [("blk.{i}.attn_output.bias", (E,), False, emb),
                  ("rope_freqs.weight", None, False, "")]
    _check_tensors(path, _tensor_shapes(reader, path), specs, n_layer, f"{arch} LLM")
    return n_embd


def check_mmproj(reader, path: Path | str) -> int:
    """Check an mmproj GGUF's tensors against its projector type and vision metadata; returns its projection dim."""
    path = Path(path)
    if _value(reader, path, "clip.has_vision_encoder") is not True:
        raise UserError(f"{path}: clip.has_vision_encoder is not true; not a vision mmproj, re-export it")
    projector = _str(reader, path, "clip.projector_type")
    if projector not in PROJECTOR_TYPES:
        raise UserError(f"{path}: clip.projector_type {projector!r}; the pre-checks know "
                        f"{', '.join(PROJECTOR_TYPES)} (what is exported)")
    H = _int(reader, path, "clip.vision.embedding_length")
    F = _int(reader, path, "clip.vision.feed_forward_length")
    n_layer = _int(reader, path, "clip.vision.block_count")
    n_head = _int(reader, path, "clip.vision.attention.head_count")
    _divides(path, "clip.vision.embedding_length over head_count", n_head, H)
    image_size = _int(reader, path, "clip.vision.image_size")
    patch = _int(reader, path, "clip.vision.patch_size")
    _divides(path, "clip.vision.image_size over patch_size", patch, image_size)
    P = _int(reader, path, "clip.vision.projection_dim")
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        value = _value(reader, path, key)
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(x, float) for x in value)):
            raise UserError(f"{path}: metadata key {key!r} is {value!r}, expected 3 floats; re-export it")
    layers = _value(reader, path, "clip.vision.feature_layer")
    if layers is not None and not (isinstance(layers, list) and layers
                                   and all(isinstance(x, int) and 0 <= x <= n_layer for x in layers)):
        raise UserError(f"{path}: clip.vision.feature_layer is {layers!r}, expected indices in [0, {n_layer}] "
                        "(clip.vision.block_count); re-export it")
    shapes = _tensor_shapes(reader, path)
    n_pos = (image_size // patch) ** 2 + ("v.class_embd" in shapes)
    width = f"embedding_length {H}"
    ff = f"embedding_length {H}, feed_forward_length {F}"
    specs = [
        ("v.patch_embd.weight", (patch, patch, 3, H), True, f"patch_size {patch}, {width}"),
        ("v.patch_embd.bias", (H,), False, width),
        ("v.class_embd", (H,), False, width),
        ("v.position_embd.weight", (H, n_pos), True,
         f"{width}, (image_size {image_size} / patch_size {patch})^2 patches"
         + (" + the class token" if "v.class_embd" in shapes else "")),
        ("v.pre_ln.weight", (H,), False, width), ("v.pre_ln.bias", (H,), False, width),
        ("v.post_ln.weight", (H,), False, width), ("v.post_ln.bias", (H,), False, width),
    ]
    specs += _connector_specs(reader, path, projector, shapes, H, P, image_size // patch)
    for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
        specs += [(f"v.blk.{{i}}.{part}.weight", (H, H), True, width),
                  (f"v.blk.{{i}}.{part}.bias", (H,), False, width)]
    for part in ("ln1", "ln2"):
        specs += [(f"v.blk.{{i}}.{part}.weight", (H,), True, width),
                  (f"v.blk.{{i}}.{part}.bias", (H,), False, width)]
    specs += [("v.blk.{i}.ffn_up.weight", (H, F), True, ff), ("v.blk.{i}.ffn_up.bias", (F,), False, ff),
              ("v.blk.{i}.ffn_down.weight", (F, H), True, ff), ("v.blk.{i}.ffn_down.bias", (H,), False, ff)]
    _check_tensors(path, shapes, specs, n_layer, f"{projector!r} mmproj")
    return P


def _ldpv2_specs(reader, path: Path, shapes: dict, H: int, P: int, side: int) -> list:
    """MobileVLM V2's LDPv2: mm.model.mlp.0 (+ GELU) + mm.model.mlp.2, 2x2 pooling, a depthwise 3x3
    convolution mm.model.peg.0 (kernel [3, 3, 1, P] as written from torch, or [3, 3, P] as llama.cpp's
    legacy converter squeezes it) added back."""
    if side != LDPV2_GRID:
        raise UserError(f"{path}: clip.vision.image_size / patch_size gives a {side}x{side} patch grid; llama.cpp's "
                        f"ldpv2 graph runs {LDPV2_GRID}x{LDPV2_GRID} only (libmtmd would abort); re-export a tower "
                        "with that grid")
    kernel = "mm.model.peg.0.weight"
    squeezed = shapes.get(kernel) == (3, 3, P)
    _check_f16(reader, path, kernel)
    return [
        ("mm.model.mlp.0.weight", (H, P), True, f"embedding_length {H} into projection_dim {P}"),
        ("mm.model.mlp.0.bias", (P,), True, f"projection_dim {P}"),
        ("mm.model.mlp.2.weight", (P, P), True, f"projection_dim {P}"),
        ("mm.model.mlp.2.bias", (P,), True, f"projection_dim {P}"),
        (kernel, (3, 3, P) if squeezed else (3, 3, 1, P), True, f"a 3x3 kernel per channel of projection_dim {P}"),
        ("mm.model.peg.0.bias", (P,), True, f"projection_dim {P}"),
    ]


def _check_f16(reader, path: Path, name: str) -> None:
    """A depthwise-convolution kernel must be F16: ggml_conv_2d_dw multiplies it with F16 columns (im2col)."""
    kind = next((t.tensor_type.name for t in reader.tensors if t.name == name), None)
    if kind is not None and kind != "F16":
        raise UserError(f"{path}: tensor {name!r} is {kind}; ggml's depthwise convolution needs its kernel in F16; "
                        "re-export it")


def _connector_specs(reader, path: Path, projector: str, shapes: dict, H: int, P: int, side: int) -> list:
    """The projector's tensors as `_check_tensors` specs: "mlp" is mm.0 (+ GELU) + mm.2; "idefics3" one
    bias-free mm.model.fc over scale_factor^2 neighbouring patches (pixel shuffle); "ldpv2" see _ldpv2_specs."""
    if projector == "ldpv2":
        return _ldpv2_specs(reader, path, shapes, H, P, side)
    if projector == "idefics3":
        scale = _int(reader, path, "clip.vision.projector.scale_factor")
        if side % scale:
            raise UserError(f"{path}: clip.vision.projector.scale_factor {scale} does not divide the tile's {side} "
                            "patches per side (image_size / patch_size); re-export it")
        _int(reader, path, "clip.vision.preproc_image_size")  # the longest edge llama.cpp resizes to
        return [("mm.model.fc.weight", (H * scale * scale, P), True,
                 f"embedding_length {H} x scale_factor {scale}^2 into projection_dim {P}")]
    mm0 = shapes.get("mm.0.weight", ())
    D = mm0[1] if len(mm0) == 2 else -1  # the projector's hidden width: only mm.0/mm.2 say it
    width = f"embedding_length {H}"
    return [
        ("mm.0.weight", (H, D), True, f"{width} into the projector"),
        ("mm.0.bias", (D,), False, "mm.0.weight's output width"),
        ("mm.2.weight", (D, P), True, f"mm.0's output width into projection_dim {P}"),
        ("mm.2.bias", (P,), False, f"projection_dim {P}"),
    ]


def check_llamacpp_pair(llm_path: Path | str, mmproj_path: Path | str) -> str:
    """Everything checkable in an LLM + mmproj pair before llama.cpp/libmtmd are given it; returns the
    mmproj's projector type."""
    llm_path, mmproj_path = Path(llm_path), Path(mmproj_path)
    n_embd = check_llm(open_gguf(llm_path, "model"), llm_path)
    mmproj = open_gguf(mmproj_path, "mmproj")
    projection = check_mmproj(mmproj, mmproj_path)
    if projection != n_embd:
        raise UserError(f"{mmproj_path}: clip.vision.projection_dim is {projection} but the LLM {llm_path.name} "
                        f"has embedding_length {n_embd}; the files are from different exports")
    return _str(mmproj, mmproj_path, "clip.projector_type")
