"""Noise check of the grid's latency measurement: a model against a deep copy of itself.

The grid's speed-ups come from :func:`prunegrid.measure.compare_eager` and
:func:`prunegrid.measure.compare_onnx` (the model and its dense baseline in interleaved rounds,
one runtime at a time, speed-up taken round by round). Timed against an identical copy, that path
must read 1.00: this script runs it ``--runs`` times (default 10) with the grid's default settings
(``measure.warmup=10``, ``measure.repeats`` rounds) for every deployment (batch 1 on 1 thread,
batch 1 on all cores, the benchmark batch on all cores) and both runtimes, and prints the median
and range of the speed-up over the runs. Target: identical models read 1.00 ± 0.05 (every run's
median speed-up inside [0.95, 1.05]). Writes ``reports/bench/noise.json``.

    .venv/bin/python benchmarks/bench_noise.py [--backbone resnet18] [--runs 10] [--repeats 50] [--device auto]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from prunegrid import measure  # noqa: E402
from prunegrid.models.backbones import resnet  # noqa: E402

TOLERANCE = 0.05


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50, help="measure.repeats (interleaved rounds at batch 1)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="measure.device: auto, cpu or cuda (eager only on cuda)")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--out", default=str(ROOT / "reports" / "bench" / "noise.json"))
    args = p.parse_args()

    torch.manual_seed(0)
    net = resnet(args.backbone, num_classes=10, input_size=args.input_size).eval()
    twin = copy.deepcopy(net)
    device = measure.resolve_device(args.device, net, args.input_size)
    net, twin = net.to(device), twin.to(device)
    deployments = measure.settings(1, None, args.batch_size)
    runtimes = {"eager": lambda s: measure.compare_eager(net, twin, args.input_size, s, warmup=args.warmup,
                                                         repeats=args.repeats)}
    tmp = tempfile.TemporaryDirectory(prefix="prunegrid-noise-")
    if not args.no_onnx:
        a = measure.export_onnx(net.cpu(), args.input_size, Path(tmp.name) / "a.onnx")
        b = measure.export_onnx(twin.cpu(), args.input_size, Path(tmp.name) / "b.onnx")
        net, twin = net.to(device), twin.to(device)
        runtimes["onnx"] = lambda s: measure.compare_onnx(a, b, args.input_size, s, warmup=args.warmup,
                                                          repeats=args.repeats)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    for i in range(args.runs):
        for rt, compare in runtimes.items():
            for s in deployments:
                c = compare(s)
                r = results.setdefault(f"{rt}{s.suffix}", {"runtime": rt, "batch": s.batch, "threads": s.threads,
                                                            "speedups": [], "q25": [], "q75": [], "ms": []})
                r["speedups"].append(c.speedup)
                r["q25"].append(c.speedup_q25)
                r["q75"].append(c.speedup_q75)
                r["ms"].append(c.ms)
        print(f"run {i + 1}/{args.runs} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    tmp.cleanup()

    print(f"\n{args.backbone} at {args.input_size} px against a deep copy of itself, {args.runs} runs of "
          f"{args.repeats} interleaved rounds, device {device}\n")
    head = f"{'deployment':<14} {'batch':>5} {'thr':>3} {'median':>7} {'min':>6} {'max':>6} {'mean IQR':>15} {'ms':>7}  verdict"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        sp = r["speedups"]
        r.update(median=statistics.median(sp), min=min(sp), max=max(sp),
                 within_tolerance=all(abs(v - 1) <= TOLERANCE for v in sp))
        iqr = f"[{statistics.mean(r['q25']):.3f}, {statistics.mean(r['q75']):.3f}]"
        verdict = "1.00 ± 0.05: ok" if r["within_tolerance"] else "OUTSIDE 1.00 ± 0.05"
        print(f"{name:<14} {r['batch']:>5} {r['threads']:>3} {r['median']:>7.3f} {r['min']:>6.3f} {r['max']:>6.3f} "
              f"{iqr:>15} {statistics.median(r['ms']):>7.3f}  {verdict}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"backbone": args.backbone, "input_size": args.input_size, "runs": args.runs,
                               "repeats": args.repeats, "warmup": args.warmup, "device": device,
                               "host": platform.node(), "torch": torch.__version__, "tolerance": TOLERANCE,
                               "results": results}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
