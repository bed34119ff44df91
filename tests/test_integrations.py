"""The integrations with Lightning, transformers and accelerate (also_fused/integrations, docs/integrations.md).

A framework's gradient accumulation must leave the params and pi bitwise where a plain loop over the
same batches leaves them (``weighted_loss`` and ``backward`` of loss / 2 on two micro-batches, then one
step), and a run resumed from a checkpoint must end bitwise where the uninterrupted run ends, pi
included. The examples of docs/integrations.md are the code below (test_doc_examples_are_the_tested_code).
CPU only, tiny models made here, no network.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import torch
import torch.nn.functional as F

import also_fused

# about 15 s on 2 idle cores, much of it importing the three frameworks; each is imported by the tests
# that use it, not at collection
ROOT = Path(__file__).resolve().parents[1]
MODES = ["optimistic", "descent-ascent"]


# ---------------------------------------------------------------- shared helpers
def _loader(n_batches: int = 8, batch_size: int = 8, seed: int = 1) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    n = n_batches * batch_size
    data = torch.utils.data.TensorDataset(torch.randn(n, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen),
                                          torch.randint(0, 3, (n,), generator=gen))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _leaves(obj: Any) -> list[Any]:
    """The tensors and plain values of a nested state, in a fixed order (dict keys sorted)."""
    if isinstance(obj, dict):
        return [leaf for key in sorted(obj, key=str) for leaf in [key, *_leaves(obj[key])]]
    if isinstance(obj, (list, tuple)):
        return [leaf for item in obj for leaf in _leaves(item)]
    return [obj]


def _state(params: Any, *owners: Any) -> list[Any]:
    """The params, then the state_dict of each owner (optimizer, ALSO, GroupWeights: pi and pi_mid included)."""
    out = [p.detach().clone() for p in params]
    for owner in owners:
        out += _leaves(owner.state_dict())
    return out


def _assert_bitwise(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), f"entry {i} differs"
        else:
            assert x == y, f"entry {i}: {x!r} != {y!r}"


def _pi_moved(pi: torch.Tensor) -> bool:
    return float((pi - 1.0 / pi.numel()).abs().max()) > 1e-3


def _plain_loop(model: torch.nn.Module, batches: list, opt: Any, weights: Any = None, accumulate: int = 2) -> None:
    """The reference: weighted_loss and backward of loss / accumulate per micro-batch, then one step."""
    owner = opt if weights is None else weights
    for i, (x, y, ids) in enumerate(batches):
        losses = F.cross_entropy(model(x), y, reduction="none")
        (owner.weighted_loss(losses, ids) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            if weights is not None:
                weights.step()
            opt.zero_grad()


# ---------------------------------------------------------------- the docs and the imports
def _doc_blocks() -> list[str]:
    text = (ROOT / "docs" / "integrations.md").read_text()
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def test_doc_examples_are_the_tested_code():
    """Every code block of docs/integrations.md is in this file, line for line (indentation aside)."""
    blocks = _doc_blocks()
    assert len(blocks) >= 8
    lines = [line.strip() for line in Path(__file__).read_text().splitlines()]
    for block in blocks:
        at = 0
        for line in (line.strip() for line in block.splitlines()):
            if not line:
                continue
            assert line in lines[at:], f"docs/integrations.md line {line!r} is not in the tests (in order)"
            at = lines.index(line, at) + 1


def test_package_imports_without_the_frameworks_and_modules_name_them():
    """``import also_fused`` needs torch alone; an integration without its package names the package."""
    code = textwrap.dedent("""
        import sys
        for name in ("lightning", "pytorch_lightning", "transformers", "accelerate"):
            sys.modules[name] = None  # any import of them fails
        import also_fused, also_fused.integrations
        assert not [m for m in sys.modules if m.startswith("also_fused.integrations.")]
        for module, package in (("lightning", "lightning"), ("transformers", "transformers"),
                                ("accelerate", "accelerate")):
            try:
                __import__("also_fused.integrations." + module)
            except ImportError as error:
                assert repr(package) in str(error), error
            else:
                raise AssertionError(module + " imported without its package")
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


# ---------------------------------------------------------------- Lightning
@functools.lru_cache(maxsize=None)
def _lightning_examples() -> tuple[Any, ...]:
    """The Lightning examples of docs/integrations.md (Lightning is imported here, when a test needs it)."""
    import lightning.pytorch as pl

    class GroupDRO(pl.LightningModule):
        def __init__(self, n_groups, mode="optimistic"):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
            self.n_groups, self.mode = n_groups, mode

        def configure_optimizers(self):
            return also_fused.ALSO(self.parameters(), n_groups=self.n_groups, mode=self.mode, loss_scale=1.0,
                                   lr=1e-2, pi_lr=0.1)

        def training_step(self, batch, batch_idx):
            x, y, group_ids = batch
            losses = F.cross_entropy(self.net(x), y, reduction="none")
            also = self.optimizers().optimizer
            return also.weighted_loss(losses, group_ids)

    from also_fused.integrations.lightning import GroupWeightsCallback

    class Classifier(pl.LightningModule):
        def __init__(self, weights):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
            self.weights = weights

        def configure_optimizers(self):
            return also_fused.AdamW(self.parameters(), lr=1e-2)

        def training_step(self, batch, batch_idx):
            x, y, group_ids = batch
            losses = F.cross_entropy(self.net(x), y, reduction="none")
            return self.weights.weighted_loss(losses, group_ids)

    return pl, GroupDRO, GroupWeightsCallback, Classifier


@pytest.fixture
def lightning_env(monkeypatch, tmp_path):
    """Quiet Trainers on the CPU (Lightning reads defaults from PL_TRAINER_* variables), run in tmp_path."""
    pytest.importorskip("lightning")
    for name, value in (("LOGGER", "False"), ("ENABLE_PROGRESS_BAR", "False"), ("ENABLE_MODEL_SUMMARY", "False"),
                        ("ENABLE_CHECKPOINTING", "False"), ("ACCELERATOR", "cpu"), ("DEVICES", "1")):
        monkeypatch.setenv(f"PL_TRAINER_{name}", value)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _saver(dirpath: Path) -> Any:
    """A checkpoint at the end of every epoch, all kept, named epoch=<n>.ckpt."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=dirpath, filename="{epoch}", every_n_epochs=1, save_top_k=-1)


@pytest.mark.parametrize("mode", MODES)
def test_lightning_also_accumulation_equals_plain_loop(mode, lightning_env):
    """accumulate_grad_batches=2 through Lightning == two weighted_loss + backward(loss / 2), then one step."""
    pl, GroupDRO, GroupWeightsCallback, Classifier = _lightning_examples()
    loader = _loader()
    torch.manual_seed(0)
    model = GroupDRO(n_groups=3, mode=mode)
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(max_epochs=3, accumulate_grad_batches=2)
    trainer.fit(model, loader)
    also = trainer.optimizers[0]
    assert isinstance(also, also_fused.ALSO) and _pi_moved(also.pi)
    assert not any(torch.equal(a, p) for a, p in zip(initial, model.parameters()))

    torch.manual_seed(0)
    net = GroupDRO(n_groups=3, mode=mode).net
    reference = also_fused.ALSO(net.parameters(), n_groups=3, mode=mode, loss_scale=1.0, lr=1e-2, pi_lr=0.1)
    _plain_loop(net, list(loader) * 3, reference)
    _assert_bitwise(_state(model.parameters(), also), _state(net.parameters(), reference))


@pytest.mark.parametrize("mode", MODES)
def test_lightning_also_resumes_bitwise(mode, lightning_env):
    """fit to epoch 3 saving at each epoch; fit from the epoch-0 checkpoint to epoch 3: the same params and ALSO
    state (Adam moments, pi, pi_mid), bit for bit."""
    pl, GroupDRO, GroupWeightsCallback, Classifier = _lightning_examples()
    loader = _loader()
    torch.manual_seed(0)
    model = GroupDRO(n_groups=3, mode=mode)
    trainer = pl.Trainer(max_epochs=3, accumulate_grad_batches=2, callbacks=[_saver(lightning_env)],
                         enable_checkpointing=True)
    trainer.fit(model, loader)
    torch.manual_seed(1)  # another init: everything comes from the checkpoint
    resumed = GroupDRO(n_groups=3, mode=mode)
    again = pl.Trainer(max_epochs=3, accumulate_grad_batches=2)
    again.fit(resumed, loader, ckpt_path=lightning_env / "epoch=0.ckpt")
    assert _pi_moved(trainer.optimizers[0].pi)
    _assert_bitwise(_state(model.parameters(), trainer.optimizers[0]),
                    _state(resumed.parameters(), again.optimizers[0]))


def _fit_classifier(loader: Any, checkpoint: Any = None, saver: Any = None) -> tuple[Any, Any, Any]:
    pl, GroupDRO, GroupWeightsCallback, Classifier = _lightning_examples()
    weights = also_fused.GroupWeights(n_groups=3, loss_scale=1.0, pi_lr=0.1)
    if saver is None:
        trainer = pl.Trainer(max_epochs=3, callbacks=[GroupWeightsCallback(weights)])
    else:
        trainer = pl.Trainer(max_epochs=3, callbacks=[GroupWeightsCallback(weights), saver], enable_checkpointing=True)
    torch.manual_seed(0 if checkpoint is None else 1)  # a resumed run takes everything from the checkpoint
    trainer.fit(Classifier(weights), loader, ckpt_path=checkpoint)
    return trainer.lightning_module, trainer.optimizers[0], weights


def test_lightning_group_weights_callback_trains_and_resumes_bitwise(lightning_env):
    """The callback steps pi once per optimizer step (pi moves; without the hook it would stay uniform), and a
    run resumed from the epoch-0 checkpoint ends bitwise where the uninterrupted one does, pi included."""
    pl, GroupDRO, GroupWeightsCallback, Classifier = _lightning_examples()
    loader = _loader()
    model, opt, weights = _fit_classifier(loader, saver=_saver(lightning_env))
    torch.manual_seed(0)
    initial = Classifier(weights)  # the uninterrupted run's init
    assert _pi_moved(weights.pi)
    assert not any(torch.equal(a, p) for a, p in zip(initial.parameters(), model.parameters()))
    ckpt = torch.load(lightning_env / "epoch=0.ckpt", weights_only=False)
    assert any("GroupWeightsCallback" in key for key in ckpt["callbacks"])
    model2, opt2, weights2 = _fit_classifier(loader, checkpoint=lightning_env / "epoch=0.ckpt")
    _assert_bitwise(_state(model.parameters(), opt, weights), _state(model2.parameters(), opt2, weights2))
    # the step hook is removed at teardown: a step outside the Trainer leaves pi alone
    pi = weights.pi.clone()
    opt.step()
    assert torch.equal(weights.pi, pi)


def test_lightning_fp16_scaler_skip_keeps_pi_and_torch_adamw_is_refused(lightning_env):
    """Under an fp16 GradScaler (a MixedPrecision plugin on the CPU) the step whose loss overflows leaves pi
    and the params as they were (found_inf reaches the hook); torch.optim.AdamW is refused at fit start."""
    pl, GroupDRO, GroupWeightsCallback, Classifier = _lightning_examples()
    from lightning.pytorch.plugins import MixedPrecision

    seen = []

    class Overflowing(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 2 else loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            seen.append((self.weights.pi.clone(), [p.detach().clone() for p in self.parameters()]))

    def scaled_trainer(weights):
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
        return pl.Trainer(max_epochs=1, plugins=[plugin], callbacks=[GroupWeightsCallback(weights)])

    weights = also_fused.GroupWeights(n_groups=3, loss_scale=1.0, pi_lr=0.1)
    torch.manual_seed(0)
    scaled_trainer(weights).fit(Overflowing(weights), _loader(n_batches=4))
    assert len(seen) == 4
    _assert_bitwise([seen[2][0], *seen[2][1]], [seen[1][0], *seen[1][1]])  # the skipped step
    assert not torch.equal(seen[3][0], seen[2][0]) and not torch.equal(seen[1][0], seen[0][0])

    class TorchAdamW(Classifier):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    weights = also_fused.GroupWeights(n_groups=3, loss_scale=1.0, pi_lr=0.1)
    with pytest.raises(ValueError, match="_step_supports_amp_scaling.*also_fused.AdamW"):
        scaled_trainer(weights).fit(TorchAdamW(weights), _loader(n_batches=4))
    assert torch.equal(weights.pi, torch.full((3,), 1 / 3))


def test_lightning_callback_refuses_also_and_several_optimizers(lightning_env):
    pl, GroupDRO, GroupWeightsCallback, Classifier = _lightning_examples()
    weights = also_fused.GroupWeights(n_groups=3, loss_scale=1.0, pi_lr=0.1)
    with pytest.raises(ValueError, match="holds its own group weights"):
        pl.Trainer(max_epochs=1, callbacks=[GroupWeightsCallback(weights)]).fit(GroupDRO(n_groups=3), _loader(2))

    class TwoOptimizers(Classifier):
        def configure_optimizers(self):
            return [also_fused.AdamW(self.net[0].parameters()), also_fused.AdamW(self.net[2].parameters())]

        def training_step(self, batch, batch_idx):
            return None

    model = TwoOptimizers(weights)
    model.automatic_optimization = False
    with pytest.raises(ValueError, match="optimizer_index"):
        pl.Trainer(max_epochs=1, callbacks=[GroupWeightsCallback(weights)]).fit(model, _loader(2))


# ---------------------------------------------------------------- transformers
@pytest.fixture
def transformers_env(monkeypatch, tmp_path):
    """No network, the CPU; accelerate's process-wide state reset around the test."""
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("ACCELERATE_USE_CPU", "true"),
                        ("WANDB_DISABLED", "true")):
        monkeypatch.setenv(name, value)
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    _reset_accelerate()
    yield tmp_path
    _reset_accelerate()


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _token_dataset(classification: bool, n: int = 16, length: int = 8, seed: int = 2) -> list[dict]:
    """Dicts of input_ids, labels (a class, or the tokens with a masked prefix) and group_ids."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        input_ids = torch.randint(0, 32, (length,), generator=gen)
        if classification:
            labels = int(torch.randint(0, 4, (), generator=gen))
        else:
            labels = input_ids.clone()
            labels[: i % 3] = -100
        items.append({"input_ids": input_ids, "labels": labels, "group_ids": i % 3})
    return items


def _train_transformers(owner: str, output_dir: str, checkpoint: Any = None) -> tuple[Any, Any]:
    """The two examples of docs/integrations.md: GPT-2 with GroupWeights and AdamW, BERT with ALSO."""
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from also_fused.integrations.transformers import GroupWeightedTrainer

    torch.manual_seed(0 if checkpoint is None else 1)  # a resumed run takes everything from the checkpoint
    dataset = _token_dataset(classification=owner == "ALSO")
    if owner == "GroupWeights":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
        weights = also_fused.GroupWeights(n_groups=3, loss_scale=1.0, pi_lr=0.1)
        args = TrainingArguments(output_dir, max_steps=6, save_steps=3, per_device_train_batch_size=4, use_cpu=True)
        trainer = GroupWeightedTrainer(model=model, args=args, train_dataset=dataset, group_weights=weights,
                                       optimizers=(also_fused.AdamW(model.parameters(), lr=1e-3), None))
        trainer.train(resume_from_checkpoint=checkpoint)
        return model, weights
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=4)
    model = BertForSequenceClassification(config)
    also = also_fused.ALSO(model.parameters(), n_groups=3, loss_scale=1.0, lr=1e-3, pi_lr=0.1)
    args = TrainingArguments(output_dir, max_steps=6, save_steps=3, per_device_train_batch_size=4, use_cpu=True)
    trainer = GroupWeightedTrainer(model=model, args=args, train_dataset=dataset, optimizers=(also, None))
    trainer.train(resume_from_checkpoint=checkpoint)
    return model, also


@pytest.mark.parametrize("owner", ["ALSO", "GroupWeights"])
def test_transformers_trainer_trains_and_resumes_bitwise(owner, transformers_env):
    """6 steps saving at step 3 (mid-epoch: 4 steps an epoch); resumed from checkpoint-3 in a fresh Trainer,
    the params and pi (with GroupWeights: from group_weights.pt; with ALSO: from optimizer.pt) end bit for bit
    where the uninterrupted run's do."""
    full = transformers_env / "full"
    model, pi_owner = _train_transformers(owner, str(full))
    assert _pi_moved(pi_owner.pi)
    assert (full / "checkpoint-3" / "group_weights.pt").is_file() == (owner == "GroupWeights")
    saved = torch.load(full / "checkpoint-3" / ("group_weights.pt" if owner == "GroupWeights" else "optimizer.pt"),
                       weights_only=True)
    saved_pi = saved["pi"] if owner == "GroupWeights" else saved["also"]["pi"]
    assert _pi_moved(saved_pi) and not torch.equal(saved_pi, pi_owner.pi)  # pi of step 3, not of step 6
    from safetensors.torch import load_file

    at_3 = load_file(full / "checkpoint-3" / "model.safetensors")
    assert not any(torch.equal(at_3[name], p) for name, p in model.named_parameters() if name in at_3)
    _reset_accelerate()
    resumed, resumed_owner = _train_transformers(owner, str(transformers_env / "resumed"), full / "checkpoint-3")
    _assert_bitwise(_state(model.parameters(), pi_owner), _state(resumed.parameters(), resumed_owner))


def test_transformers_trainer_keeps_the_group_column_and_refuses(transformers_env):
    """The group column survives remove_unused_columns; ALSO with group_weights, and torch AdamW under an fp16
    scaler, are refused; the per-sample losses are those of the docs."""
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from also_fused.integrations.transformers import GroupWeightedTrainer, per_sample_cross_entropy

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    weights = also_fused.GroupWeights(n_groups=3, loss_scale=1.0, pi_lr=0.1)
    args = TrainingArguments(str(transformers_env), per_device_train_batch_size=4, use_cpu=True)
    assert args.remove_unused_columns
    trainer = GroupWeightedTrainer(model=model, args=args, train_dataset=_token_dataset(False), group_weights=weights)
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "group_ids"} and batch["group_ids"].tolist() != [0] * 4

    # evaluation reports the plain mean and records nothing for the pi step
    assert torch.isfinite(torch.tensor(trainer.evaluate(_token_dataset(False, n=8))["eval_loss"]))
    with pytest.raises(RuntimeError, match="needs the per-sample losses"):
        weights.step()
    # a training step: the weighted loss, divided by the accumulation steps (the model's loss kwargs unused)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 2
    torch.manual_seed(3)
    loss = trainer.training_step(model, batch, num_items_in_batch=torch.tensor(100))
    torch.manual_seed(3)
    expected = weights.weighted_loss(per_sample_cross_entropy(model(input_ids=batch["input_ids"]), batch),
                                     batch["group_ids"]) / 2
    torch.testing.assert_close(loss, expected.detach())
    pi = weights.pi.clone()
    trainer.optimizer.step()  # the hook steps pi (with both recorded batches)
    assert not torch.equal(weights.pi, pi)

    # the causal-LM loss: position t predicts label t+1, the mean over each row's labels that are not -100
    logits, labels = torch.randn(2, 5, 7), torch.tensor([[1, 2, 3, 4, 5], [-100, -100, 3, -100, 6]])
    expected = torch.stack([F.cross_entropy(logits[0, :4], labels[0, 1:]),
                            F.cross_entropy(logits[1, [1, 3]], labels[1, [2, 4]])])
    torch.testing.assert_close(per_sample_cross_entropy({"logits": logits}, {"labels": labels}), expected)
    assert torch.equal(per_sample_cross_entropy(logits[:, 0], {"labels": labels[:, 0].clamp(min=0)}),
                       F.cross_entropy(logits[:, 0], labels[:, 0].clamp(min=0), reduction="none"))

    also = also_fused.ALSO(model.parameters(), n_groups=3, loss_scale=1.0)
    with pytest.raises(ValueError, match="holds its own group weights"):
        GroupWeightedTrainer(model=model, args=args, group_weights=weights, optimizers=(also, None))

    class Scaled(GroupWeightedTrainer):  # what fp16=True sets up on a GPU
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            self.accelerator.scaler = torch.amp.GradScaler("cpu")

    scaled = Scaled(model=model, args=args, group_weights=weights,
                    optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(ValueError, match="_step_supports_amp_scaling"):
        scaled.create_optimizer()
    scaled = Scaled(model=model, args=args, group_weights=weights,
                    optimizers=(also_fused.AdamW(model.parameters()), None))
    scaled.create_optimizer()  # the fused route: accepted


# ---------------------------------------------------------------- accelerate
@pytest.fixture
def accelerate_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    pytest.importorskip("accelerate")
    _reset_accelerate()
    yield tmp_path
    _reset_accelerate()


def _accelerate_run(owner: str, model: torch.nn.Module, loader: Any) -> tuple[Any, ...]:
    """The two examples of docs/integrations.md: ALSO, and GroupWeights beside also_fused.AdamW."""
    from accelerate import Accelerator

    from also_fused.integrations.accelerate import prepare_group_weights

    accelerator = Accelerator(gradient_accumulation_steps=2)
    if owner == "ALSO":
        also = also_fused.ALSO(model.parameters(), n_groups=3, loss_scale=1.0, lr=1e-2, pi_lr=0.1)
        model, optimizer, loader = accelerator.prepare(model, also, loader)
        for x, y, group_ids in loader:
            with accelerator.accumulate(model):
                losses = F.cross_entropy(model(x), y, reduction="none")
                accelerator.backward(also.weighted_loss(losses, group_ids))
                optimizer.step()
                optimizer.zero_grad()
        return accelerator, model, optimizer, also
    weights = also_fused.GroupWeights(n_groups=3, loss_scale=1.0, pi_lr=0.1, device=accelerator.device)
    model, optimizer, loader = accelerator.prepare(model, also_fused.AdamW(model.parameters(), lr=1e-2), loader)
    prepare_group_weights(accelerator, weights, optimizer)
    for x, y, group_ids in loader:
        with accelerator.accumulate(model):
            losses = F.cross_entropy(model(x), y, reduction="none")
            accelerator.backward(weights.weighted_loss(losses, group_ids))
            optimizer.step()
            optimizer.zero_grad()
    return accelerator, model, optimizer, weights


@pytest.mark.parametrize("owner", ["ALSO", "GroupWeights"])
def test_accelerate_accumulation_equals_plain_loop_and_state_round_trips(owner, accelerate_env):
    """prepare + accumulate(2) == the plain loop, bitwise (pi included); save_state then load_state into a fresh
    Accelerator, model and optimizer restores the params, the optimizer (ALSO: pi) and the registered
    GroupWeights bitwise."""
    from accelerate import Accelerator

    from also_fused.integrations.accelerate import prepare_group_weights

    loader = _loader()
    torch.manual_seed(0)
    accelerator, model, optimizer, pi_owner = _accelerate_run(owner, _net(), loader)
    assert _pi_moved(pi_owner.pi)

    torch.manual_seed(0)
    net = _net()
    if owner == "ALSO":
        reference, ref_owners = also_fused.ALSO(net.parameters(), n_groups=3, loss_scale=1.0, lr=1e-2, pi_lr=0.1), ()
        _plain_loop(net, list(loader), reference)
    else:
        reference = also_fused.AdamW(net.parameters(), lr=1e-2)
        ref_owners = (also_fused.GroupWeights(n_groups=3, loss_scale=1.0, pi_lr=0.1),)
        _plain_loop(net, list(loader), reference, ref_owners[0])
    owners = (optimizer,) if owner == "ALSO" else (optimizer, pi_owner)
    _assert_bitwise(_state(model.parameters(), *owners), _state(net.parameters(), reference, *ref_owners))

    accelerator.save_state(str(accelerate_env / "state"))
    _reset_accelerate()
    torch.manual_seed(1)
    fresh = Accelerator(gradient_accumulation_steps=2)
    net2 = _net()
    if owner == "ALSO":
        pi_owner2 = also_fused.ALSO(net2.parameters(), n_groups=3, loss_scale=1.0, lr=1e-2, pi_lr=0.1)
        net2, opt2 = fresh.prepare(net2, pi_owner2)
        owners2 = (opt2,)
    else:
        pi_owner2 = also_fused.GroupWeights(n_groups=3, loss_scale=1.0, pi_lr=0.1, device=fresh.device)
        net2, opt2 = fresh.prepare(net2, also_fused.AdamW(net2.parameters(), lr=1e-2))
        prepare_group_weights(fresh, pi_owner2, opt2)
        owners2 = (opt2, pi_owner2)
    assert not torch.equal(pi_owner2.pi, pi_owner.pi)
    fresh.load_state(str(accelerate_env / "state"))
    _assert_bitwise(_state(model.parameters(), *owners), _state(net2.parameters(), *owners2))


def test_prepare_group_weights_checks(accelerate_env):
    from accelerate import Accelerator

    from also_fused.integrations.accelerate import prepare_group_weights

    accelerator = Accelerator()
    net = _net()
    with pytest.raises(TypeError, match="GroupWeights"):
        prepare_group_weights(accelerator, object())
    with pytest.raises(ValueError, match="holds its own group weights"):
        prepare_group_weights(accelerator, also_fused.GroupWeights(3, loss_scale=1.0),
                              also_fused.ALSO(net.parameters(), n_groups=3, loss_scale=1.0))
    accelerator.scaler = torch.amp.GradScaler("cpu")  # what fp16 mixed precision sets up on a GPU
    with pytest.raises(ValueError, match="_step_supports_amp_scaling"):
        prepare_group_weights(accelerator, also_fused.GroupWeights(3, loss_scale=1.0), torch.optim.AdamW(net.parameters()))
    weights = also_fused.GroupWeights(3, loss_scale=1.0)
    assert prepare_group_weights(accelerator, weights, also_fused.AdamW(net.parameters())) is weights
