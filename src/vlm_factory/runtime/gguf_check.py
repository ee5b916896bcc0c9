"""Read a GGUF file back before anything trusts it: a truncated or corrupt file is a one-line error.

llama.cpp would reject such a file too, but through a C++ log and a generic "failed to load";
gguf-py's reader checks the magic, version and that every tensor's data lies inside the file.
"""

from __future__ import annotations

from pathlib import Path

from vlm_factory.errors import UserError


def open_gguf(path: Path | str, expect_type: str | None = None):
    """A `gguf.GGUFReader` over `path`; `expect_type` ("model" or "mmproj") checks general.type."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found; run its export stage (dvc repro)")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as error:
        raise UserError(f"{path}: not a readable GGUF file (truncated or corrupt: {str(error).splitlines()[0]}); "
                        "delete it and re-run its export stage") from None
    if expect_type is not None:
        field = reader.fields.get("general.type")
        actual = bytes(field.parts[field.data[0]]).decode() if field else "model"
        if actual != expect_type:
            raise UserError(f"{path}: general.type is {actual!r}, expected {expect_type!r}; "
                            "were the LLM and mmproj files swapped?")
    return reader
