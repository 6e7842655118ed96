"""GAN augmentation with quality filtering (Jin & Song, "Layer Importance Evaluation", section 3.2).

The paper adds 400 GAN-generated images per class to 800 real ones, and keeps a generated image
only if an InceptionV3 trained on the real images gives it a class distribution like the real
images' (Inception Score filtering). Here:

1. a class-conditional DCGAN (Radford et al. 2016; label embedding in both nets) is trained on the
   data set's **training split only** (the DataModule's ``train`` after the validation carve-out
   and the ``subset`` cap, with the same ``seed`` as the runs that will use the images, so it
   never sees validation or test images);
2. a classifier is trained briefly on the same real training images. **Substitution:** the paper
   used InceptionV3; on a 2-core CPU at 32 px we use a prunegrid backbone (``classifier``:
   ``simple_cnn`` by default), trained from scratch;
3. ``per_class`` images are generated per class; an image is kept only if the classifier predicts
   its intended class with probability >= ``min_confidence``;
4. the Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` is computed with **that classifier's
   softmax** (torchmetrics' ``InceptionScore`` with the classifier as feature extractor), not
   InceptionV3's, for the kept set, for all generated images and for the real training images;
5. kept images are written as ``OUT/<class>/*.png`` (class folder names = the data set's class
   names, see :func:`prunegrid.data.synthetic.class_dirnames`), for ``dataset.synthetic=OUT``.

Losses per epoch, a sample grid per class and the scores go to MLflow, in the data set's
experiment, in a run tagged ``job=gan_augment`` (names in :mod:`prunegrid.tracking`).

    python -m prunegrid.data.gan [--config conf/gan/default.yaml] [epochs=20 per_class=400 ...]
        [dataset=image_folder dataset.root=DIR ...]
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from prunegrid import tracking
from prunegrid.config import build, cell, compose, flatten
from prunegrid.data.synthetic import class_dirnames
from prunegrid.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "conf" / "gan" / "default.yaml"
COMPOSE_PREFIXES = ("dataset", "paths.", "tracking.")

# The GAN job's own MLflow keys (its runs carry tracking.TAG_JOB = JOB_GAN; they are not grid cells).
JOB_GAN = "gan_augment"
GAN_LOSS_G, GAN_LOSS_D = "gan/loss_g", "gan/loss_d"            # per epoch (step = epoch)
GAN_CLASSIFIER_ACC = "gan/classifier_val_acc"                   # the filter classifier on held-out real images
GAN_IS, GAN_IS_STD = "gan/inception_score", "gan/inception_score_std"  # of the kept set
GAN_IS_ALL, GAN_IS_REAL = "gan/inception_score_all", "gan/inception_score_real"
GAN_KEPT, GAN_REJECTED_SHARE = "gan/kept", "gan/rejected_share"
GAN_TRAIN_S = "gan/train_s"
ARTIFACT_GAN_SAMPLES = "gan_samples"                            # folder of one grid PNG per class
ARTIFACT_GAN_SUMMARY = "gan_summary.json"


def gan_run_name(dataset: str, seed: int) -> str:
    return f"{JOB_GAN}-{dataset}-s{seed}"


@dataclass
class GanOptions:
    """The options of ``conf/gan/*.yaml`` (see that file for their meaning)."""

    out: str = "prepared/synthetic/fashion_mnist"
    image_size: int = 32
    channels: Any = "auto"
    latent_dim: int = 64
    width: int = 32
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-4
    train_limit: int | None = None
    per_class: int = 400
    min_confidence: float = 0.9
    classifier: str = "simple_cnn"
    classifier_epochs: int = 3
    classifier_lr: float = 1e-3
    seed: int = 42
    threads: int | None = None
    track: bool = True
    progress: bool = True
    data: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.image_size < 8 or self.image_size & (self.image_size - 1):
            raise ConfigError(f"gan image_size={self.image_size} must be a power of two >= 8 (e.g. 32)")
        if self.channels not in ("auto", 1, 3):
            raise ConfigError(f"gan channels={self.channels} must be auto, 1 or 3")
        if self.epochs < 0 or self.classifier_epochs < 1 or self.per_class < 1 or self.latent_dim < 1:
            raise ConfigError("gan epochs >= 0, classifier_epochs >= 1, per_class >= 1 and latent_dim >= 1 are required")
        if not 0 <= self.min_confidence <= 1:
            raise ConfigError(f"gan min_confidence={self.min_confidence} must be in [0, 1]")


def load_options(config: str | Path | None = None, overrides: list[str] = ()) -> GanOptions:
    """Options from a GAN YAML plus overrides; ``dataset=...``/``dataset.x=...``/``paths.x=...``
    overrides go to the data set's composition (like ``train.py``)."""
    path = Path(config) if config else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"gan config {path} not found; pass --config conf/gan/<name>.yaml")
    data_over = [o for o in overrides if o.startswith(COMPOSE_PREFIXES)]
    own = [o for o in overrides if not o.startswith(COMPOSE_PREFIXES)]
    cfg = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(own)), resolve=True)
    for key in ("_target_", "name"):
        cfg.pop(key, None)
    known = set(GanOptions.__dataclass_fields__)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"unknown gan option(s) {unknown}; valid: {sorted(known)}")
    opts = GanOptions(**cfg)
    opts.data = list(opts.data or []) + data_over
    opts.check()
    return opts


# -- networks -------------------------------------------------------------------------------
class Generator(nn.Module):
    """DCGAN generator conditioned by multiplying the noise with a label embedding."""

    def __init__(self, num_classes: int, latent_dim: int, channels: int, size: int, width: int):
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.embed = nn.Embedding(num_classes, latent_dim)
        ups = int(math.log2(size // 4))
        ch = width * 2 ** (ups - 1)
        self.project = nn.Sequential(nn.Linear(latent_dim, ch * 16, bias=False), nn.BatchNorm1d(ch * 16), nn.ReLU(True))
        self.start = ch
        layers: list[nn.Module] = []
        for _ in range(ups - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.project(z * self.embed(y))
        return self.body(h.view(len(z), self.start, 4, 4))


class Discriminator(nn.Module):
    """DCGAN discriminator with a projection term for the label (Miyato & Koyama 2018)."""

    def __init__(self, num_classes: int, channels: int, size: int, width: int):
        super().__init__()
        ups = int(math.log2(size // 4))
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for _ in range(ups - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
            ch *= 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.out = nn.Linear(ch * 16, 1)
        self.embed = nn.Embedding(num_classes, ch * 16)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return (self.out(h) + (self.embed(y) * h).sum(1, keepdim=True)).squeeze(1)


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# -- data -----------------------------------------------------------------------------------
def _is_gray(img: torch.Tensor) -> bool:
    return img.shape[0] == 1 or bool((img[0] == img[1]).all() and (img[1] == img[2]).all())


def real_training_images(opts: GanOptions):
    """The DataModule's training split (never val/test) as a tensor in [-1, 1], labels, class names."""
    cfg = compose([f"seed={opts.seed}", *opts.data, "dataset.synthetic=null"])
    dm = build(cfg.dataset, seed=int(cfg.seed))
    dm.setup()
    train = dm.splits.train
    idx = np.arange(len(train))
    if opts.train_limit is not None and opts.train_limit < len(train):
        idx = np.sort(np.random.default_rng(opts.seed).permutation(len(train))[: opts.train_limit])
    to_img = v2.Compose([v2.ToImage(), v2.Resize((opts.image_size, opts.image_size), antialias=True)])
    first = [to_img(train[int(i)][0]) for i in idx[:16]]
    channels = opts.channels
    if channels == "auto":
        channels = 1 if all(_is_gray(t) for t in first) else 3
    steps = [v2.ToImage(), v2.Grayscale() if channels == 1 else v2.RGB(),
             v2.Resize((opts.image_size, opts.image_size), antialias=True), v2.ToDtype(torch.float32, scale=True),
             v2.Normalize([0.5] * channels, [0.5] * channels)]
    tf = v2.Compose(steps)
    xs, ys = [], []
    for i in idx:
        img, label = train[int(i)]
        xs.append(tf(img))
        ys.append(label)
    return torch.stack(xs), torch.tensor(ys), list(dm.classes), cfg


# -- the classifier that scores generated images ----------------------------------------------
class Scorer(nn.Module):
    """The filter classifier on GAN-range inputs: grey -> 3 channels, [-1, 1] as the backbone sees it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


def train_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, opts: GanOptions) -> tuple[Scorer, float]:
    """A backbone trained briefly on the real training images; returns it and its accuracy on a
    10 % held-out part of those images (for the log; the filter uses the model trained on 90 %)."""
    cfg = compose([f"backbone={opts.classifier}"])
    torch.manual_seed(opts.seed)
    model = Scorer(build(cfg.backbone, num_classes=num_classes, input_size=opts.image_size))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(opts.seed))
    n_hold = max(1, len(y) // 10)
    hold, fit = order[:n_hold], order[n_hold:]
    loader = DataLoader(TensorDataset(x[fit], y[fit]), batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(opts.seed))
    optim = torch.optim.Adam(model.parameters(), lr=opts.classifier_lr)
    model.train()
    for _ in range(opts.classifier_epochs):
        for xb, yb in loader:
            xb = torch.where(torch.rand(len(xb), 1, 1, 1) < 0.5, xb.flip(3), xb)
            loss = nn.functional.cross_entropy(model(xb), yb)
            optim.zero_grad()
            loss.backward()
            optim.step()
    model.eval()
    with torch.no_grad():
        acc = float((predict(model, x[hold]).argmax(1) == y[hold]).float().mean())
    return model, acc


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Class probabilities (softmax) of ``model`` for images in [-1, 1]."""
    model.eval()
    return torch.cat([model(x[i:i + batch]).softmax(1) for i in range(0, len(x), batch)])


def filter_mask(probs: torch.Tensor, labels: torch.Tensor, min_confidence: float) -> torch.Tensor:
    """Keep an image only if the classifier's top class is its intended class with p >= min_confidence."""
    return (probs.argmax(1) == labels) & (probs.gather(1, labels[:, None]).squeeze(1) >= min_confidence)


def inception_score(model: nn.Module, x: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """torchmetrics' Inception Score with ``model``'s logits in place of InceptionV3's (mean, std over splits)."""
    from torchmetrics.image.inception import InceptionScore

    if len(x) < 2:
        return float("nan"), float("nan")
    metric = InceptionScore(feature=model.eval(), splits=max(1, min(splits, len(x) // 2)))
    with torch.no_grad():
        for i in range(0, len(x), 512):
            metric.update(x[i:i + 512])
    mean, std = metric.compute()
    return float(mean), float(std)


# -- training and generation ------------------------------------------------------------------
def train_gan(x: torch.Tensor, y: torch.Tensor, num_classes: int, opts: GanOptions, on_epoch=None):
    """Standard conditional DCGAN training (BCE, Adam 2e-4, betas 0.5/0.999, one D and one G step per batch)."""
    torch.manual_seed(opts.seed)
    G = Generator(num_classes, opts.latent_dim, x.shape[1], opts.image_size, opts.width)
    D = Discriminator(num_classes, x.shape[1], opts.image_size, opts.width)
    G.apply(_init)
    D.apply(_init)
    opt_g = torch.optim.Adam(G.parameters(), lr=opts.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=opts.lr, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(opts.seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=opts.batch_size, shuffle=True, drop_last=len(y) > opts.batch_size,
                        generator=gen)
    history = []
    for epoch in range(opts.epochs):
        G.train()
        D.train()
        sums = np.zeros(2)
        n = 0
        for xb, yb in loader:
            b = len(yb)
            z = torch.randn(b, opts.latent_dim)
            fake = G(z, yb)
            d_loss = bce(D(xb, yb), torch.full((b,), 0.9)) + bce(D(fake.detach(), yb), torch.zeros(b))
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            g_loss = bce(D(fake, yb), torch.ones(b))
            opt_g.zero_grad()
            g_loss.backward()
            opt_g.step()
            sums += (g_loss.item(), d_loss.item())
            n += 1
        row = {"epoch": epoch, "loss_g": sums[0] / max(1, n), "loss_d": sums[1] / max(1, n)}
        history.append(row)
        if on_epoch:
            on_epoch(row)
    return G.eval(), history


@torch.no_grad()
def generate(G: Generator, per_class: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images per class, in [-1, 1], with their intended labels."""
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    z = torch.randn(len(labels), G.latent_dim, generator=gen)
    return torch.cat([G(z[i:i + 1024], labels[i:i + 1024]) for i in range(0, len(labels), 1024)]), labels


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W) or (N, H, W, 3)."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)


def write_images(x: torch.Tensor, labels: torch.Tensor, classes: list[str], out: Path) -> dict[str, int]:
    """Kept images as ``out/<class>/<n>.png``; class folders of an earlier run are replaced."""
    counts = {}
    arr = to_uint8(x)
    for c, (name, folder) in enumerate(zip(classes, class_dirnames(classes))):
        d = out / folder
        if d.is_dir():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        idx = (labels == c).nonzero().flatten().tolist()
        for k, i in enumerate(idx):
            Image.fromarray(arr[i]).save(d / f"gan_{c:02d}_{k:05d}.png")
        counts[name] = len(idx)
    return counts


def sample_grid(x: torch.Tensor, path: Path, title: str, nrow: int = 8) -> None:
    from torchvision.utils import make_grid

    if len(x) == 0:
        x = torch.full((1, x.shape[1] if x.ndim == 4 else 1, 8, 8), -1.0)
    grid = make_grid((x[: nrow * nrow].clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    img = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(img).save(path)


def augment(opts: GanOptions) -> dict[str, Any]:
    """The whole step: train on the training split, generate, filter, score, write, log."""
    opts.check()
    if opts.threads:
        torch.set_num_threads(int(opts.threads))
    x, y, classes, cfg = real_training_images(opts)
    dataset = cell(cfg)["dataset"]
    k = len(classes)
    tracker = None
    if opts.track:
        tags = {"dataset": dataset, "seed": str(opts.seed), tracking.TAG_JOB: JOB_GAN,
                "git_commit": tracking.git_commit(Path(__file__).parent),
                "data_md5": tracking.data_md5(cfg.dataset.get("root")), "status_detail": "running"}
        exp = cfg.tracking.get("experiment") or dataset
        tracker = tracking.Tracker(cfg.tracking.get("uri"), exp, gan_run_name(dataset, opts.seed), tags)
    params = {**{f"gan.{k_}": v for k_, v in asdict(opts).items()}, **flatten(cfg.dataset, "dataset.")}
    if tracker is None:
        return _augment(opts, x, y, classes, dataset, None)
    with tracker.run(params) as tr:
        return _augment(opts, x, y, classes, dataset, tr)


def _augment(opts, x, y, classes, dataset, tr) -> dict[str, Any]:
    k = len(classes)
    t0 = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=opts.epochs, desc="gan", unit="epoch", disable=not opts.progress, file=sys.stderr)

    def on_epoch(row):
        bar.update()
        bar.set_postfix(g=f"{row['loss_g']:.2f}", d=f"{row['loss_d']:.2f}")
        if tr:
            tr.log_metrics({GAN_LOSS_G: row["loss_g"], GAN_LOSS_D: row["loss_d"]}, step=row["epoch"])

    G, history = train_gan(x, y, k, opts, on_epoch)
    bar.close()
    train_s = time.perf_counter() - t0
    scorer, clf_acc = train_classifier(x, y, k, opts)
    fake, labels = generate(G, opts.per_class, k, opts.seed)
    probs = predict(scorer, fake)
    keep = filter_mask(probs, labels, opts.min_confidence)
    kept, kept_labels = fake[keep], labels[keep]
    is_kept = inception_score(scorer, kept)
    is_all = inception_score(scorer, fake)
    is_real = inception_score(scorer, x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:5000]])
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = write_images(kept, kept_labels, classes, out)
    summary = {
        "dataset": dataset, "classes": classes, "train_images": int(len(y)), "channels": int(x.shape[1]),
        "generated": int(len(labels)), "kept": int(keep.sum()), "rejected_share": float(1 - keep.float().mean()),
        "kept_per_class": counts, "inception_score": is_kept[0], "inception_score_std": is_kept[1],
        "inception_score_all": is_all[0], "inception_score_real": is_real[0], "classifier": opts.classifier,
        "classifier_val_acc": clf_acc, "gan_train_s": train_s, "history": history, "options": asdict(opts),
        "note": "Inception Score computed with the filter classifier's softmax (not InceptionV3)",
    }
    (out / ARTIFACT_GAN_SUMMARY).write_text(json.dumps(summary, indent=2))
    if tr:
        tr.log_metrics({GAN_IS: is_kept[0], GAN_IS_STD: is_kept[1], GAN_IS_ALL: is_all[0],
                        GAN_IS_REAL: is_real[0], GAN_KEPT: summary["kept"],
                        GAN_REJECTED_SHARE: summary["rejected_share"],
                        GAN_CLASSIFIER_ACC: clf_acc, GAN_TRAIN_S: train_s})
        grids = tr.artifact_dir / ARTIFACT_GAN_SAMPLES
        grids.mkdir(parents=True, exist_ok=True)
        for c, (name, folder) in enumerate(zip(classes, class_dirnames(classes))):
            sample_grid(fake[labels == c], grids / f"{folder}.png", name)
        tr.log_artifact(grids)
        tr.log_artifact(out / ARTIFACT_GAN_SUMMARY)
        summary["run_id"] = tr.run_id
    return summary


def summary_line(s: dict[str, Any]) -> str:
    return (f"gan: {s['kept']}/{s['generated']} kept (rejected {s['rejected_share']:.1%}), Inception Score "
            f"(classifier softmax) kept {s['inception_score']:.2f}, all {s['inception_score_all']:.2f}, "
            f"real {s['inception_score_real']:.2f}; classifier held-out acc {s['classifier_val_acc']:.3f}")


def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 after one line ``prunegrid: error: ...`` (returned; a usage error raises ``SystemExit(2)``)."""
    from prunegrid.cli import ArgumentParser, error_line, is_user_error, key_value

    p = ArgumentParser(prog="python -m prunegrid.data.gan", description=__doc__.split("\n\n")[0],
                       epilog="key=value overrides the YAML options; dataset=..., dataset.x=..., paths.x=..., "
                              "tracking.x=... choose the data set like train.py.")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="GAN YAML (conf/gan/default.yaml)")
    p.add_argument("overrides", nargs="*", type=key_value, help="key=value overrides")
    args = p.parse_args(argv)
    try:
        try:
            opts = load_options(args.config, args.overrides)
        except (TypeError, ValueError) as exc:  # a value of the wrong type (epochs=abc): the checks compare numbers
            raise ConfigError(f"an option has a value of the wrong type ({exc}); check {args.config} and the "
                              "key=value overrides") from None
        summary = augment(opts)
    except Exception as exc:  # a PrunegridError, or Hydra's complaint about a dataset=... override
        if not is_user_error(exc):
            raise
        return error_line(exc)
    print(summary_line(summary))
    print(f"kept images: {Path(summary['options']['out'])}  (train with dataset.synthetic=<that dir>)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
