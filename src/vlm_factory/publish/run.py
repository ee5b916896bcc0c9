"""The publish stage's work: check every gate, then release each tier's bundle to the store."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlm_factory.config import Params
from vlm_factory.export.targets import BUILT_FORMATS
from vlm_factory.families import family_of
from vlm_factory.publish.bundle import CARD, REPORT, Bundle, build_manifest, collect, content_version
from vlm_factory.publish.card import model_card
from vlm_factory.publish.gates import parity_verdicts, require_all_passed
from vlm_factory.publish.release import publish_bundle, release_prefix
from vlm_factory.publish.report_html import render_report
from vlm_factory.publish.signing import resolve_key
from vlm_factory.publish.store import Store, open_store

log = logging.getLogger(__name__)


def store_from_params(params: Params) -> Store:
    cfg = params.publish
    return open_store(cfg.uri, cfg.endpoint_url, cfg.region, cfg.multipart_threshold_mb)


def release_report(bundle: Bundle, data_dir: Path, title: str) -> bytes:
    """report.html of a release: its formats' parity results and its budget, thumbnails from `data_dir`."""
    def read(name: str) -> dict:
        return json.loads(bundle.files[name].read_text(encoding="utf-8"))

    parity = [read(name) for name in sorted(bundle.files) if name.startswith("parity/")]
    budget = {"tier": bundle.tier, **read("budget.json")}
    return render_report(parity, budgets=[budget], data_dir=data_dir, title=title).encode()


def publish_tiers(params: Params, *, export_root: Path, parity_dir: Path, budget_dir: Path, model_dir: Path,
                  data_dir: Path, params_path: Path, repo: Path, store: Store | None = None) -> dict:
    """Refuse (GateFailed) unless every built target passed; then publish one release per tier. Returns a record."""
    family = family_of(model_dir)
    refusals = {fmt: family.format_refusal(fmt) for fmt in params.targets if fmt in BUILT_FORMATS}
    built = {fmt: by_tier for fmt, by_tier in params.targets.items() if fmt in BUILT_FORMATS and not refusals[fmt]}
    not_built = sorted(f"{tier}-{fmt}" for fmt, by_tier in params.targets.items() if fmt not in BUILT_FORMATS
                       for tier in by_tier)
    refused = {f"{tier}-{fmt}": reason for fmt, reason in refusals.items() if reason
               for tier in params.targets[fmt]}
    if not_built:
        log.warning("not built yet, so not published: %s (no exporter for these formats)", ", ".join(not_built))
    if refused:
        log.warning("refused by model family %s, so not published: %s", family.name, ", ".join(sorted(refused)))
    require_all_passed(parity_verdicts(built, parity_dir))
    store = store or store_from_params(params)
    signing = params.publish.signing
    signing_key = resolve_key(key=signing.key, key_env=signing.key_env, password_env=signing.password_env,
                              generate=signing.generate, required=signing.required)
    prompt_template = family.prompt(family.load_processor(model_dir)).template
    record = {"not_built": not_built, "refused": dict(sorted(refused.items())), "releases": {}}
    for tier, tier_cfg in params.tiers.items():
        formats = sorted(fmt for fmt, by_tier in built.items() if tier in by_tier)
        if not formats:
            continue
        bundle = collect(tier, formats, export_root, parity_dir, budget_dir / f"{tier}.json")
        entries = bundle.entries()
        version = params.publish.version or content_version(entries)
        manifest = build_manifest(bundle, version=version, entries=entries, model_name=params.model.name,
                                  model_dir=model_dir,
                                  data_dir=data_dir, params_path=params_path, repo=repo)
        bundle.generated[CARD] = model_card(manifest, tier_cfg.description, prompt_template).encode()
        bundle.generated[REPORT] = release_report(bundle, data_dir, f"{params.model.name} for {tier} ({version})")
        manifest["files"] = bundle.entries()
        outcome = publish_bundle(store, bundle, manifest, signing_key)
        prefix = release_prefix(tier, version)
        record["releases"][tier] = {"uri": f"{store.uri}/{prefix}", "version": version, "formats": formats,
                        "files": len(manifest["files"]) + 1, "verified": True, "signed": signing_key is not None,
                        "bytes": sum(e["size"] for e in manifest["files"].values())}
        log.info("%s: %s %s", tier, outcome, record["releases"][tier]["uri"])  # outcome: logged, not recorded
    return record


def split_release_uri(uri: str) -> tuple[str, str]:
    """`<store uri>/<tier>/<version>` -> (store uri, "<tier>/<version>")."""
    head, tier, version = uri.rstrip("/").rsplit("/", 2)
    return head, f"{tier}/{version}"

