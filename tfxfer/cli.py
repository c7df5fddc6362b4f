"""The `tfxfer` command: a thin layer that builds a config and calls the library."""

import contextlib
import functools
import importlib
import json
import os
import signal
import sys

import click

from tfxfer import runtime
from tfxfer.config import BN_MODES, EXPORT_FORMATS, FinetuneConfig, PretrainConfig, StudyConfig, load_config
from tfxfer.errors import RUN_FOLDER_FIX, TfxferError, did_you_mean, write_failure
from tfxfer.evaluation import TTA_MODES
from tfxfer.interrupts import Terminated, sigterm_interrupts

def config_options(kind, names=None):
    """Click options for the fields of the command config `kind` (or only
    `names`), from each field's type, default, help and choices. Unset options
    are `None`, so the config file (or the default) stays in force."""
    fields, defaults = kind.fields(), kind.defaults()

    def decorate(command):
        for name in reversed(list(names or fields)):
            _group, field, type_ = fields[name]
            command = _option(name, field, type_, defaults[name])(command)
        return command

    return decorate


def _option(name, field, type_, default):
    flag = "--" + name.replace("_", "-")
    text = field.metadata["help"]
    if field.metadata.get("choices") and not callable(field.metadata["choices"]):
        text += " One of: " + ", ".join(field.metadata["choices"]) + "."
    if default is not None:
        text += f" [default: {default}]"
    if type_ is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=text)
    if field.metadata.get("choices") is BN_MODES:
        # `--train-bn` alone is on and `--no-train-bn` is off, as when it was a switch.
        def no_flag(context, parameter, value):
            if value:
                context.params[name] = "off"

        def decorate(command):
            command = click.option(flag, name, is_flag=False, flag_value="on", default=None, help=text,
                                   type=click.Choice(BN_MODES))(command)
            return click.option(f"--no-{flag[2:]}", is_flag=True, hidden=True, expose_value=False,
                                callback=no_flag)(command)
        return decorate
    if name == "mlflow":
        # `--mlflow` alone is the local ./mlflow.db store; `--mlflow URI` another store or a server.
        from tfxfer.tracking import DEFAULT_STORE

        return click.option("--mlflow", name, is_flag=False, flag_value=DEFAULT_STORE, default=None, metavar="[URI]",
                            help=text)
    # A field that takes `auto` reaches the config as text, which checks it.
    plain = type_ is str or field.metadata.get("auto")
    return click.option(flag, name, type=None if plain else type_, default=None, help=text)


EVALUATE_OPTIONS = (
    "dataset", "data_dir", "csv", "csv_path_column", "csv_label_column", "tfrecord", "tfrecord_image_key", "tfrecord_label_key", "tfds_data_dir", "tfds_manual_dir", "train_split", "val_split", "test_split", "val_fraction", "classes",
    "labels_per_class", "batch_size", "seed", "allow_leaks",
)


# Exit codes: 0 done, 1 a user's mistake (one sentence), 2 a usage error
# (click's own), 130 interrupted with Ctrl-C (128 + SIGINT, as shells do),
# 143 stopped by SIGTERM (128 + SIGTERM).
INTERRUPTED = 130
TERMINATED = 128 + signal.SIGTERM

# How a failed write is fixed, by what each command can be told.
OUTPUT_FIX = "free space or pass --output with a writable folder, then run again."
STUDY_FIX = "free space or choose a writable --output-dir, then run the same command again (finished runs are kept)."
PLOT_FIX = "free space or pass --plot with a writable path, then run again."
OTHER_FIX = "free space or make that folder writable, then run again."


def _progress():
    """Keras's `verbose`: a progress bar on a terminal, one line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2


def _friendly(command=None, *, tensorflow=True, fix=OTHER_FIX, check=None):
    """Turn a user's mistake (`TfxferError`) into one line on stderr and exit 1;
    a failed write ends with `fix`, which names the command's own options.
    TensorFlow loads first, quietly, unless the command does without it;
    `check(**options)` comes before it, so what needs no TensorFlow to find
    wrong is named at once rather than seconds later."""
    if command is None:
        return functools.partial(_friendly, tensorflow=tensorflow, fix=fix, check=check)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            if check is not None:
                check(**kwargs)
            if tensorflow:
                runtime.load_tensorflow_quietly()
            return command(*args, **kwargs)
        except TfxferError as e:
            raise click.ClickException(str(e)) from None
        except Exception as e:
            failure = write_failure(e, fix)
            if failure is None:
                raise
            raise click.ClickException(str(failure)) from None

    return wrapper


def _interrupted(message, stop=None):
    """After Ctrl-C (or SIGTERM: `stop` is a `Terminated`), say how to continue, on stderr, and exit 130 (143)."""
    terminated = isinstance(stop, Terminated)
    click.echo(f"{'Terminated' if terminated else 'Interrupted'}; {message}", err=True)
    raise SystemExit(TERMINATED if terminated else INTERRUPTED)


@click.group()
@click.version_option(package_name="tfxfer")
def main():
    """Transfer learning of image classifiers with TensorFlow/Keras."""


class _PretrainCommand(click.Command):
    """`tfxfer pretrain`, whose options include those the pretext methods
    declare: added when the command runs or shows its help, so that a method
    registered by then is configurable like the built-in ones."""

    def get_params(self, ctx):
        import tfxfer.pretext  # noqa: F401  (the built-in methods' options, without TensorFlow)

        known = {param.name for param in self.params}
        defaults = PretrainConfig.defaults()
        for name, (_group, field, type_) in PretrainConfig.fields().items():
            if name not in known:  # a method registered since the last call
                _option(name, field, type_, defaults[name])(self)
        return super().get_params(ctx)


def _run_command(name, kind, engine, summary, cls=click.Command):
    """A `tfxfer NAME` command: options generated from `kind`, then the library's
    `engine(config, resume=, overwrite=)` (imported when the command runs)."""

    @click.option("--config", "config_path", type=click.Path(), help="YAML config file; flags override it.")
    @config_options(kind)
    @click.option("--resume", is_flag=True, help="Continue the interrupted run --run-name from its checkpoint, with its saved config.")
    @click.option("--overwrite", is_flag=True, help="Replace an existing run folder of the same name.")
    @_friendly(fix=RUN_FOLDER_FIX)
    def command(config_path, resume, overwrite, **flags):
        module, function = engine.rsplit(".", 1)
        run = getattr(importlib.import_module(module), function)
        config = load_config(config_path, kind, validate=not resume, **flags)
        try:
            with sigterm_interrupts():
                run(config, resume=resume, overwrite=overwrite, verbose=_progress())
        except KeyboardInterrupt as stop:
            from tfxfer.runs import resolved_config  # TensorFlow is loaded by now

            # The run resolved its name on its own copy of the config; resolve it again the same way.
            run_name = resolved_config(config, resume).run.run_name
            _interrupted(f"continue with: tfxfer {name} --resume --run-name {run_name} --output-dir {config.run.output_dir}",
                         stop)

    command.__doc__ = summary
    return main.command(name, cls=cls)(command)


finetune = _run_command("finetune", FinetuneConfig, "tfxfer.training.finetune",
                        "Fine-tune a backbone on a dataset and export a SavedModel.")
pretrain = _run_command("pretrain", PretrainConfig, "tfxfer.pretraining.pretrain",
                        "Pretrain a backbone (supervised, simclr or autoencoder) for `finetune --weights RUN`.",
                        _PretrainCommand)


@main.command("lr-find")
@click.option("--config", "config_path", type=click.Path(), help="YAML config file; flags override it.")
@config_options(FinetuneConfig)
@click.option("--steps", default=100, show_default=True, help="Training steps of the sweep.")
@click.option("--start-lr", default=1e-7, show_default=True, help="Learning rate of the first step.")
@click.option("--end-lr", default=10.0, show_default=True, help="Learning rate of the last step.")
@click.option("--plot", "plot_path", default="lr_find.png", show_default=True, type=click.Path(dir_okay=False),
              help="Where the loss-against-learning-rate plot goes.")
@_friendly(fix=PLOT_FIX)
def lr_find(config_path, steps, start_lr, end_lr, plot_path, **flags):
    """Learning-rate range test on the finetune setup these options describe:
    the loss over ~100 steps of a growing learning rate, a plot, and a
    suggested --lr. Writes no run folder."""
    from tfxfer.lr_find import RULE
    from tfxfer.lr_find import lr_find as range_test
    from tfxfer.reporting.plots import lr_range

    config = load_config(config_path, FinetuneConfig, **flags)
    finding = range_test(config, steps, start_lr, end_lr, log=click.echo)
    try:
        lr_range(finding, plot_path)
    except OSError as e:
        raise TfxferError(f"Cannot write the plot to {plot_path} ({e.strerror}); pass --plot PATH.") from None
    click.echo(f"suggested lr: {finding.suggestion:.2g} by the rule {RULE}; plot: {plot_path}")
    click.echo(f"use it with: tfxfer finetune ... --lr {finding.suggestion:.2g} (or --lr auto to run this test first)")


@main.command()
@click.argument("candidates", nargs=-1, required=True)
@config_options(FinetuneConfig, EVALUATE_OPTIONS)
@click.option("--image-size", type=int, help="Input size of the backbone names (a run folder keeps its own). "
              "[default: each backbone's]")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects instead of a table.")
@_friendly(check=lambda **options: _needs_data(options))
def rank(candidates, image_size, as_json, **data):
    """Score CANDIDATE backbones on the target's labelled training images with
    LogME, before any fine-tuning; higher is better. A candidate is a backbone
    name (its default weights), NAME:none (random weights), or a pretrain or
    finetune run folder."""
    from tfxfer.ranking import rank as rank_candidates

    data = {k: v for k, v in data.items() if v is not None}
    # With --json, standard output is the JSON alone: progress and log lines go to standard error.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        results = rank_candidates(candidates, data, image_size, log=lambda line: click.echo(line, err=as_json))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    rows = [("candidate", "LogME", "feature time", "params", "size")]
    rows += [(r["candidate"], f"{r['logme']:.4f}", f"{r['feature_seconds']:.1f} s", f"{r['params']:,}",
              f"{r['image_size']} px") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    click.echo("\n" + "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows))


def _needs_data(options):
    if not any(options.get(k) for k in ("dataset", "data_dir", "csv", "tfrecord")):
        raise TfxferError("Give the target data: --dataset NAME, --data-dir DIR, --csv FILE or --tfrecord GLOB.")


STUDY_OPTIONS = [k for k in StudyConfig.fields() if k not in StudyConfig.OWNED]


@main.command()
@click.option("--config", "config_path", type=click.Path(), help="YAML config file; flags override it.")
@config_options(StudyConfig, STUDY_OPTIONS)
@_friendly(fix=STUDY_FIX)
def study(config_path, **flags):
    """Compare strategies over seeds (and folds): results.csv, report.md, plots.

    Each run is an ordinary finetune run folder under studies/NAME/runs/; running
    the same command again skips finished runs and resumes an interrupted one.
    """
    from tfxfer.studies import study as run_study

    config = load_config(config_path, StudyConfig, **flags)
    try:
        with sigterm_interrupts():
            run_study(config, log=click.echo)
    except KeyboardInterrupt as stop:
        _interrupted("run the same command again to continue the study (finished runs are kept).", stop)


VERSION_HELP = ("Which SavedModel version of the run to serve (RUN/export/N). [default: the newest in float32, "
                "else the newest]")


@main.command()
@click.option("--model", "model_path", required=True, help="Run folder or SavedModel folder.")
@click.option("--version", type=click.IntRange(min=1), help=VERSION_HELP)
@config_options(FinetuneConfig, EVALUATE_OPTIONS)
@click.option("--split", default="test", show_default=True, help="Which split to evaluate: test, val or train.")
@click.option("--output", "output_dir", type=click.Path(file_okay=False),
              help="Folder for metrics.json and predictions.csv. [default: the run folder, or the SavedModel's]")
@click.option("--predictions", "predictions_path", type=click.Path(),
              help="CSV of every image: file, true, predicted, probability, loss. [default: predictions.csv beside metrics.json]")
@click.option("--top-wrong", default=10, show_default=True, help="How many of the most confidently wrong images to list.")
@click.option("--top-k", default=5, show_default=True, help="Also report top-K accuracy (when K is below the number of classes).")
@click.option("--explain", "explain_count", default=0, show_default=True,
              help="Draw the N most confidently wrong images with their Grad-CAM heat-maps (top_losses.png); needs "
                   "a run folder as --model.")
@click.option("--tta", default="none", show_default=True, type=click.Choice(TTA_MODES),
              help="Test-time augmentation: average the probabilities over the image and its mirror image (flip), "
                   "and four shifted crops of each (flip_crop); reported beside the plain accuracy.")
@_friendly(fix=OUTPUT_FIX)
def evaluate(model_path, version, split, output_dir, predictions_path, top_wrong, top_k, tta, explain_count, **data):
    """Accuracy, top-k accuracy, loss, per-class precision/recall/F1, confusion
    matrix, calibration (ECE and reliability-SPLIT.png), every prediction
    (predictions.csv) and the most confidently wrong images."""
    from tfxfer.evaluating import evaluate as evaluate_model

    data = {k: v for k, v in data.items() if v is not None}
    evaluate_model(model_path, split, version=version, output_dir=output_dir, predictions_path=predictions_path,
                   top_wrong=top_wrong, top_k=top_k, tta=tta, explain_count=explain_count, log=click.echo,
                   warn=functools.partial(click.echo, err=True), **data)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_path", help="Run folder or SavedModel folder of a fine-tuned model.")
@click.option("--version", type=click.IntRange(min=1), help=VERSION_HELP)
@click.option("--backbone", help="Instead of --model: a backbone with its 1000-class ImageNet head.")
@click.option("--weights", default="imagenet", show_default=True, help="With --backbone: imagenet or a weights file with the top.")
@click.option("--top", default=5, show_default=True, type=click.IntRange(min=1), help="How many classes to print.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list of {file, top: [{class, probability}]} or {file, error}.")
@_friendly
def predict(images, model_path, version, backbone, weights, top, as_json):
    """Print the top classes of each IMAGE (files, folders or quoted globs).

    A file that is not an image is reported and the others are still
    predicted; the exit code is then 1.
    """
    from tfxfer.export.layout import describe_export, find_export
    from tfxfer.inference import expand_inputs, predict_files, predict_imagenet

    if bool(model_path) == bool(backbone):
        raise TfxferError("Give exactly one of --model (a fine-tuned run) or --backbone (ImageNet head).")
    if version is not None and not model_path:
        raise TfxferError("--version picks a SavedModel version of --model; drop it with --backbone.")
    if not expand_inputs(images):
        raise TfxferError(f"No image to predict: {', '.join(images) or 'no IMAGE was given'} holds no file; give image "
                          "files, folders of them or quoted globs.")
    if model_path:
        export_dir = find_export(model_path, version)
        # With --json, standard output is the JSON alone.
        click.echo(describe_export(export_dir), err=as_json)
        results = predict_files(export_dir, images, top)
    else:
        files = expand_inputs(images)
        results = [{"file": f, "top": ranked} for f, ranked in zip(files, predict_imagenet(backbone, weights, files, top))]
    if as_json:
        click.echo(json.dumps([
            {"file": r["file"], "error": r["error"]} if "error" in r else
            {"file": r["file"], "top": [{"class": name, "probability": p} for name, p in r["top"]]}
            for r in results
        ], indent=2))
    else:
        for r in results:
            if "error" in r:
                click.echo(f"error: {r['error']}", err=True)
                continue
            click.echo(r["file"])
            for name, probability in r["top"]:
                click.echo(f"  {probability:8.4f}  {name}")
    if any("error" in r for r in results):
        raise SystemExit(1)


@main.command()
@click.argument("run", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--class", "class_name", help="Explain this class instead of each image's predicted one.")
@click.option("--output", "output_dir", type=click.Path(file_okay=False), help="Folder for the PNGs. [default: RUN/explain]")
@_friendly(fix=OUTPUT_FIX)
def explain(run, images, class_name, output_dir):
    """Grad-CAM heat-maps of the finetune RUN over IMAGES (files, folders or
    quoted globs): where its backbone's last convolutional stage (or a
    transformer's patch tokens, on their grid) found the evidence for the
    predicted class (or --class), one PNG per image."""
    from tfxfer.explain import explain_files

    output_dir = output_dir or os.path.join(run, "explain")
    results = explain_files(run, images, output_dir, class_name)
    for r in results:
        if "error" in r:
            click.echo(f"error: {r['error']}", err=True)
        else:
            click.echo(f"{r['file']}: {r['class']} {r['probability']:.4f} -> {r['png']}")
    if any("error" in r for r in results):
        raise SystemExit(1)


@main.command("export")
@click.argument("run", type=click.Path())
@click.option("--format", "formats", default="saved_model", show_default=True,
              help="saved_model, onnx or litert; several separated by commas. onnx and litert need "
                   "pip install 'tfxfer[onnx]' / 'tfxfer[litert]'.")
@click.option("--output", type=click.Path(), help="Folder to write (one format), which gets model.onnx, model.tflite "
                                                  "or saved_model.pb inside. [default: RUN/export/<format>/, "
                                                  "or the next numbered version for saved_model]")
@click.option("--precision", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="What the export computes in, whatever precision trained the model.")
@click.option("--quantize", type=click.Choice(["int8", "dynamic"]),
              help="LiteRT only: int8 (full-integer, calibrated on 300 training images) or dynamic (int8 weights); "
                   "written to RUN/export/litert-<quantize>/ with its test accuracy against the float32 model.")
@_friendly(fix=OUTPUT_FIX, check=lambda formats, output, **_: _export_names(formats, output))
def export_command(run, formats, output, precision, quantize):
    """Export the best model of a finetune RUN, preprocessing inside, and check
    it against the run's float32 model on the same images (within 1e-4 in
    float32, 5e-3 in float16, 3e-2 in bfloat16)."""
    from tfxfer.export import export_run

    for name in _export_names(formats, output):
        export_run(run, name, output, log=click.echo, precision=precision, quantize=quantize)


def _export_names(formats, output):
    names = [name.strip() for name in formats.split(",") if name.strip()]
    for name in names:
        if name not in EXPORT_FORMATS:
            raise did_you_mean(name, EXPORT_FORMATS, "export format")
    if output and len(names) > 1:
        raise TfxferError("--output takes one --format at a time.")
    return names


@main.command()
@click.argument("pattern", default="*")
@_friendly(tensorflow=False)
def backbones(pattern):
    """List backbones: input sizes, parameter count, stage names, what --weights imagenet loads and its licence."""
    from tfxfer.backbones import get_backbone, list_backbones

    rows = [("name", "size", "params", "stages", "suits", "pretrained on", "licence")]
    for name in list_backbones(pattern):
        spec = get_backbone(name)
        rows.append((name, str(spec.default_size), f"{spec.params or _count_params(spec):,}", " ".join(spec.stages),
                     spec.sizes, spec.source, spec.licence or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def _count_params(spec):
    """The parameters of a spec that does not state them: built small, without weights."""
    runtime.load_tensorflow_quietly()
    import keras

    from tfxfer.backbones import create_backbone

    size = spec.default_size if spec.default_size < 64 else max(32, spec.min_size)
    count = create_backbone(spec.name, weights=None, image_size=size).count_params()
    keras.backend.clear_session()
    return count


if __name__ == "__main__":
    main()
