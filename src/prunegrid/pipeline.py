"""One cell end to end: data -> model -> method hooks -> fit -> measure -> track.

``run(cfg)`` is what ``train.py`` calls. Everything is built from config with
``_target_``; the pipeline knows no method or backbone by name.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from torch import nn

from prunegrid import hardware, interrupt, measure, plots, tracking
from prunegrid.budget import TAG_REF_PRUNE, Budget
from prunegrid.config import build, cell, check_values, choices, default_option, flatten, with_choices
from prunegrid.errors import ConfigError, one_line
from prunegrid.models.module import Classifier
from prunegrid.models.net import FLOAT, Net
from prunegrid.pruning.base import Context, PruningMethod
from prunegrid.strength import control_of, fmt, knob

log = logging.getLogger("prunegrid")
logging.getLogger("lightning.pytorch").propagate = False  # Lightning prints its own lines; avoid doubles


class FitRecord(Callback):
    """What one fit cost: the wall time of each training epoch (validation excluded), the images
    seen and the fit's seconds. Its state goes into every checkpoint, so a resumed fit counts the
    epochs, images and seconds of the attempt that was interrupted."""

    def __init__(self):
        self.times: list[float] = []
        self.images = 0
        self.seconds_before = 0.0
        self._t0: float | None = None
        self._fit_t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self._fit_t0

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def _stop(self):
        if self._t0 is not None:
            self.times.append(time.perf_counter() - self._t0)
            self._t0 = None

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._stop()

    def on_train_epoch_end(self, trainer, pl_module):
        self._stop()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += len(batch[0])

    def state_dict(self) -> dict:
        return {"times": list(self.times), "images": self.images, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.times, self.images = list(state["times"]), int(state["images"])
        self.seconds_before, self._fit_t0 = float(state["seconds"]), time.perf_counter()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: the file is written beside its name and renamed,
    with SIGINT/SIGTERM held until then, so an interrupted cell always has a whole last checkpoint."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        with interrupt.deferred():
            super().save_checkpoint(checkpoint, part, storage_options)
            os.replace(part, path)


class StopAfter(Callback):
    """End the fit after exactly ``epochs`` epochs, whatever ``max_epochs`` is: a model trained
    for a matched budget keeps the schedule (sized by ``max_epochs``) of the model it matches."""

    def __init__(self, epochs: int):
        self.epochs = int(epochs)

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


LAST_FILE, DONE_FILE = "last.ckpt", "done.pt"


def _rng_state() -> dict:
    """The global random states (torch, NumPy, Python), in a form ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      cached], "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass
class FitStats:
    seconds: float = 0.0
    epoch_times: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    process_peak_mb: float = 0.0
    epochs: int = 0
    images: int = 0
    early_stopped: bool = False


def output_dir(cfg: DictConfig) -> Path:
    if cfg.paths.get("output_dir"):
        return Path(cfg.paths.output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")


def pretrained_path(cfg: DictConfig, backbone: str | None = None) -> Path:
    """Where the grid's ``pretrain`` stage writes a backbone's source-task weights."""
    return Path(cfg.transfer.dir) / f"{backbone or cell(cfg)['backbone']}-{cfg.transfer.source}.pt"


class Cell:
    """The objects of one cell and the training / evaluation steps methods may call."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.cell = cell(cfg)
        self.out = output_dir(cfg)
        self.data = build(cfg.dataset, seed=cfg.seed)
        self.data.setup()
        self.num_classes = self.data.num_classes
        self.input_size = int(cfg.dataset.input_size)
        weights = {"weights_path": str(pretrained_path(cfg))} if cfg.get("transfer", {}).get("source") else {}
        self.net: nn.Module = build(cfg.backbone, num_classes=self.num_classes, input_size=self.input_size, **weights)
        self.task = cfg.get("task") or {}
        self.module_factory = build(self.task["module"]) if self.task.get("module") else Classifier
        self.module_cls = getattr(self.module_factory, "func", self.module_factory)
        self.method: PruningMethod = build(cfg.prune)
        self.loss = build(cfg.loss)
        self.optimizer = build(cfg.optimizer)
        self.scheduler = build(cfg.scheduler)
        self.finetune_optimizer = build(cfg.finetune.optimizer)
        self.finetune_scheduler = build(cfg.finetune.scheduler) if cfg.finetune.get("scheduler") else None
        self.precision = hardware.resolve_precision(cfg.trainer.get("precision", "32-true"))
        self.fits: list[FitStats] = []
        self.budget = Budget()
        self.tracker: tracking.Tracker | None = None
        self.logger: tracking.EpochLogger | None = None
        self.checkpoints: Path | None = None  # the run's checkpoint folder (set once the run exists)
        self._fits_started = 0
        self.recipes: list[str] = []  # the recipe of each fit this process ran: main or finetune

    # -- steps offered to methods through Context ---------------------------------------
    def _trainer(self, epochs: int, callbacks: list, logger: Any, early_stopping: bool = True,
                 ckpt_dir: Path | None = None) -> L.Trainer:
        cbs = [build(c) for c in (self.cfg.trainer.get("callbacks") or {}).values() if c]
        if not early_stopping:
            cbs = [c for c in cbs if not isinstance(c, EarlyStopping)]
        if ckpt_dir is not None:
            for cb in cbs:
                if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                    cb.dirpath = str(ckpt_dir)
            cbs.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename=LAST_FILE.removesuffix(".ckpt"), save_top_k=1,
                                       monitor=None, enable_version_counter=False))
        elif not any(isinstance(c, ModelCheckpoint) for c in cbs):
            cbs.append(ModelCheckpoint(save_top_k=0, save_last=False))
        return build(self._trainer_node(), max_epochs=epochs, callbacks=cbs + list(callbacks), logger=logger,
                     default_root_dir=str(self.out), plugins=[AtomicCheckpointIO()])

    def _trainer_node(self) -> DictConfig:
        """The trainer's settings without its callbacks, ``precision: auto`` resolved for this machine."""
        node = OmegaConf.masked_copy(self.cfg.trainer, [k for k in self.cfg.trainer if k != "callbacks"])
        node.precision = self.precision
        return node

    def fit(self, net: nn.Module, epochs: int, callbacks: list | tuple = (), *, early_stopping: bool = True,
            stop_after: int | None = None, finetune: bool = False) -> nn.Module:
        """Train ``net`` for up to ``epochs`` with the configured trainer; return the best weights
        (checkpoint chosen on the validation split).

        ``early_stopping=False`` drops the configured early stopping, so the fit runs all its
        epochs (fine-tuning); ``stop_after=N`` ends it after exactly N epochs with the schedule
        still sized for ``epochs`` (a budget matched to a baseline). Every fit adds its epochs,
        images and seconds to the cell's :class:`~prunegrid.budget.Budget`.

        With a checkpoint folder (a tracked run), the fit writes ``last.ckpt`` after every epoch
        and, when it ends, its result (``done.pt``). A resumed run replays its fits in order: a
        fit that had ended is restored from ``done.pt`` (weights, statistics, random state), the
        interrupted one continues from ``last.ckpt`` (optimizer, scheduler, epoch, callbacks).

        ``finetune=True`` trains with the fine-tuning recipe (``cfg.finetune``: its own optimizer and
        schedule) instead of the main fit's. Every fit starts with the whole net in train mode: a net
        that comes back from evaluation or from a saved file is in eval mode, and Lightning keeps the
        mode it finds, which would fine-tune with frozen BatchNorm statistics and dropout off.
        """
        k = self._fits_started
        self._fits_started += 1
        fit_dir = self.checkpoints / f"fit{k}" if self.checkpoints is not None else None
        if fit_dir is not None and (fit_dir / DONE_FILE).is_file():
            return self._restore_fit(net, fit_dir / DONE_FILE)
        net.train()
        module = self.module(net, finetune=finetune)
        self.recipes.append("finetune" if finetune else "main")
        record = FitRecord()
        extra = [StopAfter(stop_after)] if stop_after else []
        trainer = self._trainer(epochs, [record, *extra, *callbacks], self.logger or False,
                                early_stopping=early_stopping and not stop_after, ckpt_dir=fit_dir)
        last = fit_dir / LAST_FILE if fit_dir is not None else None
        resume_from = str(last) if last is not None and last.is_file() else None
        if resume_from:
            log.info("fit %d resumes from %s", k, resume_from)
        with measure.PeakMemory() as mem:
            trainer.fit(module, datamodule=self.data, ckpt_path=resume_from)
        stopped = any(isinstance(c, EarlyStopping) and c.stopped_epoch > 0 for c in trainer.callbacks)
        stats = FitStats(record.seconds, record.times,
                         mem.cuda_peak_mb if mem.cuda_peak_mb is not None else mem.increase_mb, mem.peak_mb,
                         len(record.times), record.images, stopped)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            try:
                module.load_state_dict(state)
            except RuntimeError:
                log.warning("best checkpoint does not fit the model changed during training; keeping the last weights")
        self._fit_done(stats, trainer.current_epoch)
        if fit_dir is not None:
            AtomicCheckpointIO().save_checkpoint({"state_dict": module.net.state_dict(), "stats": asdict(stats),
                                                  "epochs_done": int(trainer.current_epoch), "rng": _rng_state()},
                                                 fit_dir / DONE_FILE)
        return module.net

    def _fit_done(self, stats: FitStats, epochs_done: int) -> None:
        self.fits.append(stats)
        self.budget.add(stats.epochs, stats.images, stats.seconds)
        if self.logger is not None:
            self.logger.next_fit(epochs_done)

    def _restore_fit(self, net: nn.Module, path: Path) -> nn.Module:
        """A fit that ended before the run was interrupted: its weights, statistics and random state."""
        done = torch.load(path, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(done["state_dict"])
        except RuntimeError as exc:
            raise ConfigError(f"cannot resume: the model no longer matches {path} ({one_line(exc)[:200]}); "
                              "start a new run (resume=false)") from None
        log.info("fit %s restored from %s", path.parent.name, path)
        self._fit_done(FitStats(**done["stats"]), int(done["epochs_done"]))
        _set_rng_state(done["rng"])
        return net

    def module(self, net: nn.Module, finetune: bool = False):
        """The task's LightningModule around ``net`` (``task.module``: a classifier or a detector), with
        the main fit's optimizer and schedule, or the fine-tuning recipe's (``finetune``)."""
        if finetune:
            return self.module_factory(net, self.loss, self.finetune_optimizer, self.finetune_scheduler,
                                       self.num_classes)
        return self.module_factory(net, self.loss, self.optimizer, self.scheduler, self.num_classes)

    def evaluate(self, net: nn.Module, split: str = "val", max_batches: int | None = None) -> dict[str, float]:
        """The task's validation metrics of ``net`` on a split, without the ``val/`` prefix
        (``acc`` and ``loss`` for a classifier, ``map50``, ``map`` and ``loss`` for a detector;
        ``trainer.validate``; ``max_batches`` caps the batches read, else the whole split). The
        net's train/eval mode is kept."""
        module = self.module(net)
        on_cpu = isinstance(net, Net) and net.contract is not None and FLOAT not in net.contract.capabilities
        trainer = build(self._trainer_node(), logger=False, callbacks=[], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=max_batches or 1.0,
                        default_root_dir=str(self.out), **({"accelerator": "cpu"} if on_cpu else {}))
        was = net.training
        try:
            (res,) = trainer.validate(module, dataloaders=self.data.loader(split, shuffle=False), verbose=False)
        finally:
            net.train(was)
        return {k.split("/", 1)[1]: float(v) for k, v in res.items() if k.startswith("val/")}

    def context(self) -> Context:
        tr = self.tracker
        return Context(
            num_classes=self.num_classes, input_size=self.input_size, seed=int(self.cfg.seed),
            fit=lambda net, epochs, callbacks=(): self.fit(net, epochs, callbacks, early_stopping=False, finetune=True),
            evaluate=self.evaluate, loader=self.data.loader,
            log_metrics=(lambda m: tr.log_metrics(m)) if tr else (lambda m: None),
            log_artifact=(lambda p, a=None: tr.log_artifact(p, a)) if tr else (lambda p, a=None: None),
            artifact_dir=tr.artifact_dir if tr else self.out, extras={"cfg": self.cfg, "cell": self.cell},
            loss=self.loss,
        )

    # -- the whole cell -------------------------------------------------------------------
    def test(self, net: nn.Module) -> dict[str, Any]:
        module = self.module(net)
        trainer = build(self._trainer_node(), logger=False, callbacks=[], enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=str(self.out))
        trainer.test(module, datamodule=self.data, verbose=False)
        return module.test_results


def _load_baseline(path: str, net: nn.Module, num_classes: int) -> nn.Module:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prune.baseline_ckpt={path} does not exist; give the model.pt of the prune=none cell")
    base = measure.load_model(p)
    if not isinstance(base, Net) or base.contract is None:
        raise ConfigError(f"prune.baseline_ckpt={path} is not a model saved by this prunegrid; re-run the prune=none cell")
    if base.arch != net.arch or base.num_classes != num_classes:
        raise ConfigError(f"prune.baseline_ckpt={path} is a {base.arch} with {base.num_classes} classes; "
                          f"this cell needs {net.arch} with {num_classes} classes")
    return base


def _matched_epochs(path: str | None) -> tuple[int, int] | None:
    """``budget.match``: the training epochs (and convergence flag) recorded in a baseline model."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"budget.match={path} does not exist; give the model.pt of the trained prune=none cell")
    model = measure.load_model(p)
    budget = Budget.from_dict(model.train_budget if isinstance(model, Net) else None)
    if budget.epochs < 1:
        raise ConfigError(f"budget.match={path} records no training epochs; re-train that baseline")
    return budget.epochs, budget.converged


def train_or_load(c: Cell, ctx: Context, start_net: nn.Module | None,
                  matched: tuple[int, int] | None = None) -> nn.Module:
    """Step 1 of every cell: load the trained baseline, train it, or let the method shape training.

    A method that lightens a trained baseline (``from_baseline``) gets a plain baseline: the
    loaded ``baseline_ckpt`` (its budget carried over) or one trained here. A method that shapes
    training from scratch trains with its hooks, for exactly the baseline's epochs when
    ``matched`` (``budget.match``: the baseline's epochs and convergence) is given (equal budgets),
    else under the trainer's settings.
    """
    cfg = c.cfg
    if start_net is not None:
        c.budget = Budget.from_dict(start_net.train_budget)
        if c.budget.epochs < 1:
            log.warning("prune.baseline_ckpt records no training budget (saved by an older prunegrid); "
                        "budget/epochs counts this cell's training only")
        return start_net
    epochs = int(cfg.trainer.max_epochs)
    if c.method.from_baseline:
        net = c.fit(c.net, epochs)
        c.budget.converged = int(c.fits[-1].early_stopped)
        return net
    net = c.method.before_fit(c.net, ctx)
    if matched is None:
        net = c.fit(net, epochs, c.method.callbacks(ctx))
        c.budget.converged = int(c.fits[-1].early_stopped)
        return net
    net = c.fit(net, epochs, c.method.callbacks(ctx), stop_after=matched[0])
    c.budget.converged = matched[1]
    return net


def reinitialize(net: nn.Module) -> nn.Module:
    """Every layer of ``net`` back to PyTorch's default initialisation (``reset_parameters``), its
    architecture untouched; BatchNorm running statistics reset too."""
    for module in net.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return net


def scratch_e(c: Cell, net: nn.Module) -> nn.Module:
    """Scratch-E (Liu et al., "Rethinking the Value of Network Pruning", ICLR 2019): the architecture the
    method produced, re-initialised (:func:`reinitialize`) and trained from scratch with the main recipe
    for as many epochs as the pruned-and-fine-tuned model had in all (its start model's epochs plus
    ``finetune_epochs``), every epoch (no early stopping). The budget then counts this training only,
    which equals the equal-budget reference's; ``train/converged`` stays the start model's."""
    epochs = c.budget.epochs + c.method.finetune_epochs
    if epochs < 1:
        raise ConfigError("prune.reinit=true needs the epochs of the start model; give prune.baseline_ckpt "
                          "(or budget.match) of a trained prune=none cell")
    log.info("Scratch-E: the pruned architecture re-initialised and trained from scratch for %d epochs", epochs)
    c.budget = Budget(converged=c.budget.converged)
    return c.fit(reinitialize(net), epochs, early_stopping=False)


def _method_tags(cfg: DictConfig) -> dict[str, str]:
    """The method, its strength and its control as run tags (the trade-off report groups runs by them)."""
    method = choices(cfg).get("prune", "")
    k = knob(cfg.prune)
    tags = {tracking.TAG_METHOD: method, tracking.TAG_CONTROL: control_of(cfg.prune) or "none"}
    if k:
        tags.update({tracking.TAG_STRENGTH_KNOB: k, tracking.TAG_STRENGTH: fmt(cfg.prune.get(k))})
    return tags


def recalibrate(c: Cell, net: nn.Module) -> nn.Module:
    """BatchNorm recalibration after a structural change (NNCF's "BN adaptation"): the running statistics
    re-estimated on ``bn_recalibration.batches`` training batches with no weight update (torch's
    ``swa_utils.update_bn``), unless ``bn_recalibration.enabled=false``. Logs the validation metrics right
    after the change and after recalibration (``recovery/after_change_*``, ``recovery/after_recalibration_*``)."""
    from itertools import islice

    from torch.optim.swa_utils import update_bn

    rcfg = c.cfg.get("bn_recalibration") or {}
    metrics = {f"{RECOVERY}after_change_{k}": v for k, v in c.evaluate(net, "val").items()}
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    if rcfg.get("enabled", True) and has_bn:
        device = next(net.parameters()).device
        batches = int(rcfg.get("batches", 20))
        log.info("BatchNorm recalibration on %d training batches", batches)
        update_bn(islice(c.data.loader("train", shuffle=True), batches), net, device=device)
        metrics.update({f"{RECOVERY}after_recalibration_{k}": v for k, v in c.evaluate(net, "val").items()})
    if c.tracker is not None:
        c.tracker.log_metrics(metrics)
    return net


RECOVERY, TAG_RECIPES, TAG_PRECISION = "recovery/", "fit_recipes", "precision"


@dataclass
class CellResult(Mapping):
    """What :func:`run` returns. It reads as the run's metrics (``result["test/acc"]``) and carries
    the MLflow run id, the saved final model, the test results (per-class arrays, predictions) and
    one :class:`FitStats` per fit."""

    metrics: dict[str, float]
    run_id: str
    model_path: Path | None = None
    test: dict[str, Any] = field(default_factory=dict)
    fits: list[FitStats] = field(default_factory=list)

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]

    def __iter__(self):
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)


def run(cfg: DictConfig, parent_run_id: str | None = None) -> CellResult:
    """Train, lighten, measure and track one cell; return its :class:`CellResult`.

    One sequence for every method: train or load the baseline (:func:`train_or_load`), apply
    the method (``after_fit``), fine-tune for exactly ``finetune_epochs``, then read the
    validation split once more and the test split once; then the same measurements for every
    method (:func:`measure_model`), the reports and the Grad-CAM explanations, and the files
    ``paths.*`` asks for. Only then is the run FINISHED.

    SIGINT/SIGTERM end the run KILLED (``status_detail`` says which) by raising
    :class:`~prunegrid.interrupt.Interrupted`: nothing is tested or measured after it, and the
    checkpoints stay. ``resume=true`` continues the latest KILLED or FAILED run of the same
    config (``config_md5`` tag) in that same MLflow run, from its checkpoints; with none to
    resume, a new run starts.
    """
    from prunegrid import progress

    name = tracking.run_name(cell(cfg)) if progress.active() else None
    if name:
        progress.cell_started(name)
    parent_run_id = parent_run_id or cfg.tracking.get("parent_run_id")
    with interrupt.signals():
        result = _run(cfg, parent_run_id)
    if name:
        progress.cell_finished(name)
    return result


def _run(cfg: DictConfig, parent_run_id: str | None) -> CellResult:
    laps = measure.Laps()
    laps.lap("startup")
    check_values(cfg)  # before anything is built or logged (train.py -m, sweeps, configs built in code)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    cfg = with_choices(cfg)
    c = Cell(cfg)
    baseline_net = copy.deepcopy(c.net)
    c.method.serves(c.net)
    c.method.check(c.net, c.context())
    start_net = _load_baseline(c.method.baseline_ckpt, c.net, c.num_classes) if c.method.baseline_ckpt else None
    matched = None if start_net is not None or c.method.from_baseline else _matched_epochs(cfg.budget.get("match"))
    if matched and matched[0] > int(cfg.trainer.max_epochs):
        raise ConfigError(f"budget.match asks for {matched[0]} epochs, more than trainer.max_epochs="
                          f"{cfg.trainer.max_epochs}; give the grid's max_epochs")

    params = run_params(cfg)
    config_md5 = tracking.config_md5(params)
    commit = tracking.git_commit(Path(__file__).parent)
    tags = {**c.cell, **tracking.source_tags(commit), tracking.TAG_RUN_KIND: "cell", "git_commit": commit,
            "data_md5": tracking.data_md5(cfg.dataset.get("root")), "status_detail": "running",
            TAG_REF_PRUNE: c.method.reference, tracking.TAG_CONFIG_MD5: config_md5, **_method_tags(cfg),
            tracking.TAG_HOST: tracking.host_name(), **_baseline_tags(c, cfg),
            **{str(k): str(v) for k, v in (cfg.tracking.get("tags") or {}).items()}}
    exp = cfg.tracking.get("experiment") or c.cell["dataset"]
    name = tracking.display_name(c.cell, tags, default_option("loss"))
    c.tracker = tracking.Tracker(cfg.tracking.get("uri"), exp, name, tags)
    resume_id = c.tracker.resumable(config_md5) if cfg.get("resume") else None
    if cfg.get("resume") and resume_id is None:
        log.warning("resume=true: no KILLED or FAILED run of this config in %s; starting a new run", exp)
    with c.tracker.run(params, parent_run_id=parent_run_id, resume_run_id=resume_id) as tr, \
            _system_metrics(tr, cfg.tracking) as sysm:
        c.checkpoints = Path(cfg.paths.get("checkpoint_dir") or "checkpoints") / tr.run_id
        c.logger = tr.lightning_logger()
        if resume_id:
            c.logger.restore()
            tr.set_tags({str(k): str(v) for k, v in (cfg.tracking.get("tags") or {}).items()})
        else:
            _log_dataset(c, tr)
        ctx = c.context()
        tr.log_text(OmegaConf.to_yaml(cfg, resolve=True), tracking.ARTIFACT_CONFIG)
        if c.data.splits.bad_images:
            tr.log_metrics({"data/bad_images_skipped": c.data.splits.bad_images})

        laps.lap("build")
        net = train_or_load(c, ctx, start_net, matched)
        net = c.method.after_fit(net, ctx)
        if c.method.reinit:
            net = scratch_e(c, net)
        else:
            if c.method.structural:
                net = recalibrate(c, net)
            if c.method.finetune_epochs:
                net = c.fit(net, c.method.finetune_epochs, c.method.finetune_callbacks(ctx), early_stopping=False,
                            finetune=True)
        tr.set_tags({TAG_RECIPES: ",".join(c.recipes) or "none", TAG_PRECISION: c.precision})
        laps.lap("train")

        metrics = {f"val/final_{k}": v for k, v in c.evaluate(net, "val").items()}
        test = c.test(net)
        metrics.update(c.module_cls.test_metrics_of(test, c.data.classes))
        laps.lap("evaluate")
        net.train_budget = c.budget.as_dict()
        net, baseline_net = net.cpu(), baseline_net.cpu()
        model_path = measure.save_model(net, tr.artifact_dir / tracking.MODEL_FILE)
        tr.log_artifact(model_path, tracking.ARTIFACT_MODEL_DIR)
        tr.set_tags({tracking.TAG_MODEL_MD5: tracking.file_md5(model_path)})
        laps.lap("save")
        with sysm.paused(), measure.exclusive(cfg.measure.get("lock")) as window:
            metrics.update(measure_model(net, baseline_net, model_path, method=c.method, input_size=c.input_size,
                                         mcfg=cfg.measure, tr=tr, laps=laps))
            metrics.update(_deployment(c, net, model_path))
            laps.lap("deployment")
        metrics["time/measure_wait_s"] = window["wait_s"]
        tr.set_tags({tracking.TAG_MEASURE_WINDOW: f"{window['start']:.3f}-{window['end']:.3f}"})
        model_uri = _log_mlflow_model(c, tr, net) if cfg.tracking.get("log_model", True) else None
        laps.lap("log_model")
        metrics.update(fit_metrics(c.fits, c.budget))
        metrics.update(c.method.report(net, ctx))
        tr.log_metrics(metrics)
        if model_uri:
            tracking.log_model_metrics(tr.uri, tr.run_id, model_uri, metrics, c.cell["dataset"],
                                       tracking.data_md5(cfg.dataset.get("root")))
        c.module_cls.log_reports(tr, test, c.data.classes, c.logger.history)
        laps.lap("reports")
        from prunegrid.explain import log_run_explanations  # Grad-CAM and cam_agreement (BaiNa & Joe (explainable channel attention))
        explained, stand_in = c.method.explained(net)
        if (cfg.get("explain") or {}).get("enabled", False):
            log.info("Grad-CAM of %d fixed test images", int(cfg.explain.n_images))
        metrics.update(log_run_explanations(
            explained, test=c.data.full_test, transform=c.data.transform(False), classes=c.data.classes,
            normalized=bool(c.data.normalize), cell=c.cell, input_size=c.input_size, ecfg=cfg.get("explain"),
            tr=tr, baseline_ckpt=c.method.baseline_ckpt, stand_in=stand_in))
        laps.lap("explain")
        result = CellResult(metrics, tr.run_id, model_path, test, list(c.fits))
        _write_outputs(cfg, net, result, c.cell)
        if cfg.paths.get("metrics_out"):
            tr.log_artifact(cfg.paths.metrics_out, tracking.ARTIFACT_OUTPUTS)
        laps.lap("outputs")
        tr.log_metrics(laps.metrics())
    shutil.rmtree(c.checkpoints, ignore_errors=True)
    _summary(c.cell, result, tr.uri)
    return result


@contextmanager
def _system_metrics(tr: tracking.Tracker, tcfg: DictConfig) -> Iterator[tracking.SystemMetrics]:
    """MLflow system metrics sampled while the run trains (``tracking.system_metrics``), paused by the
    pipeline while it times latency and memory."""
    sysm = tracking.SystemMetrics(tr.run_id, tr.uri, float(tcfg.get("system_metrics_interval_s") or 10),
                                  bool(tcfg.get("system_metrics", True)))
    sysm.start()
    try:
        yield sysm
    finally:
        sysm.stop()


def _log_dataset(c: Cell, tr: tracking.Tracker) -> None:
    s = c.data.splits
    sizes = {"train": len(s.train), "val": len(s.val) if s.val is not None else 0, "test": len(s.test)}
    root = c.cfg.dataset.get("root") or c.cfg.paths.data_dir
    tracking.log_dataset(tr.client, tr.run_id, c.cell["dataset"], tracking.data_md5(c.cfg.dataset.get("root")),
                         str(root), sizes, c.num_classes)


def _log_mlflow_model(c: Cell, tr: tracking.Tracker, net: nn.Module) -> str:
    """The final model as an MLflow model named after the cell (``mlflow.pyfunc.load_model`` predicts
    with it; tag ``model_uri``), with two validation images as its input example; its URI. It is logged
    at the step after the run's last epoch, so none of the epochs' metrics is copied onto it."""
    images, _ = next(iter(c.data.loader("val", shuffle=False, batch_size=2)))
    onnx_path = tr.artifact_dir / tracking.ONNX_FILE
    step = max((int(h["epoch"]) for h in c.logger.history), default=-1) + 1
    uri, flavor, why = tracking.log_model(tr.uri, tr.run_id, net, images.numpy(),
                                          onnx_path if onnx_path.is_file() else None,
                                          name=tracking.model_name(c.cell), step=step)
    tr.set_tags({tracking.TAG_MODEL_URI: uri, tracking.TAG_MODEL_FLAVOR: flavor,
                 **({"model_flavor_reason": why} if why else {})})
    return uri


def run_params(cfg: DictConfig) -> dict[str, Any]:
    """The run's params: the whole resolved config, flattened, without ``resume`` (an instruction,
    not a setting: a resumed run keeps the params it started with) and ``tracking.tags`` (tags of
    this attempt, such as the Ray grid's, logged as tags)."""
    return {k: v for k, v in flatten(cfg).items() if k != "resume" and not k.startswith("tracking.tags.")}


def _baseline_tags(c: Cell, cfg: DictConfig) -> dict[str, str]:
    """``baseline_md5``: the md5 of the baseline model file this cell read (``prune.baseline_ckpt``, or
    ``budget.match`` for a method trained from scratch), to match with that run's ``model_md5``."""
    path = c.method.baseline_ckpt or cfg.budget.get("match")
    return {tracking.TAG_BASELINE_MD5: tracking.file_md5(path)} if path and Path(path).is_file() else {}


def _write_outputs(cfg: DictConfig, net: nn.Module, result: CellResult, cell: dict[str, str]) -> None:
    """The final model and a metrics JSON at fixed paths, for DVC's per-cell ``outs`` and ``metrics``
    (written before the run is marked FINISHED; a failure here ends it FAILED)."""
    try:
        _write_output_files(cfg, net, result, cell)
    except OSError as exc:
        raise ConfigError(f"cannot write the run's outputs ({exc}); give writable paths.model_out, "
                          "paths.weights_out and paths.metrics_out") from exc


def _write_output_files(cfg: DictConfig, net: nn.Module, result: CellResult, cell: dict[str, str]) -> None:
    if cfg.paths.get("model_out"):  # the very file that was measured and logged (its model_md5)
        out = Path(cfg.paths.model_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.model_path, out)
    if cfg.paths.get("weights_out"):
        out = Path(cfg.paths.weights_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), out)
    if cfg.paths.get("metrics_out"):
        import json

        out = Path(cfg.paths.metrics_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"run_id": result.run_id, **cell, **result.metrics}, indent=1, sort_keys=True))


def _summary(cell: dict[str, str], result: CellResult, uri: str) -> None:
    m = result.metrics
    keys = ["test/acc", "test/f1_macro", "test/map50", "test/map", "model/params", "model/params_nonzero",
            "model/flops", "model/size_mb", "time/train_s", "time/epoch_s", "time/infer_ms", "speedup/infer", "time/infer_ms_onnx",
            "speedup/infer_onnx", "memory/infer_peak_mb", "memory/train_peak_mb"]
    width = max(map(len, keys))
    lines = [f"{k:<{width}}  {m[k]:,.4g}" if abs(m[k]) < 1e5 else f"{k:<{width}}  {m[k]:,.0f}" for k in keys if k in m]
    print(f"\nprunegrid: {tracking.run_name(cell)} -> run {result.run_id} in {uri}")
    print("\n".join(lines))


def fit_metrics(fits: list[FitStats], budget: Budget) -> dict[str, float]:
    """Training time, the last fit's mean epoch time, training memory and the budget of all fits."""
    last = fits[-1] if fits else FitStats()
    m = {"time/train_s": sum(f.seconds for f in fits),
         "time/epoch_s": sum(last.epoch_times) / len(last.epoch_times) if last.epoch_times else 0.0,
         "memory/train_peak_mb": max((f.peak_mb for f in fits), default=0.0)}
    if fits:
        m["memory/train_process_peak_mb"] = max(f.process_peak_mb for f in fits)
    m.update(budget.metrics())
    return m


def measure_model(net: nn.Module, baseline_net: nn.Module, model_path: Path, *, method: PruningMethod,
                  input_size: int, mcfg: DictConfig, tr: tracking.Tracker,
                  laps: measure.Laps | None = None) -> dict[str, float]:
    """The measurements every cell gets, the same functions for the baseline and every method:
    parameters, FLOPs and size (the dense baseline's counts alongside), latency against the dense
    baseline in eager PyTorch and in ONNX Runtime, and the saved model's memory (each step a lap
    of ``laps``)."""
    laps = laps or measure.Laps(since_process_start=False)
    m = measure.static_metrics(net, input_size)
    m["model/size_mb"] = measure.file_size_mb(model_path)
    m[tracking.SIZE_COMPRESSED] = measure.compressed_size_mb(net)
    base_static = measure.static_metrics(baseline_net, input_size)
    m.update({tracking.BASELINE_PREFIX + k.split("/", 1)[1]: v for k, v in base_static.items()
              if k in ("model/params", "model/flops")})
    device = measure.resolve_device(mcfg.get("device", "auto"), net, input_size)
    tr.set_tags({tracking.TAG_MEASURE_DEVICE: device})
    laps.lap("static")
    log.info("measuring: eager latency against the dense baseline on %s (%d interleaved rounds x 3 deployments)",
             device, int(mcfg.repeats))
    m.update(_latency(net, baseline_net, input_size, mcfg, device))
    laps.lap("latency_eager")
    m.update(_onnx_metrics(method, net, baseline_net, input_size, mcfg, tr))
    laps.lap("onnx")
    m.update(_memory(model_path, input_size, mcfg, device, tr))
    laps.lap("memory")
    return m


def _deployment(c: Cell, net: nn.Module, model_path: Path) -> dict[str, float]:
    """The task's whole deployed pipeline (a detector: reading, resizing, the model and NMS over test
    images, memory sampled every second), measured in a fresh process; a failure records why in the
    ``deploy_status`` tag instead of failing the run."""
    try:
        m = c.module(net).deployment_metrics(model_path, c.data, c.input_size, c.task.get("deploy"),
                                             c.cfg.measure.threads)
    except Exception as exc:
        reason = one_line(exc)
        log.warning("deployment measurement failed: %s", reason)
        c.tracker.set_tags({tracking.TAG_DEPLOY_STATUS: reason})
        return {}
    if m:
        c.tracker.set_tags({tracking.TAG_DEPLOY_STATUS: "ok"})
    return m


def _deployments(mcfg: DictConfig) -> list[measure.Setting]:
    return measure.settings(mcfg.threads, mcfg.get("threads_all"), mcfg.batch_size)


def _latency(net: nn.Module, baseline_net: nn.Module, input_size: int, mcfg: DictConfig,
             device: str) -> dict[str, float]:
    """Eager latency of the final model against the dense baseline, interleaved, on ``device``
    (``measure.device``, ``auto``: the GPU when there is one and the model runs there; an INT8
    model runs on the CPU)."""
    net, baseline_net = net.to(device), baseline_net.to(device)
    try:
        return measure.latency_metrics(
            lambda s: measure.compare_eager(net, baseline_net, input_size, s, warmup=mcfg.warmup,
                                            repeats=mcfg.repeats), _deployments(mcfg))
    finally:
        net.cpu()
        baseline_net.cpu()


def _onnx_metrics(method: PruningMethod, net: nn.Module, baseline_net: nn.Module, input_size: int,
                  mcfg: DictConfig, tr: tracking.Tracker) -> dict[str, float]:
    """The method's ONNX model (``method.to_onnx``: INT8 for quantization) timed against the dense
    baseline's ONNX model in ONNX Runtime. A model that cannot be exported records why in the
    ``onnx_status`` tag instead of failing the run."""
    import tempfile

    try:
        log.info("measuring: ONNX export, then ONNX Runtime latency against the dense baseline")
        onnx_path = method.to_onnx(net, input_size, tr.artifact_dir / tracking.ONNX_FILE)
        with tempfile.TemporaryDirectory(prefix="prunegrid-onnx-") as tmp:
            base_path = measure.export_onnx(baseline_net, input_size, Path(tmp) / "baseline.onnx")
            m = measure.latency_metrics(
                lambda s: measure.compare_onnx(onnx_path, base_path, input_size, s, warmup=mcfg.warmup,
                                               repeats=mcfg.repeats), _deployments(mcfg), runtime="_onnx")
    except Exception as exc:
        reason = one_line(exc)
        log.warning("ONNX export/latency skipped: %s", reason)
        tr.set_tags({tracking.TAG_ONNX_STATUS: reason})
        return {}
    tr.log_artifact(onnx_path, tracking.ARTIFACT_MODEL_DIR)
    tr.set_tags({tracking.TAG_ONNX_STATUS: "ok"})
    m["model/size_mb_onnx"] = measure.file_size_mb(onnx_path)
    return m


def _memory(path: Path, input_size: int, mcfg: DictConfig, device: str, tr: tracking.Tracker) -> dict[str, float]:
    """``memory/infer_peak_mb``: what loading and running the saved model adds, in a fresh process,
    on the device its latency was timed on (the CUDA peak allocation on a GPU); the probe's absolute
    figures under other names."""
    if not mcfg.get("memory", True):
        return {}
    log.info("measuring: memory of the saved model in a fresh process")
    try:
        probe = measure.model_memory(path, input_size, int(mcfg.batch_size), threads=mcfg.threads, device=device)
    except Exception as exc:
        reason = one_line(exc)
        log.warning("memory probe failed: %s", reason)
        tr.set_tags({tracking.MEMORY_STATUS: reason})
        return {}
    tr.set_tags({tracking.MEMORY_STATUS: f"ok ({device})"})
    return {"memory/infer_peak_mb": probe.get("cuda_peak_mb", probe["increase_mb"]),
            "memory/infer_rss_increase_mb": probe["increase_mb"], "memory/infer_process_peak_mb": probe["peak_mb"],
            "memory/infer_process_before_mb": probe["before_mb"]}
