"""htc_fast.model.losses.smooth_l1_loss against torch's smooth_l1_loss / l1_loss and an explicit
weighted sum, for the betas HTC uses (RPN 1/9, box heads 1) and beta 0 (plain L1)."""
import pytest
import torch
import torch.nn.functional as F

from htc_fast.model.losses import smooth_l1_loss


def _inputs(n=257):
    pred = torch.randn(n, 4, dtype=torch.float64) * 2
    target = torch.randn(n, 4, dtype=torch.float64) * 2
    weight = (torch.rand(n, 1, dtype=torch.float64) > 0.3).double() * torch.rand(n, 1, dtype=torch.float64)
    return pred, target, weight


@pytest.mark.parametrize("beta", [0.0, 1.0 / 9.0, 1.0])
def test_sum_reduction_is_the_weighted_sum_of_torchs_elementwise_loss(beta):
    pred, target, weight = _inputs()
    elementwise = (F.l1_loss(pred, target, reduction="none") if beta == 0
                   else F.smooth_l1_loss(pred, target, reduction="none", beta=beta))
    expected = (elementwise * weight).sum()
    torch.testing.assert_close(smooth_l1_loss(pred, target, beta, weight, reduction="sum"), expected)
    torch.testing.assert_close(smooth_l1_loss(pred, target, beta, reduction="sum"), elementwise.sum())


@pytest.mark.parametrize("beta", [0.0, 1.0 / 9.0, 1.0])
def test_mean_reduction_divides_by_avg_factor_or_counts_elements(beta):
    pred, target, weight = _inputs()
    elementwise = (F.l1_loss(pred, target, reduction="none") if beta == 0
                   else F.smooth_l1_loss(pred, target, reduction="none", beta=beta))
    avg = float(torch.randint(1, 100, ()))
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(smooth_l1_loss(pred, target, beta, weight, avg_factor=avg),
                               (elementwise * weight).sum() / (avg + eps))
    torch.testing.assert_close(smooth_l1_loss(pred, target, beta), elementwise.mean())


def test_gradient_matches_torchs():
    pred, target, weight = _inputs()
    pred.requires_grad_()
    smooth_l1_loss(pred, target, 1.0 / 9.0, weight, reduction="sum").backward()
    ours = pred.grad.clone()
    pred.grad = None
    (F.smooth_l1_loss(pred, target, reduction="none", beta=1.0 / 9.0) * weight).sum().backward()
    torch.testing.assert_close(ours, pred.grad)


def test_empty_input_gives_a_connected_zero():
    pred = torch.zeros(0, 4, requires_grad=True)
    loss = smooth_l1_loss(pred, torch.zeros(0, 4), reduction="sum")
    assert loss.shape == () and float(loss.detach()) == 0.0
    loss.backward()
    assert pred.grad is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=-0.5), "beta"),
    (dict(beta=float("nan")), "beta"),
    (dict(reduction="none"), "reduction"),
    (dict(reduction="sum", avg_factor=4.0), "avg_factor"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    pred, target, _ = _inputs(3)
    with pytest.raises(ValueError, match=match):
        smooth_l1_loss(pred, target, **kwargs)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"pred \(3, 4\) and target \(3, 2\)"):
        smooth_l1_loss(torch.zeros(3, 4), torch.zeros(3, 2))
