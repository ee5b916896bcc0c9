"""Stages derive_qwen2_base and derive_smolvlm_base (frozen): the bundled base moved into another family.

The transplant itself takes seconds (src/vlm_factory/model/transplant.py); a family whose connector and
image-token layout are new is then aligned, connector and LLM together (src/vlm_factory/train/align.py),
minutes on a CPU. Regenerate on purpose with `dvc unfreeze derive_<name>_base && dvc repro derive_<name>_base`.
"""

import argparse
from pathlib import Path

from vlm_factory.data.synthetic import iter_split
from vlm_factory.errors import exits_cleanly
from vlm_factory.logs import setup_logging
from vlm_factory.model.checkpoint import load_checkpoint, save_checkpoint
from vlm_factory.model.transplant import llava_with_qwen2, smolvlm_from_llava
from vlm_factory.train.align import AlignRecipe, align_connector_and_llm

QWEN2_CARD = """# {name} (vlm-factory bundled base)

The bundled tiny LLaVA (`{source}`: SigLIP tower, 2-layer MLP projector) with its Llama LLM moved into
transformers' Qwen2 classes: the same trained weights, Qwen2's q/k/v biases at zero, so it computes what
the source computes. It exists so every exporter's Qwen2 path is gated on a model that answers.

- made by `stages/derive_base.py` (`dvc unfreeze derive_qwen2_base && dvc repro derive_qwen2_base`)
"""

PROBE_IMAGES = 1024  # synthetic "pretrain" images the new connector's least-squares start is fitted on

SMOLVLM_CARD = """# {name} (vlm-factory bundled base)

The bundled tiny LLaVA (`{source}`) as a SmolVLM / Idefics3 model: its trained SigLIP tower reads
{tile}-px tiles (up to {tiles}x{tiles} of an image resized to {longest} px on its longest side, plus the
whole image squashed to one tile), pixel shuffle x{scale} folds each tile's patches into {tokens} tokens, and
its trained Llama LLM reads them between the processor's marker tokens. The new Idefics3 connector starts as
the least-squares linear stand-in for the source's projector (fitted on {probe} synthetic images), then it and the
LLM were aligned together for {align_steps} steps on {align_images} synthetic images of the "pretrain" split
(never the train or eval questions); the pipeline's `finetune` aligns a fresh connector against this LLM as
it does for the default base.

- made by `stages/derive_base.py --to smolvlm` (`dvc unfreeze derive_smolvlm_base && dvc repro derive_smolvlm_base`)
"""


@exits_cleanly
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, required=True, help="the bundled Llama LLaVA")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--to", choices=("qwen2", "smolvlm"), default="qwen2", help="the family to move it into")
    parser.add_argument("--scale-factor", type=int, default=2, help="smolvlm: pixel shuffle factor")
    parser.add_argument("--tiles-per-side", type=int, default=2, help="smolvlm: the longest edge in tiles")
    parser.add_argument("--align-steps", type=int, default=0, help="smolvlm: joint connector + LLM alignment steps")
    parser.add_argument("--align-images", type=int, default=6000, help="smolvlm: synthetic images to align on")
    args = parser.parse_args(argv)
    setup_logging()
    model, processor = load_checkpoint(args.source)
    if args.to == "qwen2":
        save_checkpoint(llava_with_qwen2(model), processor, args.out,
                        extra_files={"README.md": QWEN2_CARD.format(name=args.out.name, source=args.source)})
        return
    probe = [item.image for item in iter_split(0, "pretrain", PROBE_IMAGES, 1, 32)]
    smol, smol_processor = smolvlm_from_llava(model, processor, scale_factor=args.scale_factor,
                                              tiles_per_side=args.tiles_per_side, probe_images=probe)
    if args.align_steps:
        smol, _ = align_connector_and_llm(smol, smol_processor,
                                          AlignRecipe(steps=args.align_steps, n_images=args.align_images))
    tile = smol.config.vision_config.image_size
    card = SMOLVLM_CARD.format(name=args.out.name, source=args.source, tile=tile, tiles=args.tiles_per_side,
                               longest=tile * args.tiles_per_side, scale=args.scale_factor,
                               tokens=smol_processor.image_seq_len, probe=PROBE_IMAGES, align_steps=args.align_steps,
                               align_images=args.align_images)
    save_checkpoint(smol, smol_processor, args.out, extra_files={"README.md": card})


if __name__ == "__main__":
    main()
