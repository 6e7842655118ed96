"""Learning-rate schedules as Lightning scheduler dicts, built from ``conf/scheduler/``.

Each factory is a ``_partial_`` target completed by the LightningModule with the optimizer,
the number of epochs and the optimizer steps per epoch of the fit.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, OneCycleLR, ReduceLROnPlateau


def cosine(optimizer: Optimizer, *, epochs: int, steps_per_epoch: int, t_max_fraction: float = 0.5,
           eta_min: float = 0.0) -> dict:
    """CosineAnnealingLR stepped per epoch with ``T_max = epochs * t_max_fraction`` (Kim (ResNet transfer learning): epochs/2)."""
    t_max = max(1, round(epochs * t_max_fraction))
    return {"scheduler": CosineAnnealingLR(optimizer, T_max=t_max, eta_min=eta_min), "interval": "epoch"}


def cosine_steps(optimizer: Optimizer, *, epochs: int, steps_per_epoch: int, eta_min: float = 0.0) -> dict:
    """Cosine decay stepped per batch from the optimizer's lr to ``eta_min`` over the whole fit, with no
    warm-up: the fine-tuning schedule of the pruning literature (a small learning rate that only falls)."""
    return {"scheduler": CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch), eta_min=eta_min),
            "interval": "step"}


def plateau(optimizer: Optimizer, *, epochs: int, steps_per_epoch: int, factor: float = 0.2, patience: int = 1,
            monitor: str = "val/loss") -> dict:
    """ReduceLROnPlateau on ``monitor``, checked after every validation: a schedule whose end is not tied to
    the epoch cap, so early stopping (not ``max_epochs``) decides when a fit has converged."""
    return {"scheduler": ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience),
            "interval": "epoch", "monitor": monitor}


def onecycle(optimizer: Optimizer, *, epochs: int, steps_per_epoch: int, max_lr_factor: float = 3.0,
             pct_start: float = 0.25) -> dict:
    """One-cycle schedule stepped per batch, peaking at ``max_lr_factor`` x the optimizer's lr."""
    max_lr = [g["lr"] * max_lr_factor for g in optimizer.param_groups]
    sched = OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(8, epochs * steps_per_epoch), pct_start=pct_start)
    return {"scheduler": sched, "interval": "step"}


def constant(optimizer: Optimizer, *, epochs: int, steps_per_epoch: int) -> None:
    """No schedule: the optimizer's learning rate throughout."""
    return None
