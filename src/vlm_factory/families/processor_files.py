"""The processor files of a model or export directory (tokenizer, image processor, chat template), checked by name.

transformers reads these files itself and fails on a malformed one with any exception type;
`hf_files.load_pretrained` turns that into a line naming the directory. The checks here run first and
name the file at fault: each JSON file must hold a JSON object, tokenizer.json must be a tokenizer the
tokenizers library reads, and every chat template must be UTF-8 text that jinja parses.

The chat template a checkpoint's processor ends up with comes from the first of these that holds one
(transformers' precedence, processor before tokenizer): processor_config.json's `chat_template`,
chat_template.json, chat_template.jinja, tokenizer_config.json's `chat_template`. The prompt every
runtime uses and the template the GGUF carries are both read in that order (`chat_template_sources`).
"""

from __future__ import annotations

from pathlib import Path

from vlm_factory.errors import UserError, first_line
from vlm_factory.families.facts_bounds import shown
from vlm_factory.io import read_json
from vlm_factory.paths import contained_tree

FIX = "re-download or re-save it"  # for a model directory; an export's readers pass their own
# JSON files transformers reads when it loads a processor, tokenizer or model from a directory.
JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "preprocessor_config.json", "processor_config.json", "chat_template.json", "config.json",
              "generation_config.json")
# Where a chat template may be, in the order transformers lets one shadow the next: (file, JSON key or None).
TEMPLATE_SOURCES = (("processor_config.json", "chat_template"), ("chat_template.json", "chat_template"),
                    ("chat_template.jinja", None), ("tokenizer_config.json", "chat_template"))
# Real chat templates are a few KB (tool-calling ones up to ~20 KB); a megabyte of template is not one.
MAX_TEMPLATE_CHARS = 1 << 20


def _read_json(path: Path, fix: str) -> dict:
    return read_json(path, missing=f"{path}: missing", fix=fix)


def _default_template(value, path: Path, key: str, fix: str) -> str | None:
    """A `chat_template` value as text: a string, or the `default` of named templates (a list of
    {name, template} or a {name: template} object), or None when there is none."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # transformers makes it {name: template}, failing on anything else
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in value):
            raise UserError(f"{path}: {key} must be a string or a list of {{\"name\", \"template\"}} "
                            f"objects of strings; {fix}")
        value = {t["name"]: t["template"] for t in value}
    if not (isinstance(value, dict) and all(isinstance(t, str) for t in value.values())):
        raise UserError(f"{path}: {key} must be a string or named templates (got {shown(value)}); {fix}")
    return value.get("default")


def _read_template_file(path: Path, fix: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: the chat template is not UTF-8 text ({first_line(exc)}); {fix}") from None


def chat_template_sources(model_dir: Path | str, fix: str = FIX) -> list[tuple[Path, str]]:
    """Every chat template the directory holds, as (file, template), the one transformers uses first."""
    model_dir = Path(model_dir)
    found = []
    for name, key in TEMPLATE_SOURCES:
        path = model_dir / name
        if not path.is_file():
            continue
        template = (_read_template_file(path, fix) if key is None
                    else _default_template(_read_json(path, fix).get(key), path, key, fix))
        if template:
            found.append((path, template))
    return found


def find_chat_template(model_dir: Path | str) -> tuple[Path, str] | None:
    """(file, template) of the chat template the checkpoint's processor uses, or None."""
    sources = chat_template_sources(model_dir)
    return sources[0] if sources else None


def check_template_syntax(template: str, where: Path | str, fix: str = FIX) -> None:
    """A template jinja cannot parse (as transformers compiles it) is refused naming `where` and the line."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if len(template) > MAX_TEMPLATE_CHARS:
        raise UserError(f"{where}: a chat template of {len(template)} characters; real ones are a few KB ({fix})")
    try:
        # transformers' own compiler (sandbox, `generation` tag, loop controls), so what parses here renders there.
        _compile_jinja_template(template)
    except TemplateSyntaxError as exc:
        raise UserError(f"{where}: the chat template does not parse (line {exc.lineno}: {first_line(exc)}); "
                        f"{fix}") from None
    except RecursionError:
        raise UserError(f"{where}: the chat template is nested too deeply to be a real one; {fix}") from None
    except Exception as exc:  # jinja reports some malformed templates with other exception types
        raise UserError(f"{where}: the chat template does not compile ({first_line(exc)}); {fix}") from None


def check_processor_files(model_dir: Path | str, fix: str = FIX) -> None:
    """Refuse, naming the file, a malformed processor file before transformers reads the directory
    (`fix`: what to do, for a model directory by default)."""
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    # Nothing is opened before every entry is known to stay inside the directory (as load_pretrained does).
    contained_tree(model_dir, model_dir, what=model_dir, key="file", fix="copy the file in instead of linking it")
    for name in JSON_FILES:
        if (model_dir / name).is_file():
            _read_json(model_dir / name, fix)
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            Tokenizer.from_str(tokenizer_json.read_text(encoding="utf-8"))
        except Exception as exc:  # the tokenizers library raises its own exception type
            raise UserError(f"{tokenizer_json}: not a tokenizer the tokenizers library reads "
                            f"({first_line(exc)}); {fix}") from None
    for path, template in chat_template_sources(model_dir, fix):
        check_template_syntax(template, path, fix)
