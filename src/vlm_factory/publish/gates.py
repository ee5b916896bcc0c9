"""Publishing reads the parity verdicts: every target of every tier must have one, and it must say pass."""

from __future__ import annotations

import json
from pathlib import Path

from vlm_factory.errors import GateFailed
from vlm_factory.eval.gates import gate_table


def parity_verdicts(targets: dict[str, dict], parity_dir: Path) -> dict[str, dict | None]:
    """`<tier>-<format>` -> its parity result (None when missing or unreadable), for every target."""
    verdicts: dict[str, dict | None] = {}
    for fmt, by_tier in targets.items():
        for tier in by_tier:
            path = parity_dir / f"{tier}-{fmt}.json"
            try:
                result = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                result = None
            if result is not None and (result.get("format"), result.get("tier")) != (fmt, tier):
                result = None
            verdicts[f"{tier}-{fmt}"] = result
    return verdicts


def require_all_passed(verdicts: dict[str, dict | None]) -> None:
    """Raise GateFailed (exit 1) with a table when any verdict is missing or failed."""
    missing = sorted(name for name, v in verdicts.items() if v is None)
    present = {name: v for name, v in verdicts.items() if v is not None}
    failed = sorted(name for name, v in present.items() if not v.get("passed"))
    if not missing and not failed:
        return
    lines = [gate_table(present)] if present else []
    lines += [f"{name}  MISSING  (no parity verdict: run its parity stage)" for name in missing]
    raise GateFailed("publishing refused: " + ", ".join(failed + missing) + "\n" + "\n".join(lines))
