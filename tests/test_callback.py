"""SparsityCallback end to end with a real Trainer: sparsity reached, hardening, STR thresholds trained."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from models import TinyNet, make_trainer
from torch import nn

from lightning_sparse import SparsityCallback, harden
from lightning_sparse.layers import sparsity_parametrizations


class BatchNormNet(TinyNet):
    """TinyNet with a wider conv, a BatchNorm and a hidden linear layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = nn.Conv1d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.hidden = nn.Linear(16 * 8, 32)
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.hidden(torch.relu(self.bn(self.conv(x))).flatten(1))))


def _sparsified_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]


@pytest.mark.parametrize("method", ["st3", "st3sigma"])
def test_st3_global_sparsity_after_fit(tmp_path, method):
    model = BatchNormNet()
    keys = list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    n_tensors = len(list(model.parameters())) + len(list(model.buffers()))
    trainer = make_trainer(tmp_path, max_epochs=4, callbacks=[SparsityCallback(method, target_sparsity=0.9)])
    trainer.fit(model, model.train_dataloader())

    weights = _sparsified_weights(model)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(0.9, abs=0.005)
    assert list(model.state_dict()) == keys
    assert [type(m) for m in model.modules()] == classes
    assert len(list(model.parameters())) + len(list(model.buffers())) == n_tensors
    assert all(type(w) is nn.Parameter for w in weights)
    assert model.bn.weight.ne(0).all() and model.conv.bias.ne(0).all()  # norm layers and biases stay dense


@pytest.mark.parametrize(
    "callback",
    [
        SparsityCallback("st3", target_sparsity=0.8, harden_on_fit_end=False),
        SparsityCallback("st3sigma", target_sparsity=0.8, harden_on_fit_end=False),
        SparsityCallback("str", s_init=-2.0, threshold_decay=0.05, harden_on_fit_end=False),
    ],
    ids=["st3", "st3sigma", "str"],
)
def test_harden_leaves_outputs_unchanged_and_exact_zeros(tmp_path, callback):
    model = BatchNormNet()
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[callback])
    trainer.fit(model, model.train_dataloader())
    assert sparsity_parametrizations(model)  # not hardened: still reparameterized

    x = torch.randn(16, 1, 8)
    model.eval()
    with torch.no_grad():
        before = model(x)
        effective = {name: module.weight.clone() for name, (module, _) in sparsity_parametrizations(model).items()}
        harden(model)
        after = model(x)
    assert (after - before).abs().max().item() <= 1e-4
    for name, weight in effective.items():
        hardened = model.get_submodule(name).weight
        assert torch.equal(hardened == 0, weight == 0)
        assert (hardened == 0).any()


def test_str_thresholds_are_in_the_users_optimizer_and_train(tmp_path):
    model = BatchNormNet()
    callback = SparsityCallback("str", s_init=-2.0, threshold_decay=0.05)
    seen = {}

    class Spy(Callback):  # watches the optimizer during fit
        def on_train_start(self, trainer, pl_module):
            thresholds = [p.s for _, p in sparsity_parametrizations(pl_module).values()]
            optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            seen["in_optimizer"] = all(id(s) in optimizer_params for s in thresholds)
            seen["decay"] = [g["weight_decay"] for g in trainer.optimizers[0].param_groups]
            seen["before"] = [s.item() for s in thresholds]

        def on_train_end(self, trainer, pl_module):
            seen["after"] = [p.s.item() for _, p in sparsity_parametrizations(pl_module).values()]

    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[callback, Spy()])
    trainer.fit(model, model.train_dataloader())
    assert seen["in_optimizer"]
    assert seen["decay"] == [5e-4, 0.05]  # the thresholds got their own group, with their own decay
    assert all(a != b for a, b in zip(seen["before"], seen["after"]))
    assert any((w == 0).any() for w in _sparsified_weights(model))


def test_validation_during_fit_sees_sparse_weights(tmp_path):
    model = BatchNormNet()
    zero_fractions = []

    class Probe(Callback):
        def on_validation_start(self, trainer, pl_module):
            zero_fractions.append((pl_module.hidden.weight == 0).float().mean().item())

    callback = SparsityCallback("st3", target_sparsity=0.9, start=0, end=8)
    trainer = make_trainer(tmp_path, max_epochs=2, limit_val_batches=1, callbacks=[callback, Probe()])
    trainer.fit(model, model.train_dataloader(), model.val_dataloader())
    assert zero_fractions[-1] > 0.5
