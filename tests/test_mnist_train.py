"""Training loop, resume after SIGKILL, DDP against one process, figure3 and table1 (tiny budgets)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from _mnist_common import MNIST_DIR, cli, cli_env, needs_mnist
from neuralode.experiments.mnist import MNISTConfig, lr_at, train


def test_lr_schedule_scales_with_epochs():
    cfg = MNISTConfig(epochs=16, batch_size=256)
    assert lr_at(0, 10, cfg) == pytest.approx(0.2)
    assert lr_at(59, 10, cfg) == pytest.approx(0.2)  # epoch 5.9 < 6
    assert lr_at(60, 10, cfg) == pytest.approx(0.02)  # 60/160 * 16 = 6
    assert lr_at(100, 10, cfg) == pytest.approx(0.002)
    assert lr_at(159, 10, cfg) == pytest.approx(0.0002)


def test_config_validation():
    with pytest.raises(ValueError, match="model='vgg'"):
        MNISTConfig(model="vgg")
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        MNISTConfig(epochs=0)
    with pytest.raises(ValueError, match="test-size must be a positive integer, got 0"):
        MNISTConfig(test_size=0)
    with pytest.raises(ValueError, match="gradient must be 'direct'"):
        MNISTConfig(model="rknet", gradient="adjoint")


def _learn(tmp_path, model, *, channels, train_size, batch_size, epochs, lr, **kw):
    torch.set_num_threads(1)
    cfg = MNISTConfig(
        model=model,
        data_dir=str(MNIST_DIR),
        epochs=epochs,
        train_size=train_size,
        test_size=500,
        batch_size=batch_size,
        lr=lr,
        augment=False,
        channels=channels,
        log_every=1,
        **{"val_size": 500, **kw},
    )
    m = train(cfg, tmp_path / model)
    its = [json.loads(s) for s in (tmp_path / model / "iterations.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in its[:3]) / 3, sum(r["loss"] for r in its[-3:]) / 3
    return m, first, last


@needs_mnist
def test_mlp_learns_on_a_small_slice(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALODE_QUIET", "1")
    m, first, last = _learn(tmp_path, "mlp", channels=64, train_size=2048, batch_size=32, epochs=1, lr=0.4)
    assert last < 0.8 * first, (first, last)
    assert m["val_error"] < 0.5 and m["test_error"] < 0.5  # chance: 0.9
    assert m["peak_memory_mb"] > 0
    if sys.platform.startswith("linux"):
        assert m["train_memory_mb"] is not None and 0 <= m["train_memory_mb"] <= m["peak_memory_mb"]
    for f in ("config.json", "metrics.jsonl", "metrics.json", "checkpoint.pt", "best.pt", "training.png"):
        assert (tmp_path / "mlp" / f).exists(), f


# The conv models normalise with GroupNorm(min(32, c)) groups, i.e. (nearly) per-channel, before a ReLU and a
# global average pool: at initialisation the pooled features hardly depend on the input and SGD sits on a
# plateau for the first few thousand images (the full-size ODE-Net run leaves it after ~40 batches of 128).
# The default-suite check is therefore that the training loss falls on one batch seen 20 times (fixed-step
# rk4 keeps the ODE models' cost down; dopri5 is covered elsewhere); the slow test checks accuracy well
# above chance after one epoch on a few thousand images at full width.
@needs_mnist
@pytest.mark.parametrize("model", ["resnet", "odenet", "rknet"])
def test_conv_models_loss_falls(tmp_path, model, monkeypatch):
    monkeypatch.setenv("NEURALODE_QUIET", "1")
    m, first, last = _learn(
        tmp_path,
        model,
        channels=8,
        train_size=32,
        batch_size=32,
        epochs=20,
        lr=0.4,
        lr_schedule="constant",
        method="rk4",
        step_size=0.5,
        val_size=0,
    )
    assert last < first - 0.05, (first, last)
    if model == "odenet":
        assert m["nfe_forward"] == 8 and m["nfe_backward"] > 0  # rk4: 4 evaluations per step, 2 steps
    if model == "rknet":
        assert m["nfe_forward"] == 8 and m["nfe_backward"] == 0


@needs_mnist
@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet", "odenet", "rknet"])
def test_conv_models_learn_well_above_chance(tmp_path, model, monkeypatch):
    monkeypatch.setenv("NEURALODE_QUIET", "1")
    m, first, last = _learn(
        tmp_path, model, channels=64, train_size=8192, batch_size=64, epochs=1, lr=0.2, lr_schedule="constant"
    )
    assert last < 0.7 * first, (first, last)
    assert m["val_error"] < 0.5 and m["test_error"] < 0.5


TINY = [
    "--data-dir",
    str(MNIST_DIR),
    "--model",
    "odenet",
    "--channels",
    "8",
    "--train-size",
    "512",
    "--val-size",
    "64",
    "--test-size",
    "64",
    "--batch-size",
    "32",
    "--threads",
    "1",
]


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@needs_mnist
@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_weights(tmp_path):
    # dopri5 with the adjoint, as in the real runs, at a loose tolerance to keep it quick
    args = [
        *TINY,
        "--train-size",
        "256",
        "--epochs",
        "2",
        "--checkpoint-every",
        "3",
        "--log-every",
        "1",
        "--tol",
        "1e-2",
    ]
    subprocess.run(cli("train", "mnist", *args, "--out", str(tmp_path / "a")), env=cli_env(), check=True)

    b = tmp_path / "b"
    proc = subprocess.Popen(
        cli("train", "mnist", *args, "--out", str(b)),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    log = b / "iterations.jsonl"
    while time.monotonic() < deadline:  # kill mid-epoch-1, between checkpoints
        if log.exists() and len(log.read_text().splitlines()) >= 4:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (b / "metrics.json").exists(), "the run finished before it was killed"
    n_logged = len(log.read_text().splitlines())
    subprocess.run(cli("train", "mnist", *args, "--out", str(b), "--resume"), env=cli_env(), check=True)

    wa, wb = _weights(tmp_path / "a" / "checkpoint.pt"), _weights(b / "checkpoint.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    strip = ("epoch_time_s", "images_per_s", "wall_time_s")
    ma, mb = (
        [
            {k: v for k, v in json.loads(s).items() if k not in strip}
            for s in (d / "metrics.jsonl").read_text().splitlines()
        ]
        for d in (tmp_path / "a", b)
    )
    assert ma == mb and len(ma) == 2
    assert (tmp_path / "a" / "iterations.jsonl").read_text() == log.read_text()
    assert n_logged < 2 * 8
    fa, fb = (
        json.loads((tmp_path / "a" / "metrics.json").read_text()),
        json.loads((b / "metrics.json").read_text()),
    )
    assert fa["test_error"] == fb["test_error"]


@needs_mnist
@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None
    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun not installed",
)
def test_ddp_two_processes_match_one_process(tmp_path):
    # One SGD step from zero momentum moves the weights by -lr * gradient: equal updates mean equal gradients
    # of the same global batch. A fixed-step solver makes each shard's solve the same as the whole batch's.
    args = [
        *TINY,
        "--train-size",
        "32",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--solver",
        "rk4",
        "--step-size",
        "0.25",
        "--gradient",
        "adjoint",
        "--lr",
        "0.8",
    ]
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    subprocess.run(cli("train", "mnist", *args, "--out", str(tmp_path / "one")), env=cli_env(), check=True)
    subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "neuralode",
            "train",
            "mnist",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        env=cli_env(),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    torch.manual_seed(0)
    from neuralode.experiments.mnist import make_model

    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["world_size"] == 2
    init = make_model(MNISTConfig(model="odenet", channels=8, method="rk4", step_size=0.25)).state_dict()
    w1, w2 = _weights(tmp_path / "one" / "checkpoint.pt"), _weights(tmp_path / "two" / "checkpoint.pt")
    moved = 0.0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
        moved = max(moved, (w1[k] - init[k]).abs().max().item())
    assert moved > 1e-3  # the step did something
    m1, m2 = (json.loads((tmp_path / d / "metrics.jsonl").read_text()) for d in ("one", "two"))
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5)
    assert m2["nfe_forward"] == m1["nfe_forward"] == 16  # rk4, 4 steps
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )


@needs_mnist
@pytest.mark.slow
def test_table1_and_figure3_commands_on_a_tiny_budget(tmp_path):
    out = tmp_path / "t1"
    subprocess.run(
        cli(
            "table1",
            "--out",
            str(out),
            "--models",
            "mlp",
            "odenet",
            "--epochs",
            "1",
            "--data-dir",
            str(MNIST_DIR),
            "--train-size",
            "128",
            "--val-size",
            "64",
            "--test-size",
            "64",
            "--batch-size",
            "32",
            "--threads",
            "1",
            "--",
            "--channels",
            "8",
        ),
        env=cli_env(),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    table = (out / "table1.md").read_text()
    assert "| ODE-Net |" in table and "0.42%" in table and "| 1-layer MLP |" in table
    rows = json.loads((out / "table1.json").read_text())
    assert rows["mlp"]["params"] == 238_510 and rows["odenet"]["nfe_forward"] > 0
    subprocess.run(
        cli(
            "figure3",
            str(out / "odenet"),
            "--n-images",
            "8",
            "--tols",
            "1e-2",
            "1e-4",
            "--out",
            str(tmp_path / "f3"),
        ),
        env=cli_env(),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    f3 = json.loads((tmp_path / "f3" / "figure3.json").read_text())
    a, b = f3["sweep"]
    assert b["nfe_forward"] > a["nfe_forward"] and b["rel_error"] < a["rel_error"]
    assert a["adjoint_nfe_backward"] > 0 and len(f3["training"]) >= 1
    for panel in ("a_nfe_vs_error", "b_time_vs_nfe", "c_backward_vs_forward", "d_nfe_vs_epoch"):
        assert (tmp_path / "f3" / f"figure3_{panel}.png").stat().st_size > 1000


# -- fast stand-ins for the slow subprocess tests above, and the command line's refusals


def _tiny_cfg(**kw):
    base = dict(model="mlp", data_dir=str(MNIST_DIR), train_size=64, val_size=32, test_size=32, batch_size=32,
                augment=True, lr_schedule="constant", threads=1, checkpoint_every=1)  # fmt: skip
    return MNISTConfig(**{**base, **kw})


@needs_mnist
def test_resume_in_process_gives_identical_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALODE_QUIET", "1")
    train(_tiny_cfg(epochs=3), tmp_path / "straight")
    train(_tiny_cfg(epochs=1), tmp_path / "split")
    train(_tiny_cfg(epochs=3), tmp_path / "split", resume=True)  # constant schedule: epochs may grow
    wa, wb = _weights(tmp_path / "straight" / "checkpoint.pt"), _weights(tmp_path / "split" / "checkpoint.pt")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    strip = ("epoch_time_s", "images_per_s", "wall_time_s")
    ma, mb = (
        [
            {k: v for k, v in json.loads(s).items() if k not in strip}
            for s in (d / "metrics.jsonl").read_text().splitlines()
        ]
        for d in (tmp_path / "straight", tmp_path / "split")
    )
    assert ma == mb and len(ma) == 3


def _usage(capsys, *argv):
    from neuralode.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "mnist", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_missing_files_and_bad_options_are_usage_errors(tmp_path, capsys):
    never = str(tmp_path / "never")
    err = _usage(capsys, "--data-dir", str(tmp_path / "empty"), "--out", never)
    assert "mnist files missing in" in err and "--data-dir" in err
    for argv, message in (
        (["--epochs", "0"], "epochs must be a positive integer, got 0"),
        (["--test-size", "0"], "test-size must be a positive integer, got 0"),
        (["--batch-size", "-1"], "batch-size must be a positive integer, got -1"),
        (["--lr", "0"], "lr must be a positive finite number"),
        (["--method", "rk45"], "method='rk45' is not a solver"),
    ):
        assert message in _usage(capsys, *argv, "--out", never)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _usage(capsys, "--device", "cuda", "--out", never)
    assert not (tmp_path / "never").exists()


@needs_mnist
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_data_file_is_a_usage_error_before_any_folder(tmp_path, capsys, damage):
    bad = tmp_path / "data"
    bad.mkdir()
    for f in MNIST_DIR.iterdir():
        if f.suffix == ".gz":
            (bad / f.name).write_bytes(f.read_bytes())
    victim = bad / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(victim.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    never = tmp_path / "never"
    err = _usage(capsys, "--data-dir", str(bad), "--out", str(never), "--epochs", "1")
    assert f"md5 check failed for {str(victim)!r}" in err and not never.exists()


@needs_mnist
def test_resume_refuses_a_new_schedule(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEURALODE_QUIET", "1")
    out = tmp_path / "run"
    train(_tiny_cfg(epochs=1, lr_schedule="paper"), out)
    err = _usage(capsys, "--out", str(out), "--resume", "--lr", "0.5")
    assert "--lr 0.5 differs from the resumed run's lr=0.1" in err
    err = _usage(capsys, "--out", str(out), "--resume", "--epochs", "4")  # the paper schedule spans --epochs
    assert "--epochs 4 differs" in err


def test_table1_refuses_existing_runs(tmp_path, capsys):
    from neuralode.cli import main

    (tmp_path / "t1" / "mlp").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        main(["table1", "--out", str(tmp_path / "t1"), "--models", "mlp"])
    assert exc.value.code == 2 and "already holds runs of mlp" in capsys.readouterr().err


def test_a_batch_that_does_not_split_across_processes_is_refused_before_any_folder(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "3")
    never = tmp_path / "never"
    err = _usage(capsys, "--batch-size", "128", "--out", str(never), "--data-dir", str(tmp_path))
    assert "must be divisible by the number of processes (3)" in err and not never.exists()
