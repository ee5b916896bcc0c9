"""The KV-cache length of a fixed-context export (Core ML, TFLite), from the tier and the model family.

A static-cache decoder allocates its cache once, so its length is decided at export time: the tier's
`context_tokens`, bounded by the model's own maximum position. It must hold one image's visual tokens,
the fixed text of the model's prompt and a whole answer; anything shorter is a configuration mistake
that would only show on the device, so the export stops before any conversion starts.
"""

from __future__ import annotations

from vlm_factory.errors import UserError
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS


def prompt_length(family, processor) -> int:
    """Tokens of the model's prompt with an empty question and the largest image: its image tokens (every
    tile's, for families that cut images) plus the fixed template text."""
    spec = family.prompt(processor)
    text = spec.expanded("", *family.largest_grid(processor))
    return len(processor.tokenizer(text, add_special_tokens=spec.add_special_tokens).input_ids)


def static_context(family, processor, context_tokens, tier: str) -> int:
    """min(tier context, model max positions), or a one-line UserError naming `tiers.<tier>.context_tokens`."""
    key = f"tiers.{tier}.context_tokens"
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 1:
        raise UserError(f"key '{key}' must be a positive integer; got {context_tokens!r}")
    context = min(context_tokens, int(family.text.max_positions))
    prompt = prompt_length(family, processor)
    needed = prompt + MAX_ANSWER_TOKENS
    if context < needed:
        visual = family.visual_tokens(processor)
        what = f"{visual} visual + {prompt - visual} prompt text + {MAX_ANSWER_TOKENS} answer"
        if context_tokens >= needed:  # the tier is fine, the model itself is too short
            raise UserError(f"{family.source}: max_position_embeddings {context} is too small for one image: "
                            f"{needed} tokens needed ({what}); this model cannot be exported with a static cache")
        raise UserError(f"key '{key}' is {context_tokens}, too small for one image: {needed} tokens needed "
                        f"({what}); raise '{key}' to at least {needed}")
    return context
