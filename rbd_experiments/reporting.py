"""What the experiments show a person: validation curves as PNG, and the machine a number came from."""

from __future__ import annotations

import platform
from pathlib import Path


def draw_curves(acc_ax, loss_ax, curves: dict[str, list[dict]], title: str,
                references: dict[str, float] | None = None) -> None:
    """Validation accuracy and loss against epochs on two axes, one line per label; a dashed line
    at each label's reference accuracy."""
    for label, rows in curves.items():
        epochs = [r["epoch"] for r in rows]
        line, = acc_ax.plot(epochs, [r["val_acc"] for r in rows], marker="o", ms=3, label=label)
        loss_ax.plot(epochs, [r["val_loss"] for r in rows], marker="o", ms=3, color=line.get_color())
        if references and label in references:
            acc_ax.axhline(references[label], ls="--", lw=1, color=line.get_color())
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title=title)
    loss_ax.set(xlabel="epoch", ylabel="validation loss", yscale="log", title=title)
    acc_ax.grid(alpha=0.3)
    loss_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)


def save_figure(panels: list[tuple[dict[str, list[dict]], str, dict[str, float] | None]], path: Path) -> None:
    """One row of (accuracy, loss) axes per panel (curves, title, references), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.8 * len(panels)), squeeze=False)
    for (acc_ax, loss_ax), (curves, title, references) in zip(axes, panels, strict=True):
        draw_curves(acc_ax, loss_ax, curves, title, references)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
