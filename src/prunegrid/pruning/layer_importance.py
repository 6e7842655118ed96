"""``prune=layer_importance``: Layer Importance Evaluation (Jin & Song, fire detection).

The paper ranks the weighted layers of a trained network by a contribution score and
rebuilds a much smaller network from the top-ranked ones:

- weight statistics of each layer: mean, std, min, max; ``S_w = |mu_w|+|sigma_w|+|w_min|+|w_max|`` (eq. 8);
- activation statistics of the layer's *output* over real training images (eqs. 4-7) and
  ``S_a`` likewise (eq. 9);
- contribution ``P = S_w * S_a`` (eq. 10); the simpler scores ``sum |W|`` (eq. 1) and
  ``mean |w * a|`` (eq. 3) are options;
- sort by P, keep the top ``k`` (6 in the paper; the top 5-8 hold over 80% of the total P),
  rebuild from them and fine-tune; the "layer removal" check (remove a layer, watch the
  accuracy) is the optional ablation.

The rebuild works on the :class:`~prunegrid.models.net.Net` shape only, never on a named
architecture: a selected layer selects the *unit* of ``net.features`` that holds it; the net
is cut after the deepest selected unit; every later-than-stem unit without a selected layer
whose input and output shapes match becomes an ``nn.Identity``; units that change the shape
stay; a new ``ClassifierHead`` (GAP + dropout + linear) goes on the last kept feature map.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd
import torch
from torch import nn

from prunegrid.errors import ConfigError
from prunegrid.models.net import LOGITS, REMOVABLE, ClassifierHead, Net
from prunegrid.pruning.base import Context, PruningMethod

log = logging.getLogger("prunegrid")

SCORES = ("weight_x_activation", "abs_weight_sum", "abs_weight_activation")


# -- statistics and scores (pure functions) ------------------------------------------------------

@dataclass(frozen=True)
class Stats:
    """Mean, population std, min and max of a set of values (eqs. 4-7)."""

    mean: float
    std: float
    min: float
    max: float

    @property
    def score(self) -> float:
        """``|mean| + |std| + |min| + |max|``: S_w (eq. 8) for weights, S_a (eq. 9) for activations."""
        return abs(self.mean) + abs(self.std) + abs(self.min) + abs(self.max)


def tensor_stats(t: torch.Tensor) -> Stats:
    """Stats of all elements of ``t`` (population std, ``1/M`` as in eq. 5)."""
    t = t.detach().flatten()
    var, mean = torch.var_mean(t, correction=0)
    lo, hi = torch.aminmax(t)
    return Stats(float(mean), math.sqrt(float(var)), float(lo), float(hi))


def weight_score(w: torch.Tensor) -> float:
    """S_w of a weight tensor (eq. 8)."""
    return tensor_stats(w).score


def abs_weight_sum(w: torch.Tensor) -> float:
    """Eq. 1: ``sum_ij |W_ij|``, the magnitude-only importance."""
    return float(w.detach().double().abs().sum())


def channel_abs_mean(w: torch.Tensor) -> torch.Tensor:
    """Mean ``|w|`` of each output channel / unit (dim 0 of Conv2d, Linear and BatchNorm weights)."""
    return w.detach().double().abs().reshape(w.shape[0], -1).mean(1)


def abs_weight_activation(w: torch.Tensor, act_channel_abs_mean: torch.Tensor) -> float:
    """Eq. 3, per layer: ``mean_c |w_c * a_c|``, with ``w_c`` the mean |weight| of output channel c
    and ``a_c`` the mean |activation| of that channel (a weight counts only if its unit fires)."""
    return float((channel_abs_mean(w) * act_channel_abs_mean.double()).abs().mean())


def contribution(s_w: float, s_a: float) -> float:
    """Eq. 10: ``P = S_w * S_a``."""
    return s_w * s_a


class ActivationStats:
    """Running mean / std / min / max of a layer's outputs over several batches (eqs. 4-7), plus
    the mean |activation| per channel (dim 1) for eq. 3. Batches are merged exactly (Chan et al.)."""

    def __init__(self):
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self._chan_sum: torch.Tensor | None = None
        self._chan_n = 0

    def update(self, out: torch.Tensor) -> None:
        t = out.detach().double()
        nb = t.numel()
        if nb == 0:
            return
        var, mean = torch.var_mean(t, correction=0)
        mb, m2b = float(mean), float(var) * nb
        delta, n = mb - self.mean, self.n + nb
        self.mean += delta * nb / n
        self.m2 += m2b + delta * delta * self.n * nb / n
        self.n = n
        lo, hi = torch.aminmax(t)
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))
        if t.dim() >= 2:
            per = t.abs().transpose(0, 1).reshape(t.shape[1], -1)
            self._chan_sum = per.sum(1) if self._chan_sum is None else self._chan_sum + per.sum(1)
            self._chan_n += per.shape[1]

    def stats(self) -> Stats:
        if self.n == 0:
            raise ValueError("no activations recorded")
        return Stats(self.mean, math.sqrt(max(self.m2 / self.n, 0.0)), self.min, self.max)

    def channel_abs_mean(self) -> torch.Tensor:
        if self._chan_sum is None:
            raise ValueError("no per-channel activations recorded")
        return self._chan_sum / self._chan_n


# -- scoring and ranking ------------------------------------------------------------------------

def layer_classes(layer_types: Sequence[str]) -> tuple[type[nn.Module], ...]:
    """``["Conv2d", "Linear"]`` -> the ``torch.nn`` classes; unknown names are a config error."""
    if not layer_types:
        raise ConfigError("prune.layer_types is empty; give e.g. [Conv2d, Linear, BatchNorm2d]")
    out = []
    for name in layer_types:
        cls = getattr(nn, str(name), None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"prune.layer_types: unknown layer type '{name}'; use torch.nn class names "
                              "such as Conv2d, Linear, BatchNorm2d")
        out.append(cls)
    return tuple(out)


def scored_layers(net: nn.Module, classes: tuple[type[nn.Module], ...]) -> list[tuple[str, nn.Module]]:
    """The layers to score, in registration order: instances of ``classes`` with a weight tensor."""
    return [(n, m) for n, m in net.named_modules()
            if isinstance(m, classes) and isinstance(getattr(m, "weight", None), torch.Tensor)]


def stage_of(net: Net, layer: str) -> int:
    """The stage index (0 = stem) of the unit holding a layer; one past the last stage for the head."""
    return net.contract.stage_of(net.contract.unit_of(layer))


@torch.no_grad()
def collect_activations(net: nn.Module, layers: list[tuple[str, nn.Module]],
                        batches: Iterable) -> dict[str, ActivationStats]:
    """Feed ``batches`` (images, or ``(images, labels)``) through ``net`` in eval mode and record each
    layer's output statistics with forward hooks."""
    acc = {name: ActivationStats() for name, _ in layers}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: acc[name].update(out)) for name, m in layers]
    device = next(net.parameters()).device
    was = net.training
    net.eval()
    seen = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            net(x.to(device))
            seen += 1
    finally:
        for h in hooks:
            h.remove()
        net.train(was)
    if seen == 0:
        raise ConfigError("no calibration images: the training split gave no batch")
    return acc


def rank_layers(net: Net, batches: Iterable, layer_types: Sequence[str] = ("Conv2d", "Linear", "BatchNorm2d"),
                score: str = "weight_x_activation") -> pd.DataFrame:
    """The ranking table of the paper (Tables 3-6): one row per scored layer, best first.

    Columns: ``rank, position`` (1-based order in the model), ``layer, type, unit`` (None in
    the head), ``stage`` (index in ``net.stages``, 0 = stem; the head is one past the last), the weight stats and ``S_w``, the activation stats and ``S_a``, ``P = S_w * S_a``,
    ``score`` (the one ranked by; equals P for ``weight_x_activation``), ``share`` of the total
    score and ``cumulative_share``.
    """
    if score not in SCORES:
        raise ConfigError(f"prune.score={score} is unknown; use one of {', '.join(SCORES)}")
    layers = scored_layers(net, layer_classes(layer_types))
    if not layers:
        raise ConfigError(f"no layer of types {list(layer_types)} with weights in this model; change prune.layer_types")
    acts = collect_activations(net, layers, batches)
    rows = []
    for pos, (name, m) in enumerate(layers, start=1):
        ws, a = tensor_stats(m.weight), acts[name]
        as_ = a.stats()
        p = contribution(ws.score, as_.score)
        value = {"weight_x_activation": lambda: p,
                 "abs_weight_sum": lambda: abs_weight_sum(m.weight),
                 "abs_weight_activation": lambda: abs_weight_activation(m.weight, a.channel_abs_mean())}[score]()
        rows.append({"position": pos, "layer": name, "type": type(m).__name__, "unit": net.contract.unit_of(name),
                     "stage": stage_of(net, name),
                     "w_mean": ws.mean, "w_std": ws.std, "w_min": ws.min, "w_max": ws.max, "S_w": ws.score,
                     "a_mean": as_.mean, "a_std": as_.std, "a_min": as_.min, "a_max": as_.max, "S_a": as_.score,
                     "P": p, "score": value})
    df = pd.DataFrame(rows).sort_values(["score", "position"], ascending=[False, True], kind="stable")
    total = float(df["score"].sum())
    df["share"] = df["score"] / total if total > 0 else 0.0
    df["cumulative_share"] = df["share"].cumsum()
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.reset_index(drop=True)


def select(ranking: pd.DataFrame, k: int | None = 6, cumulative_share: float | None = None) -> list[str]:
    """Names of the top ``k`` layers, or of the fewest top layers holding ``cumulative_share`` of the total."""
    if cumulative_share is not None:
        n = int((ranking["cumulative_share"] < cumulative_share - 1e-12).sum()) + 1
    else:
        n = int(k)
    return list(ranking["layer"].iloc[:min(n, len(ranking))])


# -- rebuilding --------------------------------------------------------------------------------

@dataclass
class RebuildPlan:
    """What the rebuild did, unit by unit (names of ``net.features`` units)."""

    selected_units: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)        # units kept as they are
    replaced: list[str] = field(default_factory=list)    # removable units with no selected layer -> Identity
    dropped: list[str] = field(default_factory=list)     # units after the deepest selected one
    removable: list[str] = field(default_factory=list)   # units after the stem whose shapes match

    @property
    def removed(self) -> list[str]:
        return self.replaced + self.dropped


def rebuild(net: Net, selected_layers: Iterable[str], input_size: int, dropout: float = 0.3) -> tuple[Net, RebuildPlan]:
    """A new :class:`Net` from the units holding ``selected_layers`` (see the module docstring).

    Unit shapes and removability are the net's declared contract. Layers in the head select no
    unit. The kept units are copies; ``net`` is left unchanged.
    """
    contract = net.contract
    names = contract.names()
    selected_units = {u for u in map(contract.unit_of, selected_layers) if u is not None}
    deepest = max((names.index(u) for u in selected_units), default=0)
    removable = set(contract.removable())
    plan = RebuildPlan(selected_units=[n for n in names if n in selected_units],
                       removable=[n for n in names if n in removable], dropped=names[deepest + 1:])
    units: list[tuple[str, nn.Module]] = []
    for i, name in enumerate(names[:deepest + 1]):
        unit = net.unit(name)
        if i > 0 and name not in selected_units and name in removable:
            units.append((name, nn.Identity()))
            plan.replaced.append(name)
        else:
            units.append((name, copy.deepcopy(unit)))
            if not isinstance(unit, nn.Identity):
                plan.kept.append(name)
    channels = contract.unit(names[deepest]).out_shape[0]
    kept = {n for n, _ in units}
    stages = [s for s in ([n for n in stage if n in kept] for stage in contract.stages) if s]
    new = Net(units, ClassifierHead(channels, net.num_classes, dropout), stages, net.arch, net.num_classes)
    new.to(next(net.parameters()).device).train(net.training)
    new.declare(input_size)
    return new, plan


def unit_scores(ranking: pd.DataFrame) -> pd.Series:
    """Per unit: the sum of its layers' scores (head layers excluded)."""
    return ranking.dropna(subset=["unit"]).groupby("unit")["score"].sum()


def ablate(net: Net, units: Sequence[str], evaluate: Callable[[nn.Module], dict[str, float]]) -> pd.DataFrame:
    """The paper's layer-removal check: accuracy with each unit in turn replaced by an identity.

    ``net`` is restored after each step. Returns ``unit, acc, acc_drop`` (drop = base - acc),
    base accuracy in ``DataFrame.attrs["base_acc"]``.
    """
    base = evaluate(net)["acc"]
    rows = []
    for name in units:
        original = net.set_unit(name, nn.Identity())
        try:
            acc = evaluate(net)["acc"]
        finally:
            net.set_unit(name, original)
        rows.append({"unit": name, "acc": acc, "acc_drop": base - acc})
    df = pd.DataFrame(rows, columns=["unit", "acc", "acc_drop"])
    df.attrs["base_acc"] = base
    return df


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (NaN with fewer than 3 points or a constant side)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def ranking_figure(ranking: pd.DataFrame, top: int = 40, selected: int = 0, title: str = ""):
    """Bars of the top layers' score with the cumulative share, selected layers highlighted."""
    from prunegrid.plots import plt

    df = ranking.head(top)
    fig, ax = plt.subplots(figsize=(max(8, 0.32 * len(df) + 3), 5))
    colors = ["tab:red" if i < selected else "tab:blue" for i in range(len(df))]
    ax.bar(range(len(df)), df["score"], color=colors)
    ax.set_xticks(range(len(df)), df["layer"].str.replace("features.", "", regex=False), rotation=90, fontsize=7)
    ax.set_ylabel("contribution (score)")
    ax2 = ax.twinx()
    ax2.plot(range(len(df)), df["cumulative_share"], color="black", marker=".", lw=1)
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("cumulative share")
    ax.set_title(title or "Layer importance ranking (red: selected)")
    fig.tight_layout()
    return fig


# -- the method --------------------------------------------------------------------------------

class LayerImportance(PruningMethod):
    """Rank layers by weight x activation statistics, keep the top ones, rebuild and fine-tune (Jin & Song).

    Args:
        score: ``weight_x_activation`` (eq. 10, the paper's P), ``abs_weight_sum`` (eq. 1) or
            ``abs_weight_activation`` (eq. 3).
        layer_types: ``torch.nn`` class names of the layers to score.
        calibration_batches: training batches whose activations are recorded (>= 1).
        k: keep the top k layers (ignored when ``cumulative_share`` is set).
        cumulative_share: keep the fewest top layers holding this share (0, 1] of the total score.
        dropout: dropout of the new classifier head.
        ablation: also run the layer-removal check on the trained baseline.
        ablation_batches: validation batches per ablation evaluation (null: the whole split).
        reinit: Scratch-E (see :class:`~prunegrid.pruning.base.PruningMethod`): the rebuilt network
            trained from scratch.
    """

    name = "layer_importance"
    from_baseline = True
    structural = True
    controls = ("scratch",)

    def __init__(self, score: str = "weight_x_activation",
                 layer_types: Sequence[str] = ("Conv2d", "Linear", "BatchNorm2d"),
                 calibration_batches: int = 4, k: int | None = 6, cumulative_share: float | None = None,
                 dropout: float = 0.3, ablation: bool = False, ablation_batches: int | None = 4,
                 baseline_ckpt: str | None = None, finetune_epochs: int = 1, reinit: bool = False):
        super().__init__(baseline_ckpt=baseline_ckpt, finetune_epochs=finetune_epochs, reinit=reinit)
        if score not in SCORES:
            raise ConfigError(f"prune.score={score} is unknown; use one of {', '.join(SCORES)}")
        self.layer_classes = layer_classes(layer_types)
        if calibration_batches is None or int(calibration_batches) < 1:
            raise ConfigError(f"prune.calibration_batches={calibration_batches} must be 1 or more")
        if cumulative_share is not None and not 0 < float(cumulative_share) <= 1:
            raise ConfigError(f"prune.cumulative_share={cumulative_share} must be in (0, 1], or null to use prune.k")
        if cumulative_share is None and (k is None or int(k) < 1):
            raise ConfigError(f"prune.k={k} must be 1 or more (or set prune.cumulative_share)")
        if not 0 <= float(dropout) < 1:
            raise ConfigError(f"prune.dropout={dropout} must be in [0, 1)")
        if ablation_batches is not None and int(ablation_batches) < 1:
            raise ConfigError(f"prune.ablation_batches={ablation_batches} must be 1 or more, or null for all")
        self.score = score
        self.layer_types = [str(t) for t in layer_types]
        self.calibration_batches = int(calibration_batches)
        self.k = None if k is None else int(k)
        self.cumulative_share = None if cumulative_share is None else float(cumulative_share)
        self.dropout = float(dropout)
        self.ablation = bool(ablation)
        self.ablation_batches = None if ablation_batches is None else int(ablation_batches)
        self.ranking: pd.DataFrame | None = None
        self.plan: RebuildPlan | None = None
        self.metrics: dict[str, float] = {}

    @property
    def requires(self) -> tuple[str, ...]:
        """The rebuild cuts the chain and puts a new classifier head on it (class logits); the
        layer-removal check also needs units that can be removed."""
        return (LOGITS, REMOVABLE) if self.ablation else (LOGITS,)

    def check(self, net: Net, ctx: Context) -> None:
        n = len(scored_layers(net, self.layer_classes))
        if n == 0:
            raise ConfigError(f"prune.layer_types={self.layer_types} matches no layer of {net.arch}; change it")
        if self.cumulative_share is None and self.k > n:
            raise ConfigError(f"prune.k={self.k} is more than the {n} scored layers of {net.arch}; use k <= {n}")

    def _calibration(self, ctx: Context):
        for i, batch in enumerate(ctx.loader("train")):
            if i >= self.calibration_batches:
                break
            yield batch

    def after_fit(self, net: nn.Module, ctx: Context) -> nn.Module:
        self.check(net, ctx)
        ranking = rank_layers(net, self._calibration(ctx), self.layer_types, self.score)
        chosen = select(ranking, self.k, self.cumulative_share)
        ranking["selected"] = ranking["layer"].isin(chosen)
        self.ranking = ranking
        out = Path(ctx.artifact_dir) / self.name
        out.mkdir(parents=True, exist_ok=True)
        ranking.to_csv(out / "ranking.csv", index=False)
        ctx.log_artifact(out / "ranking.csv", self.name)
        fig = ranking_figure(ranking, selected=len(chosen),
                             title=f"{net.arch}: layer importance ({self.score})")
        fig.savefig(out / "ranking.png", dpi=110)
        from prunegrid.plots import close

        close(fig)
        ctx.log_artifact(out / "ranking.png", self.name)
        log.info("layer importance (%s), top %d:\n%s", self.score, len(chosen),
                 ranking.head(len(chosen))[["rank", "position", "layer", "type", "S_w", "S_a", "P",
                                            "share", "cumulative_share"]].to_string(index=False))

        top_stages = ranking["stage"].iloc[:len(chosen)]
        n_stages = max(1, len(net.contract.stages))
        m = {"top_k_share": float(ranking["share"].iloc[:len(chosen)].sum()), "kept_layers": len(chosen),
             "top_stage_mean": float(top_stages.mean()), "top_stage_max": float(top_stages.max()),
             "top_early_share": float((top_stages < n_stages / 2).mean()), "stages": n_stages,
             "scored_layers": len(ranking),
             "head_layers_selected": int(sum(net.contract.unit_of(n) is None for n in chosen))}
        if self.ablation:
            m["ablation_spearman"] = self._ablation(net, ranking, ctx, out)

        new, plan = rebuild(net, chosen, ctx.input_size, self.dropout)
        self.plan = plan
        m.update({"kept_units": len(plan.kept), "removed_units": len(plan.removed),
                  "replaced_units": len(plan.replaced), "dropped_units": len(plan.dropped)})
        log.info("layer importance rebuild: kept %s; identity %s; dropped %s", plan.kept, plan.replaced, plan.dropped)
        self.metrics = {self.key(k): float(v) for k, v in m.items()}
        return new

    def _ablation(self, net: Net, ranking: pd.DataFrame, ctx: Context, out: Path) -> float:
        units = net.contract.removable()
        table = ablate(net, units, lambda n: ctx.evaluate(n, "val", max_batches=self.ablation_batches))
        scores = unit_scores(ranking)
        table.insert(1, "score", [float(scores.get(u, 0.0)) for u in table["unit"]])
        table["base_acc"] = table.attrs["base_acc"]
        table = table.sort_values("score", ascending=False, kind="stable")
        table.to_csv(out / "ablation.csv", index=False)
        ctx.log_artifact(out / "ablation.csv", self.name)
        rho = spearman(table["score"].tolist(), table["acc_drop"].tolist())
        log.info("layer removal check (Spearman score vs accuracy drop = %.3f):\n%s", rho, table.to_string(index=False))
        return rho

    def report(self, net: nn.Module, ctx: Context) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if not (isinstance(v, float) and math.isnan(v))}
