"""The figure and PNG writer every benchmark plot uses (a leaf: ``plots`` and ``study`` both
draw with it, so neither imports the other for it).

``matplotlib.figure.Figure`` on the Agg canvas directly: pyplot's global backend is neither
needed nor changed.
"""

from __future__ import annotations

from pathlib import Path


def new_figure(n_panels: int, width_each: float = 5.0, height: float = 3.6):
    """``(figure, [axes])``: one row of ``n_panels`` panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, width_each * n_panels), height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path``; returns ``path``."""
    fig.savefig(path, dpi=110)
    return path
