"""Assertions shared by the test modules (imported as ``from helpers import ...``)."""

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

RTOL = 1e-10


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Relative Frobenius error ``||actual - expected|| / ||expected||`` below ``rtol``,
    printing the error when it is not."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual - expected).norm() / expected.norm().clamp_min(1e-300)
    assert error <= rtol, f"relative error {error:.3e} > {rtol:.0e}"


def flat(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one detached flat vector (a copy)."""
    return parameters_to_vector(model.parameters()).detach().clone()


def one_step(optimizer: torch.optim.Optimizer, case) -> None:
    """One step of the usual loop on a ``cases.Case``'s batch."""
    optimizer.zero_grad()
    case.loss_fn(case.model(case.X), case.y).backward()
    optimizer.step()


def stdout(outputs: list[dict]) -> str:
    """The text a notebook cell printed to stdout (its stream outputs, joined)."""
    return "".join(
        "".join(o["text"])
        for o in outputs
        if o["output_type"] == "stream" and o["name"] == "stdout"
    )


def nbval_sanitize(text: str) -> str:
    """Apply the book's nbval sanitizer (timings, addresses, progress bars) as nbval does."""
    from natlib.notebooks import sanitizer

    return sanitizer()(text)


def checkout_env() -> dict[str, str]:
    """``os.environ`` with this checkout first on ``PYTHONPATH``, for kernels the tests start.

    A kernel started outside the repository imports the installed ``natlib``; after
    ``pip install -r requirements.txt`` that is this checkout, but on a machine where another
    checkout was installed editable it is that one. This makes the tests test this checkout.
    """
    import os
    from pathlib import Path

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env
