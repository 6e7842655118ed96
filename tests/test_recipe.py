"""The training recipe: every fit starts in train mode, later fits use the fine-tuning recipe, a
reference and its method share it, BatchNorm is recalibrated after a structural change, and
``trainer.precision=auto`` follows the CPU's flags."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from torch import nn

from prunegrid import budget, hardware, measure
from prunegrid.config import build, compose, options
from prunegrid.pipeline import recalibrate, run
from tests.conftest import tiny

FAST = ("backbone=simple_cnn", "explain.enabled=false", "trainer.limit_train_batches=2")
SPY = "+trainer.callbacks.spy._target_=tests.test_recipe.FitSpy"
FT_LR = 7e-4


class FitSpy(Callback):
    """What each fit of a run starts with: the modules in eval mode, the optimizer, every step's learning rate."""

    fits: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        FitSpy.fits.append({"eval": [n for n, m in pl_module.net.named_modules() if not m.training],
                            "optimizer": type(trainer.optimizers[0]).__name__, "lrs": []})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        FitSpy.fits[-1]["lrs"].append(trainer.optimizers[0].param_groups[0]["lr"])


def _run(tmp_path, *overrides):
    FitSpy.fits = []
    cfg = compose(tiny(tmp_path, *FAST, SPY, *overrides))
    metrics = run(cfg)
    client = MlflowClient(cfg.tracking.uri)
    r = client.search_runs([e.experiment_id for e in client.search_experiments()],
                           order_by=["attributes.start_time DESC"], max_results=1)[0]
    return metrics, r, list(FitSpy.fits)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, fashion_dir):
    """A prune=none cell saved like the grid's train_base stage (its model file is read back in eval mode)."""
    tmp = tmp_path_factory.mktemp("recipe")
    model = tmp / "none.pt"
    _run(tmp, "trainer.max_epochs=2", f"paths.model_out={model}")
    return tmp, model


def _classification_methods():
    return [m for m in options("prune") if m in options("prune", "classification")]


@pytest.mark.parametrize("method", _classification_methods())
def test_every_fit_of_every_method_starts_in_train_mode(baseline, method):
    tmp, model = baseline
    cls = build(compose([f"prune={method}"]).prune)
    start = f"++prune.baseline_ckpt={model}" if cls.from_baseline else f"++budget.match={model}"
    metrics, _, fits = _run(tmp, f"prune={method}", "trainer.max_epochs=2", start)
    expected = (0 if cls.from_baseline else 1) + (1 if cls.finetune_epochs else 0)
    assert len(fits) == expected, fits
    for fit in fits:
        assert fit["eval"] == [], f"{method}: modules in eval mode at the start of a fit: {fit['eval'][:5]}"


def test_finetune_uses_its_own_recipe_with_no_warmup(baseline):
    tmp, model = baseline
    _, r, fits = _run(tmp, "prune=channel", "optimizer=sgd", f"finetune.optimizer.lr={FT_LR}",
                      "++prune.baseline_ckpt=" + str(model))
    (ft,) = fits
    assert ft["optimizer"] == "AdamW"                       # finetune.optimizer, not the main fit's SGD
    assert ft["lrs"][0] == pytest.approx(FT_LR)             # its own lr at the first step: no warm-up
    assert ft["lrs"][1] < ft["lrs"][0]                      # and it only decays (cosine per step)
    assert r.data.tags["fit_recipes"] == "finetune"

    _, _, (main,) = _run(tmp, "prune=none", "optimizer=sgd", f"finetune.optimizer.lr={FT_LR}")
    assert main["optimizer"] == "SGD" and main["lrs"][0] != pytest.approx(FT_LR)


def test_rewind_replays_the_main_recipe(baseline):
    tmp, model = baseline
    _, _, (ft,) = _run(tmp, "prune=none", "prune.finetune_epochs=1", "finetune=rewind", "optimizer=sgd",
                       "++prune.baseline_ckpt=" + str(model))
    assert ft["optimizer"] == "SGD"
    assert ft["lrs"][1] > ft["lrs"][0]                      # one-cycle's warm-up again


def test_reference_and_method_share_recipe_and_epochs(baseline):
    tmp, model = baseline
    ref, r_ref, _ = _run(tmp, "prune=none", "prune.finetune_epochs=1", "++prune.baseline_ckpt=" + str(model))
    method, r_m, _ = _run(tmp, "prune=channel", "prune.finetune_epochs=1", "++prune.baseline_ckpt=" + str(model))
    assert r_m.data.tags[budget.TAG_REF_PRUNE] == r_ref.data.tags["prune"] == "none_ft1"
    assert ref[budget.EPOCHS] == method[budget.EPOCHS] == 3
    assert r_ref.data.tags["fit_recipes"] == r_m.data.tags["fit_recipes"] == "finetune"
    recipe = {k: v for k, v in r_ref.data.params.items() if k.startswith("finetune.")}
    assert recipe and recipe == {k: v for k, v in r_m.data.params.items() if k.startswith("finetune.")}
    logged = r_m.data.metrics
    assert "recovery/after_change_acc" in logged and "recovery/after_recalibration_acc" in logged
    assert "recovery/after_change_acc" not in r_ref.data.metrics          # no structural change, no recalibration


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))


def _cell(enabled: bool, batches: list):
    cfg = OmegaConf.create({"bn_recalibration": {"enabled": enabled, "batches": 3}})
    return SimpleNamespace(cfg=cfg, evaluate=lambda net, split: {"acc": 0.5}, tracker=None,
                           data=SimpleNamespace(loader=lambda split, shuffle=None: iter(batches)))


def test_bn_recalibration_changes_statistics_not_weights():
    net = _bn_net()
    batches = [(torch.randn(16, 3, 8, 8) * 3 + 2, torch.zeros(16, dtype=torch.long)) for _ in range(5)]
    net(batches[0][0])  # materialise the lazy layer
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    recalibrate(_cell(True, batches), net)
    after = net.state_dict()
    bn = net[1]
    assert not torch.allclose(after["1.running_mean"], before["1.running_mean"])
    assert not torch.allclose(after["1.running_var"], before["1.running_var"])
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name]), name          # no weight update
    assert bn.momentum == pytest.approx(0.1) and not net.training   # settings and mode restored
    # the mean of the 3 batches' conv outputs, as the recalibration should have estimated it
    with torch.no_grad():
        conv = torch.cat([net[0](x) for x, _ in batches[:3]])
    assert torch.allclose(after["1.running_mean"], conv.mean((0, 2, 3)), atol=1e-5)

    off = _bn_net()
    off(batches[0][0])
    kept = off[1].running_mean.clone()
    recalibrate(_cell(False, batches), off)
    assert torch.equal(off[1].running_mean, kept)


@pytest.mark.parametrize("flags, cuda, expected", [
    ({"avx2", "fma"}, False, "32-true"),
    ({"avx2", "avx512f", "avx512_vnni"}, False, "32-true"),
    ({"avx512f", "avx512_bf16"}, False, "bf16-mixed"),
    ({"amx_bf16", "amx_tile"}, False, "bf16-mixed"),
    ({"avx2"}, True, "bf16-mixed"),
])
def test_precision_auto_follows_the_flags(flags, cuda, expected):
    assert hardware.resolve_precision("auto", flags=frozenset(flags), cuda=cuda) == expected
    assert hardware.resolve_precision("16-mixed", flags=frozenset(flags), cuda=cuda) == "16-mixed"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 amx_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert hardware.cpu_flags(str(info)) == {"fpu", "sse2", "avx2", "amx_bf16"}
    assert hardware.cpu_flags(str(tmp_path / "missing")) == frozenset()


class FormatSpy(Callback):
    """The memory format of the first conv weight at each training step, and after the fit."""

    seen: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        w = next(m.weight for m in pl_module.net.modules() if isinstance(m, nn.Conv2d))
        FormatSpy.seen.append(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous())


def test_channels_last_trains_nhwc_and_hands_back_contiguous_weights(tmp_path):
    FormatSpy.seen = []
    spy = "+trainer.callbacks.fmt._target_=tests.test_recipe.FormatSpy"
    run(compose(tiny(tmp_path, *FAST, spy, "trainer.callbacks.channels_last={_target_:prunegrid.hardware.ChannelsLast}",
                     f"paths.model_out={tmp_path}/model.pt")))
    assert FormatSpy.seen and all(FormatSpy.seen), FormatSpy.seen
    saved = measure.load_model(tmp_path / "model.pt")
    assert all(p.is_contiguous() for p in saved.parameters())

    FormatSpy.seen = []
    run(compose(tiny(tmp_path, *FAST, spy)))   # the default: off
    assert FormatSpy.seen and not any(FormatSpy.seen)


def test_a_cell_logs_its_phase_split(tmp_path):
    _, r, _ = _run(tmp_path, "measure.memory=true")
    phases = {k for k in r.data.metrics if k.startswith(measure.Laps.PREFIX)}
    for name in ("build", "train", "evaluate", "save", "latency_eager", "onnx", "memory", "explain", "outputs"):
        assert f"{measure.Laps.PREFIX}{name}_s" in phases, sorted(phases)
    assert all(r.data.metrics[k] >= 0 for k in phases)
    assert r.data.metrics[f"{measure.Laps.PREFIX}train_s"] >= r.data.metrics["time/train_s"] * 0.99


def test_laps_add_up_per_name(monkeypatch):
    clock = iter([100.0, 101.5, 104.0, 104.25])
    monkeypatch.setattr(measure.time, "time", lambda: next(clock))
    laps = measure.Laps(since_process_start=False)
    laps.lap("a"), laps.lap("b"), laps.lap("a")
    assert laps.metrics() == {"time/phase_a_s": 1.75, "time/phase_b_s": 2.5}
