"""`python -m benchmarks [NAME] [options]`: run one of tfxfer's benchmarks.

Each writes a Markdown table (into `BENCHMARKS.md` or `benchmarks/NAME.md`)
stamped with the commit and the CPU; `python -m benchmarks NAME --help` lists
its options.
"""

import importlib
import sys

BENCHMARKS = {
    "suite": ("suite", "tfxfer's training step against plain Keras fit and PyTorch; writes BENCHMARKS.md"),
    "paired": ("paired", "L2-SP and the CPU speed-ups, each against the step without it, in one process"),
    "bfloat16": ("bfloat16", "bfloat16 against float32 and PyTorch, BatchNorm frozen and training, 32 and 224 px"),
    "precision-modes": ("precision_modes", "bfloat16 routes (Keras policy, oneDNN rewrite, XLA) against float32"),
    "profile": ("profile_step", "op time by kind in the training step, tfxfer's and PyTorch's, from their profilers"),
    "feature-cache": ("feature_cache", "a head-only epoch through the backbone against one on cached features"),
    "export-formats": ("export_formats", "size and batch-1 latency of SavedModel, ONNX and LiteRT"),
    "families": ("families", "ViT-B/16 and ConvNeXt-T full fine-tuning against timm's models in PyTorch eager"),
    "script-fit": ("script_fit", "a script's build_model + fit against the step tfxfer finetune runs"),
    "fixed-cost": ("fixed_cost", "where a tiny finetune's time goes outside its epoch, phase by phase"),
    "int8": ("int8", "LiteRT float, dynamic and int8: size, batch-1 latency, test accuracy against the float SavedModel"),
    "lora": ("lora", "LoRA against full and head-only fine-tuning: img/s, peak memory, trainable and optimizer size"),
}


def main(argv):
    if not argv or argv[0] not in BENCHMARKS:
        print(__doc__.splitlines()[0], "\n")
        for name, (_, summary) in BENCHMARKS.items():
            print(f"  {name:15} {summary}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"benchmarks.{BENCHMARKS[argv[0]][0]}")
    return module.main(argv[1:], prog=f"python -m benchmarks {argv[0]}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
