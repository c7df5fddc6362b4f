"""Experiment tracking in MLflow (`--mlflow [URI]`, `tracking: mlflow`).

One MLflow run per tfxfer run: the resolved config as params, each epoch's
metrics at their epoch as step, the test metrics, the run's plots, metrics,
predictions and export as artifacts. A study is a parent run with one nested
run per strategy, seed and fold. The MLflow run's id is kept in the run folder
(`mlflow.json`), so `--resume` continues the same MLflow run.

Only `MlflowClient` is used, never MLflow's global active run: a study's runs
and a user's own MLflow code do not step on each other.
"""

import contextlib
import glob
import os
import pathlib
import time

from tfxfer import atomic
from tfxfer.errors import TfxferError

__all__ = ["RECORD_FILE", "DEFAULT_STORE", "EXPERIMENT", "Tracker", "tracking_uri", "check_reachable", "open_tracker"]

RECORD_FILE = "mlflow.json"
# `mlflow ui`, started in the same folder, opens a ./mlruns store when there is one.
DEFAULT_STORE = "mlruns"
EXPERIMENT = "tfxfer"
# MLflow takes at most this many params, and this many metrics, per log_batch call.
_PARAMS_PER_CALL, _METRICS_PER_CALL = 100, 1000


def tracking_uri(uri=None):
    """A URI with a scheme (http://, sqlite:///, file:) as it is; a folder
    (default ./mlruns) as the file: URI of its absolute path, so a resumed run
    finds the same store from any working directory."""
    uri = uri or DEFAULT_STORE
    if "://" in uri:
        scheme = uri.split("://", 1)[0].lower()
        if scheme not in KNOWN_SCHEMES and "+" not in scheme:  # postgresql+psycopg2:// and the like pass
            raise TfxferError(f"--mlflow {uri}: unknown scheme {scheme!r}; MLflow takes "
                              f"{', '.join(s + '://' for s in KNOWN_SCHEMES)}, or a folder.")
        return uri
    if uri.startswith(("file:", "databricks")):
        return uri
    return pathlib.Path(os.path.abspath(uri)).as_uri()


# The tracking URI schemes MLflow's stores understand.
KNOWN_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")


def _client(uri):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TfxferError("--mlflow needs the mlflow package: pip install 'tfxfer[mlflow]'.") from None
    if uri.startswith("file:"):
        # MLflow 3 keeps its folder store, the one `mlflow ui` opens from ./mlruns, behind this switch.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


class Tracker:
    """One MLflow run, logged through `MlflowClient`."""

    def __init__(self, client, run_id, uri):
        self.client, self.run_id, self.uri = client, run_id, uri

    @classmethod
    def open(cls, folder, uri, name, tags, params=None, parent=None, resume=False):
        """The MLflow run of the tfxfer run (or study) folder `folder`: the
        one it recorded when `resume`, else a new one, nested under the run id
        `parent` when given, with `tags` and `params`."""
        record = os.path.join(folder, RECORD_FILE)
        if resume and os.path.exists(record):
            saved = atomic.read_json(record)
            tracker = cls(_client(saved["tracking_uri"]), saved["run_id"], saved["tracking_uri"])
            tracker._call("continue the run", tracker.client.update_run, tracker.run_id, status="RUNNING")
            return tracker
        uri = tracking_uri(uri)
        tracker = cls(_client(uri), None, uri)
        with _fail_fast():
            experiment = tracker._call("read the experiment", tracker.client.get_experiment_by_name, EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else tracker._call(
            "create the experiment", tracker.client.create_experiment, EXPERIMENT)
        tags = {key: str(value) for key, value in tags.items() if value is not None}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = tracker._call("create a run", tracker.client.create_run, experiment_id, tags=tags, run_name=name)
        tracker.run_id = run.info.run_id
        atomic.write_json(record, {"tracking_uri": uri, "run_id": tracker.run_id, "experiment": EXPERIMENT})
        if params:
            tracker.log_params(params)
        return tracker

    def _call(self, what, function, *args, **kwargs):
        from mlflow.exceptions import MlflowException

        try:
            return function(*args, **kwargs)
        except (MlflowException, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TfxferError(
                f"MLflow could not {what} at {self.uri} ({first[:200]}); check the tracking URI and that its server "
                "is up, or drop the URI to track into ./mlruns."
            ) from None

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(key, _text(value)) for key, value in params.items()]
        for start in range(0, len(items), _PARAMS_PER_CALL):
            self._call("log params", self.client.log_batch, self.run_id, params=items[start:start + _PARAMS_PER_CALL])

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, int(step)) for key, value in metrics.items() if _is_number(value)]
        for start in range(0, len(items), _METRICS_PER_CALL):
            self._call("log metrics", self.client.log_batch, self.run_id, metrics=items[start:start + _METRICS_PER_CALL])

    def log_artifacts(self, paths, folder=None):
        """Files, and folders with what they hold, as artifacts (under `folder`)."""
        for path in paths:
            if os.path.isdir(path):
                where = os.path.join(folder, os.path.basename(path)) if folder else os.path.basename(path)
                self._call("store artifacts", self.client.log_artifacts, self.run_id, path, where)
            elif os.path.isfile(path):
                self._call("store an artifact", self.client.log_artifact, self.run_id, path, folder)

    def finish(self, status="FINISHED"):
        self._call("end the run", self.client.set_terminated, self.run_id, status)

    def callback(self, log=print):
        """A Keras callback that logs each epoch's logs (loss, accuracy, their
        val_ forms, lr...) at step = the epoch's number, counted from 1.

        A tracking server that stops answering mid-run does not stop the
        training: the failure is reported once, and the epochs go on unlogged."""
        import keras

        failed = []

        def on_epoch_end(epoch, logs):
            if failed:
                return
            try:
                self.log_metrics(logs or {}, epoch + 1)
            except TfxferError as e:
                failed.append(e)
                log(f"note: {e} Training goes on; the later epochs are not logged to MLflow.")

        return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


def check_reachable(config):
    """With `tracking: mlflow`, fail now, in one sentence, when the store or
    server cannot be reached: before a run makes its folder or loads data."""
    if config.run.tracking != "mlflow":
        return
    uri = tracking_uri(config.run.mlflow)
    tracker = Tracker(_client(uri), None, uri)
    with _fail_fast():
        tracker._call("read the experiment", tracker.client.get_experiment_by_name, EXPERIMENT)


def open_tracker(config, folder, resume, parent=None, tags=None, log=print):
    """The `Tracker` of a command config whose `tracking` is `mlflow`, else `None`."""
    if config.run.tracking != "mlflow":
        return None
    flat = {key: value for group in config.to_dict().values() for key, value in group.items()}
    name = config.run.run_name or os.path.basename(os.path.normpath(folder))
    tags = {"tfxfer.command": config.COMMAND, **(tags or {})}
    tracker = Tracker.open(folder, config.run.mlflow, name, tags, flat, parent, resume)
    where = tracker.uri
    if where.startswith("file:"):
        from urllib.parse import unquote, urlparse

        where = f"{unquote(urlparse(where).path)} (`mlflow ui` in the folder that holds it opens it)"
    log(f"MLflow: run {tracker.run_id} of experiment {EXPERIMENT!r} in {where}")
    return tracker


def run_artifacts(run_dir):
    """What a finished finetune run logs: its plots, metrics, predictions and config."""
    files = sorted(glob.glob(os.path.join(run_dir, "*.png")))
    files += [os.path.join(run_dir, name) for name in ("metrics.json", "predictions.csv", "config.yaml", "backbone.json")]
    return [f for f in files if os.path.exists(f)]


def _text(value):
    text = "" if value is None else str(value)
    return text[:6000]  # MLflow's limit on a param value


def _is_number(value):
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _fail_fast():
    """MLflow retries a refused HTTP request 7 times with backoff: about four
    minutes (measured) before a mistyped server URI is reported. The first
    request of a run retries once, with a short timeout; the rest keep
    MLflow's (or the user's) settings, to ride out a busy server."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def ending(tracker):
    """End `tracker`'s run as MLflow should see it: KILLED on Ctrl-C (or
    SIGTERM), FAILED on an error; a run that finishes ends itself
    (`log_finished_run`). No tracker: nothing."""
    try:
        yield
    except KeyboardInterrupt:
        if tracker:
            with contextlib.suppress(TfxferError):
                tracker.finish("KILLED")
        raise
    except BaseException:
        if tracker:
            with contextlib.suppress(TfxferError):
                tracker.finish("FAILED")
        raise


def log_finished_run(tracker, run_dir, metrics):
    """A finished finetune run's test (and best-epoch validation) metrics,
    its files and its export, and the end of its MLflow run."""
    final = {"best_epoch": metrics.get("best_epoch")}
    for split in ("val", "test"):
        report = metrics.get(split)
        if not report:
            continue
        final[f"{split}_best_accuracy" if split == "val" else "test_accuracy"] = report["accuracy"]
        if split == "test":
            final.update({"test_loss": report["loss"], "test_macro_f1": report["macro"]["f1"],
                          "test_macro_recall": report["macro"]["recall"], "test_ece": report["calibration"]["ece"]})
            if "top_k" in report:
                final[f"test_top{report['top_k']['k']}_accuracy"] = report["top_k"]["accuracy"]
    tracker.log_metrics(final, step=metrics.get("epochs") or 0)
    tracker.log_artifacts(run_artifacts(run_dir))
    if metrics.get("export_dir"):
        tracker.log_artifacts([metrics["export_dir"]], "export")
    tracker.finish()
