"""`tfxfer evaluate` as a library call: evaluate a fine-tuned model's export on
a split, print the report, and keep it beside the model.

The numbers come from `tfxfer.inference.evaluate_export` (through the served
SavedModel) and `tfxfer.evaluation`; this module decides what is printed and
what is written where.
"""

import os
import sys

from tfxfer import atomic
from tfxfer.errors import TfxferError, write_failure
from tfxfer.evaluation import confident_mistakes, format_report, write_predictions
from tfxfer.explain import explain_mistakes
from tfxfer.export.layout import describe_export, find_export
from tfxfer.inference import evaluate_export
from tfxfer.preflight import describe
from tfxfer.reporting import plots

__all__ = ["evaluate"]


def evaluate(model_path, split="test", version=None, output_dir=None, predictions_path=None, top_wrong=10, top_k=5,
             tta="none", explain_count=0, log=print, warn=None, **data_options):
    """Evaluate a fine-tuned model on a split of labelled data and keep the results.

    Prints the export evaluated, the data's pre-flight report, the metrics
    (`tfxfer.evaluation.format_report`), the test-time augmentation's, and
    the most confidently wrong images; then writes every prediction
    (`predictions.csv`), the reliability diagram (`reliability-SPLIT.png`)
    and, with `explain_count`, their Grad-CAM maps (`top_losses.png`), beside
    a `metrics.json` that keeps the report under `evaluations`, next to any
    earlier ones.

    Results that cannot be written are not a failure: the report is printed
    by then, so `warn` says which file is missing and the call returns.

    Args:
        model_path: a finetune run folder or a SavedModel folder.
        split: the split to evaluate: `"test"`, `"val"` or `"train"`.
        version: the SavedModel version of a run folder (`RUN/export/N`);
            default: the newest in float32, else the newest.
        output_dir: folder for `metrics.json` and the files beside it;
            default: the run folder, or the SavedModel's folder.
        predictions_path: where `predictions.csv` goes; default: beside
            `metrics.json`.
        top_wrong: how many of the most confidently wrong images to list.
        top_k: also report top-K accuracy, when K is below the number of
            classes.
        tta: test-time augmentation, one of `tfxfer.evaluation.TTA_MODES`.
        explain_count: draw this many of the most confidently wrong images
            with their heat-maps; needs a run folder as `model_path`.
        log: called with each line printed.
        warn: called with the note on results that could not be written;
            default: printed on standard error.
        **data_options: the data to evaluate on, as the finetune options
            name it (`dataset`, `data_dir`, `csv`, `tfrecord`, ...,
            `batch_size`, `seed`, `allow_leaks`).

    Returns:
        The report, as `metrics.json` keeps it.
    """
    if explain_count and not os.path.isfile(os.path.join(model_path, "model.keras")):
        raise TfxferError(f"--explain needs the run folder of a finetune run as --model (its model.keras); "
                          f"{model_path!r} has none.")
    export_dir = find_export(model_path, version)
    log(describe_export(export_dir))
    report, export_dir, rows = evaluate_export(export_dir, split=split, top_k=top_k, tta=tta, **data_options)
    log("\n".join(describe(report["preflight"])))
    log(format_report(report, f"{report['data']} {split}"))
    if "tta" in report:
        t = report["tta"]
        log(f"with test-time augmentation ({t['mode']}, {t['views']} views): accuracy {t['accuracy']:.4f} "
            f"({t['gain']:+.4f} against {report['accuracy']:.4f} without); expected calibration error "
            f"{t['calibration']['ece']:.4f}")
    mistakes = confident_mistakes(rows, top_wrong)
    if mistakes:
        log(f"\nmost confidently wrong ({len(mistakes)} of {sum(r['true'] != r['predicted'] for r in rows)} wrong):")
        for r in mistakes:
            log(f"  {r['probability']:.3f}  {r['predicted']} (true {r['true']})  {r['file']}")
    metrics_path = os.path.join(output_dir, "metrics.json") if output_dir else _metrics_path(export_dir)
    predictions_path = predictions_path or os.path.join(os.path.dirname(metrics_path), "predictions.csv")
    try:
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
        write_predictions(predictions_path, rows)
        log(f"predictions of {len(rows)} images written to {predictions_path}")
        curves = {"plain": report["calibration"]}
        if "tta" in report:
            curves[f"TTA {tta}"] = report["tta"]["calibration"]
        diagram = os.path.join(os.path.dirname(metrics_path), f"reliability-{split}.png")
        plots.reliability(curves, diagram, f"{report['data']} {split}: {report['num_examples']} images")
        log(f"reliability diagram written to {diagram}")
        metrics = atomic.read_json(metrics_path) if os.path.exists(metrics_path) else {}
        metrics.setdefault("evaluations", {})[f"{report['data']}:{split}"] = report
        atomic.write_json(metrics_path, metrics)
        log(f"written to {metrics_path}")
        if explain_count:
            grid = explain_mistakes(model_path, rows, explain_count, split, data_options,
                                    os.path.join(os.path.dirname(metrics_path), "top_losses.png"))
            log(f"the {explain_count} most confidently wrong images with their heat-maps: {grid}"
                if grid else "no wrong prediction to explain")
    except OSError as e:
        if write_failure(e) is None:
            raise
        # The results are printed above; a model folder the user cannot write is not a failure.
        warn = warn or (lambda line: print(line, file=sys.stderr))
        warn(f"note: could not write {e.filename or metrics_path} ({e.strerror}); the results above are "
             "complete; pass --output FOLDER to keep metrics.json and predictions.csv.")
    return report


def _metrics_path(export_dir):
    # export_dir is <run>/export/<version>: the run folder holds metrics.json.
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(export_dir)))
    if os.path.exists(os.path.join(run_dir, "config.yaml")):
        return os.path.join(run_dir, "metrics.json")
    return os.path.join(export_dir, "metrics.json")
