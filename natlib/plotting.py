"""One figure style for the whole book, and small plotting helpers.

Importing this module installs the style (:func:`use_style`), so a notebook that imports it
draws every figure in the book's style; call :func:`use_style` again after changing
``matplotlib.rcParams``.
"""

from __future__ import annotations

import matplotlib as mpl

# Okabe-Ito colours: distinguishable under the common forms of colour blindness.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")

STYLE = {
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "figure.dpi": 100,
    "figure.figsize": (7.0, 4.2),
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "legend.frameon": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": mpl.cycler(color=PALETTE),
    "lines.linewidth": 1.8,
    "image.cmap": "viridis",
}


def use_style() -> None:
    """Install the book's figure style (white background, readable sizes, Okabe-Ito colours)."""
    mpl.rcParams.update(STYLE)


use_style()
