"""The release's model card (README.md): what is in it, how well it answers, how to run it, where it came from."""

from __future__ import annotations

RUN = {
    "gguf": "llama.cpp: `llama-mtmd-cli -m gguf/{llm} --mmproj gguf/{mmproj} --image photo.png -p "
            "\"<question>\"` (greedy, the prompt template below; the mmproj carries the preprocessing).",
    "onnx": "ONNX Runtime: `python onnx/answer.py photo.png \"<question>\"` (onnxruntime, numpy, tokenizers, "
            "Pillow); `onnx/onnx_config.json` names the vision, embedding and decoder graphs, their inputs and "
            "outputs, the preprocessing and the prompt (the README's ONNX package contract); `.ort` files, "
            "when present, are for ONNX Runtime Mobile.",
}


def _files_line(manifest: dict, fmt: str) -> str:
    files = {name: entry for name, entry in manifest["files"].items() if name.startswith(fmt + "/")}
    size = sum(entry["size"] for entry in files.values())
    return f"{len(files)} files, {size / 2**20:.1f} MiB"


def _run_hint(fmt: str, manifest: dict) -> str:
    names = [name.split("/", 1)[1] for name in manifest["files"] if name.startswith(fmt + "/")]
    llm = next((n for n in names if n.startswith("llm-")), "llm.gguf")
    mmproj = next((n for n in names if n.startswith("mmproj-")), "mmproj.gguf")
    return RUN.get(fmt, "see the format's export_report.json").format(llm=llm, mmproj=mmproj)


def model_card(manifest: dict, description: str, prompt_template: str) -> str:
    tier, parity, budget = manifest["tier"], manifest["parity"], manifest["budget"]
    lines = [
        f"# {manifest['model']['name']} for {tier} ({manifest['version']})",
        "",
        f"On-device builds of `{manifest['model']['name']}` for {description}. Every file here passed the "
        "parity gate: run in its own runtime on the reference's VQA questions, it answers no worse than the "
        "PyTorch model it came from, by more than the threshold below.",
        "",
        "## Parity (VQA accuracy, greedy)",
        "",
        "| format | accuracy | reference | drift, points (95 % CI) | flip rate | max drop | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for fmt, p in sorted(parity.items()):
        low, high = p["drift_ci95"]
        lines.append(f"| {fmt} | {p['vqa_accuracy']:.2f} % | {p['reference_accuracy']:.2f} % | "
                     f"{p['drift']:+.2f} ({low:+.2f}, {high:+.2f}) | {100 * p['flip_rate']:.1f} % | "
                     f"{p['threshold']['max_drop']} | {'pass' if p['passed'] else 'FAIL'} |")
    lines += ["", "## Files and how to run them", ""]
    for fmt in sorted(parity):
        lines.append(f"- **{fmt}** ({_files_line(manifest, fmt)}): {_run_hint(fmt, manifest)}")
    lines += [
        "",
        f"Prompt template (the model's own chat template): `{prompt_template!r}`, followed by the answer; "
        "each format's config carries it and the image preprocessing its runtime must apply.",
        "",
        "## Memory budget",
        "",
        f"{budget['memory_budget_mb']} MB on the device, context {budget['effective_context_tokens']} tokens "
        f"(KV cache {budget['kv_cache_dtype']}), {budget['visual_tokens_per_image']} visual tokens per image; "
        "details in `budget.json`.",
        "",
        "## Provenance",
        "",
        f"- model sha256 `{manifest['model']['sha256']}`, data sha256 `{manifest['data']['sha256']}`, "
        f"params sha256 `{manifest['params']['sha256']}`",
        f"- git commit `{manifest['git_commit']}`, built {manifest['created']}",
        "- every file's sha256 and size: the release's `manifest.json`, one folder up (`../manifest.json`); "
        "check them with `vlm-factory verify <release-uri>`",
        "",
    ]
    return "\n".join(lines)
