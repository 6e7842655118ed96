"""Learning-rate schedules as Lightning scheduler dicts, built from ``conf/scheduler/``.

Each factory is a ``_partial_`` target completed by the LightningModule with the optimizer,
the number of epochs and the optimizer steps per epoch of the fit.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, OneCycleLR


def cosine(optimizer: Optimizer, *, epochs: int, steps_per_epoch: int, t_max_fraction: float = 0.5,
           eta_min: float = 0.0) -> dict:
    """CosineAnnealingLR stepped per epoch with ``T_max = epochs * t_max_fraction`` (Kim (ResNet transfer learning): epochs/2)."""
    t_max = max(1, round(epochs * t_max_fraction))
    return {"scheduler": CosineAnnealingLR(optimizer, T_max=t_max, eta_min=eta_min), "interval": "epoch"}


def onecycle(optimizer: Optimizer, *, epochs: int, steps_per_epoch: int, max_lr_factor: float = 3.0,
             pct_start: float = 0.25) -> dict:
    """One-cycle schedule stepped per batch, peaking at ``max_lr_factor`` x the optimizer's lr."""
    max_lr = [g["lr"] * max_lr_factor for g in optimizer.param_groups]
    sched = OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(8, epochs * steps_per_epoch), pct_start=pct_start)
    return {"scheduler": sched, "interval": "step"}


def constant(optimizer: Optimizer, *, epochs: int, steps_per_epoch: int) -> None:
    """No schedule: the optimizer's learning rate throughout."""
    return None
