"""Load transformers objects (config, tokenizer, processor, model) from a directory someone else wrote.

transformers reads whatever files a directory holds (tokenizer.json, tokenizer_config.json, chat
templates, preprocessor configs, ...) and follows symlinks; a malformed one fails with any exception
type (KeyError, AttributeError, IndexError, a tokenizers or jinja2 exception). `load_pretrained` first
refuses entries that resolve outside the directory or are not regular files (paths.contained_tree),
then turns any failure of the loader into a one-line UserError naming the directory and what failed.
"""

from __future__ import annotations

from pathlib import Path

from vlm_factory.errors import UserError, first_line
from vlm_factory.paths import contained_tree


def load_pretrained(loader, directory: Path | str, what: str, fix: str = "re-export it", **kwargs):
    """`loader.from_pretrained(directory, **kwargs)`, contained, with a one-line error naming `what`."""
    directory = Path(directory)
    contained_tree(directory, directory, what=directory, key="file", fix="copy the file in instead of linking it")
    try:
        return loader.from_pretrained(directory, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # malformed files raise anything from KeyError to tokenizers' own exceptions
        raise UserError(f"{directory}: {what} cannot be loaded ({first_line(exc)}); {fix}") from None
