"""The whole detector as deployed, measured in a fresh process: read each image file, resize it,
run the model and NMS, one image after another (batch 1), while a sampler records the process's
resident memory every ``interval_s`` seconds, as Ju & Kang measured peak memory with ``pidstat``
at one-second intervals.

``python -m prunegrid.detection.deploy MODEL IMAGE... --input-size S`` prints one JSON line:
per-image latency (median and quartiles, milliseconds), the sampled peak and mean RSS (the whole
process, as pidstat reports it), the number of samples, the process's RSS before the model was
loaded and the sampled peak's increase over it (what the detector adds to a Python process with
torch imported), and the exact peak RSS of the process for comparison. Latency here is
absolute (one model, no interleaved baseline): compare it with the baseline cell's on the same
host only.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import psutil


class RssSampler(threading.Thread):
    """Resident memory of this process, sampled every ``interval_s`` (the first sample at start)."""

    def __init__(self, interval_s: float = 1.0):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop_event = threading.Event()
        self._proc = psutil.Process()

    def sample(self) -> None:
        self.samples.append(self._proc.memory_info().rss / 2**20)

    def run(self) -> None:
        while True:
            self.sample()
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def detect(model, path: str | Path, input_size: int, conf: float, iou: float, max_det: int):
    """One image as deployed: read the file, resize, scale to [0, 1], run the model, NMS."""
    import numpy as np
    import torch
    from PIL import Image

    from prunegrid.detection.boxes import non_max_suppression

    img = Image.open(path).convert("RGB").resize((input_size, input_size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return non_max_suppression(model(x), conf, iou, max_det)[0]


def run_detector(model_path: str, images: Sequence[str], input_size: int, *, conf: float = 0.25, iou: float = 0.6,
                 max_det: int = 300, threads: int = 1, warmup: int = 3, interval_s: float = 1.0,
                 min_seconds: float = 5.0) -> dict[str, float]:
    """Detect on ``images`` one after another, the sequence repeated until ``min_seconds`` have
    passed (so a 1 s sampler sees the detector running), and report latency and sampled memory."""
    import torch

    from prunegrid import measure

    if threads:
        torch.set_num_threads(threads)
    classes = measure.model_classes(model_path)
    before_mb = psutil.Process().memory_info().rss / 2**20
    sampler = RssSampler(interval_s)
    sampler.start()
    with measure.PeakMemory() as mem:
        model = measure.load_model(model_path, classes=classes).eval()
        run = lambda path: detect(model, path, input_size, conf, iou, max_det)

        times, boxes = [], 0
        with torch.inference_mode():
            for path in list(images)[:warmup]:
                run(path)
            t_start = time.perf_counter()
            while not times or time.perf_counter() - t_start < min_seconds:
                for path in images:
                    t0 = time.perf_counter()
                    boxes += len(run(path))
                    times.append((time.perf_counter() - t0) * 1e3)
            seconds = time.perf_counter() - t_start
    sampler.stop()
    q25, median, q75 = measure.quartiles(times)
    return {"detect_ms": median, "detect_ms_q25": q25, "detect_ms_q75": q75, "detect_fps": len(times) / seconds,
            "detect_peak_mb": max(sampler.samples), "detect_mean_mb": sum(sampler.samples) / len(sampler.samples),
            "detect_samples": len(sampler.samples), "detect_exact_peak_mb": mem.peak_mb,
            "detect_before_mb": before_mb, "detect_increase_mb": max(sampler.samples) - before_mb,
            "detect_boxes_per_image": boxes / max(1, len(times)), "detect_images": len(times)}


def interleaved_detectors(model_paths: Sequence[str], images: Sequence[str], input_size: int, *, conf: float = 0.25,
                          iou: float = 0.6, max_det: int = 300, threads: int = 1, rounds: int = 3,
                          warmup: int = 3) -> dict[str, list[float]]:
    """Whole-detector latency of several models in one process, image by image in turn (A B C,
    B C A, ...), so that their ratios compare like with like on a noisy machine: the ms of every
    image for every model, ``rounds`` passes over ``images``."""
    import torch

    from prunegrid import measure

    if threads:
        torch.set_num_threads(threads)
    models = [measure.load_model(p).eval() for p in model_paths]
    times: dict[str, list[float]] = {str(p): [] for p in model_paths}

    with torch.inference_mode():
        for model in models:
            for path in list(images)[:warmup]:
                detect(model, path, input_size, conf, iou, max_det)
        k = 0
        for _ in range(rounds):
            for path in images:
                order = list(range(len(models)))
                order = order[k % len(order):] + order[:k % len(order)]
                k += 1
                for i in order:
                    t0 = time.perf_counter()
                    detect(models[i], path, input_size, conf, iou, max_det)
                    times[str(model_paths[i])].append((time.perf_counter() - t0) * 1e3)
    return times


def measure_detector(model_path: str | Path, images: Sequence[str | Path], input_size: int, *, conf: float = 0.25,
                     iou: float = 0.6, max_det: int = 300, threads: int = 1, warmup: int = 3, interval_s: float = 1.0,
                     min_seconds: float = 5.0, timeout_s: float = 600) -> dict[str, float]:
    """:func:`run_detector` in a fresh Python process (nothing this process holds counts)."""
    cmd = [sys.executable, "-m", "prunegrid.detection.deploy", str(model_path), *map(str, images),
           "--input-size", str(input_size), "--conf", str(conf), "--iou", str(iou), "--max-det", str(max_det),
           "--threads", str(threads or 0), "--warmup", str(warmup), "--interval", str(interval_s),
           "--min-seconds", str(min_seconds)]
    from prunegrid.measure import json_subprocess

    return json_subprocess(cmd, "detector measurement", timeout_s)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m prunegrid.detection.deploy", description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("images", nargs="+")
    p.add_argument("--input-size", type=int, required=True)
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--iou", type=float, default=0.6)
    p.add_argument("--max-det", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--min-seconds", type=float, default=5.0)
    a = p.parse_args(argv)
    print(json.dumps(run_detector(a.model, a.images, a.input_size, conf=a.conf, iou=a.iou, max_det=a.max_det,
                                  threads=a.threads, warmup=a.warmup, interval_s=a.interval,
                                  min_seconds=a.min_seconds)))


if __name__ == "__main__":
    main()
