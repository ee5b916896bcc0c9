"""Stages derive_qwen2_base and derive_smolvlm_base (frozen): the bundled base moved into another family.

The transplant itself takes seconds (src/vlm_factory/model/transplant.py); a family whose connector and
image-token layout are new is then trained on, every weight, by the pretraining recipe of its conf/model/
entry (src/vlm_factory/train/pretrain.py, dense per-patch and per-token losses over all of an image's views),
minutes on a CPU. Regenerate on purpose with `dvc unfreeze derive_<name>_base && dvc repro derive_<name>_base`.
"""

import argparse
from pathlib import Path

from vlm_factory.data.synthetic import iter_split
from vlm_factory.config import compose, parse_params
from vlm_factory.errors import UserError, exits_cleanly
from vlm_factory.logs import setup_logging
from vlm_factory.model.checkpoint import load_checkpoint, save_checkpoint
from vlm_factory.model.transplant import llava_with_qwen2, smolvlm_from_llava
from vlm_factory.train.base import train_and_save

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
the least-squares linear stand-in for the source's projector (fitted on {probe} synthetic images); then every
weight was trained on for {steps} steps by the default base's pretraining recipe (`recipe.json`), its dense
labels placed on each tile and the global view: a tower trained on whole images reads zoomed-in tiles, and
an LLM trained on one image's tokens reads five views between markers.

- accuracy per question type during that training: `pretrain_metrics.json`
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
    parser.add_argument("--model", default="tiny_smolvlm",
                        help="smolvlm: the conf/model/ entry whose pretrain recipe trains the derived base")
    args = parser.parse_args(argv)
    setup_logging()
    model, processor = load_checkpoint(args.source)
    if args.to == "qwen2":
        save_checkpoint(llava_with_qwen2(model), processor, args.out,
                        extra_files={"README.md": QWEN2_CARD.format(name=args.out.name, source=args.source)})
        return
    source = f"conf/model/{args.model}.yaml"
    recipe = parse_params(compose([f"model={args.model}"]), source).model.pretrain
    if recipe is None:
        raise UserError(f"{source}: no pretrain recipe to train the derived base with")
    probe = [item.image for item in iter_split(0, "pretrain", PROBE_IMAGES, 1, 32)]
    smol, smol_processor = smolvlm_from_llava(model, processor, scale_factor=args.scale_factor,
                                              tiles_per_side=args.tiles_per_side, probe_images=probe)
    tile = smol.config.vision_config.image_size
    card = SMOLVLM_CARD.format(name=args.out.name, source=args.source, tile=tile, tiles=args.tiles_per_side,
                               longest=tile * args.tiles_per_side, scale=args.scale_factor,
                               tokens=smol_processor.image_seq_len, probe=PROBE_IMAGES, steps=recipe.steps)
    origin = {"derived_from": str(args.source), "scale_factor": args.scale_factor,
              "tiles_per_side": args.tiles_per_side, "connector_probe_images": PROBE_IMAGES}
    train_and_save(smol, smol_processor, recipe, args.out, card, origin)


if __name__ == "__main__":
    main()
