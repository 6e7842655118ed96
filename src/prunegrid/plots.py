"""Figures logged with every run: learning curves and the confusion matrix."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curves_figure(history: list[dict[str, float]], metric: str = "acc"):
    """Loss and ``metric`` (accuracy; mAP50 for a detector) per epoch, train and validation (Kim
    (ResNet transfer learning)'s learning curves)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what in zip(axes, ("loss", metric)):
        for split in ("train", "val"):
            pts = [(h["epoch"], h[f"{split}/{what}"]) for h in history if f"{split}/{what}" in h]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.set_title({"loss": "Loss", "acc": "Accuracy", "map50": "mAP50"}.get(what, what))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_figure(cm: np.ndarray, classes: list[str], title: str = "Confusion matrix (test)"):
    cm = np.asarray(cm)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * n + 3), max(4, 0.6 * n + 2)))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    thresh = cm.max() / 2 if cm.size else 0
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > thresh else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
