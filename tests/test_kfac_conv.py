"""K-FAC for nn.Conv2d (KFC, Grosse & Martens, 2016) against exact GGN blocks and a loop."""

from __future__ import annotations

import pytest
import torch
from cases import loss_function, targets
from helpers import assert_close
from torch import nn

from natlib import curvature
from natlib.kfac import KFACApproximation, nearest_kronecker
from natlib.layout import ParamLayout

pytestmark = pytest.mark.usefixtures("float64")

# (input size, Conv2d options) with a single output location
SINGLE_LOCATION = {
    "plain": (3, dict(kernel_size=3)),
    "padding-stride": (3, dict(kernel_size=3, padding=1, stride=3)),
    "dilation": (5, dict(kernel_size=3, dilation=2)),
    "rectangular": ((2, 4), dict(kernel_size=(2, 3), stride=(1, 2))),
}


def conv_net(size, bias: bool = True, seed: int = 0, **conv) -> nn.Module:
    """Conv2d(2 -> 3) -> tanh -> Flatten -> Linear(-> 4) on ``(N, 2, *size)`` inputs."""
    torch.manual_seed(seed)
    layer = nn.Conv2d(2, 3, bias=bias, **conv)
    with torch.no_grad():
        out = layer(torch.zeros(1, 2, *_pair(size))).numel()
    return nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(out, 4))


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def inputs(n: int, size, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, *_pair(size), generator=torch.Generator().manual_seed(seed))


def blocks(model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor):
    """K-FAC's matrix and the exact GGN's block diagonal."""
    K = KFACApproximation.from_batch(model, loss_fn, X, y).to_dense()
    return K, ParamLayout.of(model).block_diagonal(curvature.ggn(model, loss_fn, X, y))


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("geometry", SINGLE_LOCATION)
def test_exact_for_one_example_at_one_location(geometry: str, bias: bool, loss: str) -> None:
    """One example and one output location: the gradient is g a^T, so A (x) G is the block."""
    size, conv = SINGLE_LOCATION[geometry]
    model = conv_net(size, bias, **conv)
    assert model[0](inputs(1, size)).shape[-2:] == (1, 1)
    K, exact = blocks(model, loss_function(loss), inputs(1, size), targets(loss, 1, 4))
    assert_close(K, exact)


def test_not_exact_with_several_locations() -> None:
    """KFC drops the cross-location terms, so several locations make it inexact."""
    model = conv_net(4, kernel_size=3)
    K, exact = blocks(model, loss_function("ce"), inputs(1, 4), targets("ce", 1, 4))
    conv = slice(0, model[0].weight.numel() + 3)
    error = (K[conv, conv] - exact[conv, conv]).norm() / exact[conv, conv].norm()
    assert error > 1e-3


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_bounded_error_on_random_batches(approximation: str) -> None:
    """Tanh CNN, 6 examples, 5 x 5 inputs (stride 2, padding 1, 9 overlapping locations).

    Even the nearest Kronecker product (Van Loan & Pitsianis) of the exact Conv2d block is
    far from it here (relative Frobenius error 0.67-0.78); K-FAC's error stays within 1.3
    times that (measured: expand 0.80-0.86, reduce 0.83-0.96, over three seeds).
    """
    loss_fn = loss_function("ce")
    for seed in range(3):
        model = conv_net(5, seed=seed, kernel_size=3, stride=2, padding=1)
        X, y = inputs(6, 5, seed), targets("ce", 6, 4, seed)
        K = KFACApproximation.from_batch(model, loss_fn, X, y, approximation=approximation)
        conv = slice(0, model[0].weight.numel() + 3)
        exact = curvature.ggn(model, loss_fn, X, y)[conv, conv]
        layer = K.layers[0]
        A, G = nearest_kronecker(exact, layer)
        order = layer.permutation()
        best = (torch.kron(G, A)[order][:, order] - exact).norm() / exact.norm()
        error = (K.to_dense()[conv, conv] - exact).norm() / exact.norm()
        assert error < 1.3 * best, (seed, error, best)


def loop_patches(x: torch.Tensor, layer: nn.Conv2d) -> torch.Tensor:
    """Patches ``(N, L, C k_h k_w)`` cut by explicit loops over output locations."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
    )
    x = nn.functional.pad(x, (pw, pw, ph, ph))
    rows = []
    for i in range(0, x.shape[2] - dh * (kh - 1), sh):
        for j in range(0, x.shape[3] - dw * (kw - 1), sw):
            rows.append(x[:, :, i : i + dh * (kh - 1) + 1 : dh, j : j + dw * (kw - 1) + 1 : dw])
    return torch.stack([r.flatten(1) for r in rows], dim=1)


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_factors_against_a_loop_reference(approximation: str) -> None:
    """A from loop-cut patches, G from autograd's per-location output gradients of the MSE
    cotangents (Lambda = 2I), both written without natlib.factors."""
    conv = dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    model = conv_net(6, **conv)
    X = inputs(3, 6)
    K = KFACApproximation.from_batch(model, nn.MSELoss(), X, approximation=approximation)
    A, G = K.factors["0"]
    a = loop_patches(X, model[0])
    a = torch.cat([a, torch.ones(*a.shape[:2], 1)], dim=2)  # (N, L, d_A)
    s = model[0](X)
    f = model[2:](torch.tanh(s))
    r = 1.0 / f.numel()  # MSELoss mean over N x C entries; cotangents sqrt(2r) e_c
    g = torch.stack(
        [
            torch.autograd.grad(f[:, c].sum(), s, retain_graph=True)[0] * (2 * r) ** 0.5
            for c in range(f.shape[1])
        ]
    )  # (C, N, C_out, H, W)
    g = g.flatten(3).transpose(2, 3)  # (C, N, L, C_out)
    if approximation == "expand":
        expected_A = torch.einsum("nli,nlj->ij", a, a) / (a.shape[0] * a.shape[1])
        expected_G = torch.einsum("knli,knlj->ij", g, g)
    else:
        mean, total = a.mean(1), g.sum(2)
        expected_A = mean.T @ mean / a.shape[0]
        expected_G = torch.einsum("kni,knj->ij", total, total)
    assert_close(A, expected_A)
    assert_close(G, expected_G)


UNSUPPORTED = {
    "groups": (nn.Conv2d(2, 2, 3, groups=2), r"'body\.0' \(Conv2d with groups=2\)"),
    "padding-mode": (
        nn.Conv2d(2, 2, 3, padding_mode="reflect"),
        r"'body\.0' \(Conv2d with padding",
    ),
    "same": (nn.Conv2d(2, 2, 3, padding="same"), r"'body\.0' \(Conv2d with padding='same'"),
    "batchnorm": (nn.BatchNorm2d(2), r"'body\.0' \(BatchNorm2d\)"),
    "conv1d": (nn.Conv1d(2, 2, 3), r"'body\.0' \(Conv1d\)"),
    "layernorm": (nn.LayerNorm(4), r"'body\.0' \(LayerNorm\)"),
    "embedding": (nn.Embedding(5, 2), r"'body\.0' \(Embedding\)"),
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_layers_are_named(name: str) -> None:
    module, message = UNSUPPORTED[name]
    model = nn.Module()
    model.body = nn.Sequential(module, nn.Linear(2, 2))
    with pytest.raises(ValueError, match=message + r".*support only nn\.Linear.*nn\.Conv2d"):
        ParamLayout.of(model, kronecker=True)
    layout = ParamLayout.of(model, kronecker=True, unsupported="gradient")
    assert [type(b).__name__ for b in layout.blocks] == ["Block", "LinearLayer"]


def test_conv_input_must_be_batched() -> None:
    model = conv_net(3, kernel_size=3)
    with pytest.raises(ValueError, match=r"batched inputs \(N, C, H, W\)"):
        KFACApproximation.from_batch(model[:1], nn.MSELoss(), torch.randn(2, 3, 3))
