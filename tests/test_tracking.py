"""MLflow tracking against a real local store, read back with MlflowClient."""

import json

import keras
import mlflow
import pytest

from tests.conftest import run_cli, write_splits

OPTIONS = ["--backbone", "tiny", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--lr", "0.05"]


def _client(store):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.as_uri())


def _artifacts(client, run_id, path=None):
    """Every artifact path of a run, recursively."""
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def test_finetune_logs_params_epochs_test_metrics_and_artifacts_to_mlruns(tmp_path, monkeypatch):
    data = write_splits(tmp_path / "data", train=12, test=4)
    monkeypatch.chdir(tmp_path)
    result = run_cli("finetune", "--data-dir", data, *OPTIONS, "--epochs", "3", "--mlflow", "--run-name", "tracked",
                     "--output-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    client = _client(tmp_path / "mlruns")  # a bare --mlflow is ./mlruns
    experiment = client.get_experiment_by_name("tfxfer")
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


class _Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("crash")


@pytest.mark.slow
def test_resume_continues_the_same_mlflow_run(tmp_path):
    import tfxfer

    data = write_splits(tmp_path / "data", train=12, test=4)
    store = tmp_path / "store"
    config = tfxfer.load_config(data_dir=str(data), backbone="tiny", weights="none", image_size=32, batch_size=8,
                                epochs=4, mlflow=str(store), run_name="crashy", output_dir=str(tmp_path / "runs"))
    with pytest.raises(RuntimeError):
        tfxfer.finetune(config, callbacks=[_Crash()], verbose=0)
    client = _client(store)
    (failed,) = client.search_runs([client.get_experiment_by_name("tfxfer").experiment_id])
    assert failed.info.status == "FAILED"
    assert len(client.get_metric_history(failed.info.run_id, "val_loss")) == 2

    result = run_cli("finetune", "--resume", "--run-name", "crashy", "--output-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
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


def test_tracking_mlflow_in_a_config_file_logs_to_mlruns(tmp_path, monkeypatch):
    data = write_splits(tmp_path / "data", train=6, test=2)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(f"data_dir: {data}\nbackbone: tiny\nweights: none\nimage_size: 32\n"
                                       "epochs: 1\nbatch_size: 8\ntracking: mlflow\n")
    result = run_cli("finetune", "--config", tmp_path / "run.yaml", "--output-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    client = _client(tmp_path / "mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("tfxfer").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["tracking"] == "mlflow"


def test_sigterm_ends_the_mlflow_run_killed_and_keeps_the_checkpoint_for_resume(tmp_path, monkeypatch):
    import os
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
    result = run_cli("finetune", "--data-dir", data, *OPTIONS, "--epochs", "3", "--mlflow", store, "--run-name", "stopped",
                     "--output-dir", tmp_path / "runs")
    assert result.exit_code == 143, result.output
    assert "Terminated; continue with: tfxfer finetune --resume --run-name stopped" in result.output
    client = _client(store)
    (run,) = client.search_runs([client.get_experiment_by_name("tfxfer").experiment_id])
    assert run.info.status == "KILLED"
    assert json.loads((tmp_path / "runs" / "stopped" / "checkpoint" / "state.json").read_text())["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) == before
