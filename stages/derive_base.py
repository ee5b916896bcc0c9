"""Stage derive_qwen2_base (frozen): the bundled base's trained weights moved into Qwen2 classes, in seconds
(src/vlm_factory/model/transplant.py). Regenerate on purpose with
`dvc unfreeze derive_qwen2_base && dvc repro derive_qwen2_base`.
"""

import argparse
from pathlib import Path

from vlm_factory.errors import exits_cleanly
from vlm_factory.logs import setup_logging
from vlm_factory.model.checkpoint import load_checkpoint, save_checkpoint
from vlm_factory.model.transplant import llava_with_qwen2

QWEN2_CARD = """# {name} (vlm-factory bundled base)

The bundled tiny LLaVA (`{source}`: SigLIP tower, 2-layer MLP projector) with its Llama LLM moved into
transformers' Qwen2 classes: the same trained weights, Qwen2's q/k/v biases at zero, so it computes what
the source computes. It exists so every exporter's Qwen2 path is gated on a model that answers.

- made by `stages/derive_base.py` (`dvc unfreeze derive_qwen2_base && dvc repro derive_qwen2_base`)
"""


@exits_cleanly
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, required=True, help="the bundled Llama LLaVA")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    model, processor = load_checkpoint(args.source)
    save_checkpoint(llava_with_qwen2(model), processor, args.out,
                    extra_files={"README.md": QWEN2_CARD.format(name=args.out.name, source=args.source)})


if __name__ == "__main__":
    main()
