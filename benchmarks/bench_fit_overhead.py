"""Lightning fit vs a plain PyTorch loop: images per second on the same model, data and threads.

The default cell's model (resnet18 at 32 px), its Fashion-MNIST training loader and optimizer,
trained for the same number of batches in both loops, alternating runs; prints the ratio
(Lightning / plain; target >= 0.9) and writes ``reports/bench/fit_overhead.json``.

    python benchmarks/bench_fit_overhead.py [--batches 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from prunegrid.config import build, compose
from prunegrid.models.module import Classifier

ROOT = Path(__file__).resolve().parents[1]


def setup(cfg):
    data = build(cfg.dataset, seed=cfg.seed)
    data.setup()
    return data


def make_module(cfg, data):
    torch.manual_seed(cfg.seed)
    net = build(cfg.backbone, num_classes=data.num_classes, input_size=cfg.dataset.input_size)
    return Classifier(net, build(cfg.loss), build(cfg.optimizer), None, data.num_classes)


def plain(cfg, data, batches: int) -> float:
    module = make_module(cfg, data)
    net, loss_fn = module.net, module.loss_fn
    opt = module.optimizer_factory(net.parameters())
    net.train()
    seen = 0
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(data.train_dataloader()):
        if i >= batches:
            break
        opt.zero_grad(set_to_none=True)
        logits = net(x)
        loss = loss_fn(logits, y)
        loss.backward()
        opt.step()
        (logits.argmax(1) == y).float().mean().item()
        seen += len(y)
    return seen / (time.perf_counter() - t0)


def lightning(cfg, data, batches: int) -> float:
    module = make_module(cfg, data)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=batches, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    return batches * data.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose([f"paths.data_dir={ROOT / 'data'}"])
    data = setup(cfg)
    plain(cfg, data, 3)
    res = {"plain": [], "lightning": []}
    for _ in range(args.repeats):
        res["plain"].append(plain(cfg, data, args.batches))
        res["lightning"].append(lightning(cfg, data, args.batches))
    p, lt = statistics.median(res["plain"]), statistics.median(res["lightning"])
    ratio = lt / p
    print(f"{'loop':<10} {'images/s':>10}  runs")
    print(f"{'plain':<10} {p:>10.1f}  {', '.join(f'{v:.1f}' for v in res['plain'])}")
    print(f"{'lightning':<10} {lt:>10.1f}  {', '.join(f'{v:.1f}' for v in res['lightning'])}")
    print(f"ratio lightning/plain = {ratio:.3f} (target >= 0.9) ; {args.batches} batches of {data.batch_size}, "
          f"{args.threads} threads, {cfg.backbone.name} at {cfg.dataset.input_size}px")
    out = ROOT / "reports" / "bench" / "fit_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"plain_img_s": p, "lightning_img_s": lt, "ratio": ratio, "runs": res,
                               "batches": args.batches, "batch_size": data.batch_size, "threads": args.threads,
                               "backbone": cfg.backbone.name, "input_size": cfg.dataset.input_size}, indent=2))


if __name__ == "__main__":
    main()
