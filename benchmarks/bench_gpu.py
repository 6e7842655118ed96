"""A grid cell's models measured on a GPU, through the grid's own measurement functions.

For each saved model (default: the default grid's seed-0 ``prune=none`` and ``prune=channel`` cells,
``models/*.pt``), eager latency against the dense baseline (the ``none`` model) in interleaved
rounds with both models on the GPU (``measure.device=auto`` picks it), at batch 1 and at the
benchmark batch, and ``memory/infer_peak_mb`` as the pipeline measures it on a GPU: the CUDA peak
allocation of loading and running the model in a fresh process. Writes ``reports/bench/gpu.json``.

    python benchmarks/bench_gpu.py [--models models/a.pt models/b.pt] [--baseline models/none.pt]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from prunegrid import measure  # noqa: E402

CELL = "models/resnet18-{}-fashion_mnist-cross_entropy-s0.pt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default=str(ROOT / CELL.format("none")))
    p.add_argument("--models", nargs="+", default=[str(ROOT / CELL.format(m)) for m in ("none", "channel")])
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "reports" / "bench" / "gpu.json"))
    args = p.parse_args()

    base = measure.load_model(args.baseline)
    rows = []
    for path in args.models:
        model = measure.load_model(path)
        device = measure.resolve_device("auto", model, args.input_size)
        base = base.to(device)
        row = {"model": Path(path).name, "device": device,
               "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
               **measure.static_metrics(model.cpu(), args.input_size)}
        model = model.to(device)
        row.update(measure.latency_metrics(
            lambda s: measure.compare_eager(model, base, args.input_size, s, warmup=args.warmup, repeats=args.repeats),
            measure.settings(1, None, args.batch_size)))
        row["memory"] = measure.model_memory(path, args.input_size, args.batch_size, device=device)
        rows.append(row)
        print(f"{row['model']}: device {device}, batch 1 {row['time/infer_ms']:.3f} ms (IQR {row['time/infer_ms_iqr']:.3f})"
              f" vs baseline {row['baseline/infer_ms']:.3f} ms, speed-up {row['speedup/infer']:.3f} "
              f"[{row['speedup/infer_q25']:.3f}, {row['speedup/infer_q75']:.3f}]; batch {args.batch_size}: "
              f"{row['time/infer_ms_batch']:.4f} ms/img, speed-up {row['speedup/infer_batch']:.3f} "
              f"[{row['speedup/infer_batch_q25']:.3f}, {row['speedup/infer_batch_q75']:.3f}]; memory {row['memory']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
