"""Experiment tracking in MLflow (`--mlflow [URI]`, `tracking: mlflow`).

One MLflow run per tfxfer run: the resolved config as params, each epoch's
metrics at their epoch as step, the test metrics, the run's plots, metrics,
predictions and export as artifacts. A study is a parent run with one nested
run per strategy, seed and fold. The MLflow run's id is kept in the run folder
(`mlflow.json`), so `--resume` continues the same MLflow run.

The default store is MLflow 3's own, ./mlflow.db with artifacts in ./mlruns:
`mlflow ui` started in that folder opens both. A folder given as the store is
a folder store, as before MLflow 3, which MLflow 3.13+ opens only when asked.

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
# MLflow 3's own default store and artifact root: `mlflow ui` started in the same folder opens them.
DEFAULT_STORE = "sqlite:///mlflow.db"
ARTIFACTS_FOLDER = "mlruns"
EXPERIMENT = "tfxfer"
# MLflow takes at most this many params, and this many metrics, per log_batch call.
_PARAMS_PER_CALL, _METRICS_PER_CALL = 100, 1000


def tracking_uri(uri=None):
    """The store to track into: by default ./mlflow.db (`DEFAULT_STORE`). A URI
    with a scheme (http://, sqlite:///, file:) as it is, a relative SQLite
    database made absolute; a folder as the file: URI of its absolute path, a
    folder store, as before MLflow 3. Absolute, so that a resumed run finds the
    same store from any working directory."""
    uri = uri or DEFAULT_STORE
    if "://" in uri:
        scheme = uri.split("://", 1)[0].lower()
        if scheme not in KNOWN_SCHEMES and "+" not in scheme:  # postgresql+psycopg2:// and the like pass
            raise TfxferError(f"--mlflow {uri}: unknown scheme {scheme!r}; MLflow takes "
                              f"{', '.join(s + '://' for s in KNOWN_SCHEMES)}, or a folder.")
        if _is_sqlite(uri):
            return _absolute_sqlite(uri)
        return uri
    if uri.startswith(("file:", "databricks")):
        return uri
    return pathlib.Path(os.path.abspath(uri)).as_uri()


# The tracking URI schemes MLflow's stores understand.
KNOWN_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")


def _is_sqlite(uri):
    return "://" in uri and uri.split("://", 1)[0].lower().split("+")[0] == "sqlite"


def _sqlite_url(uri):
    """SQLAlchemy's reading of a sqlite:// URI, or `None` without SQLAlchemy
    (then there is no MLflow either, and `_client` says so)."""
    try:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
    except ImportError:
        return None
    try:
        return make_url(uri)
    except ArgumentError:
        raise TfxferError(f"--mlflow {uri}: not a SQLite URI; write sqlite:///FILE (relative) or sqlite:////FILE.") from None


def _sqlite_file(uri):
    """The database file of a sqlite:// URI, `None` for an in-memory one."""
    url = _sqlite_url(uri) if _is_sqlite(uri) else None
    database = url.database if url is not None else None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return database


def _absolute_sqlite(uri):
    database = _sqlite_file(uri)
    if database is None or os.path.isabs(database):
        return uri
    # SQLAlchemy renders the path escaped as its own version reads it back (2.1 decodes %XX, 2.0 not).
    absolute = pathlib.Path(os.path.abspath(database)).as_posix()
    return _sqlite_url(uri).set(database=absolute).render_as_string(hide_password=False)


def _artifact_root(uri):
    """Where a SQLite store's tfxfer experiment keeps its artifacts: ./mlruns
    beside the database, as `mlflow ui` started beside it would; other stores
    keep MLflow's (or their server's) choice."""
    database = _sqlite_file(uri)
    if database is None:
        return None
    return pathlib.Path(os.path.dirname(os.path.abspath(database)), ARTIFACTS_FOLDER).as_uri()


def _mlflow_installed():
    try:
        import mlflow.tracking  # noqa: F401
    except ImportError:
        raise TfxferError("--mlflow needs the mlflow package: pip install 'tfxfer[mlflow]'.") from None


def _client(uri):
    _mlflow_installed()
    from mlflow.tracking import MlflowClient

    if uri.startswith("file:"):
        # A folder given on purpose is a folder store, which MLflow 3.13+ opens only behind this switch;
        # without it, runs tracked into ./mlruns before tfxfer moved to SQLite could not be resumed.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    # A database store is opened, its tables made, as the client is made: a file that is no
    # database fails here, not at the first call.
    return _calling("open the store", uri, MlflowClient, tracking_uri=uri)


def _calling(what, uri, function, *args, **kwargs):
    """`function(*args, **kwargs)`, a store's or server's failure as one sentence."""
    from mlflow.exceptions import MlflowException

    failures = (MlflowException, OSError)
    try:
        from sqlalchemy.exc import SQLAlchemyError

        failures += (SQLAlchemyError,)  # a database store lets some of these through unwrapped
    except ImportError:
        pass
    try:
        return function(*args, **kwargs)
    except failures as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if uri.startswith("file:") or _is_sqlite(uri):
            advice = "check that it is an MLflow store this user can write, or give another with --mlflow URI"
        else:
            advice = "check the tracking URI and that its server is up, or drop the URI to track into ./mlflow.db"
        raise TfxferError(f"MLflow could not {what} at {uri} ({first[:200]}); {advice}.") from None


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
            "create the experiment", tracker.client.create_experiment, EXPERIMENT, artifact_location=_artifact_root(uri))
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
        return _calling(what, self.uri, function, *args, **kwargs)

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
    local = _local_store(uri)
    if local and not os.path.exists(local):
        # The run makes a local store when it opens its tracker, not here: a run resumed from another
        # folder tracks into the store its record names, and would leave an empty one behind here.
        _mlflow_installed()
        folder = os.path.dirname(local)
        while not os.path.exists(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)  # MLflow makes the missing folders below the nearest one that exists
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise TfxferError(f"MLflow cannot make its store {local}: {folder} is not a folder this user can write; "
                              "give another store with --mlflow URI.")
        return
    tracker = Tracker(_client(uri), None, uri)
    with _fail_fast():
        tracker._call("read the experiment", tracker.client.get_experiment_by_name, EXPERIMENT)


def _local_store(uri):
    """The database file or folder of a store on this machine, else `None`."""
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return os.path.abspath(unquote(urlparse(uri).path))
    database = _sqlite_file(uri)
    return os.path.abspath(database) if database else None


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
        where = f"{_local_store(where)} (`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {where}` opens it)"
    elif _sqlite_file(where):
        database = _local_store(where)
        # Named even for ./mlflow.db: MLflow 3's `mlflow ui` prefers a ./mlruns folder store, which
        # earlier versions of tfxfer left there, to ./mlflow.db.
        where = f"{database} (`mlflow ui --backend-store-uri {where}` opens it)"
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
