"""End to end: every stage of dvc.yaml, tiny settings, in a temporary copy of the repository.

Broken stage wiring (a path, a declared param, a stage script) fails here, not for a user.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest



def _open_gates() -> list[str]:
    """Every gate threshold of the default composition at its open end (drops of 100 points, flips and KL
    unbounded, floors at 0)."""
    from omegaconf import OmegaConf

    from vlm_factory.eval.gates import PER_FORMAT, PER_SETTING

    gates = OmegaConf.load(Path(__file__).resolve().parents[1] / "params.yaml").eval
    open_end = {"max_drop": 100.0, "max_aspect_drop": 100.0, "max_flip_rate": 1.0, "max_first_token_kl": 1e6}
    overrides = [f"eval.{table}.{fmt}.{setting}={open_end.get(table, 0.0)}"
                 for table in PER_SETTING for fmt, settings in gates[table].items() for setting in settings]
    return overrides + [f"eval.{table}.{fmt}=0.0" for table in PER_FORMAT for fmt in gates[table]]


TINY = [
    "data.train_images=90", "data.eval_images=36",
    "train.steps=12", "train.batch_size=32", "train.log_every=4",
    "eval.embedding_images=8",
    # 72 eval questions cannot resolve a 1-2 point drift (one question is 1.4 points) and a 12-step
    # projector is near random: the smoke run checks wiring, so its gates are open.
    # test_a_failed_gate_stops_with_a_table checks that a gate does stop the stage.
    *_open_gates(),
    "export.calibration_images=4",
    # Attribution multiplies every parity stage's work; test_parity_attributes_drift_to_components runs it once.
    "eval.attribution=false",
    "search.targets.iphone15pro-gguf.evaluate=until_pass",  # all 36 candidates are the default's picture
]


def _run(args, cwd, **kwargs):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, root) -> Path:
    """A git + DVC copy of the tracked tree (the bundled base included), on its own commit."""
    work = tmp_path_factory.mktemp("smoke") / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, tracked):
        src = root / name
        if src.is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=smoke", "-c", "user.email=smoke@localhost", "commit", "-qm", "smoke"]):
        _run(cmd, work)
    return work


def test_dvc_repro_runs_every_stage_then_nothing(workspace):
    _run([sys.executable, "-m", "vlm_factory.cli", "compose", *TINY], workspace)
    out = _run(["dvc", "repro"], workspace)
    for stage in ("download", "finetune", "reference_eval", "budget@iphone15pro", "budget@jetson_orin",
                  "export_gguf@android_budget", "export_gguf@jetson_orin", "parity_gguf@iphone15pro",
                  "parity_gguf@android_flagship", "export_onnx@android_budget", "export_onnx@jetson_orin",
                  "parity_onnx@android_flagship", "parity_onnx@jetson_orin", "export_coreml@iphone15pro",
                  "parity_coreml@iphone15pro", "export_tflite@android_flagship", "parity_tflite@android_flagship",
                  "search@iphone15pro-gguf", "search@iphone15pro-coreml", "search@android_flagship-onnx",
                  "search@android_flagship-tflite", "publish"):
        assert f"'{stage}'" in out, f"stage {stage} did not run:\n{out[-2000:]}"
    assert "pretrain_base" not in out.split("Running stage")[-1]  # frozen: never rebuilt

    reference = json.loads((workspace / "metrics" / "reference.json").read_text())
    assert reference["n_questions"] == 72
    assert set(reference["by_aspect"]) == {"square", "tall", "wide"}
    budget = json.loads((workspace / "metrics" / "budget" / "android_budget.json").read_text())
    assert budget["visual_tokens_per_image"] == 16
    loss_curve = (workspace / "metrics" / "finetune" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    assert len(loss_curve.strip().splitlines()) == 1 + 3  # header + steps 4, 8, 12
    assert (workspace / "artifacts" / "finetuned" / "model.safetensors").is_file()
    parity = json.loads((workspace / "metrics" / "parity" / "android_budget-gguf.json").read_text())
    assert parity["n_questions"] == 72 and parity["format"] == "gguf" and parity["passed"] is True
    assert parity["reference_accuracy"] == reference["vqa_accuracy"]
    assert {"square", "tall", "wide"} == set(parity["preprocessing"]) == set(parity["by_aspect"]["accuracy"])
    exported = json.loads((workspace / "metrics" / "export" / "jetson_orin-gguf.json").read_text())
    assert exported["files"]["llm"]["file"] == "llm-Q8_0.gguf"
    assert (workspace / "artifacts" / "export" / "jetson_orin" / "gguf" / "llm-Q8_0.gguf").is_file()
    onnx_parity = json.loads((workspace / "metrics" / "parity" / "android_budget-onnx.json").read_text())
    assert onnx_parity["format"] == "onnx" and onnx_parity["threshold"]["max_drop"] == 100.0
    assert all(v["method"] == "pixel input" for v in onnx_parity["preprocessing"].values())
    assert (workspace / "artifacts" / "export" / "android_budget" / "onnx" / "text.ort").is_file()
    assert not (workspace / "metrics" / "parity" / "iphone15pro-onnx.json").exists()  # the tier lists no onnx
    published = json.loads((workspace / "metrics" / "publish.json").read_text())
    assert set(published["releases"]) == {"iphone15pro", "android_flagship", "android_budget", "jetson_orin"}
    release = published["releases"]["jetson_orin"]
    assert release["formats"] == ["gguf", "onnx"] and release["uri"].startswith("file://artifacts/releases/jetson_orin/")
    assert published["not_built"] == []
    assert published["releases"]["iphone15pro"]["formats"] == ["coreml", "gguf"]
    verified = _run([sys.executable, "-m", "vlm_factory.cli", "verify", release["uri"]], workspace)
    assert "every file matches" in verified
    assert parity["attribution"] == {"skipped": "eval.attribution is false (set it true to attribute drift to "
                                                "components)"}
    # Open gates: the smallest candidate of each search passes, so each evaluated exactly one.
    search = json.loads((workspace / "metrics" / "search" / "iphone15pro-gguf.json").read_text())
    assert len(search["evaluated"]) == 1 and search["winner"] == search["evaluated"][0]
    assert search["winner"]["precisions"] == {"vision": "Q4_K", "projector": "Q8_0", "llm": "Q2_K"}
    assert search["override"][-1] == "targets.gguf.iphone15pro.llm=Q2_K"
    points = json.loads((workspace / "metrics" / "search" / "plots" / "iphone15pro-gguf.json").read_text())
    assert points[0]["verdict"] == "pass" and points[0]["artifact_mib"] > 0
    assert (workspace / "metrics" / "search" / "iphone15pro-coreml.png").read_bytes()[:4] == b"\x89PNG"

    again = _run(["dvc", "repro"], workspace)
    assert "Running stage" not in again
    assert "didn't change" in again or "up to date" in again.lower()


def test_releases_are_signed_and_answer_in_each_runtime(workspace, tmp_path):
    """The default publish signs with a development key made on first use; `ask --artifact` fetches a release,
    checks its signature and files, and answers from its GGUF, ONNX and TFLite files as the export directories
    that were gated answer."""
    public = workspace / "artifacts" / "keys" / "release-signing.pem.pub"
    uri = json.loads((workspace / "metrics" / "publish.json").read_text())["releases"]["android_flagship"]["uri"]
    verified = _run([sys.executable, "-m", "vlm_factory.cli", "verify", uri, "--public-key", str(public)], workspace)
    assert "its signature verifies with" in verified
    record = json.loads((workspace / "artifacts" / "data" / "eval.jsonl").read_text().splitlines()[0])
    image, question = str(workspace / "artifacts" / "data" / record["image"]), record["question"]
    for fmt in ("gguf", "onnx", "tflite"):
        ask = [sys.executable, "-m", "vlm_factory.cli", "ask", image, question]
        released = _run([*ask, "--artifact", uri, "--format", fmt, "--public-key", str(public),
                         "--cache", str(tmp_path)], workspace).strip()
        exported = _run([*ask, "--artifact", f"artifacts/export/android_flagship/{fmt}"], workspace).strip()
        assert released and released == exported, fmt
    assert (tmp_path / "android_flagship" / uri.rsplit("/", 1)[1] / "manifest.sig").is_file()


def test_a_failed_gate_stops_with_a_table(workspace):
    """A gate no quantized artifact passes (a cosine floor of exactly 1 with a Q8_0 tower, no drop allowed):
    exit 1, a table naming the failing check, the verdict kept. (Floors above 1 are refused by the params
    schema.)"""
    from omegaconf import OmegaConf

    params = OmegaConf.load(workspace / "params.yaml")
    params.eval.min_embedding_cosine.gguf = 1.0
    params.eval.max_drop.gguf.Q4_K_M = 0.0
    strict = workspace / "strict-params.yaml"
    OmegaConf.save(params, strict)
    out = workspace / "strict-verdict.json"
    result = subprocess.run(
        [sys.executable, "stages/parity.py", "--params", str(strict), "--format", "gguf", "--tier", "android_budget",
         "--artifact", "artifacts/export/android_budget/gguf", "--model", "artifacts/finetuned", "--data", "artifacts/data",
         "--reference", "artifacts/reference/predictions.jsonl", "--reference-metrics", "metrics/reference.json",
         "--out", str(out)],
        cwd=workspace, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "parity gate failed" in result.stderr and "android_budget-gguf  FAIL" in result.stderr
    assert "embedding_cosine" in result.stderr and "below 1" in result.stderr
    assert "Traceback" not in result.stderr
    verdict = json.loads(out.read_text())
    assert verdict["passed"] is False and "embedding_cosine" in verdict["failure_reason"]


def test_parity_attributes_drift_to_components(workspace):
    """The parity stage with attribution on (the default's setting): the Q4_K_M / Q8_0 GGUF target's drift split
    into a vision-only and an LLM-only variant plus the all-F16 floor, each run in llama.cpp."""
    from omegaconf import OmegaConf

    params = OmegaConf.load(workspace / "params.yaml")
    params.eval.attribution = True
    attributed = workspace / "attributed-params.yaml"
    OmegaConf.save(params, attributed)
    out = workspace / "attributed-verdict.json"
    _run([sys.executable, "stages/parity.py", "--params", str(attributed), "--format", "gguf", "--tier",
          "android_budget", "--artifact", "artifacts/export/android_budget/gguf", "--model", "artifacts/finetuned",
          "--data", "artifacts/data", "--reference", "artifacts/reference/predictions.jsonl",
          "--reference-metrics", "metrics/reference.json", "--out", str(out)], workspace)
    attribution = json.loads(out.read_text())["attribution"]
    assert attribution["reduced"] == ["vision", "llm"] and set(attribution["rows"]) == {"floor", "vision", "llm",
                                                                                      "target"}
    assert attribution["rows"]["llm"]["precisions"] == {"vision": "F16", "projector": "F16", "llm": "Q4_K_M"}
    assert attribution["summary"].startswith("vision ") and "(floor " in attribution["summary"]


def test_dvc_exp_run_with_an_override_is_listed_with_params_and_metrics(workspace):
    _run(["dvc", "exp", "run", "-n", "smoke-lr", *[f"-S{o}" for o in TINY], "-S", "train.lr=0.01"], workspace)
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], workspace))
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    named = [e for e in experiments if e.get("name") == "smoke-lr"]
    assert named, json.dumps(shown)[:2000]
    data = named[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["lr"] == 0.01
    assert "vqa_accuracy" in data["metrics"]["metrics/reference.json"]["data"]


@pytest.mark.slow
def test_dvc_exp_run_builds_every_format_for_the_qwen2_base(workspace):
    """`-S model=tiny_qwen2`: the Qwen2 LLaVA through download, finetune, all four exporters, parity, publish."""
    _run(["dvc", "exp", "run", "-n", "smoke-qwen2", *[f"-S{o}" for o in TINY], "-S", "model=tiny_qwen2",
          "-S", "tier=[iphone15pro,android_flagship]"], workspace)
    published = json.loads((workspace / "metrics" / "publish.json").read_text())
    assert set(published["releases"]) == {"iphone15pro", "android_flagship"}
    assert published["releases"]["android_flagship"]["formats"] == ["gguf", "onnx", "tflite"]
    assert published["releases"]["iphone15pro"]["formats"] == ["coreml", "gguf"]
    budget = json.loads((workspace / "metrics" / "budget" / "android_flagship.json").read_text())
    assert budget["model_variant"] == "siglip + mlp + qwen2"
    for target in ("android_flagship-gguf", "android_flagship-onnx", "android_flagship-tflite", "iphone15pro-coreml"):
        verdict = json.loads((workspace / "metrics" / "parity" / f"{target}.json").read_text())
        assert verdict["passed"] and verdict["n_questions"] == 72, target
    table = _run([sys.executable, "-m", "vlm_factory.cli", "family-table", "--out", "family.json"], workspace)
    assert "tiny-llava-qwen2 (siglip + mlp + qwen2)" in table
    assert json.loads((workspace / "family.json").read_text())["all_passed"] is True


@pytest.mark.slow
def test_dvc_exp_run_builds_every_format_for_the_smolvlm_base(workspace):
    """`-S model=tiny_smolvlm`: the Idefics3 base (2x2 tiles + a global view per image) through every stage;
    the budget counts every view's tokens, each runtime splits the images itself."""
    _run(["dvc", "exp", "run", "-n", "smoke-smolvlm", *[f"-S{o}" for o in TINY], "-S", "model=tiny_smolvlm",
          "-S", "tier=[iphone15pro,android_flagship]"], workspace)
    published = json.loads((workspace / "metrics" / "publish.json").read_text())
    assert published["releases"]["android_flagship"]["formats"] == ["gguf", "onnx", "tflite"]
    assert published["releases"]["iphone15pro"]["formats"] == ["coreml", "gguf"]
    budget = json.loads((workspace / "metrics" / "budget" / "android_flagship.json").read_text())
    # 2x2 tiles + the global view, 4 tokens each (64 px tiles, patch 16: 4x4 patches, pixel shuffle x2)
    assert (budget["views_per_image"], budget["visual_tokens_per_image"]) == (5, 20)
    for target in ("android_flagship-gguf", "android_flagship-onnx", "android_flagship-tflite", "iphone15pro-coreml"):
        verdict = json.loads((workspace / "metrics" / "parity" / f"{target}.json").read_text())
        assert verdict["passed"] and verdict["n_questions"] == 72, target
    table = _run([sys.executable, "-m", "vlm_factory.cli", "family-table", "--out", "family.json"], workspace)
    assert "tiny-smolvlm (siglip + pixel shuffle x2 + llama)" in table


@pytest.mark.slow
def test_dvc_exp_run_builds_what_the_mobilevlm_base_supports_and_lists_the_refused(workspace):
    """`-S model=tiny_mobilevlm`: the MobileVLM V2 base (8x8 patches pooled to 16 tokens) through every stage.
    Every tier lists GGUF, which llama.cpp's ldpv2 graph (24x24 patches only) cannot run: those targets are
    refused with the family's reason, and each tier publishes the formats it can."""
    _run(["dvc", "exp", "run", "-n", "smoke-mobilevlm", *[f"-S{o}" for o in TINY], "-S", "model=tiny_mobilevlm",
          "-S", "tier=[iphone15pro,android_flagship]"], workspace)
    published = json.loads((workspace / "metrics" / "publish.json").read_text())
    assert published["releases"]["android_flagship"]["formats"] == ["onnx", "tflite"]
    assert published["releases"]["iphone15pro"]["formats"] == ["coreml"]
    reason = "llama.cpp's ldpv2 graph reshapes a 24x24 patch grid, this tower makes 8x8"
    assert published["refused"] == {"android_flagship-gguf": reason, "iphone15pro-gguf": reason}
    export = workspace / "artifacts" / "export" / "android_flagship" / "gguf"
    assert [p.name for p in export.iterdir()] == ["refused.json"]
    budget = json.loads((workspace / "metrics" / "budget" / "android_flagship.json").read_text())
    assert (budget["views_per_image"], budget["visual_tokens_per_image"]) == (1, 16)
    for target in ("android_flagship-onnx", "android_flagship-tflite", "iphone15pro-coreml"):
        verdict = json.loads((workspace / "metrics" / "parity" / f"{target}.json").read_text())
        assert verdict["passed"] and verdict["n_questions"] == 72, target
    table = _run([sys.executable, "-m", "vlm_factory.cli", "family-table", "--out", "family.json"], workspace)
    assert "tiny-mobilevlm (clip + ldpv2 + llama)" in table and f"| android_flagship-gguf | refused: {reason} |" in table
    family = json.loads((workspace / "family.json").read_text())
    assert family["all_passed"] is True and set(family["refused"]) == {"android_flagship-gguf", "iphone15pro-gguf"}
