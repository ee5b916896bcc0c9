"""report.html: parity results list their flipped questions, and one self-contained page shows them.

The page is opened in a real browser, headless Chromium from the OS packages driven by selenium (`make test`
installs them where it can; without them the browser test skips, saying so). The inputs are real: committed
parity results (metrics/parity/*.json) and the images of a synthetic dataset the tests generate.

The README's screenshot comes from the same code: `python tests/test_report_html.py` renders the committed
metrics (parity, search, budgets; thumbnails from artifacts/data) and writes docs/report.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf
from PIL import Image

from vlm_factory.cli import main as cli
from vlm_factory.data.records import read_jsonl
from vlm_factory.eval.artifact_parity import flipped_questions
from vlm_factory.eval.parity import paired_drift
from vlm_factory.eval.vqa_metric import vqa_score
from vlm_factory.publish.report_html import render_report

ROOT = Path(__file__).resolve().parent.parent
TIER = "iphone15pro"
RESULTS = ("iphone15pro-gguf", "iphone15pro-coreml", "android_budget-onnx")  # committed, two tiers, three formats
HOSTILE = '<b>nope</b> & "x"'  # an artifact's answer that must show as text, never as markup
WINDOW_WIDTH = 1200


def _answers(records):
    """Reference and artifact answers that disagree in a known pattern: the reference misses every 7th
    question from the 4th, the artifact every 5th; the official metric scores them."""
    reference = ["no idea" if i % 7 == 3 else r.multiple_choice_answer for i, r in enumerate(records)]
    artifact = [HOSTILE if i % 5 == 0 else r.multiple_choice_answer for i, r in enumerate(records)]
    return ([vqa_score(a, r.answers) for a, r in zip(reference, records)], reference,
            [vqa_score(a, r.answers) for a, r in zip(artifact, records)], artifact)


@pytest.fixture(scope="module")
def eval_records(synthetic_data):
    return read_jsonl(synthetic_data / "eval.jsonl")


@pytest.fixture(scope="module")
def flips(eval_records):
    ref_scores, ref_answers, scores, answers = _answers(eval_records)
    reference = SimpleNamespace(records=eval_records, scores=ref_scores, answers=ref_answers)
    return flipped_questions(reference, scores, answers, limit=12)


@pytest.fixture(scope="module")
def parity_results(flips):
    """Three committed parity results; the gguf one with the flips measured on the synthetic data, the onnx
    one as committed before results listed flips."""
    results = {key: json.loads((ROOT / "metrics" / "parity" / f"{key}.json").read_text()) for key in RESULTS}
    results["iphone15pro-gguf"].update(flips)
    results["iphone15pro-coreml"].update(flips=flips["flips"][:3], flips_total=3)
    results["android_budget-onnx"].pop("flips", None)
    return results


@pytest.fixture(scope="module")
def report_page(tmp_path_factory, parity_results, synthetic_data):
    budget = json.loads((ROOT / "metrics" / "budget" / f"{TIER}.json").read_text())
    search = json.loads((ROOT / "metrics" / "search" / f"{TIER}-gguf.json").read_text())
    page = render_report(list(parity_results.values()), search=[search], budgets=[budget], data_dir=synthetic_data)
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def test_flips_are_the_questions_the_flip_rate_counts(eval_records, flips, synthetic_data):
    ref_scores, _, scores, _ = _answers(eval_records)
    n = len(eval_records)
    expected = [r.question_id for i, r in enumerate(eval_records) if (i % 7 == 3) != (i % 5 == 0)]
    lost = [r.question_id for i, r in enumerate(eval_records) if i % 5 == 0 and i % 7 != 3]
    assert flips["flips_total"] == len(expected) == 21
    assert flips["flips_total"] / n == pytest.approx(paired_drift(ref_scores, scores)["flip_rate"], abs=5e-5)
    # Lost answers first, each group by question id; capped at the limit.
    listed = [f["question_id"] for f in flips["flips"]]
    assert len(listed) == 12 and listed == (sorted(lost) + sorted(set(expected) - set(lost)))[:12]
    first = flips["flips"][0]
    record = next(r for r in eval_records if r.question_id == first["question_id"])
    assert first == {"question_id": record.question_id, "image": record.image, "question": record.question,
                     "question_type": record.question_type, "aspect": record.aspect,
                     "reference_answer": record.multiple_choice_answer, "artifact_answer": HOSTILE,
                     "reference_score": 1.0, "artifact_score": 0.0}
    assert (synthetic_data / first["image"]).is_file()


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_the_page_is_self_contained_and_escapes_its_inputs(report_page, parity_results):
    page = report_page.read_text(encoding="utf-8")
    tags = _Tags()
    tags.feed(page)
    names = [tag for tag, _ in tags.tags]
    assert "script" not in names and "link" not in names and "iframe" not in names
    links = [attrs[key] for _, attrs in tags.tags for key in ("src", "href") if key in attrs]
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    assert HOSTILE not in page and "&lt;b&gt;nope&lt;/b&gt; &amp; &quot;x&quot;" in page
    failing = {**parity_results["iphone15pro-gguf"], "passed": False, "failure_reason": "<script>x()</script>"}
    assert "<script>" not in render_report([failing]) and "&lt;script&gt;x()&lt;/script&gt;" in render_report([failing])
    # The same inputs give the same bytes (a release's report does not depend on when it was made).
    assert render_report([failing]) == render_report([failing])


def test_malformed_parts_show_as_missing_and_images_stay_inside_the_data(parity_results, synthetic_data, tmp_path):
    (tmp_path / "secret.png").write_bytes((synthetic_data / "images" / "eval" / "20000000.png").read_bytes())
    flip = {**parity_results["iphone15pro-gguf"]["flips"][0], "image": "../secret.png"}
    broken = {**parity_results["iphone15pro-gguf"], "attribution": {"rows": [1]}, "agreement": "x", "budget": 3,
              "image_embedding_cosine": None, "drift_ci95": "wide", "flips": [flip], "flips_total": 1}
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    page = render_report([broken], budgets=[{"tier": TIER, "memory_budget_mb": 1, "formats": {"gguf": "junk"}}],
                         data_dir=data)
    row = page.split('<tr data-tier="iphone15pro" data-format="gguf">', 1)[1].split("</tr>", 1)[0]
    assert "-0.37 (\u2014, \u2014)" in row and row.count("\u2014") >= 6  # CI, agreement, cosine: dashes
    # An image named outside the data directory is not read, even where the file exists.
    assert "data:image/png" not in page.split('id="flips"', 1)[1] and "image not shown" in page
    assert "resolves outside" in page


def _browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium is not installed (OS packages chromium and chromium-driver; `make test` "
                    "installs them where apt-get can)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    return open_browser(webdriver, chromium, driver)


def open_browser(webdriver, chromium: str, driver: str):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    # An explicit driver path: selenium's own driver lookup would try the network.
    return webdriver.Chrome(service=Service(driver), options=options)


def screenshot_full_page(browser, page: Path, width: int = WINDOW_WIDTH) -> bytes:
    """A PNG of the whole page: the window is made as tall as the page (plus the window's own frame)."""
    browser.set_window_size(width, 800)
    browser.get(page.resolve().as_uri())
    frame = browser.execute_script("return window.outerHeight - window.innerHeight")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(width, height + frame)
    assert browser.execute_script("return window.innerHeight") >= height, "the page does not fit the window"
    return browser.get_screenshot_as_png()


@pytest.fixture(scope="module")
def browser():
    driver = _browser_or_skip()
    yield driver
    driver.quit()


def test_the_report_in_a_real_browser(browser, report_page, parity_results, tmp_path):
    from selenium.webdriver.common.by import By

    png = screenshot_full_page(browser, report_page)
    (tmp_path / "report.png").write_bytes(png)
    width, height = browser.execute_script("return [window.innerWidth, document.documentElement.scrollHeight]")
    shot = Image.open(BytesIO(png))
    assert shot.width == width and shot.height >= height > 1500  # the whole page, not the first screen

    # The parity table: one per format, a row per tier, with the result's own numbers and verdict.
    tables = browser.find_elements(By.CSS_SELECTOR, "table.parity")
    assert sorted(t.get_attribute("data-format") for t in tables) == ["coreml", "gguf", "onnx"]
    for result in parity_results.values():
        row = browser.find_element(By.CSS_SELECTOR, f'table.parity[data-format="{result["format"]}"] '
                                                    f'tr[data-tier="{result["tier"]}"]')
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        assert cells[0] == result["tier"] and cells[3] == f"{result['vqa_accuracy']:.2f} %"
        assert cells[-1] == "pass" and row.is_displayed()

    # Every picture decoded: the figure (accuracy against size) and one thumbnail per flipped question.
    images = browser.find_elements(By.TAG_NAME, "img")
    decoded = browser.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
    assert len(images) == len(decoded) == 1 + 12 + 3
    assert all(complete and width > 0 for complete, width in decoded), decoded
    assert browser.find_element(By.CSS_SELECTOR, "img.figure").get_property("naturalWidth") >= 1000
    assert all(0 < width <= 96 for _, width in decoded[1:])

    # The flipped questions: both answers on every card, the hostile answer as text.
    gguf = parity_results["iphone15pro-gguf"]
    cards = browser.find_elements(By.CSS_SELECTOR, 'div.flips[data-target="iphone15pro-gguf"] figure.flip')
    assert len(cards) == len(gguf["flips"]) == 12
    for card, flip in zip(cards, gguf["flips"]):
        assert card.is_displayed() and card.get_attribute("data-question-id") == str(flip["question_id"])
        reference = card.find_element(By.CSS_SELECTOR, ".reference-answer").text
        artifact = card.find_element(By.CSS_SELECTOR, ".artifact-answer").text
        assert reference == f"{flip['reference_answer']} ({flip['reference_score']:.2f})"
        assert artifact == f"{flip['artifact_answer']} ({flip['artifact_score']:.2f})"
    heading = browser.find_element(By.XPATH, "//h3[starts-with(., 'iphone15pro-gguf:')]").text
    assert heading == f"iphone15pro-gguf: {gguf['flips_total']} flipped, the first 12 shown"
    section = browser.find_element(By.ID, "flips").text
    assert "android_budget-onnx\nNot recorded" in section


def test_report_command_writes_the_page_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "report.html"
    parity = [str(ROOT / "metrics" / "parity" / f"{key}.json") for key in RESULTS]
    cli(["report", *parity, "--budget", str(ROOT / "metrics" / "budget" / f"{TIER}.json"), "--out", str(out)])
    page = out.read_text(encoding="utf-8")
    assert page.count('<table class="parity"') == 3 and 'data-tier="android_budget"' in page
    assert 'id="budget"' in page and capsys.readouterr().out == f"wrote {out}\n"
    for bad, says in ((ROOT / "metrics" / "budget" / f"{TIER}.json", "not a parity result"),
                      (tmp_path / "missing.json", "parity result not found")):
        with pytest.raises(SystemExit) as exit_:
            cli(["report", parity[0], str(bad), "--out", str(tmp_path / "other.html")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {bad}: {says}")
    with pytest.raises(SystemExit):
        cli(["report", parity[0], "--search", parity[1], "--out", str(tmp_path / "other.html")])
    assert "not a search result" in capsys.readouterr().err
    assert not (tmp_path / "other.html").exists()


@pytest.fixture
def release_inputs(tmp_path, parity_results, synthetic_data, random_checkpoint):
    """One tier (iphone15pro: gguf + coreml) with small export directories and its committed results."""
    params = OmegaConf.load(ROOT / "params.yaml")
    params.tiers = {TIER: params.tiers[TIER]}
    params.targets = {fmt: ({TIER: by_tier[TIER]} if TIER in by_tier and fmt in ("gguf", "coreml") else {})
                      for fmt, by_tier in params.targets.items()}
    if "signing" in params.publish:  # a key of this test's own, never one in the repository's artifacts/
        params.publish.signing.key = str(tmp_path / "keys" / "release.pem")
    params_path = tmp_path / "params.yaml"
    OmegaConf.save(params, params_path)
    exports, parity, budgets = tmp_path / "export", tmp_path / "parity", tmp_path / "budget"
    for fmt in ("gguf", "coreml"):
        (exports / TIER / fmt).mkdir(parents=True)
        (exports / TIER / fmt / "model.bin").write_bytes(fmt.encode() * 100)
        (exports / TIER / fmt / "export_report.json").write_text(json.dumps({"format": fmt, "tools": {}}))
        parity.mkdir(exist_ok=True)
        (parity / f"{TIER}-{fmt}.json").write_text(json.dumps(parity_results[f"{TIER}-{fmt}"]))
    budgets.mkdir()
    shutil.copy(ROOT / "metrics" / "budget" / f"{TIER}.json", budgets / f"{TIER}.json")
    return {"params_path": params_path, "export_root": exports, "parity_dir": parity, "budget_dir": budgets,
            "model_dir": random_checkpoint, "data_dir": synthetic_data, "repo": ROOT}


def test_every_release_holds_its_report_which_does_not_version_it(release_inputs, tmp_path):
    from vlm_factory.config import load_params
    from vlm_factory.publish.bundle import content_version
    from vlm_factory.publish.release import check_release, files_root, read_manifest
    from vlm_factory.publish.run import publish_tiers
    from vlm_factory.publish.store import FileStore

    store = FileStore(tmp_path / "releases")

    def publish(**changes):
        params = load_params(release_inputs["params_path"])
        params.publish.version = "1.0.0"
        inputs = {**release_inputs, **changes}
        return publish_tiers(params, store=store, params_path=inputs["params_path"],
                             **{k: v for k, v in inputs.items() if k != "params_path"})["releases"][TIER]

    first = publish()
    prefix = f"{TIER}/1.0.0"
    manifest = read_manifest(store, prefix)
    report = (tmp_path / "releases" / files_root(prefix, manifest) / "report.html").read_text(encoding="utf-8")
    assert check_release(store, prefix) == [] and manifest["files"]["report.html"]["size"] == len(report.encode())
    assert report.count('<table class="parity"') == 2 and f" for {TIER} (1.0.0)</title>" in report
    assert report.count('class="flip ') == 12 + 3 and "data:image/png;base64," in report
    # Without its report (and card) the files name the same content version, and a report that differs (here:
    # no images to show) over the same artifacts is the same release, not a conflicting one.
    assert content_version(manifest["files"]) == content_version(
        {k: v for k, v in manifest["files"].items() if k != "report.html"})
    empty = tmp_path / "no-images"
    empty.mkdir()
    again = publish(data_dir=empty)
    assert (again["uri"], again["version"]) == (first["uri"], first["version"])
    assert read_manifest(store, prefix) == manifest  # the release stands as it was


def main(argv: list[str] | None = None) -> None:
    """Write the README's screenshot: the report of one tier's committed metrics, as its release holds it (with
    the tier's search results too). All nine results of the default run make a page 6,500 px tall."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--tier", default="iphone15pro", help="the tier whose metrics to show, or 'all'")
    parser.add_argument("--parity", nargs="+", default=None, help="parity results instead of metrics/parity/<tier>-*")
    parser.add_argument("--data", default=str(ROOT / "artifacts" / "data"))
    parser.add_argument("--colours", type=int, default=256, help="palette size of the PNG (keeps it small)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png")
    args = parser.parse_args(argv)
    from selenium import webdriver

    tier = "*" if args.tier == "all" else args.tier
    metrics = ROOT / "metrics"
    parity = args.parity or sorted(map(str, metrics.glob(f"parity/{tier}-*.json")))
    search = sorted(map(str, metrics.glob(f"search/{tier}-*.json")))
    budget = sorted(map(str, metrics.glob(f"budget/{tier}.json")))
    with tempfile.TemporaryDirectory() as scratch:
        page = Path(scratch) / "report.html"
        cli(["report", *parity, "--search", *search, "--budget", *budget, "--data", args.data, "--out", str(page)])
        browser = open_browser(webdriver, shutil.which("chromium") or "chromium",
                               shutil.which("chromedriver") or "/usr/bin/chromedriver")
        try:
            png = screenshot_full_page(browser, page)
        finally:
            browser.quit()
    # On a palette without dithering (its noise compresses badly) a page of text shrinks to a third.
    image = Image.open(BytesIO(png)).convert("RGB").quantize(args.colours, dither=Image.Dither.NONE)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out}: {image.width}x{image.height}, {args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    sys.exit(main())
