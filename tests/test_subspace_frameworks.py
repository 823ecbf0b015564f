"""rbd_cuda.nn.RandomSubspace as the model of real training frameworks: the Hugging Face Trainer
(safetensors checkpoints) and Lightning. Each trains, checkpoints, and resumes bit for bit as the
uninterrupted run."""

import copy
import inspect
import json
import pickle
import types

import pytest
import torch
from torch import nn

from rbd_cuda.nn import RandomSubspace

REASON = "{} is in requirements-dev.txt (pip install -r requirements-dev.txt)"


# ---- Hugging Face transformers ------------------------------------------------------------------


def tiny_gpt2():
    transformers = pytest.importorskip("transformers", reason=REASON.format("transformers"))
    torch.manual_seed(0)
    # GPT-2 ties its output matrix to the token embedding: the wrapper keeps one θ₀ for both.
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def token_data(n=24, length=8):
    ids = torch.randint(0, 32, (n, length), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


def hf_trainer(wrapper, out, max_steps, stop_at=None, **kw):
    """A Trainer of ``max_steps`` steps (the learning rate decays over them) that saves a checkpoint
    every 3 steps and, with ``stop_at``, is interrupted after that step."""
    transformers = pytest.importorskip("transformers", reason=REASON.format("transformers"))
    pytest.importorskip("accelerate", reason=REASON.format("accelerate"))

    class Interrupt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **_):
            control.should_training_stop = state.global_step == stop_at
    # remove_unused_columns keeps its default (True): the Trainer keeps the columns the wrapper's
    # forward names, which are the wrapped model's.
    args = transformers.TrainingArguments(str(out), max_steps=max_steps, per_device_train_batch_size=4,
                                          learning_rate=0.05, save_steps=3, save_strategy="steps", logging_steps=1,
                                          report_to=[], use_cpu=True, seed=7, dataloader_num_workers=0,
                                          disable_tqdm=True, **kw)
    return transformers.Trainer(model=wrapper, args=args, train_dataset=token_data(), callbacks=[Interrupt()])


def test_the_hf_trainer_trains_checkpoints_with_safetensors_and_resumes_bit_exactly(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch", reason=REASON.format("safetensors"))
    whole = RandomSubspace(tiny_gpt2(), 8, seed=3)
    hf_trainer(whole, tmp_path / "whole", 6).train()
    assert whole.c.abs().sum() > 0

    first = RandomSubspace(tiny_gpt2(), 8, seed=3)
    hf_trainer(first, tmp_path / "part", 6, stop_at=3).train()
    checkpoint = tmp_path / "part" / "checkpoint-3"
    saved = safetensors.load_file(checkpoint / "model.safetensors")
    assert json.loads(bytes(saved["_extra_state"].tolist())) == first.subspace_config()
    assert torch.equal(saved["c"], first.c.detach())

    resumed = RandomSubspace(tiny_gpt2(), 8, seed=3)
    hf_trainer(resumed, tmp_path / "part", 6).train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(resumed.c, whole.c)
    ids = torch.arange(8).view(1, 8)
    resumed.eval(), whole.eval()  # no dropout
    assert torch.equal(resumed(input_ids=ids).logits, whole(input_ids=ids).logits)


def test_the_wrapper_shows_the_wrapped_forwards_signature():
    # The HF Trainer keeps the dataset columns this signature names (the training test above).
    model = tiny_gpt2()
    expected = inspect.signature(model.forward)
    wrapper = RandomSubspace(model, 8, seed=3)
    assert inspect.signature(wrapper.forward) == expected
    assert "input_ids" in expected.parameters
    # Copies keep it; a framework may still replace forward (accelerate's autocast does).
    assert inspect.signature(copy.deepcopy(wrapper).forward) == expected
    assert inspect.signature(pickle.loads(pickle.dumps(wrapper)).forward) == expected
    ids = torch.arange(8).view(1, 8)
    wrapper.eval()
    logits = wrapper(input_ids=ids).logits
    wrapper.forward = types.MethodType(wrapper.forward.__func__, wrapper)
    assert torch.equal(wrapper(input_ids=ids).logits, logits)


def test_the_hf_trainer_refuses_a_checkpoint_of_another_subspace(tmp_path):
    first = RandomSubspace(tiny_gpt2(), 8, seed=3)
    hf_trainer(first, tmp_path, 6, stop_at=3).train()
    other = RandomSubspace(tiny_gpt2(), 8, seed=4)
    before = other.c.detach().clone()
    with pytest.raises(ValueError, match="seed: 3 saved, 4 here"):
        hf_trainer(other, tmp_path, 6).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert torch.equal(other.c, before)


def test_the_wrapped_models_save_pretrained_and_generate_point_to_export(tmp_path):
    transformers = pytest.importorskip("transformers", reason=REASON.format("transformers"))
    wrapper = RandomSubspace(tiny_gpt2(), 8, seed=3).eval()  # no dropout
    with torch.no_grad():
        wrapper.c.normal_()
    prompt = torch.tensor([[1, 2, 3]])
    # The wrapped module holds θ₀: it must not save or generate as if it were the trained model.
    for call in (lambda m: m.save_pretrained(tmp_path / "theta0"), lambda m: m.generate(prompt, max_new_tokens=2)):
        with pytest.raises(RuntimeError, match=r"holds θ₀ .* call wrapper.export\(\)"):
            call(wrapper.module)
    # A Seq2SeqTrainer calls model.generate, on the wrapper.
    with pytest.raises(RuntimeError, match=r"holds θ₀ .* call wrapper.export\(\).generate"):
        wrapper.generate(prompt, max_new_tokens=2)

    plain = wrapper.export()
    plain.save_pretrained(tmp_path / "trained")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "trained")
    ids = torch.arange(8).view(1, 8)
    expected = wrapper(input_ids=ids).logits
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    generated = plain.generate(prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)
    # Greedy decoding: the first new token is the wrapper's argmax after the prompt.
    assert generated[0, 3] == wrapper(input_ids=prompt).logits[0, -1].argmax()


# ---- Lightning ----------------------------------------------------------------------------------


def lightning():
    return pytest.importorskip("lightning", reason=REASON.format("lightning"))


def subspace_module(**kw):
    L = lightning()

    class Subspace(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = RandomSubspace(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), 5, seed=2, **kw)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x.to(self.model.module[0].weight.dtype)).float(), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.model.parameters(), lr=0.05)

    return Subspace()


def lightning_fit(module, root, max_epochs, ckpt_path=None, **kw):
    L = lightning()
    gen = torch.Generator().manual_seed(5)
    data = torch.utils.data.TensorDataset(torch.randn(24, 6, generator=gen), torch.randint(0, 3, (24,), generator=gen))
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, default_root_dir=root,
                        enable_progress_bar=False, enable_model_summary=False, **kw)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    return trainer


def test_lightning_fits_checkpoints_and_resumes_bit_exactly(tmp_path):
    whole = subspace_module(compartments="layer", said=True)
    lightning_fit(whole, tmp_path / "whole", 2)

    first = subspace_module(compartments="layer", said=True)
    trainer = lightning_fit(first, tmp_path / "part", 1)
    path = tmp_path / "part" / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert json.loads(bytes(state["model._extra_state"].tolist())) == first.model.subspace_config()

    resumed = subspace_module(compartments="layer", said=True)
    lightning_fit(resumed, tmp_path / "resumed", 2, ckpt_path=path)
    assert whole.model.c.abs().sum() > 0
    assert torch.equal(resumed.model.c, whole.model.c)
    assert torch.equal(resumed.model.lambdas, whole.model.lambdas)

    other = subspace_module(compartments="global", said=True)
    with pytest.raises(ValueError, match="compartment 0's numel: 56 saved, 83 here"):
        lightning_fit(other, tmp_path / "other", 2, ckpt_path=path)


def test_lightning_true_half_precision_keeps_the_coefficients_fp32(tmp_path):
    module = subspace_module()
    lightning_fit(module, tmp_path, 1, precision="bf16-true")
    assert module.model.module[0].weight.dtype == torch.bfloat16
    assert module.model.c.dtype == torch.float32 and module.model.c.abs().sum() > 0
