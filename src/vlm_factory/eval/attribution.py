"""Which component a target's drift comes from: the vision encoder, the projector or the LLM.

For a target, variants of its artifact are built with only one component at the target's precision and
the others at the format's full precision (export/components.py), plus the variant with everything full
(the format's own conversion floor), each exported by the format's exporter and measured in the format's
own runtime against the same reference as the target: accuracy drift, flips, agreement with the
reference's answers and first tokens, image-embedding cosine. A component the target keeps at full
precision needs no variant: its share is the floor's. The summary reads like "vision -1.9, projector
+0.0, llm -0.3": the drift each component alone causes. Drifts of one component alone need not add up
to the target's (errors can compound or cancel); the table shows both.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from vlm_factory.artifacts import artifact_bytes
from vlm_factory.eval.artifact_parity import ReferenceSide, Runtime, headline, measure
from vlm_factory.export.components import FULL_PRECISION, component_precisions, full_precision, only
from vlm_factory.families import COMPONENTS

log = logging.getLogger(__name__)

FLOOR = "floor"  # the variant with every component at the format's full precision


def summary(rows: dict[str, dict], reduced: list[str]) -> str:
    """'vision -1.90, projector +0.00, llm -0.30 (floor -0.10)': each reduced component's drift alone."""
    floor = f"floor {rows[FLOOR]['drift']:+.2f}"
    if not reduced:
        return f"no component reduced ({floor})"
    return ", ".join(f"{c} {rows[c]['drift']:+.2f}" for c in reduced) + f" ({floor})"


def attribute(fmt: str, tier: str, settings: dict, reference: ReferenceSide, *,
              export: Callable[[dict, Path], object], open_runtime: Callable[[Path], AbstractContextManager[Runtime]],
              max_new_tokens: int, vqa_metric: str, target: dict | None = None) -> dict:
    """The attribution table of one target.

    `export(settings, out_dir)` builds a variant as the export stage would; `open_runtime(dir)` opens it as
    the parity stage opens the target. `target` (the target's own parity result) adds its row."""
    started = time.perf_counter()
    precisions = component_precisions(fmt, settings, tier)
    full = FULL_PRECISION[fmt]
    reduced = [c for c in COMPONENTS if precisions[c] != full]
    plan = {FLOOR: full_precision(fmt, settings, tier), **{c: only(fmt, settings, tier, c) for c in reduced}}
    rows = {}
    with tempfile.TemporaryDirectory(prefix=f"attribution-{tier}-{fmt}-") as scratch:
        for name, variant in plan.items():
            out = Path(scratch) / name
            export(variant, out)
            with open_runtime(out) as runtime:
                measured = measure(runtime, reference, f"{tier}-{fmt} {name} only" if name != FLOOR else
                                   f"{tier}-{fmt} {FLOOR}", max_new_tokens=max_new_tokens, vqa_metric=vqa_metric)
            rows[name] = headline(measured, component_precisions(fmt, variant, tier), artifact_bytes(out))
    if target is not None:
        rows["target"] = headline(target, precisions, target["artifact_bytes"])
    text = summary(rows, reduced)
    log.info("%s-%s attribution: %s in %.1fs", tier, fmt, text, time.perf_counter() - started)
    return {"method": f"one component at the target's precision, the others at {fmt} full precision ({full}), "
                      "each variant exported and run in the format's own runtime",
            "full_precision": full, "reduced": reduced,
            "at_full_precision": [c for c in COMPONENTS if c not in reduced],
            "rows": rows, "summary": text}
