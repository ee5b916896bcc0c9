"""The smallest artifact of one (tier, format) that passes the gate and fits the tier.

Candidates are every combination of the per-component precisions in `search.grid.<format>` (those the
format's own settings check refuses, e.g. ONNX int8 and fp16 in one graph, are listed as refused with
its reason), ordered smallest first by the budget planner's estimate of their weights. Each is exported
as the export stage would, run in its own runtime and judged by the full parity gate at the thresholds
of the tier's current target (the bar the tier ships at: a candidate never gets a looser gate for being
smaller) with the tier's memory and context budget. `search.evaluate: until_pass` stops at the first
that passes (everything smaller has failed, so it is the smallest passing, up to the estimate's
ordering); `all` evaluates every candidate, for the full accuracy-vs-size picture.

The result holds every evaluated candidate (real bytes, accuracy, drift, flips, agreement, verdict and
reasons), the Pareto front (no other evaluated candidate is both smaller and more accurate), the winner
and the `-S` overrides that make it the tier's target (`dvc exp run -S ...`).
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from pathlib import Path

from vlm_factory.budget import estimated_weight_bytes
from vlm_factory.errors import UserError
from vlm_factory.eval.artifact_parity import headline
from vlm_factory.eval.gates import GateThresholds
from vlm_factory.export.components import component_precisions, with_precisions
from vlm_factory.families import COMPONENTS

log = logging.getLogger(__name__)

MODES = ("until_pass", "all")


def candidates(fmt: str, tier: str, target: dict, grid: dict) -> tuple[list[dict], list[dict]]:
    """(valid candidates as {precisions, settings}, refused ones with the settings check's reason)."""
    missing = [c for c in COMPONENTS if not grid.get(c)]
    if missing:
        raise UserError(f"key 'search.grid.{fmt}' must list precisions for every component; missing: "
                        f"{', '.join(missing)}")
    valid, refused = [], []
    for combo in itertools.product(*(grid[c] for c in COMPONENTS)):
        precisions = {c: str(p) for c, p in zip(COMPONENTS, combo)}
        try:
            settings = with_precisions(fmt, target, tier, precisions)
        except UserError as error:
            refused.append({"precisions": precisions, "reason": str(error)})
            continue
        valid.append({"precisions": component_precisions(fmt, settings, tier), "settings": settings})
    return valid, refused


def label(precisions: dict[str, str]) -> str:
    return ", ".join(f"{c} {precisions[c]}" for c in COMPONENTS)


def pareto_front(rows: list[dict]) -> list[str]:
    """Labels of the evaluated candidates no other one beats on both size and accuracy."""
    front = []
    for row in rows:
        dominated = any(other["artifact_bytes"] <= row["artifact_bytes"] and other["vqa_accuracy"] >= row["vqa_accuracy"]
                        and (other["artifact_bytes"], other["vqa_accuracy"]) != (row["artifact_bytes"], row["vqa_accuracy"])
                        for other in rows)
        if not dominated:
            front.append(row["candidate"])
    return front


def overrides(fmt: str, tier: str, precisions: dict[str, str]) -> list[str]:
    """The `-S` overrides that make `precisions` the tier's target."""
    return [f"targets.{fmt}.{tier}.{c}={precisions[c]}" for c in COMPONENTS]


def _row(name: str, precisions: dict, estimate: int, result: dict) -> dict:
    fits = all(c["status"] != "fail" for c in result["checks"] if c["check"] in ("memory_mib", "context_tokens_needed"))
    return {"candidate": name, **headline(result, precisions, result["artifact_bytes"]),
            "estimated_weight_bytes": estimate, "artifact_mib": round(result["artifact_bytes"] / 2**20, 4),
            "fits": fits, "passed": result["passed"], "failure_reason": result.get("failure_reason", "")}


def search(bench, fmt: str, target: dict, grid: dict, thresholds: GateThresholds, mode: str = "until_pass") -> dict:
    """Search one (bench.tier_name, fmt); see the module docstring. `target` is the tier's current settings."""
    if mode not in MODES:
        raise UserError(f"key 'search.evaluate' must be one of {', '.join(MODES)}; got {mode!r}")
    tier = bench.tier_name
    started = time.perf_counter()
    valid, refused = candidates(fmt, tier, target, grid)
    for candidate in valid:
        candidate["estimate"] = estimated_weight_bytes(bench.family, fmt, candidate["settings"], tier)
    valid.sort(key=lambda c: (c["estimate"], label(c["precisions"])))
    log.info("%s-%s search: %d candidates (%d refused by the settings check), smallest first, %s", tier, fmt,
             len(valid), len(refused),
             "until one passes" if mode == "until_pass" else "all evaluated")
    rows, winner = [], None
    with tempfile.TemporaryDirectory(prefix=f"search-{tier}-{fmt}-") as scratch:
        for index, candidate in enumerate(valid):
            name = label(candidate["precisions"])
            out = Path(scratch) / f"candidate-{index}"
            bench.export(fmt, candidate["settings"], out)
            result = bench.evaluate(fmt, out, thresholds, label=f"{tier}-{fmt} [{name}]")
            rows.append(_row(name, candidate["precisions"], candidate["estimate"], result))
            if result["passed"] and winner is None:
                winner = rows[-1]
                if mode == "until_pass":
                    break
    not_evaluated = [label(c["precisions"]) for c in valid[len(rows):]]
    current = component_precisions(fmt, target, tier)
    log.info("%s-%s search: %s after %d of %d candidates in %.1fs", tier, fmt,
             f"smallest passing {winner['candidate']} ({winner['artifact_mib']:.2f} MiB)" if winner else "none passes",
             len(rows), len(valid), time.perf_counter() - started)
    return {
        "tier": tier, "format": fmt, "mode": mode, "current_target": current,
        "gate": f"the thresholds of the tier's current target ({label(current)}) and the tier's budget",
        "grid": {c: [str(p) for p in grid[c]] for c in COMPONENTS},
        "evaluated": rows, "pareto_front": pareto_front(rows),
        "winner": winner,
        "override": overrides(fmt, tier, winner["precisions"]) if winner else None,
        "not_evaluated": not_evaluated, "refused": refused,
    }


def plot_points(result: dict) -> list[dict]:
    """One row per evaluated candidate, for `dvc plots` (x: artifact_mib, y: vqa_accuracy)."""
    return [{"candidate": r["candidate"], "artifact_mib": r["artifact_mib"], "vqa_accuracy": r["vqa_accuracy"],
             "verdict": "pass" if r["passed"] else "fail"} for r in result["evaluated"]]


def _draw(ax, result: dict) -> None:
    rows = result["evaluated"]
    for passed, style in ((True, {"color": "tab:green", "label": "passes the gate"}),
                          (False, {"facecolors": "none", "edgecolors": "tab:red", "label": "fails"})):
        chosen = [r for r in rows if r["passed"] == passed]
        if chosen:
            ax.scatter([r["artifact_mib"] for r in chosen], [r["vqa_accuracy"] for r in chosen], s=36, **style)
    front = sorted((r for r in rows if r["candidate"] in result["pareto_front"]), key=lambda r: r["artifact_mib"])
    if len(front) > 1:
        ax.plot([r["artifact_mib"] for r in front], [r["vqa_accuracy"] for r in front], color="tab:blue",
                linewidth=1, drawstyle="steps-post", label="Pareto front", zorder=0)
    ax.axhline(result["reference_accuracy"], color="grey", linestyle="--", linewidth=1, label="reference (PyTorch)")
    if result["winner"]:
        w = result["winner"]
        ax.annotate(f"smallest passing:\n{w['candidate']}", (w["artifact_mib"], w["vqa_accuracy"]),
                    textcoords="offset points", xytext=(12, 24), fontsize=8,
                    arrowprops={"arrowstyle": "->", "linewidth": 0.8})
    ax.set_xlabel("artifact size (MiB)")
    ax.set_ylabel("VQA accuracy (%)")
    ax.set_title(f"{result['tier']} {result['format']}: accuracy vs size ({len(rows)} candidates evaluated)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)


def render_picture(result: dict, path: Path) -> None:
    """Accuracy vs size of every evaluated candidate as a PNG: passing ones filled, failing hollow, the
    winner named, the reference's accuracy as a line."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib import pyplot as plt

    from vlm_factory.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if "skipped" in result:
        ax.text(0.5, 0.5, f"{result['tier']} {result['format']} not searched:\n{result['skipped']}", ha="center",
                va="center", fontsize=9)
        ax.set_axis_off()
    else:
        _draw(ax, result)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run(params, tier: str, fmt: str, *, model_dir: Path, data_dir: Path, reference_predictions: Path,
        reference_metrics: Path, mode: str | None = None) -> dict:
    """The search of one (tier, format) from params.yaml, or a record of why it was skipped; `mode` overrides
    search.evaluate."""
    from vlm_factory.eval.bench import Bench
    from vlm_factory.eval.gates import gate_thresholds
    from vlm_factory.families import family_of

    skipped = {"tier": tier, "format": fmt, "evaluated": [], "winner": None}
    if tier not in params.tiers:
        return {**skipped, "skipped": f"tier {tier} is not selected (tier=[...])"}
    if tier not in params.targets.get(fmt, {}):
        return {**skipped, "skipped": f"tier {tier} ships no {fmt} target (targets.{fmt}.{tier})"}
    reason = family_of(model_dir).format_refusal(fmt)
    if reason is not None:
        return {**skipped, "skipped": f"the model family cannot go to {fmt}: {reason}"}
    if fmt not in params.search.grid:
        raise UserError(f"key 'search.grid.{fmt}' is missing: list the precisions to try per component")
    target = dict(params.targets[fmt][tier])
    thresholds = gate_thresholds(params.eval, fmt, tier, target)
    bench = Bench(params, tier, model_dir=model_dir, data_dir=data_dir, reference_predictions=reference_predictions,
                  reference_metrics=reference_metrics)
    result = search(bench, fmt, target, dict(params.search.grid[fmt]), thresholds, mode or params.search.evaluate)
    result["reference_accuracy"] = bench.reference.accuracy
    return result


def table(result: dict) -> str:
    """The evaluated candidates as text, smallest first, the winner marked, its overrides last."""
    if "skipped" in result:
        return f"{result['tier']}-{result['format']}: skipped ({result['skipped']})"
    lines = [f"{'candidate':<44} {'MiB':>7} {'acc %':>6} {'drift':>6}  verdict"]
    for r in result["evaluated"]:
        mark = " <- smallest passing" if result["winner"] and r["candidate"] == result["winner"]["candidate"] else ""
        lines.append(f"{r['candidate']:<44} {r['artifact_mib']:7.3f} {r['vqa_accuracy']:6.2f} {r['drift']:+6.2f}  "
                     f"{'pass' if r['passed'] else 'FAIL: ' + r['failure_reason']}{mark}")
    if result["override"]:
        lines.append("apply: dvc exp run " + " ".join(f"-S {o}" for o in result["override"]))
    else:
        lines.append(f"no candidate of search.grid.{result['format']} passes")
    return "\n".join(lines)
