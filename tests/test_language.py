"""natlib.language: the standard-library corpus and the character transformer under K-FAC."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from natlib import language
from natlib.optim import KFAC


def test_corpus_is_deterministic_and_split_by_file() -> None:
    first = language.stdlib_chars(context=32, train_chars=20_000, test_chars=5_000)
    again = language.stdlib_chars(context=32, train_chars=20_000, test_chars=5_000)
    assert torch.equal(first.X_train, again.X_train) and torch.equal(first.X_test, again.X_test)
    assert first.X_train.shape == (20_000 // 32 - (20_000 % 32 == 0), 32)
    assert torch.equal(first.X_train[:, 1:], first.y_train[:, :-1])
    assert torch.equal(first.X_train[1:, 0], first.y_train[:-1, -1])
    files = language.stdlib_files()
    train, test = language.stdlib_text(1_000, 1_000)
    assert train.startswith(files[1].read_text(encoding="utf-8", errors="replace")[:100])
    assert test.startswith(files[0].read_text(encoding="utf-8", errors="replace")[:100])


def test_encode_and_decode() -> None:
    text = "def f(x):\n\treturn x  # é"
    indices = language.encode(text)
    assert indices.max() == language.UNKNOWN and language.VOCABULARY_SIZE == 97
    assert language.decode(indices) == text.replace("\t", "\ufffd").replace("é", "\ufffd")


def test_default_transformer_size_and_shapes() -> None:
    model = language.transformer(seed=0)
    assert 0.9e6 < sum(p.numel() for p in model.parameters()) < 1.1e6
    assert model(torch.zeros(2, 128, dtype=torch.long)).shape == (256, 97)
    with pytest.raises(ValueError, match="T <= 128"):
        model(torch.zeros(2, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of heads"):
        language.transformer(width=10, heads=4)


@functools.cache
def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    data = language.stdlib_chars(context=16, train_chars=4_000, test_chars=1_000)
    return data.X_train[:8], data.y_train[:8].flatten()


def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = language.transformer(context=16, width=16, layers=2, heads=2, seed=0)
    return model, *tiny_data()


def test_kfac_needs_a_choice_for_layernorm_and_embedding() -> None:
    model, _, _ = tiny()
    with pytest.raises(ValueError, match=r"'tokens' \(Embedding\).*unsupported='gradient'"):
        KFAC(model, nn.CrossEntropyLoss())


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
@pytest.mark.parametrize("kind", ["mc", "empirical"])
def test_kfac_trains_the_transformer(kind: str, approximation: str) -> None:
    model, X, y = tiny()
    loss_fn = nn.CrossEntropyLoss()
    options = dict(lr=0.1, damping=0.1, kind=kind, T_inv=2, approximation=approximation)
    optimizer = KFAC(model, loss_fn, unsupported="gradient", **options)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    curvature = optimizer.curvature
    assert curvature.positions["head"] == 16 and curvature.positions["blocks.0.mlp.0"] == 16
    assert {b.name for b in curvature.fallback} >= {"tokens", "positions", "norm"}
    other = KFAC(model, loss_fn, unsupported="gradient", **options)
    other.load_state_dict(optimizer.state_dict())
    assert other.curvature.settings() == curvature.settings()
    assert other.curvature.positions == curvature.positions
    other.remove_hooks()
