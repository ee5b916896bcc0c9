"""params.yaml: loaded and validated into the typed schema (params_schema.py), or composed from conf/.

Unknown keys, wrong types, missing or out-of-range values are one-line errors (params_checks.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlm_factory.errors import UserError
from vlm_factory.params_checks import check_interpolations, one_line_error, show_value, string_leaves, validate_params
from vlm_factory.params_schema import (FORMATS, ArchitectureConfig, DataConfig, EvalConfig, ExportConfig,
                                       ModelConfig, Params, PretrainConfig, PublishConfig, TierConfig, TrainConfig)

# The schema's sections are imported from here by stages and the library.
__all__ = ["FORMATS", "ArchitectureConfig", "DataConfig", "EvalConfig", "ExportConfig", "ModelConfig", "Params",
           "PretrainConfig", "PublishConfig", "TierConfig", "TrainConfig", "compose", "compose_to_yaml",
           "load_params", "parse_params", "target_settings"]


def target_settings(params: Params, fmt: str, tier: str, path: Path | str = "params.yaml") -> dict[str, Any]:
    """The settings of one export target, or a one-line error naming the missing key."""
    if tier not in params.targets.get(fmt, {}):
        listed = ", ".join(params.targets.get(fmt, {})) or "none"
        raise UserError(f"{path}: no key 'targets.{fmt}.{tier}'; tiers listing {fmt}: {listed}")
    return dict(params.targets[fmt][tier])


def _ints_as_floats(raw: DictConfig) -> None:
    """`eval.max_drop.gguf.F16=1` is a number: OmegaConf refuses an int as a value of a dict[str, float]."""
    gates = raw.get("eval")
    if not isinstance(gates, DictConfig):
        return
    max_drop = gates.get("max_drop")
    tables = [gates.get("min_embedding_cosine"), *(max_drop.values() if isinstance(max_drop, DictConfig) else [])]
    for table in tables:
        if isinstance(table, DictConfig):
            for name, value in table.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    table[name] = float(value)


def parse_params(raw: DictConfig, path: Path | str = "params.yaml") -> Params:
    """Type and validate the contents of a params.yaml (as loaded, unresolved) into `Params`."""
    path = Path(path)
    check_interpolations(raw, path, allow_references=False)
    _ints_as_floats(raw)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Params), raw)
        params: Params = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise one_line_error(exc, path) from None
    validate_params(params, path)
    return params


def load_params(path: Path | str = "params.yaml") -> Params:
    """Parse and validate params.yaml into typed sections."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; run from the project root (compose it with `vlm-factory compose`)")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); recompose it with `vlm-factory compose`") from None
    if not isinstance(raw, DictConfig):
        raise UserError(f"{path}: not a mapping of sections; recompose it with `vlm-factory compose`")
    return parse_params(raw, path)


def _refuse_empty_dict_overrides(overrides: list[str], cfg: DictConfig, path: Path | str) -> None:
    """`key={}` merges into a mapping and changes nothing: say so rather than write what was not asked for."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_delete() or override.value() != {}:
            continue
        key = override.key_or_group
        current = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if isinstance(current, DictConfig) and len(current):
            how = ("choose tiers with tier=[name,...]" if key == "tiers"
                   else f"override its entries one by one, or delete it with ~{key}")
            raise UserError(f"{path}: override '{key}={{}}' changes nothing (Hydra merges a mapping into the "
                            f"{len(current)} entries of '{key}'); {how}")


def _unresolvable(cfg: DictConfig, exc: OmegaConfBaseException, path: Path) -> UserError:
    """A one-line error naming the key whose `${...}` reference does not resolve."""
    if not getattr(exc, "full_key", None):
        for key, value in string_leaves(OmegaConf.to_container(cfg, resolve=False)):
            if "${" not in value:
                continue
            try:
                OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
            except OmegaConfBaseException:
                return UserError(f"{path}: key '{key}' is {show_value(value)}: {str(exc).splitlines()[0]}; "
                                 "fix it in conf/ and recompose (see README)")
    return one_line_error(exc, path)


def compose(overrides: list[str] | None = None, config_dir: Path | str = "conf", *,
            output: Path | str = "params.yaml", validate: bool = True) -> DictConfig:
    """Compose conf/ as DVC's Hydra integration does before `dvc exp run`, refusing resolvers such as
    `${oc.env:...}` (params.yaml is committed); with `validate`, check the result as `load_params` would."""
    return _compose(overrides, config_dir, output, validate)[0]


def compose_to_yaml(overrides: list[str] | None = None, config_dir: Path | str = "conf", *,
                    output: Path | str = "params.yaml", validate: bool = True) -> str:
    """The text of params.yaml for `overrides`; a one-line UserError naming `output` and the key if invalid."""
    return _compose(overrides, config_dir, output, validate)[1]


def _compose(overrides: list[str] | None, config_dir: Path | str, output: Path | str,
             validate: bool) -> tuple[DictConfig, str]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    overrides = list(overrides or [])
    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if exc.__cause__ is not None and str(exc.__cause__):
            reason += f" ({str(exc.__cause__).splitlines()[0]})"
        raise UserError(f"{config_dir}: {reason}") from None
    _refuse_empty_dict_overrides(overrides, cfg, output)
    check_interpolations(cfg, output, allow_references=True)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _unresolvable(cfg, exc, Path(output)) from None
    text = OmegaConf.to_yaml(cfg)
    if validate:
        # Read the text back exactly as a stage would: what compose writes, load_params accepts.
        parse_params(OmegaConf.create(text), output)
    return cfg, text
