"""`vlm-factory`: the human side of the factory (the pipeline itself runs through `dvc repro`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm_factory.errors import UserError, exits_cleanly
from vlm_factory.logs import setup_logging


def _compose(args: argparse.Namespace) -> None:
    from vlm_factory.config import compose_to_yaml

    # Refuses resolvers (${oc.env:...}: params.yaml is committed) and validates as load_params does,
    # before anything is written: a refused composition leaves the output as it was.
    text = compose_to_yaml(args.overrides, args.config_dir, output=args.output)
    if args.check:
        current = Path(args.output).read_text(encoding="utf-8") if Path(args.output).is_file() else ""
        if current != text:
            raise UserError(f"{args.output}: differs from the composition of {args.config_dir}/; "
                            "run `vlm-factory compose` and commit the result")
        print(f"{args.output} matches {args.config_dir}/")
        return
    from vlm_factory.io import atomic_path

    with atomic_path(args.output) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")


def _budget(args: argparse.Namespace) -> None:
    from vlm_factory.budget import format_budget_table, tier_budget
    from vlm_factory.config import load_params
    from vlm_factory.families import family_of

    tiers = load_params(args.params).tiers
    names = list(tiers) if args.tier == "all" else [args.tier]
    for name in names:
        if name not in tiers:
            raise UserError(f"{args.params}: no tier '{name}' under 'tiers'; known: {', '.join(tiers)}")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no config.json; pass --model DIR or run `dvc repro download`")
    family = family_of(model_dir)
    processor = family.load_processor(model_dir)
    for name in names:
        print(format_budget_table(tier_budget(family, name, tiers[name], processor)))
        print()


MATRIX_START, MATRIX_END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"


def _families(args: argparse.Namespace) -> None:
    from vlm_factory.families.registry import support_matrix_markdown
    from vlm_factory.io import atomic_path

    matrix = support_matrix_markdown()
    if args.update is None:
        print(matrix, end="")
        return
    readme = Path(args.update)
    text = readme.read_text(encoding="utf-8")
    if MATRIX_START not in text or MATRIX_END not in text:
        raise UserError(f"{readme}: no {MATRIX_START} ... {MATRIX_END} section to update")
    head, rest = text.split(MATRIX_START, 1)
    tail = rest.split(MATRIX_END, 1)[1]
    with atomic_path(readme) as tmp:
        tmp.write_text(f"{head}{MATRIX_START}\n{matrix}{MATRIX_END}{tail}", encoding="utf-8")
    print(f"updated the support matrix in {readme}")


def _family_table(args: argparse.Namespace) -> None:
    from vlm_factory.config import load_params
    from vlm_factory.eval.family_table import family_markdown, family_table
    from vlm_factory.io import write_json

    name = args.name or load_params(args.params).model.name
    table = family_table(name, Path(args.model), Path(args.metrics))
    if args.out:
        write_json(table, Path(args.out))
        print(f"wrote {args.out}")
    print(family_markdown(table), end="")


def _search(args: argparse.Namespace) -> None:
    from vlm_factory.config import load_params
    from vlm_factory.eval.search import run, table
    from vlm_factory.io import write_json

    result = run(load_params(args.params), args.tier, args.format, model_dir=Path(args.model),
                 data_dir=Path(args.data), reference_predictions=Path(args.reference),
                 reference_metrics=Path(args.reference_metrics), mode=args.evaluate)
    if args.out:
        write_json(result, Path(args.out))
    print(table(result))


def _ask(args: argparse.Namespace) -> None:
    if args.artifact is None:
        if args.format:
            raise UserError("--format chooses among an artifact's formats: pass --artifact as well")
        from vlm_factory.data.images import load_image
        from vlm_factory.eval.generate import answer_questions
        from vlm_factory.model.checkpoint import load_checkpoint

        model, processor = load_checkpoint(args.model)
        image = load_image(Path(args.image))
        print(answer_questions(model, processor, [image], [args.question])[0])
        return
    from vlm_factory.ask import ask, locate
    from vlm_factory.publish.signing import read_public_key

    public_key = read_public_key(Path(args.public_key)) if args.public_key else None
    located = locate(args.artifact, args.format, public_key=public_key,
                     cache=Path(args.cache) if args.cache else None, endpoint_url=args.endpoint_url,
                     region=args.region)
    print(ask(located, Path(args.image), args.question))


def _verify(args: argparse.Namespace) -> None:
    from vlm_factory.publish.release import check_release
    from vlm_factory.publish.run import split_release_uri
    from vlm_factory.publish.signing import read_public_key
    from vlm_factory.publish.store import open_store

    public_key = read_public_key(Path(args.public_key)) if args.public_key else None
    store_uri, prefix = split_release_uri(args.release)
    problems = check_release(open_store(store_uri, args.endpoint_url, args.region), prefix, public_key)
    if problems:
        print(f"{args.release}: FAILED", *(f"  {p}" for p in problems), sep="\n", file=sys.stderr)
        raise SystemExit(1)
    signature = (f"its signature verifies with {args.public_key}" if public_key else
                 "signature not checked (pass --public-key to check it)")
    print(f"{args.release}: every file matches manifest.json; {signature}")


def _gc(args: argparse.Namespace) -> None:
    from datetime import timedelta

    from vlm_factory.publish.gc import collect_garbage, format_report
    from vlm_factory.publish.store import open_store

    if args.grace_hours < 0:
        raise UserError(f"--grace-hours {args.grace_hours}: must not be negative")
    store = open_store(args.store, args.endpoint_url, args.region)
    report = collect_garbage(store, grace=timedelta(hours=args.grace_hours), delete=args.delete)
    print(format_report(report, store.uri))


def _report(args: argparse.Namespace) -> None:
    from vlm_factory.io import atomic_path
    from vlm_factory.publish.report_html import read_budget, read_parity_result, read_search_result, render_report

    if args.data is not None and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: not a directory; give the eval data (e.g. artifacts/data)")
    page = render_report([read_parity_result(p) for p in args.parity],
                         search=[read_search_result(p) for p in args.search],
                         budgets=[read_budget(p) for p in args.budget], data_dir=args.data, title=args.title)
    with atomic_path(args.out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-factory", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    compose = sub.add_parser("compose", help="compose conf/ into params.yaml (what DVC does before `exp run`)")
    compose.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.lr=0.001")
    compose.add_argument("--config-dir", default="conf")
    compose.add_argument("--output", default="params.yaml")
    compose.add_argument("--check", action="store_true", help="fail if the output differs instead of writing")
    compose.set_defaults(func=_compose)

    budget = sub.add_parser("budget", help="memory / visual-token / KV-cache budget of a device tier")
    budget.add_argument("--tier", default="all", help="a tier name from params.yaml, or 'all'")
    budget.add_argument("--model", default="artifacts/finetuned", help="model directory (config.json)")
    budget.add_argument("--params", default="params.yaml")
    budget.set_defaults(func=_budget)

    families = sub.add_parser("families", help="the model families and which formats each can be exported to")
    families.add_argument("--update", metavar="README", default=None,
                          help="rewrite the support-matrix section of this markdown file instead of printing")
    families.set_defaults(func=_families)

    table = sub.add_parser("family-table", help="the last run's reference and parity results as one table "
                                                "(metrics/families/<model>.json)")
    table.add_argument("--out", default=None, help="write the JSON here (e.g. metrics/families/tiny_qwen2.json)")
    table.add_argument("--name", default=None, help="model name to record (default: model.name in params)")
    table.add_argument("--model", default="artifacts/finetuned")
    table.add_argument("--metrics", default="metrics")
    table.add_argument("--params", default="params.yaml")
    table.set_defaults(func=_family_table)

    search = sub.add_parser("search", help="the smallest artifact of a (tier, format) that passes its gate, from "
                                           "search.grid (needs the reference_eval stage's outputs)")
    search.add_argument("--tier", required=True)
    search.add_argument("--format", required=True, choices=["gguf", "onnx", "coreml", "tflite"])
    search.add_argument("--evaluate", choices=["until_pass", "all"], default=None,
                        help="stop at the first passing candidate (default: search.evaluate) or evaluate all")
    search.add_argument("--out", default=None, help="also write the result as JSON here")
    search.add_argument("--params", default="params.yaml")
    search.add_argument("--model", default="artifacts/finetuned")
    search.add_argument("--data", default="artifacts/data")
    search.add_argument("--reference", default="artifacts/reference/predictions.jsonl")
    search.add_argument("--reference-metrics", default="metrics/reference.json")
    search.set_defaults(func=_search)

    ask = sub.add_parser("ask", help="ask a question about an image: the PyTorch model (HF directory), or with "
                                     "--artifact an exported file in its own runtime")
    ask.add_argument("image")
    ask.add_argument("question")
    ask.add_argument("--model", default="artifacts/finetuned", help="the HF model directory (without --artifact)")
    ask.add_argument("--artifact", default=None,
                     help="an export directory, a release folder, or a release URI "
                          "(file://artifacts/releases/<tier>/<version> or s3://bucket/prefix/<tier>/latest)")
    ask.add_argument("--format", default=None, choices=["gguf", "onnx", "coreml", "tflite"],
                     help="which of a release's formats to run (needed when it has several)")
    ask.add_argument("--public-key", default=None,
                     help="the publisher's public key (PEM): a release URI's signature must verify with it")
    ask.add_argument("--cache", default=None, help="where fetched releases go (default ~/.cache/vlm-factory)")
    ask.add_argument("--endpoint-url", default=None, help="S3 API endpoint (credentials: the AWS chain)")
    ask.add_argument("--region", default=None)
    ask.set_defaults(func=_ask)

    verify = sub.add_parser("verify", help="re-hash a published release against its manifest and check the manifest's "
                                           "signature (exit 1 if either fails)")
    verify.add_argument("release", help="<store uri>/<tier>/<version>, e.g. file://artifacts/releases/jetson_orin/c1a2...")
    verify.add_argument("--public-key", default=None,
                        help="the publisher's public key (PEM): the manifest's signature must verify with it")
    verify.add_argument("--endpoint-url", default=None, help="S3 API endpoint (credentials: the AWS chain)")
    verify.add_argument("--region", default=None)
    verify.set_defaults(func=_verify)

    gc = sub.add_parser("gc", help="list upload prefixes no release manifest references (killed or losing "
                                   "publishes); --delete removes them")
    gc.add_argument("store", help="the store publish.uri names, e.g. s3://my-bucket/vlm-factory or "
                                  "file://artifacts/releases")
    gc.add_argument("--delete", action="store_true", help="delete the orphans (default: a dry run that lists them)")
    gc.add_argument("--grace-hours", type=float, default=1.0,
                    help="leave uploads written to within this many hours alone: they may still be in flight")
    gc.add_argument("--endpoint-url", default=None, help="S3 API endpoint (credentials: the AWS chain)")
    gc.add_argument("--region", default=None)
    gc.set_defaults(func=_gc)

    report = sub.add_parser("report", help="one self-contained HTML page of parity results: tables, accuracy "
                                           "against size, drift by component, budgets, flipped questions")
    report.add_argument("parity", nargs="+", metavar="PARITY_JSON", help="parity results, e.g. metrics/parity/*.json")
    report.add_argument("--search", nargs="*", default=[], metavar="JSON",
                        help="search results to plot as candidates (metrics/search/*.json)")
    report.add_argument("--budget", nargs="*", default=[], metavar="JSON", help="tier budgets (metrics/budget/*.json)")
    report.add_argument("--data", type=Path, default=None,
                        help="eval data the flipped questions' images are named in (e.g. artifacts/data)")
    report.add_argument("--title", default=None)
    report.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    report.set_defaults(func=_report)
    return parser


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging("WARNING" if args.command != "compose" else None)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
