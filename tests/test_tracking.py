"""MLflow tracking against a real local store, read back with MlflowClient."""

import json
import os

import keras
import mlflow
import pytest

from tests.conftest import run_cli, write_splits

OPTIONS = ["--backbone", "tiny", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--lr", "0.05"]


def _client(store):
    """A client of the folder store `store`."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.as_uri())


def _default_store_client(folder, monkeypatch):
    """A plain client of the store a bare --mlflow made in `folder`, as a user
    would open it: without the switch that MLflow 3.13+ wants for folder stores."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    return mlflow.MlflowClient(tracking_uri="sqlite:///" + os.path.abspath(folder / "mlflow.db"))


def _artifacts(client, run_id, path=None):
    """Every artifact path of a run, recursively."""
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def test_finetune_logs_params_epochs_test_metrics_and_artifacts_to_mlflow_db(tmp_path, monkeypatch):
    data = write_splits(tmp_path / "data", train=12, test=4)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    result = run_cli("finetune", "--data-dir", data, *OPTIONS, "--epochs", "3", "--mlflow", "--run-name", "tracked",
                     "--output-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert f"in {tmp_path / 'mlflow.db'} (`mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}` opens it)" in result.output
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # MLflow's supported store needs no switch
    client = _default_store_client(tmp_path, monkeypatch)
    experiment = client.get_experiment_by_name("tfxfer")
    assert experiment.artifact_location == (tmp_path / "mlruns").as_uri()  # where `mlflow ui` here looks
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["lr"] == "0.05" and run.data.params["backbone"] == "tiny" and run.data.params["epochs"] == "3"
    assert {run.data.tags[k] for k in ("backbone", "weights", "strategy")} == {"tiny", "none", "full"}
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
    metrics = json.loads((tmp_path / "runs" / "tracked" / "metrics.json").read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert run.data.metrics["test_ece"] == pytest.approx(metrics["test"]["calibration"]["ece"])
    artifacts = _artifacts(client, run.info.run_id)
    for name in ("metrics.json", "predictions.csv", "config.yaml", "learning_curves.png", "confusion_matrix.png",
                 "reliability.png", "export/1/saved_model.pb", "export/1/tfxfer.json", "export/1/MODEL_CARD.md"):
        assert name in artifacts, name
    stored = tmp_path / "mlruns" / run.info.run_id / "artifacts" / "metrics.json"
    assert json.loads(stored.read_text()) == metrics
    record = json.loads((tmp_path / "runs" / "tracked" / "mlflow.json").read_text())
    assert record["tracking_uri"] == "sqlite:///" + str(tmp_path / "mlflow.db")  # absolute: --resume from anywhere


class _Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("crash")


@pytest.mark.slow
def test_resume_from_another_folder_continues_the_same_mlflow_run(tmp_path, monkeypatch):
    import tfxfer

    data = write_splits(tmp_path / "data", train=12, test=4)
    (tmp_path / "first").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    config = tfxfer.load_config(data_dir=str(data), backbone="tiny", weights="none", image_size=32, batch_size=8,
                                epochs=4, tracking="mlflow", run_name="crashy", output_dir=str(tmp_path / "runs"))
    with pytest.raises(RuntimeError):
        tfxfer.finetune(config, callbacks=[_Crash()], verbose=0)
    client = _default_store_client(tmp_path / "first", monkeypatch)
    (failed,) = client.search_runs([client.get_experiment_by_name("tfxfer").experiment_id])
    assert failed.info.status == "FAILED"
    assert len(client.get_metric_history(failed.info.run_id, "val_loss")) == 2

    monkeypatch.chdir(tmp_path / "elsewhere")
    result = run_cli("finetune", "--resume", "--run-name", "crashy", "--output-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert not os.listdir(tmp_path / "elsewhere")  # no second store where the resume was started
    (run,) = client.search_runs([client.get_experiment_by_name("tfxfer").experiment_id])
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss")) == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_study_is_a_parent_run_with_one_nested_run_per_strategy_and_seed(tmp_path):
    data = write_splits(tmp_path / "data", train=12, test=4)
    store = tmp_path / "store"
    result = run_cli("study", "--data-dir", data, *OPTIONS, "--epochs", "1", "--strategies", "scratch,head",
                     "--seeds", "0,1", "--mlflow", store, "--name", "tracked-study", "--output-dir", tmp_path / "studies")
    assert result.exit_code == 0, result.output
    client = _client(store)
    runs = client.search_runs([client.get_experiment_by_name("tfxfer").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["head-seed0", "head-seed1", "scratch-seed0", "scratch-seed1"]
    assert parent.info.status == "FINISHED" and "report.md" in _artifacts(client, parent.info.run_id)
    assert "test_accuracy_mean.head" in parent.data.metrics


def test_an_unreachable_tracking_server_is_one_sentence(tmp_path):
    data = write_splits(tmp_path / "data", train=6, test=2)
    result = run_cli("finetune", "--data-dir", data, *OPTIONS, "--epochs", "1", "--mlflow", "http://127.0.0.1:9",
                     "--output-dir", tmp_path / "runs")
    assert result.exit_code == 1
    assert "MLflow could not read the experiment at http://127.0.0.1:9" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing made: the same command works once the server is up


def test_a_store_that_cannot_be_opened_or_made_is_one_sentence(tmp_path, monkeypatch):
    data = write_splits(tmp_path / "data", train=6, test=2)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlflow.db").write_text("notes, not a database")
    result = run_cli("finetune", "--data-dir", data, *OPTIONS, "--epochs", "1", "--mlflow", "--output-dir", tmp_path / "runs")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"MLflow could not open the store at sqlite:///{tmp_path / 'mlflow.db'} (" in result.output
    # MLflow makes missing folders, but not below a file.
    (tmp_path / "notes.txt").write_text("a file")
    missing = tmp_path / "notes.txt" / "runs" / "mlflow.db"
    result = run_cli("finetune", "--data-dir", data, *OPTIONS, "--epochs", "1", "--mlflow", f"sqlite:///{missing}",
                     "--output-dir", tmp_path / "runs")
    assert result.exit_code == 1
    assert f"MLflow cannot make its store {missing}: {tmp_path / 'notes.txt'} is not a folder this user can write" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


def test_tracking_mlflow_in_a_config_file_logs_to_mlflow_db(tmp_path, monkeypatch):
    data = write_splits(tmp_path / "data", train=6, test=2)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(f"data_dir: {data}\nbackbone: tiny\nweights: none\nimage_size: 32\n"
                                       "epochs: 1\nbatch_size: 8\ntracking: mlflow\n")
    result = run_cli("finetune", "--config", tmp_path / "run.yaml", "--output-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    client = _default_store_client(tmp_path, monkeypatch)
    (run,) = client.search_runs([client.get_experiment_by_name("tfxfer").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["tracking"] == "mlflow"


def test_a_bare_folder_is_a_folder_store_and_a_relative_database_is_made_absolute(tmp_path, monkeypatch):
    from tfxfer.tracking import tracking_uri

    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == tracking_uri("sqlite:///mlflow.db") == "sqlite:///" + str(tmp_path / "mlflow.db")
    assert tracking_uri("store") == tracking_uri(str(tmp_path / "store")) == (tmp_path / "store").as_uri()
    assert tracking_uri("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_sigterm_ends_the_mlflow_run_killed_and_keeps_the_checkpoint_for_resume(tmp_path, monkeypatch):
    import signal

    import tfxfer.training

    data = write_splits(tmp_path / "data", train=6, test=2)
    store = tmp_path / "store"
    before = signal.getsignal(signal.SIGTERM)
    train = tfxfer.training._train

    def stop_after_the_first_epoch(epoch, logs):
        # Only with the command's handler in place: Python's default would end this test process.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None, before)
        os.kill(os.getpid(), signal.SIGTERM)

    def terminated(*args, **kwargs):
        args = list(args)
        args[5] = [*args[5], keras.callbacks.LambdaCallback(on_epoch_end=stop_after_the_first_epoch)]
        return train(*args, **kwargs)

    monkeypatch.setattr(tfxfer.training, "_train", terminated)
    # An explicit folder is a folder store still, opened without the user setting MLflow 3.13+'s switch.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    result = run_cli("finetune", "--data-dir", data, *OPTIONS, "--epochs", "3", "--mlflow", store, "--run-name", "stopped",
                     "--output-dir", tmp_path / "runs")
    assert result.exit_code == 143, result.output
    assert "Terminated; continue with: tfxfer finetune --resume --run-name stopped" in result.output
    assert (store / "0" / "meta.yaml").exists() and not (tmp_path / "mlflow.db").exists()
    client = _client(store)
    (run,) = client.search_runs([client.get_experiment_by_name("tfxfer").experiment_id])
    assert run.info.status == "KILLED"
    assert json.loads((tmp_path / "runs" / "stopped" / "checkpoint" / "state.json").read_text())["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) == before
