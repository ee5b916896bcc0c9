"""Configuration: params.yaml is the composition of conf/, stages read exactly declared keys, errors are clear."""

import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from vlm_factory.config import compose, compose_to_yaml, load_params
from vlm_factory.errors import UserError


def test_committed_params_equal_the_composition_of_conf(root):
    committed = (root / "params.yaml").read_text()
    assert committed == compose_to_yaml(config_dir=root / "conf"), (
        "params.yaml is stale: run `vlm-factory compose` and commit it")


def test_params_parse_into_the_typed_schema(root):
    params = load_params(root / "params.yaml")
    assert params.model.source == "local"
    assert set(params.tiers) >= {"iphone15pro", "android_flagship", "android_budget", "jetson_orin"}
    for tier in params.tiers.values():
        assert tier.formats and tier.memory_budget_mb > 0


def _declared_params(root, params):
    """(stage, params key) for every stage, `foreach` stages expanded over their params dict (`${key}` and
    `${item.<field>}` substituted as DVC does)."""
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        if "foreach" in stage:
            source = OmegaConf.select(params, stage["foreach"].strip("${}"))
            for item in source:
                fields = source[item] if OmegaConf.is_dict(source[item]) else {}
                for key in stage["do"].get("params", []):
                    key = key.replace("${key}", item)
                    for field, value in fields.items():
                        key = key.replace(f"${{item.{field}}}", str(value))
                    yield f"{name}@{item}", key
        else:
            for key in stage.get("params", []):
                yield name, key


def test_every_declared_stage_param_exists(root):
    params = OmegaConf.load(root / "params.yaml")
    declared = list(_declared_params(root, params))
    assert any(stage.startswith("parity_gguf@") for stage, _ in declared)
    for stage, key in declared:
        assert OmegaConf.select(params, key, default="<missing>") != "<missing>", f"{stage}: {key}"


def test_overrides_compose_and_one_tier_changes_alone(root):
    cfg = compose(["train.lr=0.01", "targets.gguf.android_budget.llm=Q5_K_M"], root / "conf")
    assert cfg.train.lr == 0.01
    assert cfg.targets.gguf.android_budget.llm == "Q5_K_M"
    assert cfg.targets.gguf.iphone15pro.llm == "Q4_K_M"


def test_selecting_tiers_keeps_only_their_targets(root):
    cfg = compose(["tier=[jetson_orin]"], root / "conf")
    assert list(cfg.tiers) == ["jetson_orin"]
    assert {fmt: list(by_tier) for fmt, by_tier in cfg.targets.items()} == {
        "gguf": ["jetson_orin"], "onnx": ["jetson_orin"], "coreml": [], "tflite": []}


def test_target_of_an_unknown_tier_is_refused(tmp_path, root):
    bad = tmp_path / "params.yaml"
    bad.write_text((root / "params.yaml").read_text().replace("\n  gguf:\n", "\n  gguf:\n    watch: {llm: Q8_0}\n", 1))
    with pytest.raises(UserError, match=r"targets\.gguf\.watch.*no tier"):
        load_params(bad)


def test_unknown_override_key_is_one_line_error(root):
    with pytest.raises(UserError) as err:
        compose(["train.learning_rate=0.01"], root / "conf")
    assert "learning_rate" in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_params_names_the_key(tmp_path, root):
    text = (root / "params.yaml").read_text().replace("\ntrain:\n", "\ntrain:\n  momentum: 0.9\n", 1)
    bad = tmp_path / "params.yaml"
    bad.write_text(text)
    with pytest.raises(UserError, match=r"train\.momentum"):
        load_params(bad)


def test_wrong_type_and_bad_choice_are_named(tmp_path, root):
    bad = tmp_path / "params.yaml"
    bad.write_text((root / "params.yaml").read_text().replace("steps: 600", "steps: many", 1))
    with pytest.raises(UserError, match=r"train\.steps"):
        load_params(bad)
    bad.write_text((root / "params.yaml").read_text().replace("llm: frozen", "llm: frozzen", 1))
    with pytest.raises(UserError, match=r"train\.llm.*frozen, lora, full"):
        load_params(bad)


def test_hub_model_without_pinned_revision_is_refused(tmp_path, root):
    with pytest.raises(UserError, match=r"model\.revision.*40-hex"):
        compose_to_yaml(["model=llava_interleave_0_5b"], root / "conf")
    bad = tmp_path / "params.yaml"
    bad.write_text(compose_to_yaml(["model=llava_interleave_0_5b"], root / "conf", validate=False))
    with pytest.raises(UserError, match=r"model\.revision.*40-hex"):
        load_params(bad)


def test_compose_check_cli_reports_staleness(tmp_path, root):
    stale = tmp_path / "params.yaml"
    stale.write_text("model: {}\n")
    cmd = [sys.executable, "-m", "vlm_factory.cli", "compose", "--check", "--config-dir", str(root / "conf"),
           "--output", str(stale)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "differs" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_built_format_has_export_and_parity_stages_and_no_other(root):
    from vlm_factory.export.targets import BUILT_FORMATS

    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for kind in ("export", "parity"):
        staged = {name.split("_", 1)[1] for name in stages if name.startswith(kind + "_")}
        assert staged == set(BUILT_FORMATS), kind
        for fmt in BUILT_FORMATS:
            assert stages[f"{kind}_{fmt}"]["foreach"] == "${targets." + fmt + "}"
