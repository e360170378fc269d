"""Transformers and language models: attention projections sparsified by default, tied embeddings kept tied,
parameters opted in by name, output axes of transposed and third-party layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_sparse import SparsityCallback, harden, layer_stats
from lightning_sparse.checkpoint import harden_state_dict
from lightning_sparse.layers import parametrize_weights, select_weights, sparsity_parametrizations
from lightning_sparse.methods import ST3, STR, SparsityMethod
from lightning_sparse.methods.st3 import update_thresholds
from lightning_sparse.stats import dense_flops, sparsified_fraction
from models import make_trainer

VOCAB, WIDTH, CONTEXT = 32, 16, 12


class TinyLM(pl.LightningModule):
    """A causal transformer language model whose output layer is tied to its input embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.block = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.example_input_array = torch.zeros(2, CONTEXT, dtype=torch.long)

    def forward(self, tokens: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.block(self.embed(tokens), src_mask=mask, is_causal=True))

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, VOCAB, (64, CONTEXT + 1), generator=generator)
        return DataLoader(TensorDataset(tokens), batch_size=8)


@pytest.mark.parametrize("method", [ST3(0.9), STR(s_init=-3.0, threshold_decay=0.05)], ids=["st3", "str"])
def test_a_tied_language_model_is_sparsified_once_and_hardening_changes_no_output(
    tmp_path: Path, method: SparsityMethod
) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    make_trainer(tmp_path, max_epochs=2, callbacks=[SparsityCallback(method, harden_on_fit_end=False)]).fit(model)

    layers = sparsity_parametrizations(model)
    assert "embed" in layers and "head" not in layers  # one weight, named by its first holder
    assert layers["embed"].holders == ((model.embed, "weight"), (model.head, "weight"))
    # During training both users compute with the one effective (sparse) weight.
    assert torch.equal(model.embed.weight, model.head.weight) and (model.embed.weight == 0).any()
    tokens = torch.randint(0, VOCAB, (4, CONTEXT), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        before = model(tokens)
    stats = {s.name: s for s in layer_stats(model, tokens)}
    assert "head" not in stats and stats["embed"].params == VOCAB * WIDTH  # counted once

    harden(model)

    assert model.head.weight is model.embed.weight  # still one Parameter
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), before, atol=1e-4, rtol=0)


def test_attention_projections_are_sparsified_by_default_in_train_and_eval_fast_path() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0, batch_first=True)
    selected = select_weights(layer)
    assert list(selected) == ["self_attn.in_proj_weight", "self_attn.out_proj", "linear1", "linear2"]
    parametrize_weights(selected, ST3(0.5).parametrization)
    layers = sparsity_parametrizations(layer)
    update_thresholds(
        [w.parametrization for w in layers.values()],  # type: ignore[misc]
        [w.raw for w in layers.values()],
        sparsity=0.5,
    )
    x = torch.randn(3, 5, WIDTH)
    outputs = {}
    for train in (True, False):  # eval under no_grad takes MultiheadAttention's fused fast path
        with torch.no_grad():
            outputs[train] = layer.train(train)(x)
    harden(layer)
    assert (layer.self_attn.in_proj_weight == 0).float().mean() > 0.3
    for train, output in outputs.items():
        with torch.no_grad():
            torch.testing.assert_close(layer.train(train)(x), output)


def test_separate_query_key_value_projections_are_each_a_weight() -> None:
    attention = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert list(select_weights(attention)) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj"]


def test_the_default_covers_every_matrix_multiply_weight_of_a_vision_transformer() -> None:
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )
    parametrize_weights(select_weights(model), ST3(0.9).parametrization)
    layers = sparsity_parametrizations(model)
    assert {"encoder.layers.encoder_layer_0.self_attention.in_proj_weight", "conv_proj", "heads.head"} <= set(layers)
    # Only the class token and the position embedding stay dense.
    dense = model.class_token.numel() + model.encoder.pos_embedding.numel()
    total = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert sparsified_fraction(model) == pytest.approx(1 - dense / total)


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.lstm = nn.LSTM(4, 4)
        self.up = nn.ConvTranspose1d(4, 6, 3)
        self.attn = nn.MultiheadAttention(4, 2)


@pytest.mark.parametrize(
    ("include", "expected"),
    [
        (["*.in_proj_weight"], ["attn.in_proj_weight"]),
        (["attn.in_proj_weight", "attn.out_proj"], ["attn.in_proj_weight", "attn.out_proj"]),
        ([nn.Embedding], ["embed"]),
        (["embed.weight"], ["embed"]),
        ([nn.LSTM], ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]),
        (["lstm.weight_hh_l0"], ["lstm.weight_hh_l0"]),
        ([nn.ConvTranspose1d], ["up"]),
    ],
)
def test_include_takes_types_and_parameter_names_of_any_weight(include: list[Any], expected: list[str]) -> None:
    assert list(select_weights(LM(), include)) == expected


def test_a_parameter_named_that_cannot_be_sparsified_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"- 'attn.in_proj_bias': it is 1-D \(shape \(12,\)\)"):
        select_weights(LM(), ["*.in_proj_bias"])
    with pytest.raises(ValueError, match=r"`include` entry 'attn.bias_q' matches no module with a weight and no param"):
        select_weights(LM(), ["attn.bias_q"])


class Conv1D(nn.Module):
    """A layer from outside torch that stores its weight (in, out), as Hugging Face GPT-2's does."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, outputs))
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


def test_the_rescale_runs_along_the_output_axis_of_transposed_and_declared_layers() -> None:
    net = nn.Sequential(nn.ConvTranspose1d(3, 5, 2), nn.Flatten(), Conv1D(20, 7))
    assert list(select_weights(net)) == []  # neither is a default type
    selected = select_weights(net, include=[nn.ConvTranspose1d, Conv1D], output_axes={Conv1D: 1})
    assert [w.output_axis for w in selected.values()] == [1, 1]
    parametrize_weights(selected, ST3(0.5).parametrization)
    scales = [w.parametrization.scale.shape for w in sparsity_parametrizations(net).values()]
    assert scales == [(1, 5, 1), (1, 7)]  # one per output channel
    with pytest.raises(ValueError, match=r"'0': `output_axes` gives it output axis 2, but it has 2 dimensions"):
        select_weights(nn.Sequential(Conv1D(2, 3)), include=[Conv1D], output_axes={"2": 2, Conv1D: 2})


def test_hardening_an_attention_layer_gives_back_its_parameter_order_and_a_strict_loading_state_dict() -> None:
    layer = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0)
    keys, parameters = list(layer.state_dict()), list(layer.parameters())
    parametrize_weights(select_weights(layer), ST3(0.5).parametrization)
    layers = sparsity_parametrizations(layer)
    update_thresholds(
        [w.parametrization for w in layers.values()],  # type: ignore[misc]
        [w.raw for w in layers.values()],
        sparsity=0.5,
    )
    plain = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0)
    plain.load_state_dict(harden_state_dict(layer.state_dict()))  # strict
    x = torch.randn(5, 3, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x))
    harden(layer)
    assert list(layer.state_dict()) == keys and all(p is q for p, q in zip(layer.parameters(), parameters, strict=True))


def test_output_axes_is_checked_at_construction() -> None:
    with pytest.raises(TypeError, match=r"`output_axes` maps module types or name patterns to the axis"):
        SparsityCallback("st3", 0.9, output_axes={"*.c_attn": "1"})  # type: ignore[dict-item]


class HuggingFaceLM(pl.LightningModule):
    """A Hugging Face causal or masked language model from a small config, on random tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.example_input_array = {"input_ids": torch.zeros(2, CONTEXT, dtype=torch.long)}

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).logits  # type: ignore[no-any-return]

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss  # type: ignore[no-any-return]

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        tokens = torch.randint(0, VOCAB, (32, CONTEXT), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens), batch_size=8)


def _gpt2() -> tuple[nn.Module, dict[str, Any]]:
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=CONTEXT, n_embd=WIDTH, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    # GPT-2's projections are `Conv1D`s, weights stored (in, out): opted in, with their output axis.
    return transformers.GPT2LMHeadModel(config), {"include": [nn.Linear, Conv1D], "output_axes": {Conv1D: 1}}


def _bert() -> tuple[nn.Module, dict[str, Any]]:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * WIDTH
    )
    return transformers.BertForMaskedLM(config), {}


@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert-mlm"])
def test_hugging_face_language_models_with_tied_embeddings_harden_without_changing_outputs(
    tmp_path: Path, build: Any
) -> None:
    torch.manual_seed(0)
    model, settings = build()
    module = HuggingFaceLM(model)
    callback = SparsityCallback("st3", 0.9, harden_on_fit_end=False, **settings)
    make_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(module)
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    (tied,) = (w for w in sparsity_parametrizations(module).values() if (embedding, "weight") in w.holders)
    assert (output, "weight") in tied.holders and torch.equal(output.weight, embedding.weight)
    tokens = torch.randint(0, VOCAB, (4, CONTEXT), generator=torch.Generator().manual_seed(1))
    module.eval()
    with torch.no_grad():
        before = module(tokens)

    harden(module)

    assert output.weight is model.get_input_embeddings().weight
    assert (output.weight == 0).float().mean() > 0.5
    with torch.no_grad():
        torch.testing.assert_close(module(tokens), before, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------- FLOPs


def _hooked_macs(model: nn.Module, *inputs: Tensor) -> dict[str, int]:
    """Weight MACs per sample counted independently: forward hooks and the layers' shapes."""
    counts: dict[str, int] = {}

    def linear(name: str, module: nn.Linear, args: Any, output: Tensor) -> None:
        counts[name] = counts.get(name, 0) + args[0].numel() * module.out_features

    def attention(name: str, module: nn.MultiheadAttention, args: Any, output: Any) -> None:
        query, key, value = args[:3]
        width = module.embed_dim
        counts[f"{name}.in_proj_weight"] = (query.numel() + key.numel() + value.numel()) * width
        counts[f"{name}.out_proj"] = query.numel() * width  # F.linear in the parent: its own hook never runs

    def conv(name: str, module: nn.Conv2d, args: Any, output: Tensor) -> None:
        counts[name] = output.numel() * module.weight[0].numel()

    hooks = []
    for name, module in model.named_modules():
        kinds = {nn.MultiheadAttention: attention, nn.Linear: linear, nn.Conv2d: conv}
        kind = next((k for t, k in kinds.items() if isinstance(module, t)), None)
        if kind is not None:
            hooks.append(module.register_forward_hook(lambda m, a, o, name=name, kind=kind: kind(name, m, a, o)))
    model.eval()
    with torch.no_grad():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    return {name: n // inputs[0].shape[0] for name, n in counts.items()}


@pytest.mark.parametrize("train", [True, False])
def test_attention_flops_are_charged_to_each_projection(train: bool) -> None:
    layer = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, batch_first=True).train(train)
    x = torch.randn(3, 5, WIDTH)
    expected = _hooked_macs(layer, x)
    layer.train(train)
    assert dense_flops(layer, x) == expected  # eval's fused fast path reported 0 of these
    assert layer.training is train
    assert expected["self_attn.in_proj_weight"] == 5 * WIDTH * 3 * WIDTH


def test_vision_transformer_flops_match_an_independent_count() -> None:
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )
    image = torch.randn(2, 3, 32, 32)
    parametrize_weights(select_weights(model), ST3(0.9).parametrization)  # counted by their effective weights
    expected = _hooked_macs(model, image)
    counted = dense_flops(model, image)
    assert counted.keys() == expected.keys() and all(
        counted[name] == pytest.approx(n, rel=0.01) for name, n in expected.items()
    )


def test_swin_flops_charge_every_weight_and_leave_out_only_attention_products() -> None:
    model = torchvision.models.swin_t(num_classes=10).eval()
    image = torch.randn(1, 3, 64, 64)
    counted = dense_flops(model, image)
    assert set(select_weights(model)) <= {name for name, n in counted.items() if n > 0}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    by_op = {str(op): n // 2 for op, n in counter.get_flop_counts()["Global"].items()}
    # Weights are multiplied by `mm`/`addmm`/`convolution`; attention's scores and values by `bmm`.
    assert sum(counted.values()) == pytest.approx(by_op["aten.mm"] + by_op["aten.addmm"] + by_op["aten.convolution"])


def test_str_warns_at_fit_start_about_a_zero_initialised_weight_it_could_never_train(tmp_path: Path) -> None:
    model = TinyLM()
    nn.init.zeros_(model.block.linear2.weight)  # e.g. adaLN-zero, LoRA's B, a ViT's classifier head
    callback = SparsityCallback("str", s_init=-5.0, threshold_decay=0.01, harden_on_fit_end=False)
    with pytest.warns(UserWarning, match=r"all zeros at fit start: 'block.linear2'\. STR gives .* use ST-3"):
        make_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(model)
    assert not model.block.linear2.weight.any()  # what the warning is about: it never trained


def test_layer_stats_lists_a_third_party_layer_the_forward_multiplies_by_also_after_hardening() -> None:
    net = nn.Sequential(Conv1D(6, 4), nn.ReLU(), nn.Linear(4, 2))
    parametrize_weights(
        select_weights(net, include=[Conv1D, nn.Linear], output_axes={Conv1D: 1}), ST3(0.5).parametrization
    )
    x = torch.randn(3, 6)
    assert [(s.name, s.dense_flops) for s in layer_stats(net, x)] == [("0", 24), ("2", 8)]
    harden(net)
    assert [(s.name, s.dense_flops) for s in layer_stats(net, x)] == [("0", 24), ("2", 8)]
