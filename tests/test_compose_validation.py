"""`vlm-factory compose` and `load_params` refuse what a stage must never run on, in one line, before writing.

Bad values (nan, inf, negative, zero where a count is needed, wrong types, unsafe names), empty tiers and
resolvers such as `${oc.env:...}` (params.yaml is committed: an environment value would be too) are each an
exit status 2 with one line naming the file and key; the output file is not written.
"""

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from vlm_factory.cli import main
from vlm_factory.config import compose_to_yaml, load_params
from vlm_factory.params_checks import BOUNDS
from vlm_factory.errors import UserError

# (overrides, the key the one-line error must name)
BAD = [
    # learning rates: finite and > 0
    (["train.lr=nan"], "train.lr"),
    (["train.lr=inf"], "train.lr"),
    (["train.lr=-inf"], "train.lr"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=-0.001"], "train.lr"),
    (["train.lr=1e400"], "train.lr"),
    (["model.pretrain.lr=nan"], "model.pretrain.lr"),
    (["model.pretrain.min_lr_ratio=1.5"], "model.pretrain.min_lr_ratio"),
    (["train.weight_decay=-0.1"], "train.weight_decay"),
    (["train.weight_decay=nan"], "train.weight_decay"),
    # steps, batch sizes, image counts: >= 1; seeds and warmup >= 0
    (["train.steps=-1"], "train.steps"),
    (["train.steps=0"], "train.steps"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.log_every=0"], "train.log_every"),
    (["train.lora_rank=0"], "train.lora_rank"),
    (["train.warmup_steps=-1"], "train.warmup_steps"),
    (["train.seed=-1"], "train.seed"),
    (["data.seed=-3"], "data.seed"),
    (["data.train_images=0"], "data.train_images"),
    (["data.eval_images=-5"], "data.eval_images"),
    (["data.eval_questions_per_image=0"], "data.eval_questions_per_image"),
    (["data.cell_px=1"], "data.cell_px"),
    (["train.batch_size=100000"], "train.batch_size"),  # more than the training questions: no step
    (["data=vqav2", "data.max_questions.train=10"], "train.batch_size"),
    (["data=vqav2", "data.max_questions.eval=0"], "data.max_questions.eval"),
    (["data.max_questions={bogus: 3}"], "data.max_questions.bogus"),
    (["data.splits.eval="], "data.splits.eval"),
    (["model.pretrain.steps=0"], "model.pretrain.steps"),
    (["model.pretrain.batch_images=-2"], "model.pretrain.batch_images"),
    (["model.pretrain.eval_every=0"], "model.pretrain.eval_every"),
    (["model.architecture.vision_layers=0"], "model.architecture.vision_layers"),
    (["model.architecture.vision_heads=3"], "model.architecture.vision_heads"),
    (["model.architecture.patch_size=7"], "model.architecture.patch_size"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["eval.embedding_images=0"], "eval.embedding_images"),
    (["export.calibration_images=0"], "export.calibration_images"),
    (["publish.multipart_threshold_mb=0"], "publish.multipart_threshold_mb"),
    # parity gates: finite, max_drop >= 0, cosine in [0, 1]
    (["eval.max_drop.gguf.F16=-0.1"], "eval.max_drop.gguf.F16"),
    (["eval.max_drop.onnx.int8=nan"], "eval.max_drop.onnx.int8"),
    (["eval.max_drop.coreml.4=inf"], "eval.max_drop.coreml.4"),
    (["eval.min_embedding_cosine.gguf=1.5"], "eval.min_embedding_cosine.gguf"),
    (["eval.min_embedding_cosine.onnx=-0.01"], "eval.min_embedding_cosine.onnx"),
    (["eval.min_embedding_cosine.tflite=nan"], "eval.min_embedding_cosine.tflite"),
    # tiers: at least one, each with a context and a memory budget
    (["tier=[]"], "tiers"),
    (["~tiers"], "tiers"),
    (["tiers={}"], "tiers"),  # merges into the tiers: changes nothing, so it is refused rather than ignored
    (["tiers.jetson_orin.context_tokens=0"], "tiers.jetson_orin.context_tokens"),
    (["tiers.iphone15pro.memory_budget_mb=-1"], "tiers.iphone15pro.memory_budget_mb"),
    (["tiers.android_budget.kv_cache_dtype=int3"], "tiers.android_budget.kv_cache_dtype"),
    (["+tiers.watch={description: w, memory_budget_mb: 64, context_tokens: 0}"], "tiers.watch.context_tokens"),
    # wrong types
    (["train.steps=many"], "train.steps"),
    (["train.steps=1.5"], "train.steps"),
    (["train.steps=true"], "train.steps"),
    (["train.lr=abc"], "train.lr"),
    (["train.lr=true"], "train.lr"),
    (["eval.embedding_images=[1,2]"], "eval.embedding_images"),
    (["tiers.jetson_orin.memory_budget_mb=lots"], "tiers.jetson_orin.memory_budget_mb"),
    (["model.name=null"], "model.name"),
    (["publish.version=[a]"], "publish.version"),
    # names that become paths: one safe segment
    (["publish.version=../../etc"], "publish.version"),
    (["publish.version=a/b"], "publish.version"),
    (["publish.version=.hidden"], "publish.version"),
    (["publish.version=v1 final"], "publish.version"),
    (["publish.version=" + "9" * 129], "publish.version"),
    (["model.name=../x"], "model.name"),
    (["model.name="], "model.name"),
    # where releases go, never with credentials
    (["publish.uri=ftp://host/x"], "publish.uri"),
    (["publish.uri=s3://"], "publish.uri"),
    (["publish.uri=s3://AKIAEXAMPLE:secret@bucket/x"], "publish.uri"),
    (["publish.endpoint_url=localhost:9000"], "publish.endpoint_url"),
    # resolvers: nothing from the environment (or anything but plain references) reaches params.yaml
    (["publish.uri=${oc.env:HOME}"], "publish.uri"),
    (["publish.uri='${oc.env:HOME}'"], "publish.uri"),
    (["publish.uri=file://${oc.env:HOME}/releases"], "publish.uri"),
    (["publish.endpoint_url=${oc.env:AWS_ENDPOINT_URL,http://localhost:9000}"], "publish.endpoint_url"),
    (["tiers.iphone15pro.memory_budget_mb=${oc.env:BUDGET,3000}"], "tiers.iphone15pro.memory_budget_mb"),
    (["targets.gguf.jetson_orin.llm=${oc.env:QUANT}"], "targets.gguf.jetson_orin.llm"),
    (["train.lr=${oc.decode:'0.01'}"], "train.lr"),
    (["model.path=${hydra:runtime.cwd}/models/x"], "model.path"),
    (["train.lr=${nope}"], "train.lr"),  # a reference to no key
    # what the existing checks refuse, now before writing
    (["model=llava_interleave_0_5b"], "model.revision"),
    (["train.llm=frozzen"], "train.llm"),
]


def _compose(args, tmp_path, capsys):
    """Run the CLI in-process; (exit status, stderr, output path)."""
    out = tmp_path / "params.yaml"
    with pytest.raises(SystemExit) as exited:
        main(["compose", *args, "--output", str(out)])
    return exited.value.code, capsys.readouterr().err, out


def _assert_one_line(stderr, *needles):
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _in_root(root, monkeypatch):
    monkeypatch.chdir(root)  # conf/ by default, as a user runs it
    monkeypatch.setenv("VLM_FACTORY_LOG", "WARNING")


@pytest.mark.parametrize("overrides, key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_override_is_refused_before_writing(overrides, key, tmp_path, capsys):
    code, stderr, out = _compose(overrides, tmp_path, capsys)
    assert code == 2, stderr
    _assert_one_line(stderr, f"'{key}'", str(out))
    assert not out.exists()


def _below(bound):
    if bound.low is None:
        return None
    if bound.integer:
        return int(bound.low) - (0 if bound.low_open else 1)
    return bound.low if bound.low_open else bound.low - 0.5


def _above(bound):
    return None if bound.high is None else (int(bound.high) + 1 if bound.integer else bound.high + 0.5)


# Keys the default composition leaves unset: (the overrides that set them, the key to try).
_SET_BY = {"data.max_questions.*": (["data=vqav2"], "data.max_questions.train"),
           # Idefics3-only keys: the default model's conf has none (an override of one is refused by Hydra).
           **{f"model.architecture.{key}": (["model=tiny_smolvlm"], f"model.architecture.{key}")
              for key in ("scale_factor", "tiles_per_side")}}


def _concrete(pattern):
    """A key of the default composition that the BOUNDS pattern names."""
    if pattern in _SET_BY:
        return _SET_BY[pattern][1]
    cfg = OmegaConf.load("params.yaml")
    parts = []
    node = cfg
    for part in pattern.split("."):
        if part == "*":
            if node is None or not len(node):
                return None
            part = str(next(iter(node)))
        node = node[part] if node is not None else None
        parts.append(part)
    return ".".join(parts) if node is not None else None


@pytest.mark.parametrize("pattern", sorted(BOUNDS))
def test_every_bound_refuses_just_outside_it(pattern):
    bound = BOUNDS[pattern]
    key = _concrete(pattern)
    assert key is not None, f"{pattern}: not set in the default composition; add it to _SET_BY"
    for value in (_below(bound), _above(bound), float("nan")):
        if value is None:
            continue
        with pytest.raises(UserError) as err:
            compose_to_yaml([*_SET_BY.get(pattern, ([], None))[0], f"{key}={value}"])
        message = str(err.value)
        assert f"'{key}'" in message and "\n" not in message, message


GOOD = [
    [],
    ["model=tiny_qwen2"],
    ["model=tiny_smolvlm"],
    ["data=vqav2"],
    ["publish=s3"],
    ["publish=s3", "publish.uri=s3://my-bucket/vlm", "publish.endpoint_url=http://localhost:9000"],
    ["model=llava_interleave_0_5b", "model.revision=" + "0123456789abcdef" * 2 + "01234567"],
    ["tier=[jetson_orin]"],
    ["tier=[iphone15pro,android_budget]"],
    ["train.projector=frozen", "train.batch_size=100000"],  # nothing is trained: no batch to fill
    ["train.warmup_steps=0", "train.seed=0", "train.weight_decay=0", "data.seed=0"],
    ["eval.max_drop.gguf.F16=0", "eval.max_drop.gguf.Q8_0=100.0", "eval.min_embedding_cosine.gguf=1.0"],
    ["eval.max_drop.gguf.F16=1", "eval.min_embedding_cosine.gguf=1", "eval.min_embedding_cosine.onnx=0"],
    ["publish.version=1.2.0", "publish.multipart_threshold_mb=5"],
    ["publish.version=2024-06-01_rc.1"],
    ["train.lr=${model.pretrain.lr}"],  # a plain reference inside the config is composed
]


@pytest.mark.parametrize("overrides", GOOD, ids=[" ".join(o) or "defaults" for o in GOOD])
def test_valid_compositions_compose_and_load(overrides, tmp_path):
    out = tmp_path / "params.yaml"
    out.write_text(compose_to_yaml(overrides, output=out))
    load_params(out)


def test_the_smoke_run_settings_stay_valid(tmp_path):
    from test_pipeline_smoke import TINY

    out = tmp_path / "params.yaml"
    out.write_text(compose_to_yaml(TINY, output=out))
    params = load_params(out)
    assert params.eval.min_embedding_cosine["gguf"] == 0.0 and params.eval.max_drop["gguf"]["Q4_K_M"] == 100.0


def test_a_refused_compose_leaves_the_existing_output_alone(tmp_path, capsys):
    out = tmp_path / "params.yaml"
    out.write_text("previous\n")
    code, stderr, _ = _compose(["train.lr=nan"], tmp_path, capsys)
    assert code == 2 and out.read_text() == "previous\n"
    code, stderr, _ = _compose(["--check", "publish.uri=${oc.env:HOME}"], tmp_path, capsys)
    assert code == 2 and out.read_text() == "previous\n"
    _assert_one_line(stderr, "'publish.uri'", "environment")


# A few through a real process: the exit status and stderr a user (or DVC) sees.
SUBPROCESS = [
    (["train.lr=nan"], "'train.lr' is nan; must be a finite number > 0"),
    (["publish.version=../../etc"], "'publish.version' is '../../etc'"),
    (["tier=[]"], "'tiers' is empty"),
    (["publish.uri=${oc.env:VLM_FACTORY_TEST_SECRET}"], "'publish.uri' reads the environment"),
]


@pytest.mark.parametrize("overrides, needle", SUBPROCESS, ids=[o[0] for o, _ in SUBPROCESS])
def test_cli_exit_status_and_one_line(overrides, needle, root, tmp_path):
    out = tmp_path / "params.yaml"
    env = {**os.environ, "VLM_FACTORY_TEST_SECRET": "s3://hunter2-bucket/x"}
    result = subprocess.run([sys.executable, "-m", "vlm_factory.cli", "compose", *overrides, "--output", str(out)],
                            cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    _assert_one_line(result.stderr, needle, str(out))
    assert "hunter2" not in result.stderr + result.stdout  # the environment's value is never shown
    assert not out.exists()


# --- load_params: a params.yaml written by hand, or by a composer other than ours --------------------------

def _params_with(tmp_path, root, old, new):
    text = (root / "params.yaml").read_text()
    assert old in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old, new, key, needle", [
    ("uri: file://artifacts/releases", "uri: ${oc.env:HOME}", "publish.uri", "reads the environment"),
    ("uri: file://artifacts/releases", "uri: file://${oc.env:HOME,/tmp}/releases", "publish.uri",
     "reads the environment"),
    ("region: null", "region: ${env:AWS_REGION}", "publish.region", "reads the environment"),
    ("  lr: 0.001\n", "  lr: ${model.pretrain.lr}\n", "train.lr", "unresolved interpolation"),
    ("memory_budget_mb: 3000", "memory_budget_mb: ${oc.decode:'3000'}", "tiers.iphone15pro.memory_budget_mb",
     "resolver"),
    ("  lr: 0.001\n", "  lr: .nan\n", "train.lr", "finite number > 0"),
    ("version: null", "version: ../../etc", "publish.version", "not starting with '.'"),
])
def test_load_params_refuses(old, new, key, needle, tmp_path, root):
    with pytest.raises(UserError) as err:
        load_params(_params_with(tmp_path, root, old, new))
    message = str(err.value)
    assert f"'{key}'" in message and needle in message and "params.yaml" in message and "\n" not in message


def test_load_params_keeps_an_escaped_dollar_brace(tmp_path, root):
    path = _params_with(tmp_path, root, "description: budget Android phone (4-6 GB, CPU only)",
                        r"description: costs \${x} phone")
    assert load_params(path).tiers["android_budget"].description == "costs ${x} phone"


def test_a_stage_refuses_an_environment_interpolation(tmp_path, root):
    params = _params_with(tmp_path, root, "uri: file://artifacts/releases", "uri: ${oc.env:HOME}")
    result = subprocess.run([sys.executable, str(root / "stages" / "finetune.py"), "--params", str(params),
                             "--base", "x", "--data", "x", "--out", "x", "--metrics-dir", "x"],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'publish.uri'" in last and "environment" in last


@pytest.mark.parametrize("override", ["publish.uri=${oc.env:HOME}", "publish.version=${oc.env:AWS_SECRET_ACCESS_KEY,x}",
                                      "train.seed=${oc.env:SEED,'1'}"])
def test_dvc_compose_refuses_environment_values(override, root, tmp_path):
    # `dvc exp run -S` composes conf/ in DVC's own process, resolving before our code runs; the repository's
    # hydra_plugins module (scanned by DVC from the repo root) makes oc.env refuse there. A fresh interpreter,
    # as DVC's is: Hydra scans plugins once per process.
    script = ("import sys\nfrom dvc.utils.hydra import compose_and_dump\n"
              "compose_and_dump(sys.argv[1], sys.argv[2], None, 'config', sys.argv[3], [sys.argv[4]])\n")
    out = tmp_path / "params.yaml"
    child = subprocess.run([sys.executable, "-c", script, str(out), str(root / "conf"), str(root), override],
                           capture_output=True, text=True, env={**os.environ, "AWS_SECRET_ACCESS_KEY": "s3cr3t-v4lue"})
    assert child.returncode != 0 and not out.exists()
    assert "would write an environment value into params.yaml" in child.stderr
    assert "s3cr3t-v4lue" not in child.stderr and os.environ.get("HOME", "/nonexistent") not in child.stderr


def test_dvc_compose_still_writes_plain_overrides(root, tmp_path):
    script = ("import sys\nfrom dvc.utils.hydra import compose_and_dump\n"
              "compose_and_dump(sys.argv[1], sys.argv[2], None, 'config', sys.argv[3], ['train.seed=7'])\n")
    out = tmp_path / "params.yaml"
    subprocess.run([sys.executable, "-c", script, str(out), str(root / "conf"), str(root)], check=True)
    assert load_params(out).train.seed == 7
