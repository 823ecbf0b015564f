"""python -m rbd_cuda.intrinsic_dim: d_int90 and the end-to-end command on a small synthetic dataset."""

import json
import math

import pytest
import torch

from rbd_experiments import data, intrinsic_dim


def test_d_int_is_the_smallest_dim_reaching_the_target():
    assert intrinsic_dim.d_int([400, 100, 200, 800], [0.90, 0.50, 0.86, 0.95], 0.88)["d_int"] == 400
    assert intrinsic_dim.d_int([100, 200], [0.91, 0.95], 0.90) == {"d_int": 100, "interpolated": None}
    assert intrinsic_dim.d_int([100, 200], [0.5, 0.6], 0.9) == {"d_int": None, "interpolated": None}
    # a later dip below the target does not matter: the first crossing counts
    assert intrinsic_dim.d_int([100, 200, 400], [0.95, 0.80, 0.97], 0.9)["d_int"] == 100


def test_d_int_interpolates_in_log_d_between_the_neighbours():
    found = intrinsic_dim.d_int([100, 400], [0.80, 0.90], 0.85)
    assert found["d_int"] == 400
    assert math.isclose(found["interpolated"], 200.0)  # halfway in accuracy = halfway in log d


def tiny_mnist(name, root=None, **kwargs):
    """1×8×8 uint8 images, each its class's random template plus as much noise: learnable, and fast."""
    gen = torch.Generator().manual_seed(0)
    templates = torch.rand(10, 1, 8, 8, generator=gen)

    def split(n):
        y = torch.randint(0, 10, (n,), generator=gen)
        x = 0.5 * templates[y] + 0.5 * torch.rand(n, 1, 8, 8, generator=gen)
        return (255 * x).to(torch.uint8), y

    return data.Splits(name, *split(1200), *split(300), *split(300))


def test_the_command_writes_json_and_a_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(intrinsic_dim.data, "load", tiny_mnist)
    out = tmp_path / "run"
    argv = ["--model", "fc", "--dataset", "mnist", "--dims", "40", "5", "--epochs", "2", "--batch-size", "60",
            "--lr", "0.01", "--out", str(out), "--threads", "1"]
    result = intrinsic_dim.run(intrinsic_dim.parse_args(argv))
    saved = json.loads((out / "intrinsic_dim.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert (out / "intrinsic_dim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert saved["numel"] == 64 * 128 + 128 + 128 * 10 + 10
    assert [r["dim"] for r in saved["subspace"]] == [5, 40]  # sorted
    assert [r["trainable"] for r in saved["subspace"]] == [5, 40]
    base = saved["baseline"]
    assert base["steps"] == 40 and len(base["curve"]) == 2  # 1200 / 60 = 20 steps per epoch
    assert base["val_accuracy"] > 0.5  # chance is about 0.1: the direct run learned the teacher
    assert all(run["steps"] == 40 and run["step_time_median_s"] > 0 for run in saved["subspace"])
    assert saved["subspace"][1]["val_accuracy"] > 0.3  # d = 40 learned something (chance: about 0.1)
    assert math.isclose(saved["target_accuracy"], 0.9 * base["val_accuracy"])
    expected = intrinsic_dim.d_int([5, 40], [r["val_accuracy"] for r in saved["subspace"]],
                                   saved["target_accuracy"])
    assert saved["d_int"] == expected["d_int"]
    assert saved["settings"]["distribution"] == "normal" and saved["settings"]["optimizer"] == "adam"
    err = capsys.readouterr().err
    assert "direct training: val" in err and "d = 40: val" in err and "wrote" in err


def test_said_and_a_given_baseline(tmp_path, monkeypatch):
    monkeypatch.setattr(intrinsic_dim.data, "load", tiny_mnist)
    result = intrinsic_dim.run(intrinsic_dim.parse_args([
        "--dims", "8", "--epochs", "0.5", "--batch-size", "100", "--said", "--compartments", "layer",
        "--no-baseline", "--baseline-accuracy", "0.5", "--out", str(tmp_path), "--threads", "1"]))
    (run,) = result["subspace"]
    assert run["trainable"] == 2 * 8 + 2  # two layers, 8 directions and one λ each
    assert run["steps"] == 6  # half an epoch of 12 steps
    assert result["target_accuracy"] == 0.45
    assert (tmp_path / "intrinsic_dim.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--dims", "0"], "--dims"), (["--dims", "10", "--threshold", "1.5"], "--threshold"), (["--epochs", "0"], "--epochs"),
    (["--no-baseline"], "--baseline-accuracy"), (["--compartments", "rows"], "--compartments"), (["--model", "vgg"], "--model"),
    (["--threads", "0"], "--threads must be at least 1"), (["--seed", str(2**64)], "--seed must be in"),
    (["--no-baseline", "--baseline-accuracy", "1.5"], "--baseline-accuracy must be"),
    (["--no-baseline", "--baseline-accuracy", "nan"], "--baseline-accuracy must be"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        intrinsic_dim.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err
