"""The tokenizer of an LLM GGUF: read from the checkpoint's own tokenizer files, written as llama.cpp reads it.

Three kinds are recognised from tokenizer.json's structure (llama.cpp's converter hashes a test
string instead; we read what the file says):

- byte-level BPE behind GPT-2's split (`ByteLevel` with its regex): `tokenizer.ggml.model` gpt2,
  pre-tokenizer `gpt-2` (the bundled tiny bases); with single digits split off first (`Digits`
  individual + `ByteLevel`, SmolLM2 in SmolVLM): gpt2 / `smollm`;
- byte-level BPE behind Qwen2's split regex (`Split` + `ByteLevel` without regex): gpt2 / `qwen2`;
- SentencePiece-style BPE with byte fallback (Llama-2, LLaVA-1.5): spaces become `▁`, bytes
  without a piece become `<0xNN>` tokens. llama.cpp runs these as model `llama`, which merges
  the adjacent pair whose merged piece has the highest score, so each merged piece scores minus
  the rank of the merge that makes it; BPE applies merges in that same order.
  A checkpoint with only a `tokenizer.model` is read through transformers' conversion of it.

Anything else is refused in one line naming the file. The token list is exactly the embedding
table long (llama.cpp requires it): rows past the tokenizer become `[PAD<i>]` tokens of type
UNUSED, as llama.cpp's own converter writes them. BOS is added when the checkpoint's tokenizer
adds it; the chat template is the checkpoint's own, read where its processor reads it
(families/processor_files.py). The tokenizer files are checked first: a malformed one is named.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from vlm_factory.errors import UserError
from vlm_factory.families.processor_files import check_processor_files, find_chat_template
from vlm_factory.hf_files import load_pretrained

SPACE = "\u2581"  # SentencePiece's visible space
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Split regexes of byte-level BPE tokenizers -> llama.cpp's name for that pre-tokenizer.
KNOWN_SPLITS = {QWEN2_SPLIT: "qwen2"}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# llama.cpp's token types (gguf.TokenType), spelled out so this module imports without gguf.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocabulary:
    """Everything `tokenizer.ggml.*` holds for one checkpoint."""

    model: str                       # "gpt2" (byte-level BPE) | "llama" (SentencePiece-style)
    pre: str                         # llama.cpp pre-tokenizer name
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)   # bos / eos / unk / pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    padded: int = 0                  # [PAD<i>] rows added past the tokenizer's own tokens


def _flatten(node: dict | None, key: str) -> list[dict]:
    """The steps of a (possibly nested) tokenizers Sequence, in order."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get(key, []) for step in _flatten(child, key)]
    return [node]


def _describe(node: dict | None) -> str:
    return json.dumps(node)[:160] if node else "none"


def _byte_level_pre(tok: dict) -> str | None:
    """llama.cpp's pre-tokenizer name of a byte-level BPE tokenizer.json, or None if it is not one we know."""
    steps = _flatten(tok.get("pre_tokenizer"), "pretokenizers")
    normalizers = _flatten(tok.get("normalizer"), "normalizers")
    # Qwen2 ships an NFC normalizer; llama.cpp does not normalise and its converter ignores it (a no-op on ASCII).
    if any(n.get("type") != "NFC" for n in normalizers):
        return None
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    # SmolLM/SmolLM2: every digit on its own, then GPT-2's split (llama.cpp's `smollm`: \p{N}, then GPT-2's regex).
    if (types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        return "smollm"
    if types == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
        split = steps[0]
        if split.get("behavior") == "Isolated" and not split.get("invert"):
            return KNOWN_SPLITS.get(split.get("pattern", {}).get("Regex"))
    return None


def _sentencepiece_prefix(tok: dict) -> bool | None:
    """Whether a SentencePiece-style tokenizer.json prefixes a space (None: it is not SentencePiece-style).

    Llama-2 writes `Prepend(▁)` + `Replace(' ', ▁)` normalizers; newer files a `Metaspace` pre-tokenizer.
    """
    normalizers = _flatten(tok.get("normalizer"), "normalizers")
    steps = _flatten(tok.get("pre_tokenizer"), "pretokenizers")
    prepend = replace = False
    for n in normalizers:
        if n.get("type") == "Prepend" and n.get("prepend") == SPACE:
            prepend = True
        elif n.get("type") == "Replace" and n.get("pattern", {}).get("String") == " " and n.get("content") == SPACE:
            replace = True
        else:
            return None
    for s in steps:
        if s.get("type") != "Metaspace" or s.get("replacement", SPACE) != SPACE:
            return None
        replace = True
        scheme = s.get("prepend_scheme", "always" if s.get("add_prefix_space", True) else "never")
        prepend = prepend or scheme != "never"
    return prepend if replace else None


def read_chat_template(model_dir: Path) -> str | None:
    """The chat template the checkpoint's processor uses (processor_config.json, chat_template.json,
    chat_template.jinja, then tokenizer_config.json: transformers' precedence), or None."""
    found = find_chat_template(model_dir)
    return found[1] if found else None


def _from_tokenizer_json(tok: dict, path: Path, vocab_size: int) -> Vocabulary:
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{path}: a {model.get('type')!r} tokenizer model; the GGUF export writes BPE tokenizers "
                        "(byte-level, or SentencePiece-style with byte fallback)")
    vocab: dict[int, str] = {i: t for t, i in model.get("vocab", {}).items()}
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    vocab.update({i: t["content"] for i, t in added.items()})
    _check_fits(vocab, vocab_size, path)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    types = {i: (CONTROL if t.get("special") else USER_DEFINED) for i, t in added.items()}
    if model.get("byte_fallback"):
        prefix = _sentencepiece_prefix(tok)
        if prefix is None:
            raise UserError(f"{path}: BPE with byte fallback but normalizer {_describe(tok.get('normalizer'))} and "
                            f"pre-tokenizer {_describe(tok.get('pre_tokenizer'))} are not SentencePiece-style; "
                            "llama.cpp's tokenizers cannot reproduce it")
        # Each merged piece scores minus the rank of the first merge making it; other pieces score below
        # every merge (in id order), so llama.cpp merges exactly what BPE merges, in the same order.
        rank_of: dict[str, int] = {}
        for rank, merge in enumerate(model.get("merges", [])):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            rank_of.setdefault(left + right, rank)
        scores = {i: -float(rank_of[t]) if t in rank_of else -float(len(merges) + i) for i, t in vocab.items()}
        unk = model.get("unk_token")
        for i, text in vocab.items():
            if BYTE_TOKEN.fullmatch(text):
                types[i] = BYTE
            elif text == unk:
                types[i] = UNKNOWN
        return Vocabulary(model="llama", pre="default", add_space_prefix=prefix, **_indexed(vocab, types, scores))
    pre = _byte_level_pre(tok)
    if pre is None:
        raise UserError(f"{path}: pre-tokenizer {_describe(tok.get('pre_tokenizer'))} (normalizer "
                        f"{_describe(tok.get('normalizer'))}) is not one llama.cpp knows here: byte-level BPE with "
                        "GPT-2's or Qwen2's split, or SentencePiece-style BPE with byte fallback")
    return Vocabulary(model="gpt2", pre=pre, merges=merges, **_indexed(vocab, types, None))


def _check_fits(vocab: dict[int, str], vocab_size: int, source: Path) -> None:
    """Token ids inside the embedding table, checked before any list is made as long as the largest id."""
    if vocab and (max(vocab) >= vocab_size or min(vocab) < 0):
        raise UserError(f"{source}: the tokenizer has token ids up to {max(vocab)} but the model's embedding "
                        f"table only {vocab_size} rows (text_config.vocab_size); they must belong together")


def _indexed(vocab: dict[int, str], types: dict[int, int], scores: dict[int, float] | None) -> dict:
    """Parallel per-id lists (filled to the embedding size later by `_pad`), keyed for Vocabulary."""
    size = max(vocab) + 1 if vocab else 0
    result = {"tokens": [vocab.get(i) for i in range(size)], "types": [types.get(i, NORMAL) for i in range(size)]}
    if scores is not None:
        result["scores"] = [scores.get(i, -1e9) for i in range(size)]
    return result


def _pad(vocabulary: Vocabulary, vocab_size: int, source: Path) -> None:
    """Make the token list exactly `vocab_size` long: holes and rows past the tokenizer become [PAD<i>]."""
    if len(vocabulary.tokens) > vocab_size:
        raise UserError(f"{source}: the tokenizer has {len(vocabulary.tokens)} tokens but the model's embedding "
                        f"table only {vocab_size} rows (text_config.vocab_size); they must belong together")
    before = sum(t is not None for t in vocabulary.tokens)
    vocabulary.tokens += [None] * (vocab_size - len(vocabulary.tokens))
    vocabulary.types += [UNUSED] * (vocab_size - len(vocabulary.types))
    if vocabulary.scores is not None:
        vocabulary.scores += [-1e9] * (vocab_size - len(vocabulary.scores))
    for i, text in enumerate(vocabulary.tokens):
        if text is None:
            vocabulary.tokens[i], vocabulary.types[i] = f"[PAD{i}]", UNUSED
    vocabulary.padded = vocab_size - before


def read_vocabulary(model_dir: Path, vocab_size: int) -> Vocabulary:
    """The checkpoint's tokenizer as llama.cpp's vocabulary, `vocab_size` tokens long."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    check_processor_files(model_dir)  # a malformed tokenizer file or chat template is named, not a traceback
    tokenizer = load_pretrained(AutoTokenizer, model_dir, "the tokenizer", fix="re-download or re-save it")
    source = model_dir / "tokenizer.json"
    if source.is_file():
        tok = json.loads(source.read_text(encoding="utf-8"))  # a JSON object tokenizers reads (checked above)
    elif getattr(tokenizer, "backend_tokenizer", None) is not None:
        # Only a tokenizer.model: transformers converted it (its SentencePiece converter) to the same structure.
        source = model_dir / "tokenizer.model"
        tok = json.loads(tokenizer.backend_tokenizer.to_str())
    else:
        raise UserError(f"{model_dir}: no tokenizer.json (or tokenizer.model transformers can convert); "
                        "the GGUF needs the model's tokenizer")
    vocabulary = _from_tokenizer_json(tok, source, vocab_size)
    _pad(vocabulary, vocab_size, source)
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            vocabulary.special_ids[role] = int(token_id)
    # What the checkpoint's tokenizer adds around a text is what llama.cpp must add (add_special).
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    bos, eos = vocabulary.special_ids.get("bos"), vocabulary.special_ids.get("eos")
    vocabulary.add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    vocabulary.add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    vocabulary.chat_template = read_chat_template(model_dir)
    return vocabulary


def add_vocabulary(writer, vocabulary: Vocabulary) -> None:
    """Write `tokenizer.ggml.*` (and the chat template) into a GGUFWriter."""
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    if vocabulary.merges is not None:
        writer.add_token_merges(vocabulary.merges)
    ids = vocabulary.special_ids
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if role in ids:
            add(ids[role])
    writer.add_add_bos_token(vocabulary.add_bos)
    writer.add_add_eos_token(vocabulary.add_eos)
    if vocabulary.add_space_prefix is not None:
        writer.add_add_space_prefix(vocabulary.add_space_prefix)
    if vocabulary.chat_template:
        writer.add_chat_template(vocabulary.chat_template)
