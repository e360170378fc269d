"""STR and ST-3 effective weights and gradients against hand-computed values, without a Trainer."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_sparse.methods.st3 import StraightThroughSoftThreshold, update_thresholds
from lightning_sparse.methods.str_method import LearnedSoftThreshold
from lightning_sparse.methods.st3 import sigma_scale


def test_str_effective_weight_and_gradients():
    weight = torch.tensor([0.5, -0.2, 0.05, -0.8], requires_grad=True)
    s_init = math.log(0.1 / 0.9)  # sigmoid(s) = 0.1
    str_ = LearnedSoftThreshold(s_init=s_init)
    effective = str_(weight)
    torch.testing.assert_close(effective, torch.tensor([0.4, -0.1, 0.0, -0.7]))
    assert effective[2].item() == 0.0  # exact zero, not a tiny residue

    effective.sum().backward()
    # Weights under the threshold get no gradient; the others pass it through unchanged.
    torch.testing.assert_close(weight.grad, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    # d/ds of sign(w) * (|w| - sigmoid(s)) = -sign(w) * sigmoid'(s) over survivors: (-1 + 1 + 1) * 0.1 * 0.9
    torch.testing.assert_close(str_.s.grad, torch.tensor(0.09))


def test_str_keeps_bf16_and_keep_mask():
    weight = torch.tensor([0.5, -0.05], dtype=torch.bfloat16)
    str_ = LearnedSoftThreshold(s_init=math.log(0.1 / 0.9))
    assert str_(weight).dtype == torch.bfloat16
    assert str_.keep_mask(weight).tolist() == [True, False]


def _st3_layer() -> tuple[torch.Tensor, StraightThroughSoftThreshold]:
    weight = torch.tensor([[0.5, -0.2, 0.05], [-0.8, 0.1, 0.3]], requires_grad=True)
    return weight, StraightThroughSoftThreshold(weight)


def test_st3_threshold_mask_and_rescale():
    weight, st3 = _st3_layer()
    # |w| sorted: 0.05 0.1 0.2 0.3 0.5 0.8; half of six pruned -> tau is the third, 0.2.
    assert update_thresholds([st3], [weight], sparsity=0.5) == pytest.approx(0.2)
    assert st3.mask.tolist() == [[True, False, False], [True, False, True]]
    # Kept L1 fractions 0.5 / 0.75 and 1.1 / 1.2, rescaled by 1.01 / (r + 0.01).
    expected_scale = torch.tensor([[1.01 / (0.5 / 0.75 + 0.01)], [1.01 / (1.1 / 1.2 + 0.01)]])
    torch.testing.assert_close(st3.scale, expected_scale)

    effective = st3(weight)
    soft = torch.tensor([[0.3, 0.0, 0.0], [-0.6, 0.0, 0.1]])
    torch.testing.assert_close(effective, soft * expected_scale)
    assert (effective[st3.mask.logical_not()] == 0).all()


def test_st3_gradient_is_straight_through_to_every_weight():
    weight, st3 = _st3_layer()
    update_thresholds([st3], [weight], sparsity=0.5)
    upstream = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (st3(weight) * upstream).sum().backward()
    # Pruned weights receive the gradient too, so they can come back at the next threshold.
    torch.testing.assert_close(weight.grad, upstream)


def test_st3_without_rescale_is_a_plain_soft_threshold():
    weight = torch.tensor([[0.5, -0.2, 0.05], [-0.8, 0.1, 0.3]])
    st3 = StraightThroughSoftThreshold(weight, rescale=False)
    update_thresholds([st3], [weight], sparsity=0.5)
    torch.testing.assert_close(st3(weight), torch.tensor([[0.3, 0.0, 0.0], [-0.6, 0.0, 0.1]]))


def test_st3_frozen_trains_only_surviving_weights():
    weight, st3 = _st3_layer()
    update_thresholds([st3], [weight], sparsity=0.5)
    before = st3(weight).detach()
    with torch.no_grad():
        st3.freeze(weight)
    torch.testing.assert_close(weight.detach(), before)  # effective weights baked into the raw ones
    st3(weight).sum().backward()
    assert weight.grad.tolist() == st3.mask.float().tolist()
    assert st3.state_dict()["_extra_state"] == {"frozen": True}


def test_st3_sigma_normalises_magnitudes_by_layer_width():
    wide, narrow = torch.full((64, 64), 0.1), torch.full((2, 2), 0.2)
    wide[0, 0], narrow[0, 0] = 1.0, 1.0
    layers = [StraightThroughSoftThreshold(wide, rescale=False), StraightThroughSoftThreshold(narrow, rescale=False)]
    # Plain ST-3 prunes the small weights of both layers alike...
    update_thresholds(layers, [wide, narrow], sparsity=0.5)
    assert layers[1].mask.sum().item() == 4
    # ...while ST-3σ compares |w| * sqrt(sum(shape)): the wide layer's 0.1 * sqrt(128) beats 0.2 * sqrt(4).
    tau = update_thresholds(layers, [wide, narrow], sparsity=3 / 4100, sigma=True)
    assert sigma_scale(wide) == math.sqrt(128)
    assert layers[1].threshold.item() == pytest.approx(tau / 2)
    assert layers[1].mask.sum().item() == 1 and layers[0].mask.all()


def test_st3_keeps_bf16_weights_bf16():
    weight = torch.randn(8, 4, dtype=torch.bfloat16)
    st3 = StraightThroughSoftThreshold(weight)
    update_thresholds([st3], [weight], sparsity=0.5)
    assert st3(weight).dtype == torch.bfloat16
    assert st3.threshold.dtype == torch.float32 and st3.scale.dtype == torch.float32


def test_parametrized_conv_sees_effective_weight():
    conv = nn.Conv2d(3, 8, 3)
    st3 = StraightThroughSoftThreshold(conv.weight)
    parametrize.register_parametrization(conv, "weight", st3)
    update_thresholds([st3], [conv.parametrizations.weight.original], sparsity=0.75)
    assert (conv.weight == 0).float().mean().item() == pytest.approx(0.75, abs=1 / conv.weight.numel())
