"""report.html: one self-contained page that shows a person what passed the parity gate, and what changed.

Rendered from parity results (metrics/parity/<tier>-<format>.json, one per artifact), optionally the
precision search's results (metrics/search/*.json) and the tiers' budgets (metrics/budget/<tier>.json),
with thumbnails from the eval data. Sections: the parity table per format; accuracy against size per
tier (every artifact, and the search's candidates when given); the drift by component; the budgets; the
flipped questions (the parity result's `flips`), each with its image and both answers.

Everything is inline - CSS, the figure and the thumbnails as data URIs, no script, no external URL - so
the page reads the same offline, from a release bucket or attached to a ticket. Every text taken from
the inputs is escaped. Nothing in the page depends on the time it was made: the same inputs give the
same bytes.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from collections.abc import Iterable
from pathlib import Path

from vlm_factory.errors import UserError
from vlm_factory.io import read_json

THUMBNAIL_PX = 96
# families.COMPONENTS' order (vision, projector, llm); not imported, so rendering a page loads no torch.
COMPONENT_ORDER = ("vision", "projector", "llm")
FORMAT_COLOURS = {"gguf": "#1f77b4", "onnx": "#ff7f0e", "coreml": "#2ca02c", "tflite": "#d62728"}
MISSING = "\u2014"  # an em dash where a result does not hold a value

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; margin: 24px auto;
       max-width: 1180px; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 6px; }
p.lead, p.note { color: #555; margin: 4px 0 10px; }
.scroll { overflow-x: auto; }  /* a wide table scrolls inside its box instead of being cut off */
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 4px 8px; text-align: right; vertical-align: top;
         white-space: nowrap; }
th { background: #f5f5f7; font-weight: 600; white-space: normal; vertical-align: bottom; }
th.text, td.text { text-align: left; white-space: normal; }
td.precision { min-width: 13em; }
.pass { color: #0a7d28; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; }
.reason { color: #b3261e; font-size: 12px; text-align: left; max-width: 340px; }
img.figure { max-width: 100%; height: auto; border: 1px solid #eee; }
.flips { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 10px; }
.flip { display: flex; gap: 10px; border: 1px solid #e3e3e3; border-left: 4px solid #b3261e; border-radius: 4px;
        padding: 8px; margin: 0; }
.flip.gained { border-left-color: #0a7d28; }
.flip img, .flip .no-image { flex: none; width: 96px; height: 96px; object-fit: contain; background: #f5f5f7; }
.flip .no-image { font-size: 11px; color: #777; display: flex; align-items: center; text-align: center; }
.flip figcaption { font-size: 13px; min-width: 0; }
.flip .question { font-weight: 600; margin: 0 0 2px; }
.flip .meta { color: #777; font-size: 12px; margin: 0 0 4px; }
.flip dl { margin: 0; display: grid; grid-template-columns: auto 1fr; gap: 0 6px; }
.flip dt { color: #555; } .flip dd { margin: 0; overflow-wrap: anywhere; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _dict(value: object) -> dict:
    """`value` where it is a JSON object, else an empty one: an optional part of a result that is malformed
    renders as missing instead of failing the page."""
    return value if isinstance(value, dict) else {}


def _at(value: object, *keys: str) -> object:
    """value[key][key]...: None where a step is no JSON object or lacks the key."""
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: object, spec: str, suffix: str = "") -> str:
    """A number as `spec` formats it, or a dash where the result does not hold one."""
    return f"{value:{spec}}{suffix}" if _is_number(value) else MISSING


def _mib(size: object) -> str:
    if not _is_number(size):
        return MISSING
    mib = size / 2**20
    return f"{mib:,.2f} MiB" if mib < 100 else f"{mib:,.0f} MiB"


def _percent(share: object, digits: int = 1) -> str:
    return f"{100 * share:.{digits}f} %" if _is_number(share) else MISSING


def _attributes(attributes: dict[str, str]) -> str:
    """HTML attributes from keyword arguments: class_ -> class, data_tier -> data-tier; values escaped."""
    return "".join(f' {name.rstrip("_").replace("_", "-")}="{_esc(value)}"' for name, value in attributes.items())


def _table(headers: Iterable[str], rows: Iterable[str], text_columns: tuple[int, ...] = (0,), **attributes: str) -> str:
    """A table; `rows` are finished <tr> elements, every header and attribute value is escaped here.
    `text_columns` are left-aligned (the others hold numbers)."""
    attrs = _attributes(attributes)
    head = "".join(f'<th class="text">{_esc(h)}</th>' if i in text_columns else f"<th>{_esc(h)}</th>"
                   for i, h in enumerate(headers))
    body = "".join(rows)
    return f'<div class="scroll"><table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _row(cells: Iterable[str], **attributes: str) -> str:
    """A <tr> of finished <td> contents (already escaped by the caller); the first cell is a text cell."""
    attrs = _attributes(attributes)
    tds = [cell if cell.startswith("<td") else f'<td class="text">{cell}</td>' if i == 0 else f"<td>{cell}</td>"
           for i, cell in enumerate(cells)]
    return f"<tr{attrs}>" + "".join(tds) + "</tr>"


def _name(result: dict) -> str:
    return f"{result.get('tier')}-{result.get('format')}"


def precisions_label(precisions: object) -> str:
    """'vision Q8_0, projector F16, llm Q4_K_M': components in the model's order, others after."""
    if not isinstance(precisions, dict) or not precisions:
        return MISSING
    order = [c for c in COMPONENT_ORDER if c in precisions] + sorted(c for c in precisions if c not in COMPONENT_ORDER)
    return ", ".join(f"{c} {precisions[c]}" for c in order)


def _target_precisions(result: dict, budgets: dict[str, dict]) -> object:
    """What the artifact was built at: the attribution's target row, else the tier budget's settings."""
    return (_at(result, "attribution", "rows", "target", "precisions")
            or _at(budgets, result.get("tier"), "formats", result.get("format"), "settings"))


def _flip_count(result: dict) -> object:
    if _is_number(result.get("flips_total")):
        return result["flips_total"]
    if _is_number(result.get("flip_rate")) and _is_number(result.get("n_questions")):
        return round(result["flip_rate"] * result["n_questions"])
    return None


# ---- inputs -------------------------------------------------------------------------------------------------

PARITY_NUMBERS = ("vqa_accuracy", "drift", "flip_rate")


def read_parity_result(path: Path | str) -> dict:
    """A parity result (or a refused target's record), or a one-line UserError naming the file."""
    fix = "give the parity stage's results (metrics/parity/<tier>-<format>.json)"
    data = read_json(path, missing=f"{path}: parity result not found; {fix}", fix=fix)
    if not isinstance(data.get("format"), str) or not isinstance(data.get("tier"), str):
        raise UserError(f"{path}: not a parity result (no 'format' and 'tier'); {fix}")
    if "refused" in data:
        return data
    bad = [key for key in PARITY_NUMBERS if not _is_number(data.get(key))]
    ci = data.get("drift_ci95")
    if bad or not isinstance(data.get("passed"), bool) or not (
            isinstance(ci, list) and len(ci) == 2 and all(_is_number(v) for v in ci)):
        missing = ", ".join(bad + [k for k in ("passed", "drift_ci95") if k not in data]) or "well-formed values"
        raise UserError(f"{path}: not a parity result (lacks {missing}); {fix}")
    return data


def read_search_result(path: Path | str) -> dict:
    """A precision search's result (its evaluated candidates), or a one-line UserError naming the file."""
    fix = "give the search stage's results (metrics/search/<tier>-<format>.json)"
    data = read_json(path, missing=f"{path}: search result not found; {fix}", fix=fix)
    rows = data.get("evaluated")
    if not isinstance(data.get("tier"), str) or not isinstance(rows, list) or not all(
            isinstance(r, dict) and _is_number(r.get("artifact_bytes")) and _is_number(r.get("vqa_accuracy"))
            for r in rows):
        raise UserError(f"{path}: not a search result (needs 'tier' and 'evaluated' candidates with artifact_bytes "
                        f"and vqa_accuracy); {fix}")
    return data


def read_budget(path: Path | str) -> dict:
    """A tier's budget, or a one-line UserError naming the file."""
    fix = "give the budget stage's results (metrics/budget/<tier>.json)"
    data = read_json(path, missing=f"{path}: budget not found; {fix}", fix=fix)
    if not isinstance(data.get("tier"), str) or not _is_number(data.get("memory_budget_mb")):
        raise UserError(f"{path}: not a tier budget (needs 'tier' and 'memory_budget_mb'); {fix}")
    return data


# ---- pictures -----------------------------------------------------------------------------------------------

def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def accuracy_size_png(parity: list[dict], search: list[dict]) -> bytes | None:
    """Accuracy against size, one panel per tier: each artifact as a star, each search candidate as a dot
    (passed) or a cross (failed), the reference's accuracy as a dashed line. None with nothing to plot."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    points: dict[str, dict[str, list]] = {}
    for result in parity:
        if _is_number(result.get("artifact_bytes")) and _is_number(result.get("vqa_accuracy")):
            points.setdefault(result["tier"], {"artifacts": [], "candidates": []})["artifacts"].append(result)
    for found in search:
        for row in found["evaluated"]:
            points.setdefault(found["tier"], {"artifacts": [], "candidates": []})["candidates"].append(
                (found.get("format"), row))
    if not points:
        return None
    reference = {r["tier"]: r["reference_accuracy"] for r in parity if _is_number(r.get("reference_accuracy"))}
    reference.update({s["tier"]: s["reference_accuracy"] for s in search if _is_number(s.get("reference_accuracy"))})
    tiers = sorted(points)
    cols = min(2, len(tiers))
    rows = math.ceil(len(tiers) / cols)
    figure = Figure(figsize=(5.4 * cols, 3.5 * rows), dpi=100, layout="constrained")
    for index, tier in enumerate(tiers):
        axes = figure.add_subplot(rows, cols, index + 1)
        for fmt, row in points[tier]["candidates"]:
            colour = FORMAT_COLOURS.get(fmt, "#777777")
            axes.scatter(row["artifact_bytes"] / 2**20, row["vqa_accuracy"], s=18, color=colour, alpha=0.55,
                         marker="o" if row.get("passed") else "x", linewidths=1)
        for result in sorted(points[tier]["artifacts"], key=lambda r: r["format"]):
            colour = FORMAT_COLOURS.get(result["format"], "#777777")
            x, y = result["artifact_bytes"] / 2**20, result["vqa_accuracy"]
            axes.scatter(x, y, s=170, marker="*", color=colour, edgecolors="black", linewidths=0.7, zorder=3,
                         label=f"{result['format']} ({'pass' if result.get('passed') else 'FAIL'})")
            axes.annotate(result["format"], (x, y), xytext=(6, 5), textcoords="offset points", fontsize=8)
        if tier in reference:
            axes.axhline(reference[tier], color="#555555", linestyle="--", linewidth=1, label="reference")
        axes.set_title(tier, fontsize=10)
        axes.set_xlabel("size, MiB", fontsize=9)
        axes.set_ylabel("VQA accuracy, %", fontsize=9)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
        if points[tier]["candidates"]:  # one proxy entry each for the search's passed and failed candidates
            axes.scatter([], [], s=18, marker="o", color="#777777", alpha=0.55, label="search: passed")
            axes.scatter([], [], s=18, marker="x", color="#777777", alpha=0.55, label="search: failed")
        axes.margins(x=0.08, y=0.2)  # stars and labels clear of the frame
        axes.legend(fontsize=7, loc="best")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})  # no version string: stable bytes
    return buffer.getvalue()


class Thumbnails:
    """~96 px PNG data URIs of the eval images, each made once; an image that cannot be shown says why."""

    def __init__(self, data_dir: Path | None):
        self.data_dir = data_dir
        self._made: dict[str, tuple[str, int, int] | str] = {}

    def get(self, name: str) -> tuple[str, int, int] | str:
        """(data URI, width, height), or the reason there is no picture."""
        if name not in self._made:
            self._made[name] = self._make(name)
        return self._made[name]

    def _make(self, name: str) -> tuple[str, int, int] | str:
        from vlm_factory.data.images import load_image
        from vlm_factory.paths import contained

        if self.data_dir is None:
            return "no data directory given"
        try:  # names come from a results file: they stay inside the data directory
            image = load_image(contained(self.data_dir, name, what="parity result", key="flips", fix="re-run parity"))
        except UserError as error:
            return str(error)
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        return _data_uri(buffer.getvalue(), "image/png"), image.width, image.height


# ---- sections -----------------------------------------------------------------------------------------------

def _gate_cell(result: dict) -> str:
    if result.get("passed"):
        verdict = '<span class="pass">pass</span>'
    else:
        verdict = '<span class="fail">FAIL</span>'
    details = [result[k] for k in ("failure_reason", "known_issue") if result.get(k)]
    if result.get("accuracy_informative") is False:
        details.append("accuracy uninformative (reference near the blind baseline): agreement decides")
    extra = "".join(f'<div class="reason">{_esc(d)}</div>' for d in details)
    return f'<td class="text gate">{verdict}{extra}</td>'


PARITY_HEADERS = ("tier", "precision", "size", "accuracy", "drift, points (95 % CI)", "flips", "answers agree",
                  "first token top-1", "first token KL", "embedding cosine", "gate")


def _parity_row(result: dict, budgets: dict[str, dict]) -> str:
    tier = result.get("tier", "")
    if "refused" in result:
        return _row([_esc(tier), f'<td class="text" colspan="{len(PARITY_HEADERS) - 1}">refused by the model '
                                 f'family: {_esc(result["refused"])}</td>'], data_tier=tier)
    ci = result.get("drift_ci95")
    ci = ci if isinstance(ci, list) and len(ci) == 2 else [None, None]
    agreement = _dict(result.get("agreement"))
    count = _flip_count(result)
    flips = _percent(result.get("flip_rate"), 2) + (f" ({count})" if count is not None else "")
    precision = precisions_label(_target_precisions(result, budgets))
    return _row([
        _esc(tier), f'<td class="text precision">{_esc(precision)}</td>',
        _mib(result.get("artifact_bytes")), _num(result.get("vqa_accuracy"), ".2f", " %"),
        f"{_num(result.get('drift'), '+.2f')} ({_num(ci[0], '+.2f')}, {_num(ci[1], '+.2f')})", _esc(flips),
        _percent(agreement.get("answers")), _percent(agreement.get("first_token_top1")),
        _num(agreement.get("first_token_kl"), ".4f"),
        _num(_at(result, "image_embedding_cosine", "mean"), ".4f"),
        _gate_cell(result)], data_tier=tier, data_format=result.get("format", ""))


def parity_section(parity: list[dict], budgets: dict[str, dict]) -> str:
    parts = ['<section id="parity"><h2>Parity</h2><p class="lead">Each artifact run in its own runtime on the '
             "reference's eval questions. Drift: artifact minus reference accuracy, points, with its paired 95 % "
             "confidence interval; flips: questions right in one and wrong in the other.</p>"]
    for fmt in sorted({r["format"] for r in parity}):
        rows = [_parity_row(r, budgets) for r in sorted(parity, key=lambda r: r["tier"]) if r["format"] == fmt]
        parts.append(f"<h3>{_esc(fmt)}</h3>" + _table(PARITY_HEADERS, rows, (0, 1, 10), class_="parity",
                                                               data_format=fmt))
    return "".join(parts) + "</section>"


def figure_section(parity: list[dict], search: list[dict]) -> str:
    png = accuracy_size_png(parity, search)
    if png is None:
        return ('<section id="accuracy-size"><h2>Accuracy against size</h2><p class="note">No sizes recorded in '
                "these results.</p></section>")
    what = "every artifact (stars)" + (" and every candidate the precision search evaluated (dots: passed its "
                                       "gate, crosses: failed)" if search else "")
    return (f'<section id="accuracy-size"><h2>Accuracy against size</h2><p class="lead">Per tier: {what}; the '
            f'dashed line is the reference model.</p><img class="figure" src="{_data_uri(png, "image/png")}" '
            'alt="VQA accuracy against artifact size, per tier"></section>')


ATTRIBUTION_HEADERS = ("variant", "precisions", "size", "accuracy", "drift", "flip rate", "answers agree",
                       "first-token KL", "embedding cosine")


def _attribution_block(result: dict) -> str:
    attribution = result["attribution"]
    title = f"<h3>{_esc(_name(result))}</h3>"
    if "rows" not in attribution:
        return title + f'<p class="note">Not measured: {_esc(attribution.get("skipped", "no rows"))}</p>'
    rows = _dict(attribution["rows"])
    order = (["floor"] + [c for c in COMPONENT_ORDER if c in rows] + ["target"])
    order = [n for n in order if n in rows] + sorted(n for n in rows if n not in order)
    body = [_row([_esc(name), f'<td class="text">{_esc(precisions_label(row.get("precisions")))}</td>',
                  _mib(row.get("artifact_bytes")), _num(row.get("vqa_accuracy"), ".2f", " %"),
                  _num(row.get("drift"), "+.2f"), _percent(row.get("flip_rate"), 2),
                  _percent(row.get("answer_agreement")), _num(row.get("first_token_kl"), ".4f"),
                  _num(row.get("embedding_cosine"), ".4f")], data_variant=name)
            for name, row in ((n, rows[n]) for n in order) if isinstance(row, dict)]
    summary = f'<p class="lead">Drift by component: {_esc(attribution.get("summary", MISSING))}.</p>'
    return title + summary + _table(ATTRIBUTION_HEADERS, body, (0, 1), class_="attribution",
                                                     data_target=_name(result))


def attribution_section(parity: list[dict]) -> str:
    blocks = [_attribution_block(r) for r in sorted(parity, key=_name) if isinstance(r.get("attribution"), dict)]
    intro = ('<p class="lead">Where each artifact\'s drift comes from: the floor has every component at the '
             "format's full precision; each other variant reduces one component alone to the target's "
             "precision.</p>")
    return ('<section id="attribution"><h2>Drift by component</h2>'
            + (intro + "".join(blocks) if blocks else '<p class="note">No attribution in these results.</p>')
            + "</section>")


BUDGET_HEADERS = ("format", "settings", "weights in memory", "KV cache at context", "total", "artifact, measured",
                  "fits")


def _budget_block(budget: dict, parity: list[dict]) -> str:
    tier = budget["tier"]
    facts = [f"memory budget {_num(budget.get('memory_budget_mb'), ',')} MB"]
    if _is_number(budget.get("effective_context_tokens")):
        facts.append(f"context {budget['effective_context_tokens']:,} tokens"
                     + (f" (tier: {budget['context_tokens']:,})" if _is_number(budget.get("context_tokens")) else ""))
    if _is_number(budget.get("visual_tokens_per_image")):
        facts.append(f"{budget['visual_tokens_per_image']} visual tokens per image")
    if budget.get("kv_cache_dtype"):
        facts.append(f"KV cache {budget['kv_cache_dtype']}")
    description = f"{budget['description']}: " if budget.get("description") else ""
    measured = {r["format"]: _dict(r.get("budget")) for r in parity if r.get("tier") == tier}
    rows = []
    for fmt, entry in sorted(_dict(budget.get("formats")).items()):
        entry, real = _dict(entry), _dict(measured.get(fmt))
        fits = entry.get("fits")
        rows.append(_row([
            _esc(fmt), f'<td class="text">{_esc(precisions_label(entry.get("settings")))}</td>',
            _mib(entry.get("weights_bytes_in_memory")), _mib(entry.get("kv_cache_bytes_at_context")),
            _mib(entry.get("total_bytes")), _mib(real.get("total_bytes")),
            MISSING if fits is None else ('<span class="pass">yes</span>' if fits else '<span class="fail">no</span>')],
            data_format=fmt))
    table = _table(BUDGET_HEADERS, rows, (0, 1), class_="budget", data_tier=tier) if rows else ""
    return f'<h3>{_esc(tier)}</h3><p class="lead">{_esc(description + "; ".join(facts))}.</p>{table}'


def budget_section(budgets: dict[str, dict], parity: list[dict]) -> str:
    if not budgets:
        return ""
    return ('<section id="budget"><h2>Budgets</h2>'
            + "".join(_budget_block(budgets[t], parity) for t in sorted(budgets)) + "</section>")


def _flip_card(flip: dict, thumbnails: Thumbnails) -> str:
    picture = thumbnails.get(str(flip.get("image", "")))
    if isinstance(picture, tuple):
        uri, width, height = picture
        image = f'<img src="{uri}" width="{width}" height="{height}" alt="{_esc(flip.get("image", ""))}">'
    else:
        image = f'<div class="no-image" title="{_esc(picture)}">image not shown</div>'
    lost = _is_number(flip.get("reference_score")) and _is_number(flip.get("artifact_score")) and \
        flip["reference_score"] > flip["artifact_score"]
    kind = "lost" if lost else "gained"
    meta = " \u00b7 ".join(_esc(v) for v in (f"#{flip.get('question_id', '?')}", flip.get("question_type"),
                                             flip.get("aspect"), kind) if v)
    return (f'<figure class="flip {kind}" data-question-id="{_esc(flip.get("question_id", ""))}">{image}<figcaption>'
            f'<p class="question">{_esc(flip.get("question", ""))}</p><p class="meta">{meta}</p><dl>'
            f'<dt>reference</dt><dd class="reference-answer">{_esc(flip.get("reference_answer", ""))} '
            f'({_num(flip.get("reference_score"), ".2f")})</dd>'
            f'<dt>artifact</dt><dd class="artifact-answer">{_esc(flip.get("artifact_answer", ""))} '
            f'({_num(flip.get("artifact_score"), ".2f")})</dd></dl></figcaption></figure>')


def _flips_block(result: dict, thumbnails: Thumbnails) -> str:
    name = _name(result)
    flips = result.get("flips")
    if not isinstance(flips, list):
        return (f'<h3>{_esc(name)}</h3><p class="note">Not recorded: this parity result was made before parity '
                "results listed their flipped questions; run its parity stage again.</p>")
    total = result.get("flips_total", len(flips))
    shown = f"{total} flipped" + (f", the first {len(flips)} shown" if _is_number(total) and total > len(flips) else "")
    if not flips:
        return f'<h3>{_esc(name)}: no question flipped</h3>'
    cards = "".join(_flip_card(f, thumbnails) for f in flips if isinstance(f, dict))
    return (f'<h3>{_esc(name)}: {_esc(shown)}</h3>'
            f'<div class="flips" data-target="{_esc(name)}">{cards}</div>')


def flips_section(parity: list[dict], thumbnails: Thumbnails) -> str:
    blocks = [_flips_block(r, thumbnails) for r in sorted(parity, key=_name) if "refused" not in r]
    return ('<section id="flips"><h2>Flipped questions</h2><p class="lead">Questions the artifact answers right '
            "where the reference answers wrong (gained, green) or the other way round (lost, red), with both "
            "answers and their VQA scores; lost ones first.</p>" + "".join(blocks) + "</section>")


# ---- the page -----------------------------------------------------------------------------------------------

def _summary(parity: list[dict]) -> str:
    gated = [r for r in parity if "refused" not in r]
    passed = sum(1 for r in gated if r.get("passed"))
    tiers = sorted({r["tier"] for r in parity})
    lines = [f"{len(gated)} artifact(s) for {', '.join(tiers)}: {passed} passed the parity gate"
             + (f", {len(gated) - passed} failed" if passed < len(gated) else "")
             + (f"; {len(parity) - len(gated)} refused by the model family" if len(gated) < len(parity) else "") + "."]
    references = sorted({r["reference_accuracy"] for r in gated if _is_number(r.get("reference_accuracy"))})
    if len(references) == 1:
        first = next(r for r in gated if _is_number(r.get("reference_accuracy")))
        questions = f" on {first['n_questions']:,} questions" if _is_number(first.get("n_questions")) else ""
        lines.append(f"Reference model: {first['reference_accuracy']:.2f} % VQA accuracy "
                     f"({first.get('vqa_metric', 'official')} metric){questions}.")
    elif references:  # results of different runs: each drift is against its own reference
        lines.append("The results were measured against different references: "
                     + ", ".join(f"{a:.2f} %" for a in references) + ".")
    return " ".join(lines)


def render_report(parity: list[dict], *, search: Iterable[dict] = (), budgets: Iterable[dict] = (),
                  data_dir: Path | None = None, title: str | None = None) -> str:
    """The whole page. `parity`: one result per (tier, format); `search`, `budgets`: optional results of the
    search and budget stages; `data_dir`: the eval data the flipped questions' images are named in."""
    if not parity:
        raise UserError("no parity results to report; give metrics/parity/<tier>-<format>.json files")
    search = list(search)
    by_tier = {b["tier"]: b for b in budgets if isinstance(b.get("tier"), str)}
    title = title or "Parity report: " + ", ".join(sorted({r["tier"] for r in parity}))
    body = "".join([
        f"<h1>{_esc(title)}</h1><p class=\"lead\">{_esc(_summary(parity))}</p>",
        parity_section(parity, by_tier),
        figure_section(parity, search),
        attribution_section(parity),
        budget_section(by_tier, parity),
        flips_section(parity, Thumbnails(Path(data_dir) if data_dir is not None else None)),
    ])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_esc(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")
