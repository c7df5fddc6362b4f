"""The `tfxfer` command: a thin layer that builds a config and calls the library."""

import functools
import json
import os

import click

from tfxfer.config import FIELDS, OPTIONAL_NUMBERS, load_config
from tfxfer.errors import TfxferError

HELP = {
    "dataset": "Built-in dataset (digits) or a tensorflow-datasets name, e.g. cifar10.",
    "data_dir": "Image folder: one sub-folder per class, or train/ plus val/ and/or test/.",
    "tfds_data_dir": "Folder with prepared tensorflow-datasets data (the offline route).",
    "train_split": "tfds split to train on (slicing allowed, e.g. 'train[:50%]').",
    "val_split": "tfds validation split; default 'validation', else carved from train.",
    "test_split": "tfds test split; default 'test' when the dataset has one.",
    "val_fraction": "Share of train carved out as validation when there is none.",
    "max_train_examples": "Train on a seeded sample of this many images.",
    "augment": "Training augmentation: none, flip or flip_crop.",
    "backbone": "Backbone name; see `tfxfer backbones`.",
    "weights": "imagenet, none, or the path of a weights file for the headless backbone.",
    "image_size": "Square input size in pixels (default: the backbone's; 32 works).",
    "freeze": "head, full, stages:N or from:LAYER.",
    "train_bn": "Let BatchNorm statistics of the training part update (frozen by default).",
    "bn_momentum": "Momentum of BatchNorm moving averages (default: the backbone's, 0.99).",
    "dropout": "Dropout rate before the new head.",
    "l2sp": "L2-SP alpha: pull the backbone toward its starting weights.",
    "l2sp_scope": "Weights L2-SP pulls: kernels (as the paper) or all.",
    "head_l2": "Plain L2 beta on the new head's kernel.",
    "optimizer": "sgd (momentum 0.9), adam or adamw.",
    "lr": "Learning rate of the head (and backbone, times --backbone-lr-mult).",
    "weight_decay": "Optimizer weight decay; never on the backbone while L2-SP is on.",
    "schedule": "constant or cosine (with --warmup-epochs).",
    "warmup_epochs": "Linear warmup length before cosine decay.",
    "backbone_lr_mult": "Backbone learning rate = lr * this, through its own optimizer.",
    "epochs": "Number of epochs.",
    "batch_size": "Batch size.",
    "seed": "Seeds Python, NumPy, TensorFlow and data shuffling.",
    "deterministic": "TF op determinism: identical histories on any device, at a speed cost (see README).",
    "precision": "auto (bfloat16 where the hardware has it, else float32), float32, mixed_bfloat16 or mixed_float16.",
    "jit_compile": "Compile the training step with XLA.",
    "distribute": "none, or mirrored (tf.distribute.MirroredStrategy).",
    "run_name": "Run folder name under --output-dir; default <dataset>-<backbone>-<policy>.",
    "output_dir": "Where run folders go.",
}
DATA_FIELDS = ("dataset", "data_dir", "tfds_data_dir", "train_split", "val_split", "test_split", "val_fraction", "batch_size", "seed")


def _option(field):
    """A click option for config field `field`; unset options are None, so the
    config file (or the default) stays in force."""
    flag = "--" + field.replace("_", "-")
    default = FIELDS[field].default
    if isinstance(default, bool):
        return click.option(f"{flag}/--no-{flag[2:]}", field, default=None, help=HELP[field])
    kind = type(default) if default is not None and not isinstance(default, str) else None
    kind = OPTIONAL_NUMBERS.get(field, kind)
    return click.option(flag, field, type=kind, default=None, help=HELP[field])


def _options(fields):
    def decorate(command):
        for field in reversed(fields):
            command = _option(field)(command)
        return command

    return decorate


def _friendly(command):
    """Turn a user's mistake (`TfxferError`) into one line on stderr and exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TfxferError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


@click.group()
@click.version_option(package_name="tfxfer")
def main():
    """Transfer learning of image classifiers with TensorFlow/Keras."""


@main.command()
@click.option("--config", "config_path", type=click.Path(), help="YAML config file; flags override it.")
@_options(list(FIELDS))
@click.option("--resume", is_flag=True, help="Continue the interrupted run --run-name from its checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder of the same name.")
@_friendly
def finetune(config_path, resume, overwrite, **flags):
    """Fine-tune a backbone on a dataset and export a SavedModel."""
    from tfxfer.training import finetune as run

    if resume:
        config_path, flags = _resumed(config_path, flags)
    config = load_config(config_path, **flags)
    try:
        run(config, resume=resume, overwrite=overwrite)
    except KeyboardInterrupt:
        raise click.ClickException(
            f"Interrupted; continue with: tfxfer finetune --resume --run-name {config.run_name} --output-dir {config.output_dir}"
        ) from None


def _resumed(config_path, flags):
    """A resumed run keeps its saved config; only --epochs may change."""
    from tfxfer.config import FinetuneConfig, default_run_name

    if not flags.get("run_name"):
        base = load_config(config_path, **flags)
        flags["run_name"] = default_run_name(base)
    output_dir = flags.get("output_dir") or FinetuneConfig.output_dir
    saved = os.path.join(output_dir, flags["run_name"], "config.yaml")
    if not os.path.exists(saved):
        raise TfxferError(f"No run to resume at {os.path.dirname(saved)}; check --run-name and --output-dir.")
    return saved, {"epochs": flags.get("epochs"), "run_name": flags["run_name"], "output_dir": output_dir}


@main.command()
@click.option("--model", "model_path", required=True, help="Run folder or SavedModel folder.")
@_options(DATA_FIELDS)
@click.option("--split", default="test", show_default=True, help="Which split to evaluate: test, val or train.")
@_friendly
def evaluate(model_path, split, **data):
    """Accuracy, loss, per-class precision/recall/F1 and confusion matrix of a run."""
    from tfxfer.evaluation import format_report
    from tfxfer.inference import evaluate_export

    data = {k: v for k, v in data.items() if v is not None}
    report, export_dir = evaluate_export(model_path, split=split, **data)
    click.echo(format_report(report, f"{report['data']} {split}"))
    metrics_path = _metrics_path(model_path, export_dir)
    metrics = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
    metrics.setdefault("evaluations", {})[f"{report['data']}:{split}"] = report
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=2)
    click.echo(f"written to {metrics_path}")


def _metrics_path(model_path, export_dir):
    # export_dir is <run>/export/<version>: the run folder holds metrics.json.
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(export_dir)))
    if os.path.exists(os.path.join(run_dir, "config.yaml")):
        return os.path.join(run_dir, "metrics.json")
    return os.path.join(export_dir, "metrics.json")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_path", help="Run folder or SavedModel folder of a fine-tuned model.")
@click.option("--backbone", help="Instead of --model: a backbone with its 1000-class ImageNet head.")
@click.option("--weights", default="imagenet", show_default=True, help="With --backbone: imagenet or a weights file with the top.")
@click.option("--top", default=5, show_default=True, help="How many classes to print.")
@_friendly
def predict(images, model_path, backbone, weights, top):
    """Print the top classes of each IMAGE with their probabilities."""
    from tfxfer.inference import predict_files, predict_imagenet

    if bool(model_path) == bool(backbone):
        raise TfxferError("Give exactly one of --model (a fine-tuned run) or --backbone (ImageNet head).")
    results = predict_files(model_path, images, top) if model_path else predict_imagenet(backbone, weights, images, top)
    for path, ranked in zip(images, results):
        click.echo(path)
        for name, probability in ranked:
            click.echo(f"  {probability:8.4f}  {name}")


@main.command()
@click.argument("pattern", default="*")
@_friendly
def backbones(pattern):
    """List backbones: default input size, parameter count and stage names."""
    import keras

    from tfxfer.backbones import create_backbone, get_backbone, list_backbones

    rows = [("name", "size", "params", "stages", "suits")]
    for name in list_backbones(pattern):
        spec = get_backbone(name)
        # Counting needs the model; build it small and without weights.
        params = create_backbone(name, weights=None, image_size=spec.default_size if spec.default_size < 64 else 32).count_params()
        keras.backend.clear_session()
        rows.append((name, str(spec.default_size), f"{params:,}", " ".join(spec.stages), spec.sizes))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])


if __name__ == "__main__":
    main()
