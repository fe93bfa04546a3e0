"""Small real problems with no download: bundled digits, generated regression and toys, and
the small models trained on them (:func:`mlp`, :func:`digits_cnn`).

Every problem is deterministic given its seed and returns tensors in torch's default dtype
(or ``dtype``) on the requested device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from natlib.checks import check_choice, check_float_dtype, check_integer, check_seed

Activation = Literal["tanh", "relu", "sigmoid", "identity"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


@dataclass(frozen=True)
class Problem:
    """A supervised problem: training and test tensors and the loss that defines it.

    ``theta_star`` holds the true parameters of generated problems (``None`` for real data).
    """

    name: str
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    loss_fn: nn.Module
    theta_star: Tensor | None = None


def _generator(seed: int) -> torch.Generator:
    check_seed(seed)
    return torch.Generator().manual_seed(int(seed))


def _resolve(dtype: torch.dtype | None, device: torch.device | str | None):
    dtype = dtype or torch.get_default_dtype()
    check_float_dtype(dtype)
    return dtype, torch.device(device or "cpu")


def _split(n: int, test_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    order = torch.randperm(n, generator=generator)
    n_test = round(n * test_fraction)
    return order[n_test:], order[:n_test]


def _digits_arrays() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    data = load_digits()
    return torch.from_numpy(data.data), torch.from_numpy(data.target)


def digits(
    seed: int = 0,
    test_fraction: float = 0.25,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Problem:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as classification.

    Pixels are standardised with the training set's mean and standard deviation (pixels that
    are constant on the training set are only centred). Loss: mean cross-entropy.
    """
    dtype, device = _resolve(dtype, device)
    images, labels = _digits_arrays()
    train, test = _split(len(labels), test_fraction, _generator(seed))
    images = images.to(torch.float64)
    mean, std = images[train].mean(0), images[train].std(0)
    standardised = (images - mean) / torch.where(std > 0, std, torch.ones_like(std))
    X = standardised.to(dtype=dtype, device=device)
    y = labels.to(device=device)
    return Problem("digits", X[train], y[train], X[test], y[test], nn.CrossEntropyLoss())


def digits_autoencoder(
    seed: int = 0,
    test_fraction: float = 0.25,
    scale: Literal["unit", "standardize"] = "unit",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Problem:
    """The digits as an autoencoder task: targets are the inputs.

    ``scale="unit"`` maps pixels to [0, 1] (pixel / 16) with a Bernoulli likelihood
    (``BCEWithLogitsLoss``), as in Martens & Grosse (2015, §13); ``"standardize"`` uses the
    standardised pixels of :func:`digits` with ``MSELoss``.
    """
    if scale == "unit":
        dtype, device = _resolve(dtype, device)
        images, labels = _digits_arrays()
        train, test = _split(len(labels), test_fraction, _generator(seed))
        X = (images / 16.0).to(dtype=dtype, device=device)
        loss_fn: nn.Module = nn.BCEWithLogitsLoss()
    elif scale == "standardize":
        base = digits(seed, test_fraction, dtype, device)
        X = torch.cat([base.X_train, base.X_test])
        train = torch.arange(len(base.X_train))
        test = torch.arange(len(base.X_train), len(X))
        loss_fn = nn.MSELoss()
    else:
        raise ValueError(f"scale {scale!r} is not supported; use 'unit' or 'standardize'.")
    return Problem("digits-autoencoder", X[train], X[train], X[test], X[test], loss_fn)


def kunstner_linear_regression(
    seed: int = 0,
    n: int = 1000,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Problem:
    """The linear-regression data of Kunstner, Balles & Hennig (2019, Fig. 1).

    :math:`x_n = (1, z_n)` with :math:`z_n \\sim \\mathrm{LogNormal}(0, 0.75)`,
    :math:`y_n = x_n^\\top \\theta^* + \\varepsilon_n`, :math:`\\theta^* = (2, 2)`,
    :math:`\\varepsilon_n \\sim \\mathcal{N}(0, 1)`. Loss: ``MSELoss()`` (mean), the Gaussian
    negative log-likelihood up to an affine map. A test set of the same size is drawn
    independently.

    Raises:
        TypeError: if ``seed`` is not an integer.
        ValueError: if ``seed`` is negative, ``n`` is not an integer of at least 2, or
            ``dtype`` is not float32 or float64.
    """
    check_integer("n", n, 2)
    dtype, device = _resolve(dtype, device)
    generator = _generator(seed)
    theta_star = torch.tensor([2.0, 2.0], dtype=torch.float64)

    def draw() -> tuple[Tensor, Tensor]:
        z = torch.exp(0.75 * torch.randn(n, generator=generator, dtype=torch.float64))
        X = torch.stack([torch.ones(n, dtype=torch.float64), z], dim=1)
        y = X @ theta_star + torch.randn(n, generator=generator, dtype=torch.float64)
        return X.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)

    (X_train, y_train), (X_test, y_test) = draw(), draw()
    theta = theta_star.to(dtype=dtype, device=device)
    return Problem(
        "kunstner-linear-regression", X_train, y_train, X_test, y_test, nn.MSELoss(), theta
    )


def logistic_toy(
    seed: int = 0,
    n: int = 200,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Problem:
    """Two-parameter logistic regression without bias, on anisotropic inputs.

    :math:`x_n \\sim \\mathcal{N}(0, \\mathrm{diag}(1, 1/9))`, rotated by 30 degrees;
    :math:`y_n \\sim \\mathrm{Bernoulli}(\\sigma(x_n^\\top \\theta^*))` with
    :math:`\\theta^* = (1.5, -1)`. The ill-conditioned, correlated inputs make gradient
    descent's path curve while the natural gradient's does not. Loss: mean
    ``BCEWithLogitsLoss`` on the logit :math:`x^\\top\\theta`.

    Raises:
        TypeError: if ``seed`` is not an integer.
        ValueError: if ``seed`` is negative, ``n`` is not an integer of at least 2, or
            ``dtype`` is not float32 or float64.
    """
    check_integer("n", n, 2)
    dtype, device = _resolve(dtype, device)
    generator = _generator(seed)
    theta_star = torch.tensor([1.5, -1.0], dtype=torch.float64)
    angle = math.pi / 6
    rotation = torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
        dtype=torch.float64,
    )
    scales = torch.tensor([1.0, 1.0 / 3.0], dtype=torch.float64)

    def draw() -> tuple[Tensor, Tensor]:
        X = (torch.randn(n, 2, generator=generator, dtype=torch.float64) * scales) @ rotation.T
        p = torch.sigmoid(X @ theta_star)
        y = torch.bernoulli(p, generator=generator)
        return X.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)

    (X_train, y_train), (X_test, y_test) = draw(), draw()
    theta = theta_star.to(dtype=dtype, device=device)
    return Problem("logistic-toy", X_train, y_train, X_test, y_test, nn.BCEWithLogitsLoss(), theta)


LogisticDataset = Literal["well-specified", "misspecified noise", "misspecified model"]
#: The data sets :func:`kunstner_logistic` draws.
LOGISTIC_DATASETS: tuple[str, ...] = get_args(LogisticDataset)


def kunstner_logistic(
    name: LogisticDataset, n: int = 1000, seed: int = 0, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    r"""Two Gaussian classes of ``n // 2`` points each, labels 0 and 1 (Kunstner et al., Fig. 2).

    ``"well-specified"``: means :math:`\pm(1, 1)`, equal isotropic covariances, so the log-odds
    are linear and logistic regression without bias is the true model; ``"misspecified
    noise"``: means :math:`\pm(1.5, 1.5)`, covariances :math:`9I` and :math:`I`;
    ``"misspecified model"``: means :math:`\pm(1, 1)`, covariances with correlations of
    opposite sign. Both misspecified sets have quadratic log-odds.

    Raises:
        ValueError: for a name not in :data:`LOGISTIC_DATASETS`.
    """
    check_choice("dataset", name, LogisticDataset)
    generator = torch.Generator().manual_seed(seed)
    half = n // 2
    shift, scale0, scale1 = {
        "well-specified": (1.0, 2 * torch.eye(2), 2 * torch.eye(2)),
        "misspecified noise": (1.5, 3 * torch.eye(2), torch.eye(2)),
        "misspecified model": (
            1.0,
            1.5 * torch.tensor([[1.0, -0.6], [-0.6, 1.0]]),
            1.5 * torch.tensor([[1.0, 0.6], [0.6, 1.0]]),
        ),
    }[name]
    mean = torch.full((2,), shift, dtype=torch.float64)
    z = torch.randn(2 * half, 2, generator=generator, dtype=torch.float64)
    X = torch.cat([mean + z[:half] @ scale0.double(), -mean + z[half:] @ scale1.double()])
    y = torch.cat([torch.zeros(half), torch.ones(half)]).double()
    dtype = dtype or torch.get_default_dtype()
    return X.to(dtype), y.to(dtype)


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "digits": digits,
    "digits-autoencoder": digits_autoencoder,
    "kunstner-linear-regression": kunstner_linear_regression,
    "logistic-toy": logistic_toy,
}


def load(name: str, **kwargs) -> Problem:
    """Build a problem by name; ``kwargs`` go to its constructor (seed, dtype, device, ...).

    Raises:
        ValueError: for an unknown name, or a constructor's argument out of range (a seed
            outside ``[0, 2**32 - 1]``, a dtype other than float32 or float64, ...).
        TypeError: for a seed that is not an integer.
    """
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; supported: {', '.join(sorted(PROBLEMS))}.")
    return PROBLEMS[name](**kwargs)


def mlp(
    sizes: Sequence[int],
    activation: Activation = "tanh",
    bias: bool = True,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """A multilayer perceptron: ``Linear``, activation, ..., ``Linear`` with the given sizes.

    No activation after the last layer (losses take logits). ``seed`` makes the
    initialisation independent of the global generator; ``dtype`` (default: torch's default)
    is the one the weights are drawn in, so a seed gives the same float64 weights whatever the
    default dtype.

    Raises:
        ValueError: for fewer than two sizes, a size that is not a positive integer, an
            unsupported activation or a negative seed.
    """
    if len(sizes) < 2 or any(
        isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in sizes
    ):
        raise ValueError(f"sizes must be at least two positive integers, got {list(sizes)}.")
    sizes = [int(s) for s in sizes]
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation {activation!r} is not supported; use one of {sorted(_ACTIVATIONS)}."
        )
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(d_in, d_out, bias=bias, dtype=dtype))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    model = nn.Sequential(*layers)
    if seed is not None:
        generator = _generator(seed)
        with torch.no_grad():
            for layer in model:
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    if layer.bias is not None:
                        layer.bias.uniform_(-bound, bound, generator=generator)
    return model


def digits_cnn(
    channels: Sequence[int] = (8, 16),
    activation: Activation = "relu",
    seed: int | None = None,
) -> nn.Sequential:
    """A small CNN for the flattened 8x8 digits of :func:`digits` (inputs ``(N, 64)``).

    ``Unflatten`` to ``(N, 1, 8, 8)``; a 3x3 ``Conv2d`` (padding 1) to ``channels[0]``; then one
    3x3 ``Conv2d`` with stride 2 and padding 1 per further entry (8x8 -> 4x4 -> 2x2 ...), each
    followed by the activation; ``Flatten`` and a ``Linear`` to the 10 classes. ``seed`` makes
    the (PyTorch default) initialisation independent of the global generator.
    """
    if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
        raise ValueError(f"channels must be positive integers, got {list(channels)}.")
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation {activation!r} is not supported; use one of {sorted(_ACTIVATIONS)}."
        )

    def build() -> nn.Sequential:
        layers: list[nn.Module] = [nn.Unflatten(1, (1, 8, 8))]
        size, previous = 8, 1
        for i, c in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv2d(previous, c, 3, stride=stride, padding=1),
                _ACTIVATIONS[activation](),
            ]
            size, previous = (size - 1) // stride + 1, c
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(previous * size * size, 10))

    if seed is None:
        return build()
    _generator(seed)  # checks the seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
