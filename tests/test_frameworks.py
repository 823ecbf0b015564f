"""The optimizers inside real training frameworks: the Hugging Face Trainer (transformers, on
accelerate) and Lightning, on tiny models from configs and synthetic data (seconds each).

Covered: RBD with a scheduler, the Trainer's decay/no-decay param groups (the decoupled rule),
gradient clipping, save and resume bit for bit against an uninterrupted run, bf16 autocast, and
NES through its documented Lightning recipe (manual optimization). RandomSubspace as the model is
tests/test_subspace_frameworks.py's."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F

from rbd_cuda.optim import NES, RBD

INSTALL = "pip install -r requirements-dev.txt"


# ---- Hugging Face Trainer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers", reason=f"the HF Trainer tests need transformers ({INSTALL})")
    pytest.importorskip("accelerate", reason=f"the HF Trainer runs on accelerate ({INSTALL})")
    transformers.logging.set_verbosity_error()
    return transformers


class TokenData(torch.utils.data.Dataset):
    """24 random sequences of 8 tokens, labels = inputs (causal LM)."""

    def __init__(self):
        self.ids = torch.randint(0, 64, (24, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2(hf):
    torch.manual_seed(0)
    config = hf.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return hf.GPT2LMHeadModel(config)


def hf_train(hf, out, *, max_steps=6, weight_decay=0.1, resume=None, **args):
    model = gpt2(hf)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    training = hf.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=0.05,
        lr_scheduler_type="linear", weight_decay=weight_decay, max_grad_norm=1.0, save_strategy="steps",
        save_steps=3, report_to="none", use_cpu=True, seed=0, disable_tqdm=True, logging_strategy="no",
        dataloader_num_workers=0, **args)
    trainer = hf.Trainer(model=model, args=training, train_dataset=TokenData(), optimizer_cls_and_kwargs=(
        RBD, {"lr": 0.05, "dim": 12, "compartments": "tensor", "seed": 3}))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, initial, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_hf_trainer_trains_clips_accumulates_and_resumes_bit_identically(hf, tmp_path):
    trainer, initial, final = hf_train(hf, tmp_path / "run", gradient_accumulation_steps=2)
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, RBD) and opt.steps_taken == 6
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["lr"] == 0.0  # the linear schedule ran to its end
    assert any(not torch.equal(initial[n], final[n]) for n in final)
    # A second Trainer resumes from the first one's checkpoint at step 3.
    resumed, _, resumed_final = hf_train(hf, tmp_path / "resumed", resume=str(tmp_path / "run" / "checkpoint-3"),
                                         gradient_accumulation_steps=2)
    assert resumed.state.global_step == 6
    for n in final:
        assert torch.equal(final[n], resumed_final[n]), n


def test_hf_trainer_weight_decay_follows_the_decoupled_rule(hf, tmp_path):
    """One step with the Trainer's groups (weights decayed, biases and LayerNorms not): the decayed
    weights are θ₀(1 − lr·wd) plus the update of the run without decay (the clipped gradient and
    the basis do not depend on wd); the others are that run's, bit for bit."""
    wd, lr = 0.5, 0.05
    _, initial, plain = hf_train(hf, tmp_path / "plain", max_steps=1, weight_decay=0.0)
    trainer, _, decayed = hf_train(hf, tmp_path / "decayed", max_steps=1, weight_decay=wd)
    decay_names = set(trainer.get_decay_parameter_names(trainer.model))
    assert decay_names and len(decay_names) < len(decayed)
    for n, p in decayed.items():
        if n in decay_names:
            torch.testing.assert_close(p, initial[n] * (1 - lr * wd) + (plain[n] - initial[n]), rtol=0, atol=1e-6)
            assert not torch.equal(p, plain[n]), n
        else:
            assert torch.equal(p, plain[n]), n


def test_nes_under_the_hf_trainer_fails_at_its_first_step_naming_the_closure(hf, tmp_path):
    model = gpt2(hf)
    before = [p.detach().clone() for p in model.parameters()]
    training = hf.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                    report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = hf.Trainer(model=model, args=training, train_dataset=TokenData(), optimizer_cls_and_kwargs=(
        NES, {"lr": 0.1, "population": 4}))
    with pytest.raises(ValueError, match="NES.step needs a closure"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_hf_trainer_bf16_autocast(hf, tmp_path):
    trainer, initial, final = hf_train(hf, tmp_path / "bf16", max_steps=3, bf16=True)
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert opt.steps_taken == 3
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in final.values())
    assert any(not torch.equal(initial[n], final[n]) for n in final)


def accelerate_run(accelerate, micro_batches, *, load=None, save=None, save_after=None):
    """An accelerate loop: 2 micro-batches per step, clipping, a scheduler; ``save_state`` after
    micro-batch ``save_after``, ``load_state`` before the first."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = RBD(model.named_parameters(), lr=0.3, dim=8, compartments="layer", momentum=0.5, weight_decay=0.01, seed=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    if load is not None:
        accelerator.load_state(load)
    data = list(batches())
    for i in micro_batches:
        x, y = data[i % len(data)]
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            sched.step()
            opt.zero_grad()
        if i == save_after:
            accelerator.save_state(save)
    return opt.optimizer, weights(model)


def test_accelerate_loop_accumulates_clips_and_resumes_bit_identically(hf, tmp_path):
    import accelerate

    opt, uninterrupted = accelerate_run(accelerate, range(12), save=tmp_path / "state", save_after=5)
    assert opt.steps_taken == 6 and opt.param_groups[0]["lr"] == pytest.approx(0.3 * 0.8**6)
    resumed_opt, resumed = accelerate_run(accelerate, range(6, 12), load=tmp_path / "state")
    assert resumed_opt.steps_taken == 6
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed, strict=True))


# ---- Lightning -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def L():  # Lightning's customary name
    lightning = pytest.importorskip("lightning", reason=f"the Lightning tests need lightning ({INSTALL})")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    return lightning


def batches():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 10, generator=gen)
    y = (x @ torch.randn(10, 3, generator=gen)).argmax(1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


def lightning_trainer(L, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def lightning_fit(L, module, ckpt_path=None, **kw):
    trainer = lightning_trainer(L, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the number of training batches is small", workers, ...
        trainer.fit(module, batches(), ckpt_path=ckpt_path)
    return trainer


def rbd_module(L):
    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

        def training_step(self, batch, index):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = RBD(self.named_parameters(), lr=0.3, dim=8, compartments="layer", momentum=0.5, weight_decay=0.01,
                      seed=2)
            return {"optimizer": opt, "lr_scheduler": {
                "scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), "interval": "step"}}

    return Classifier()


def weights(module):
    return [p.detach().clone() for p in module.parameters()]


def test_lightning_trains_clips_accumulates_and_resumes_bit_identically(L, tmp_path):
    uninterrupted = rbd_module(L)
    before = weights(uninterrupted)
    fit = {"gradient_clip_val": 0.5, "accumulate_grad_batches": 2}
    trainer = lightning_fit(L, uninterrupted, max_epochs=2, **fit)
    opt = trainer.optimizers[0]
    assert isinstance(opt, RBD) and opt.steps_taken == 4  # 3 batches an epoch: steps after batches 2 and 3
    assert opt.param_groups[0]["lr"] == 0.3 * 0.5**2
    assert not all(torch.equal(a, b) for a, b in zip(before, uninterrupted.parameters(), strict=True))

    first = rbd_module(L)
    trainer = lightning_fit(L, first, max_epochs=1, **fit)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = rbd_module(L)
    trainer = lightning_fit(L, resumed, ckpt_path=tmp_path / "epoch1.ckpt", max_epochs=2, **fit)
    assert trainer.optimizers[0].steps_taken == 4
    for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lightning_bf16_autocast(L):
    module = rbd_module(L)
    before = weights(module)
    trainer = lightning_fit(L, module, max_epochs=1, precision="bf16-mixed")
    assert trainer.optimizers[0].steps_taken == 3
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def nes_module(L, manual: bool):
    class Evolved(L.LightningModule):
        """docs/optimizers.md's recipe: manual optimization, opt.step(closure) in training_step."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            self.automatic_optimization = not manual

        def training_step(self, batch, index):
            x, y = batch
            if not manual:
                return F.cross_entropy(self.net(x), y)
            # NES.step returns the population's mean loss, a float: log it, return nothing.
            self.log("train_loss", self.optimizers().step(lambda: F.cross_entropy(self.net(x), y)))
            return None

        def configure_optimizers(self):
            return NES(self.parameters(), lr=0.1, population=6, sigma=0.05, antithetic=True, seed=4)

    return Evolved()


def test_nes_under_lightning_manual_optimization_equals_a_plain_loop(L):
    module = nes_module(L, manual=True)
    trainer = lightning_fit(L, module, max_epochs=1)
    assert trainer.optimizers[0].steps_taken == 3 and "train_loss" in trainer.callback_metrics
    plain = nes_module(L, manual=True)
    opt = plain.configure_optimizers()
    for x, y in batches():
        opt.step(lambda x=x, y=y: F.cross_entropy(plain.net(x), y))
    for a, b in zip(module.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)


def test_nes_under_lightning_automatic_optimization_is_refused_at_its_first_closure(L):
    module = nes_module(L, manual=False)
    before = weights(module)
    with pytest.raises(ValueError, match="NES.step's closure ran a backward pass.*automatic_optimization = False"):
        lightning_fit(L, module, max_epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


# ---- torch.distributed.checkpoint ----------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda ps: RBD(ps, lr=0.1, dim=3), lambda ps: NES(ps, lr=0.1, population=4)],
                         ids=["rbd", "nes"])
def test_dcp_state_dict_helpers_count_no_step(make):
    # To create an optimizer's state they step it at lr 0 with zero gradients; counted, that step
    # would move every later basis, so saving a checkpoint would change the run.
    helpers = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    net = torch.nn.Linear(4, 3)
    opt = make(net.parameters())
    before = [p.detach().clone() for p in net.parameters()]
    saved = helpers.get_optimizer_state_dict(net, opt)
    assert opt.steps_taken == 0
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))
    assert all(p.grad is None for p in net.parameters())
    assert set(saved) == {"state", "param_groups"}


def test_an_rbd_run_saved_by_dcp_continues_as_one_not_saved():
    helpers = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    data = torch.randn(4, 8, 4, generator=torch.Generator().manual_seed(1))
    runs = []
    for save in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3)
        opt = RBD(net.parameters(), lr=0.1, dim=3)
        for x in data:
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if save:
                helpers.get_optimizer_state_dict(net, opt)
        runs.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert torch.equal(runs[0], runs[1])
