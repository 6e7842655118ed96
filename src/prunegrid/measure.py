"""Measurement: pure functions called the same way for the baseline and every method.

The grid is only fair if every cell is measured by the same code: dense and non-zero
parameter counts, FLOPs (torch's own counter), the saved file's size, latency (fixed
threads, warm-up, median of repeats) and peak memory (sampled resident set size, plus
CUDA peak allocation on a GPU). Unstructured sparsity makes no dense model faster or
smaller, so both counts and the measured latency are reported as they are.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import psutil
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def weight_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every learned tensor: the parameters, plus the weights and biases that quantized layers
    keep packed outside ``parameters()`` (dequantized), so an INT8 model is counted like a float one."""
    yield from model.parameters()
    for m in model.modules():
        w = getattr(m, "weight", None)
        if callable(w) and not isinstance(w, torch.Tensor):  # torch.ao quantized Conv/Linear: weight(), bias()
            yield w().dequantize()
            if m.bias() is not None:
                yield m.bias()
        elif isinstance(m, torch.jit.ScriptModule) and hasattr(m, "_weight_bias"):  # the same, as TorchScript
            yield from (t.dequantize() if t.is_quantized else t for t in m._weight_bias() if t is not None)


def count_params(model: nn.Module) -> int:
    """All parameters, dense count, quantized weights included (shared modules count once)."""
    return sum(t.numel() for t in weight_tensors(model))


def count_nonzero(tensors: Iterable[torch.Tensor]) -> int:
    return sum(int(torch.count_nonzero(t.detach())) for t in tensors)


def count_nonzero_params(model: nn.Module) -> int:
    """Parameters not exactly zero (a pruning mask that is applied counts as zeros)."""
    return count_nonzero(weight_tensors(model))


def sparsity(tensors: Iterable[torch.Tensor]) -> float:
    """Share of exactly-zero entries over all ``tensors`` (Algorithm 1 of Ju & Kang (on-device lightweight methods))."""
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    return 0.0 if total == 0 else (total - count_nonzero(tensors)) / total


def model_sparsity(model: nn.Module) -> float:
    return sparsity(weight_tensors(model))


def layer_sparsity(model: nn.Module, kind: type[nn.Module]) -> float:
    """Share of zero weights over all ``kind`` layers (e.g. ``nn.Conv2d``, ``nn.BatchNorm2d``)."""
    return sparsity(m.weight for m in model.modules() if isinstance(m, kind) and getattr(m, "weight", None) is not None)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _quantized_flop_formulas() -> dict:
    """FLOP formulas for torch's quantized conv / linear ops (weights packed), counted as the float ops are."""
    from torch.utils.flop_counter import conv_flop_count

    def conv(x_shape, packed, *args, out_shape=None, **kwargs):
        return conv_flop_count(list(x_shape), list(packed.unpack()[0].shape), list(out_shape))

    def linear(x_shape, packed, *args, out_shape=None, **kwargs):
        out_features, in_features = packed.unpack()[0].shape
        return 2 * math.prod(x_shape[:-1]) * in_features * out_features

    table = {"conv2d": conv, "conv2d_relu": conv, "conv2d_add": conv, "conv2d_add_relu": conv,
             "linear": linear, "linear_relu": linear}
    return {getattr(torch.ops.quantized, k): f for k, f in table.items() if hasattr(torch.ops.quantized, k)}


def flops(model: nn.Module, input_size: int, channels: int = 3) -> int:
    """Forward FLOPs for one input (a multiply-add counts 2), by ``torch.utils.flop_counter``;
    quantized conv / linear ops count as their float versions (same multiply-adds, in INT8)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, channels, input_size, input_size, device=_device(model))
    counter = FlopCounterMode(display=False, custom_mapping=_quantized_flop_formulas())
    with counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Save the whole module (architecture included: pruned models change shape)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return path


def load_model(path: str | Path, map_location: str = "cpu") -> nn.Module:
    return torch.load(path, map_location=map_location, weights_only=False)


def file_size_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / 1e6


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Fix torch's intra-op thread count for the block (restored after)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_ms(model: nn.Module, input_size: int, batch_size: int = 1, *, warmup: int = 10, repeats: int = 50,
               threads: int | None = None, channels: int = 3) -> float:
    """Median wall time of one forward pass per image, in ms, after ``warmup`` passes."""
    device = _device(model)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, channels, input_size, input_size, device=device)
    times = []
    with num_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            model(x)
        _sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    model.train(was_training)
    return statistics.median(times) * 1000.0 / batch_size


@dataclass
class PeakMemory:
    """Peak resident set size of this process (MB) while the block runs, sampled by a thread;
    on a GPU also the CUDA peak allocation (``cuda_peak_mb``)."""

    interval_s: float = 0.005
    peak_mb: float = 0.0
    cuda_peak_mb: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def _sample(self) -> None:
        proc = psutil.Process(os.getpid())
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, psutil.Process(os.getpid()).memory_info().rss / 2**20)
        if torch.cuda.is_available():
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20


def static_metrics(model: nn.Module, input_size: int) -> dict[str, float]:
    """Size figures of a model: dense/non-zero parameters, sparsity and FLOPs."""
    params = count_params(model)
    nonzero = count_nonzero_params(model)
    return {
        "model/params": params,
        "model/params_nonzero": nonzero,
        "model/sparsity": 0.0 if params == 0 else (params - nonzero) / params,
        "model/flops": flops(model, input_size),
    }


def speed_metrics(model: nn.Module, input_size: int, *, batch_size: int = 32, warmup: int = 10,
                  repeats: int = 50, threads: int | None = None) -> dict[str, float]:
    """Latency at batch 1 and at ``batch_size`` (per image), and the benchmark's peak memory."""
    with PeakMemory() as mem:
        single = latency_ms(model, input_size, 1, warmup=warmup, repeats=repeats, threads=threads)
        batch = latency_ms(model, input_size, batch_size, warmup=max(1, warmup // 2),
                           repeats=max(3, repeats // 5), threads=threads)
    return {
        "time/infer_ms": single,
        "time/infer_ms_batch": batch,
        "memory/infer_peak_mb": mem.cuda_peak_mb if mem.cuda_peak_mb is not None else mem.peak_mb,
    }


def compressed_size_mb(model: nn.Module) -> float:
    """Size of the state dict saved deflate-compressed (zip), in MB.

    ``model/size_mb`` is the real ``torch.save`` file, which stores zeros as dense floats, so an
    unstructured-sparse model is exactly as large as the dense one. Compression is the cheap way
    zeros pay off on disk or over the wire; the dense baseline is measured the same way.
    """
    import io
    import zlib

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}, buf)
    return len(zlib.compress(buf.getvalue(), 6)) / 1e6


def export_onnx(model: nn.Module, input_size: int, path: str | Path, channels: int = 3, opset: int = 17) -> Path:
    """Export ``model`` to ONNX with a dynamic batch axis (input ``input``, output ``logits``).

    Uses torch's TorchScript-based exporter (``dynamo=False``): in torch 2.14 it is several
    times faster than the ``torch.export`` one and handles every backbone of the grid.
    """
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    x = torch.zeros(1, channels, input_size, input_size, device=_device(model))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        model.train(was_training)
    return path


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session with fixed intra-op threads (sequential execution)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_latency_ms(path: str | Path, input_size: int, batch_size: int = 1, *, warmup: int = 10, repeats: int = 50,
                    threads: int | None = None, channels: int = 3) -> float:
    """Median wall time of one ONNX Runtime (CPU) run per image, in ms, like :func:`latency_ms`."""
    import numpy as np

    sess = onnx_session(path, threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch_size, channels, input_size, input_size)).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0 / batch_size
