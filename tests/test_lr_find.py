"""The learning-rate range test: its rule on known curves, the command, and `finetune --lr auto`."""

import os

import numpy as np
import pytest
import yaml

from tests.conftest import run_cli, write_splits
from tfxfer.config import load_config
from tfxfer.errors import TfxferError
from tfxfer.lr_find import minimum_tenth, smooth


def test_smoothing_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])


def test_the_suggestion_lands_on_the_falling_part():
    lrs = np.logspace(-6, 0, 100)
    loss = np.where(lrs < 1e-4, 2.0, 2.0 - 0.5 * np.log10(lrs / 1e-4))  # falls from 1e-4 ...
    loss = np.where(lrs > 1e-2, 1.0 + 5 * np.log10(lrs / 1e-2), loss)  # ... to 1e-2, then blows up
    loss = loss + np.random.default_rng(0).normal(0, 0.01, loss.shape)  # noise does not cut the stretch
    suggestion = minimum_tenth(list(lrs), smooth(list(loss)))
    assert 3e-4 < suggestion < 3e-3


def test_lr_find_writes_a_plot_and_no_run_folder(tmp_path):
    data = write_splits(tmp_path / "data", train=8, test=2, classes=("cat", "dog"))
    plot = tmp_path / "sweep.png"
    result = run_cli("lr-find", "--data-dir", data, "--backbone", "resnet9", "--weights", "none", "--image-size", "32",
                     "--batch-size", "4", "--steps", "20", "--lr-decay", "0.5", "--plot", plot,
                     "--output-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "suggested lr:" in result.output and "minimum/10" in result.output
    assert plot.stat().st_size > 1000
    assert not (tmp_path / "runs").exists()


def test_bad_range_test_requests_get_one_sentence(tmp_path):
    data = write_splits(tmp_path / "data", train=4, test=2, classes=("cat", "dog"))
    result = run_cli("lr-find", "--data-dir", data, "--backbone", "resnet9", "--weights", "none", "--image-size", "32",
                     "--start-lr", "0")
    assert result.exit_code == 1 and "--start-lr must be above 0 and below --end-lr" in result.output
    with pytest.raises(TfxferError, match=r"Config key lr must be a number or auto, got 'fast'"):
        load_config(dataset="digits", lr="fast")
    with pytest.raises(TfxferError, match=r"--lr auto is for finetune"):
        from tfxfer.config import PretrainConfig

        load_config(kind=PretrainConfig, dataset="digits", lr="auto")


@pytest.mark.slow
def test_finetune_lr_auto_records_the_chosen_rate(tmp_path):
    data = write_splits(tmp_path / "data", train=8, test=2, classes=("cat", "dog"))
    result = run_cli("finetune", "--data-dir", data, "--backbone", "resnet9", "--weights", "none", "--image-size", "32",
                     "--batch-size", "4", "--epochs", "1", "--lr", "auto", "--output-dir", tmp_path / "runs",
                     "--run-name", "auto")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "auto"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    lr = saved["optim"]["lr"]
    assert isinstance(lr, float) and 1e-7 <= lr <= 10
    assert f"--lr auto: lr {lr:g}" in result.output
    assert os.path.getsize(run / "lr_find.png") > 1000


def test_a_strategy_may_set_lr_auto_over_a_study_s_shared_lr():
    from tfxfer.config import FinetuneConfig, config_from_flat

    config = config_from_flat({"dataset": "digits", "lr": "auto", "strategy": "full+lr=auto"}, FinetuneConfig)
    assert config.optim.lr == "auto"
    with pytest.raises(TfxferError, match="--lr 0.02 conflicts with --strategy full\\+lr=auto"):
        config_from_flat({"dataset": "digits", "lr": 0.02, "strategy": "full+lr=auto"}, FinetuneConfig)
