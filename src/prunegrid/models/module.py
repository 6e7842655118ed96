"""The LightningModule: a plain ``nn.Module`` + a loss + optimizer/scheduler factories.

It knows nothing about pruning; it logs the ``train/``, ``val/`` and ``test/`` metrics of
CONTRACT.md with torchmetrics and keeps the test predictions for the reports.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


class TaskModule(L.LightningModule):
    """What every task's LightningModule shares: ``net``, ``loss_fn`` and the optimizer/scheduler
    factories, built into Lightning's optimizer configuration."""

    def __init__(self, net: nn.Module, loss: nn.Module, optimizer: Callable, scheduler: Callable | None,
                 num_classes: int):
        super().__init__()
        self.net, self.loss_fn = net, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.num_classes = num_classes

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        epochs = max(1, int(self.trainer.max_epochs or 1))
        steps = max(1, int(self.trainer.estimated_stepping_batches) // epochs)
        scheduler = self.scheduler_factory(optimizer, epochs=epochs, steps_per_epoch=steps)
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}


class Classifier(TaskModule):
    def __init__(self, net: nn.Module, loss: nn.Module, optimizer: Callable, scheduler: Callable | None,
                 num_classes: int):
        super().__init__(net, loss, optimizer, scheduler, num_classes)
        acc = lambda: MulticlassAccuracy(num_classes, average="micro")
        self.train_acc, self.val_acc = acc(), acc()
        self.test_metrics = MetricCollection({
            "acc": acc(),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average=None),
            "precision": MulticlassPrecision(num_classes, average=None),
            "recall": MulticlassRecall(num_classes, average=None),
            "confusion": MulticlassConfusionMatrix(num_classes),
        })
        self.test_results: dict[str, torch.Tensor] = {}
        self._test_loss_sum, self._test_n = 0.0, 0
        self._test_preds: list[torch.Tensor] = []
        self._test_targets: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch):
        x, y = batch
        logits = self.net(x)
        return self.loss_fn(logits, y), logits, y

    def training_step(self, batch, batch_idx):
        loss, logits, y = self._step(batch)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, logits, y = self._step(batch)
        self.val_acc(logits, y)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def on_test_epoch_start(self):
        self.test_metrics.reset()
        self._test_loss_sum, self._test_n = 0.0, 0
        self._test_preds, self._test_targets = [], []

    def test_step(self, batch, batch_idx):
        loss, logits, y = self._step(batch)
        self.test_metrics.update(logits, y)
        self._test_loss_sum += float(loss) * len(y)
        self._test_n += len(y)
        self._test_preds.append(logits.argmax(1).cpu())
        self._test_targets.append(y.cpu())

    def on_test_epoch_end(self):
        res = {k: v.detach().cpu() for k, v in self.test_metrics.compute().items()}
        res["loss"] = torch.tensor(self._test_loss_sum / max(1, self._test_n))
        res["preds"] = torch.cat(self._test_preds) if self._test_preds else torch.empty(0, dtype=torch.long)
        res["targets"] = torch.cat(self._test_targets) if self._test_targets else torch.empty(0, dtype=torch.long)
        self.test_results = res
        self.log_dict({"test/acc": res["acc"], "test/loss": res["loss"], "test/f1_macro": res["f1_macro"]})

    @staticmethod
    def test_metrics_of(res: dict[str, Any], classes: list[str]) -> dict[str, float]:
        """``test/acc``, ``test/loss``, ``test/f1_macro`` and the per-class metrics of one test pass."""
        from prunegrid import tracking

        m: dict[str, float] = {"test/acc": float(res["acc"]), "test/loss": float(res["loss"]),
                               "test/f1_macro": float(res["f1_macro"])}
        for kind in tracking.PER_CLASS_KINDS:
            for key, value in zip(tracking.class_keys(kind, classes), res[kind].tolist()):
                m[key] = float(value)
        return m

    @staticmethod
    def log_reports(tr, res: dict[str, Any], classes: list[str], history: Any) -> None:
        """The confusion matrix, the training curves and scikit-learn's classification report."""
        from sklearn.metrics import classification_report

        from prunegrid import plots, tracking

        fig = plots.confusion_figure(res["confusion"].numpy(), classes)
        tr.log_figure(fig, tracking.ARTIFACT_CONFUSION)
        plots.close(fig)
        fig = plots.curves_figure(history)
        tr.log_figure(fig, tracking.ARTIFACT_CURVES)
        plots.close(fig)
        report = classification_report(res["targets"].numpy(), res["preds"].numpy(), labels=list(range(len(classes))),
                                       target_names=classes, digits=4, zero_division=0)
        tr.log_text(report, tracking.ARTIFACT_REPORT)

    def deployment_metrics(self, model_path, data, input_size: int, deploy: Any, threads: int | None) -> dict[str, float]:
        """A classifier's deployment is its model: latency and memory are :func:`measure_model`'s."""
        return {}
