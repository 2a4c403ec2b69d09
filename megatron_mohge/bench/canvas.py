"""The figure, colormaps and PNG writer every benchmark plot uses (a leaf: ``plots``,
``plots_research`` and ``study`` all draw with it, so none imports another for it).

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


def colormap(name: str):
    """Matplotlib's colormap ``name``."""
    import matplotlib

    return matplotlib.colormaps[name]
