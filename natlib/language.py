r"""A character-level language model on Python's own standard library, with no download.

The corpus is the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (outside
``site-packages``), read in sorted order of their relative paths; every tenth file (index
0, 10, 20, ...) goes to the test text, the others to the training text, so the split is by
file and fixed for a given Python version. Characters are mapped to the fixed vocabulary
:data:`VOCABULARY` (newline and printable ASCII), anything else to one unknown symbol.

The model (:func:`transformer`) is a pre-norm decoder-only transformer (Vaswani et al., 2017;
Radford et al., 2019) built from ``nn.Linear`` layers, which K-FAC preconditions as
weight-shared layers over the T positions, and ``nn.LayerNorm``/``nn.Embedding``, which
:class:`natlib.optim.KFAC` trains by plain gradient steps with ``unsupported="gradient"``.
It returns ``(N T, V)`` logits, so the loss is
``nn.CrossEntropyLoss()(model(X), y.flatten())`` and the mean over positions is bits per
character after division by :math:`\ln 2`.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import torch
from torch import Tensor, nn

from natlib.problems import Problem

#: Newline and the printable ASCII characters, each with its own index.
VOCABULARY = "\n" + "".join(chr(c) for c in range(32, 127))
#: The index of every other character.
UNKNOWN = len(VOCABULARY)
VOCABULARY_SIZE = len(VOCABULARY) + 1
TEST_EVERY = 10  # every tenth file is test text


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files in sorted order of their relative paths."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def encode(text: str) -> Tensor:
    """Character indices into :data:`VOCABULARY` (:data:`UNKNOWN` for the rest), int64."""
    table = torch.full((128,), UNKNOWN, dtype=torch.long)
    table[[ord(c) for c in VOCABULARY]] = torch.arange(len(VOCABULARY))
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
    return torch.where(codes < 128, table[codes.clamp(max=127)], UNKNOWN)


def decode(indices: Tensor) -> str:
    """Inverse of :func:`encode`, with the unknown symbol shown as ``"\\ufffd"``."""
    return "".join(VOCABULARY[i] if i < UNKNOWN else "\ufffd" for i in indices.tolist())


def stdlib_text(train_chars: int, test_chars: int) -> tuple[str, str]:
    """The first ``train_chars`` characters of the training files and the first
    ``test_chars`` of the test files, each file's text followed by a newline."""
    parts: dict[bool, list[str]] = {False: [], True: []}
    wanted = {False: train_chars, True: test_chars}
    have = {False: 0, True: 0}
    for index, path in enumerate(stdlib_files()):
        test = index % TEST_EVERY == 0
        if have[test] >= wanted[test]:
            if all(have[k] >= wanted[k] for k in wanted):
                break
            continue
        text = path.read_text(encoding="utf-8", errors="replace") + "\n"
        parts[test].append(text)
        have[test] += len(text)
    train, test = "".join(parts[False]), "".join(parts[True])
    if len(train) < train_chars or len(test) < test_chars:
        raise ValueError(
            f"the standard library holds {len(train)} training and {len(test)} test "
            f"characters, fewer than the {train_chars} and {test_chars} asked for."
        )
    return train[:train_chars], test[:test_chars]


def _windows(indices: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows: inputs ``(N, T)`` and their next characters ``(N, T)``."""
    n = (len(indices) - 1) // context
    X = indices[: n * context].view(n, context)
    y = indices[1 : n * context + 1].view(n, context)
    return X, y


def stdlib_chars(
    context: int = 128,
    train_chars: int = 1_000_000,
    test_chars: int = 100_000,
    device: torch.device | str | None = None,
) -> Problem:
    """Next-character prediction on the standard library's source: ``X`` and ``y`` hold
    ``(N, context)`` character indices, ``y`` shifted by one; loss: mean cross-entropy over
    all ``N context`` positions (flatten ``y``)."""
    if context < 1:
        raise ValueError(f"context must be a positive integer, got {context}.")
    train, test = stdlib_text(train_chars, test_chars)
    device = torch.device(device or "cpu")
    X_train, y_train = (t.to(device) for t in _windows(encode(train), context))
    X_test, y_test = (t.to(device) for t in _windows(encode(test), context))
    return Problem("stdlib-chars", X_train, y_train, X_test, y_test, nn.CrossEntropyLoss())


class CausalSelfAttention(nn.Module):
    r"""Multi-head causal self-attention with separate query, key, value and output
    ``nn.Linear`` layers: :math:`\mathrm{softmax}(QK^\top / \sqrt{d_h} + M) V` per head."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}.")
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.output = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape

        def split(z: Tensor) -> Tensor:
            return z.view(n, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        mixed = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.output(mixed.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """Token and position embeddings, :class:`Block` s, a final LayerNorm and a linear head;
    ``(N, T)`` indices in, ``(N T, V)`` logits out."""

    def __init__(
        self, vocabulary: int, context: int, width: int, layers: int, heads: int, mlp_ratio: int
    ) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] > self.context:
            raise ValueError(
                f"expected (N, T) indices with T <= {self.context}, got shape {tuple(x.shape)}."
            )
        where = torch.arange(x.shape[1], device=x.device)
        h = self.blocks(self.tokens(x) + self.positions(where))
        logits = self.head(self.norm(h))
        return logits.reshape(-1, logits.shape[-1])


def transformer(
    context: int = 128,
    width: int = 144,
    layers: int = 4,
    heads: int = 4,
    mlp_ratio: int = 4,
    vocabulary: int = VOCABULARY_SIZE,
    seed: int | None = None,
) -> CharTransformer:
    """A character-level transformer LM; the defaults hold about :math:`10^6` parameters
    (:math:`12\\,d^2` per block). Linear weights are drawn from :math:`\\mathcal{N}(0, 0.02^2)`
    with zero biases, the output projections scaled by :math:`1/\\sqrt{2L}` (Radford et al.,
    2019); ``seed`` makes the initialisation independent of the global generator."""
    for name, value in (("context", context), ("width", width), ("layers", layers)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}.")
    model = CharTransformer(vocabulary, context, width, layers, heads, mlp_ratio)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("output", "mlp.2")) else 0.02
                module.weight.normal_(0.0, std, generator=generator)
            if isinstance(module, nn.Linear):
                module.bias.zero_()
    return model


class PerPosition(nn.Module):
    """A :class:`CharTransformer` with one example per sequence *and* output position: the
    row ``(x_1, ..., x_T, t)`` gives the logits at position ``t`` of its sequence, ``(M, V)``.

    The loss over the rows of :func:`per_position` is the language model's loss, term by
    term, so :func:`natlib.curvature.ggn` of this module is the language model's exact GGN,
    and K-FAC back-propagates each output position's cotangents on their own (the caveat in
    :mod:`natlib.factors`). Each row runs its whole sequence: for tiny models only.
    """

    def __init__(self, model: CharTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, rows: Tensor) -> Tensor:
        x, where = rows[:, :-1], rows[:, -1]
        logits = self.model(x).view(len(rows), x.shape[1], -1)
        return logits[torch.arange(len(rows), device=rows.device), where]


def per_position(X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The rows and targets of :class:`PerPosition` for windows ``X`` and next characters
    ``y`` (both ``(N, T)``): ``N T`` rows, sequence-major, like the flattened targets."""
    n, t = X.shape
    where = torch.arange(t, device=X.device).repeat(n)
    return torch.cat([X.repeat_interleave(t, 0), where[:, None]], 1), y.flatten()
