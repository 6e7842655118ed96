"""Measurement: pure functions called the same way for the baseline and every method.

The grid is only fair if every cell is measured by the same code: dense and non-zero
parameter counts, FLOPs (torch's own counter), the saved file's size, latency and memory.
Unstructured sparsity makes no dense model faster or smaller, so both counts and the measured
latency are reported as they are.

- **Latency** is always a comparison: the model and its dense baseline run in interleaved rounds
  (A B, B A, ...) in one process, with the same threads, input and warm-up, and within one
  runtime (eager PyTorch with eager, ONNX Runtime with ONNX Runtime). Each gets a median and an
  interquartile range; the speed-up is taken round by round (baseline time / model time), so a
  load spike on a shared machine hits both sides of a pair, and comes with its quartiles.
- **Memory** is the model's own: the increase of resident memory over the process before the model
  was loaded, measured in a fresh process (:func:`model_memory`), or the CUDA peak allocation
  with the model on the GPU. On Linux the kernel's high-water mark is reset and read back
  (``/proc/self/clear_refs``), so no short peak is missed; elsewhere RSS is sampled.
"""

from __future__ import annotations

import contextlib

import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import psutil
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunegrid.errors import PrunegridError, one_line


def _declared(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Submodules that declare their own ``weight_counts`` (params, non-zero), outermost only.

    An INT8 graph declares the counts of the float weights it quantized: quantization stores
    the same weights in 8 bits and folds BatchNorm into the convolutions, so it removes no
    parameter, and its rounding zeros are not pruning."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(getattr(m, "weight_counts", None), tuple) and not any(
                name.startswith(f"{p}.") or p == "" for p, _ in found):
            found.append((name, m))
    return found


def weight_tensors(model: nn.Module, declared: bool = True) -> Iterator[torch.Tensor]:
    """Every learned tensor: the parameters, plus the weights and biases that quantized layers
    keep packed outside ``parameters()`` (dequantized). With ``declared`` (default), subtrees that
    declare ``weight_counts`` are left out (:func:`count_params` adds their declared counts)."""
    skip = [p for p, _ in _declared(model)] if declared else []

    def inside(name: str) -> bool:
        return any(p == "" or name == p or name.startswith(f"{p}.") for p in skip)

    for name, p in model.named_parameters():
        if not inside(name.rsplit(".", 1)[0] if "." in name else ""):
            yield p
    for name, m in model.named_modules():
        if inside(name):
            continue
        w = getattr(m, "weight", None)
        if callable(w) and not isinstance(w, torch.Tensor):  # torch.ao quantized Conv/Linear: weight(), bias()
            yield w().dequantize()
            if m.bias() is not None:
                yield m.bias()
        elif isinstance(m, torch.jit.ScriptModule) and hasattr(m, "_weight_bias"):  # the same, as TorchScript
            yield from (t.dequantize() if t.is_quantized else t for t in m._weight_bias() if t is not None)


def count_params(model: nn.Module) -> int:
    """All parameters, dense count, quantized weights included (shared modules count once)."""
    return sum(t.numel() for t in weight_tensors(model)) + sum(m.weight_counts[0] for _, m in _declared(model))


def count_nonzero(tensors: Iterable[torch.Tensor]) -> int:
    return sum(int(torch.count_nonzero(t.detach())) for t in tensors)


def count_nonzero_params(model: nn.Module) -> int:
    """Parameters not exactly zero (a pruning mask that is applied counts as zeros)."""
    return count_nonzero(weight_tensors(model)) + sum(m.weight_counts[1] for _, m in _declared(model))


def sparsity(tensors: Iterable[torch.Tensor]) -> float:
    """Share of exactly-zero entries over all ``tensors`` (Algorithm 1 of Ju & Kang (on-device lightweight methods))."""
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    return 0.0 if total == 0 else (total - count_nonzero(tensors)) / total


def model_sparsity(model: nn.Module) -> float:
    params = count_params(model)
    return 0.0 if params == 0 else 1 - count_nonzero_params(model) / params


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
    """Save the whole module (architecture included: pruned models change shape); :func:`load_model`
    reads it back without running code from the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return path


# A model file may only name these: nn.Module classes of these packages, and these plain types.
SAFE_PACKAGES = ("torch", "torchvision", "timm", "prunegrid")
SAFE_TYPES = ("builtins.frozenset", "builtins.set", "prunegrid.models.net.Contract", "prunegrid.models.net.Unit")


class ModelFileError(PrunegridError):
    """A model file that cannot be loaded safely (it names code outside the allowed classes) or at all."""


def _safe_global(name: str, path: Path) -> object:
    """The class a model file names, when it is allowed (:data:`SAFE_PACKAGES`, :data:`SAFE_TYPES`);
    a module outside those packages is never imported."""
    import importlib

    refuse = ModelFileError(f"{path} names {name}, which prunegrid does not load (it could run code); "
                            "load only model files that prunegrid saved")
    parts = name.split(".")
    if parts[0] not in SAFE_PACKAGES and name not in SAFE_TYPES:
        raise refuse
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module, then nested attributes
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise refuse from None
        break
    else:
        raise refuse
    if name in SAFE_TYPES or (isinstance(obj, type) and issubclass(obj, nn.Module)):
        return obj
    raise refuse


def model_classes(path: str | Path) -> list[object]:
    """The classes a model file names, each allowed by :func:`_safe_global` (imported, never run)."""
    path = Path(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:
        raise ModelFileError(f"{path} is not a model file saved by torch ({one_line(exc)[:200]})") from None
    return [_safe_global(n, path) for n in names]


def load_model(path: str | Path, map_location: str = "cpu", classes: list[object] | None = None) -> nn.Module:
    """Load a model saved by :func:`save_model` with ``torch.load(weights_only=True)``: the file may
    only build tensors and the classes :func:`_safe_global` allows, so loading it runs no code from
    it (a crafted pickle is refused in one line). An INT8 model's compiled graph is TorchScript,
    which is deserialized here and runs only TorchScript operators when the model runs."""
    import pickle

    path = Path(path)
    allowed = model_classes(path) if classes is None else classes
    try:
        with torch.serialization.safe_globals(allowed):
            model = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        raise ModelFileError(f"{path} cannot be loaded safely ({one_line(exc)[:300]}); load only model files "
                             "that prunegrid saved") from None
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"{path} holds a {type(model).__name__}, not a model; give a model.pt saved by prunegrid")
    return model


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


LOCK_AUTO = "auto"


def lock_path(setting: str | None) -> Path | None:
    """The node-wide measurement lock of ``measure.lock``: ``auto`` is one file in this machine's
    temporary folder (every cell on the machine takes the same one); null/empty: no lock."""
    import tempfile

    if not setting or str(setting).lower() in ("none", "null", "false", "off"):
        return None
    if str(setting) == LOCK_AUTO:
        return Path(tempfile.gettempdir()) / "prunegrid-measure.lock"
    return Path(str(setting)).expanduser()


@contextmanager
def exclusive(setting: str | None) -> Iterator[dict[str, float]]:
    """Hold the machine's measurement lock (:func:`lock_path`) while timing, so two cells running on
    one node (Ray tasks, parallel jobs) never time latency or memory on the same cores at once.
    Yields ``{"wait_s", "start", "end"}``: seconds spent waiting, and the held window (epoch seconds)."""
    from filelock import FileLock

    path = lock_path(setting)
    window = {"wait_s": 0.0, "start": time.time(), "end": 0.0}
    if path is None:
        yield window
        window["end"] = time.time()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with FileLock(str(path)):
        window.update(wait_s=time.perf_counter() - t0, start=time.time())
        try:
            yield window
        finally:
            window["end"] = time.time()


def resolve_device(device: str | None = "auto", model: nn.Module | None = None, input_size: int | None = None) -> str:
    """``auto``: ``cuda`` when a GPU is visible, else ``cpu``. With ``model``, a model that cannot run
    on the GPU (an INT8 CPU kernel) falls back to ``cpu``."""
    device = device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and model is not None and input_size is not None:
        was = model.training
        try:
            with torch.inference_mode():
                model.to(device).eval()(torch.zeros(1, 3, input_size, input_size, device=device))
        except Exception:
            model.cpu()
            return "cpu"
        finally:
            model.train(was)
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float:
    """``VmHWM``, the kernel's resident high-water mark of this process, in MiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Resident memory of this process while the block runs, in MiB: ``start_mb`` before it,
    ``peak_mb`` its peak, ``increase_mb = peak_mb - start_mb`` (what the block added); on a GPU
    also ``cuda_peak_mb``, the CUDA peak allocation during the block.

    On Linux the kernel's high-water mark is reset at the start and read at the end (exact);
    elsewhere a thread samples RSS every ``interval_s``.
    """

    interval_s: float = 0.005
    start_mb: float = 0.0
    peak_mb: float = 0.0
    cuda_peak_mb: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _kernel: bool = field(default=False, repr=False)

    @property
    def increase_mb(self) -> float:
        return max(0.0, self.peak_mb - self.start_mb)

    def _rss(self) -> float:
        return psutil.Process(os.getpid()).memory_info().rss / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._kernel = reset_peak_rss()
        self.start_mb = self.peak_mb = self._rss()
        if not self._kernel:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._kernel:
            self.peak_mb = max(self.peak_mb, _peak_rss_mb())
        else:
            self._stop.set()
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss())
        if torch.cuda.is_available():
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20


class Laps:
    """Wall-clock seconds per phase of a cell: :meth:`lap` closes the phase that began at the
    previous lap. The first ``Laps`` of a process with ``since_process_start`` begins at the
    process's start (imports and config composition count); later ones (multirun, sweeps) at their
    creation. :meth:`metrics` gives ``time/phase_<name>_s`` (a repeated name adds up) for the
    cell-overhead split (``benchmarks/bench_cell_overhead.py``)."""

    PREFIX = "time/phase_"
    _process_counted = False

    def __init__(self, since_process_start: bool = True):
        first = since_process_start and not Laps._process_counted
        Laps._process_counted = Laps._process_counted or first
        self._last = psutil.Process().create_time() if first else time.time()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.time()
        took, self._last = now - self._last, now
        self.seconds[name] = self.seconds.get(name, 0.0) + took
        return took

    def metrics(self) -> dict[str, float]:
        return {f"{self.PREFIX}{k}_s": v for k, v in self.seconds.items()}


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


# -- latency: interleaved rounds against the dense baseline, one runtime at a time -----------------
@dataclass(frozen=True)
class Setting:
    """Where a model is deployed: ``batch`` images per call on ``threads`` intra-op threads.
    ``suffix`` names its metrics (``""``: batch 1 on the edge thread count)."""

    suffix: str
    batch: int
    threads: int


def all_threads() -> int:
    """Every core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def settings(threads: int | None = 1, threads_all: int | None = None, batch_size: int = 32) -> list[Setting]:
    """The grid's three deployments: batch 1 on ``threads`` (an edge device, default 1), batch 1 on
    all cores, and ``batch_size`` on all cores (``threads_all``: ``None`` = every core)."""
    edge, full = int(threads or 1), int(threads_all or all_threads())
    return [Setting("", 1, edge), Setting("_mt", 1, full), Setting("_batch", int(batch_size), full)]


def interleaved(runners: Sequence[Callable[[], object]], rounds: int, warmup: int,
                sync: Callable[[], None] = lambda: None) -> list[list[float]]:
    """Seconds of each call of each runner: ``warmup`` calls each, then ``rounds`` rounds in which
    every runner runs once, the order reversed every other round (A B, B A, ...)."""
    for run in runners:
        for _ in range(warmup):
            run()
    sync()
    times: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    for i in range(rounds):
        for j in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            runners[j]()
            sync()
            times[j].append(time.perf_counter() - t0)
    return times


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile (linear interpolation, as numpy's default)."""
    import numpy as np

    q25, q50, q75 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q25), float(q50), float(q75)


@dataclass(frozen=True)
class Comparison:
    """A model against its dense baseline in one runtime and setting: per-image latency (ms) median
    and interquartile range of each, and the round-by-round speed-up ``baseline / model``
    with its quartiles."""

    ms: float
    ms_iqr: float
    base_ms: float
    base_ms_iqr: float
    speedup: float
    speedup_q25: float
    speedup_q75: float

    @classmethod
    def from_times(cls, model_s: Sequence[float], base_s: Sequence[float], per: int = 1) -> "Comparison":
        m25, m50, m75 = quartiles([t * 1000.0 / per for t in model_s])
        b25, b50, b75 = quartiles([t * 1000.0 / per for t in base_s])
        s25, s50, s75 = quartiles([b / m for b, m in zip(base_s, model_s) if m > 0])
        return cls(m50, m75 - m25, b50, b75 - b25, s50, s25, s75)

    def metrics(self, runtime: str = "", suffix: str = "") -> dict[str, float]:
        """Metric keys: ``time/infer_ms{runtime}{suffix}`` (``_iqr``), ``baseline/infer_ms...`` and
        ``speedup/infer{runtime}{suffix}`` (``_q25``, ``_q75``); ``runtime`` is ``""`` or ``"_onnx"``."""
        t, sp = f"infer_ms{runtime}{suffix}", f"infer{runtime}{suffix}"
        return {f"time/{t}": self.ms, f"time/{t}_iqr": self.ms_iqr,
                f"baseline/{t}": self.base_ms, f"baseline/{t}_iqr": self.base_ms_iqr,
                f"speedup/{sp}": self.speedup, f"speedup/{sp}_q25": self.speedup_q25,
                f"speedup/{sp}_q75": self.speedup_q75}


def _rounds(setting: Setting, repeats: int, warmup: int) -> tuple[int, int]:
    """Rounds and warm-up calls of a setting: at a batch > 1 a fifth of them, but at least 20 rounds
    (quartiles of fewer pairs say little) and 2 warm-up calls, never more than at batch 1."""
    if setting.batch == 1:
        return repeats, warmup
    return min(repeats, max(20, repeats // 5)), min(warmup, max(2, warmup // 2))


def compare_eager(model: nn.Module, baseline: nn.Module, input_size: int, setting: Setting, *, warmup: int = 10,
                  repeats: int = 50, channels: int = 3) -> Comparison:
    """Time ``model`` against ``baseline`` in eager PyTorch, interleaved, on the model's device."""
    device = _device(model)
    rounds, warm = _rounds(setting, repeats, warmup)
    x = torch.randn(setting.batch, channels, input_size, input_size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    modes = model.training, baseline.training
    model.eval()
    baseline.eval()
    try:
        with num_threads(setting.threads), torch.inference_mode():
            model_s, base_s = interleaved([lambda: model(x), lambda: baseline(x)], rounds, warm,
                                          lambda: _sync(device))
    finally:
        model.train(modes[0])
        baseline.train(modes[1])
    return Comparison.from_times(model_s, base_s, setting.batch)


def compare_onnx(path: str | Path, base_path: str | Path, input_size: int, setting: Setting, *, warmup: int = 10,
                 repeats: int = 50, channels: int = 3) -> Comparison:
    """Time ONNX model ``path`` against ``base_path`` in ONNX Runtime (CPU), interleaved."""
    import numpy as np

    rounds, warm = _rounds(setting, repeats, warmup)
    sessions = [onnx_session(path, setting.threads), onnx_session(base_path, setting.threads)]
    x = np.random.default_rng(0).standard_normal((setting.batch, channels, input_size, input_size)).astype(np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    model_s, base_s = interleaved([lambda: sessions[0].run(None, feeds[0]), lambda: sessions[1].run(None, feeds[1])],
                                  rounds, warm)
    return Comparison.from_times(model_s, base_s, setting.batch)


def latency_metrics(compare: Callable[[Setting], Comparison], deployments: Sequence[Setting],
                    runtime: str = "") -> dict[str, float]:
    """:class:`Comparison` metrics of every deployment, and the thread counts they used."""
    out: dict[str, float] = {}
    for setting in deployments:
        out.update(compare(setting).metrics(runtime, setting.suffix))
        out[f"measure/threads{setting.suffix}"] = float(setting.threads)
        out[f"measure/batch{setting.suffix}"] = float(setting.batch)
    return out


def latency_ms(model: nn.Module, input_size: int, batch_size: int = 1, *, warmup: int = 10, repeats: int = 50,
               threads: int | None = None, channels: int = 3) -> float:
    """Median wall time of one forward pass per image, in ms, after ``warmup`` passes (one model alone;
    the grid uses :func:`compare_eager`)."""
    device = _device(model)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, channels, input_size, input_size, device=device)
    with num_threads(threads), torch.inference_mode():
        (times,) = interleaved([lambda: model(x)], repeats, warmup, lambda: _sync(device))
    model.train(was_training)
    return statistics.median(times) * 1000.0 / batch_size


# -- memory of the model alone, in a fresh process ---------------------------------------------------
def model_memory(path: str | Path, input_size: int, batch_size: int = 32, *, threads: int | None = 1,
                 device: str = "cpu", channels: int = 3, timeout_s: float = 600) -> dict[str, float]:
    """Memory that loading and running the saved model ``path`` adds, measured in a fresh process.

    The child process (``python -m prunegrid.measure``) imports torch and prunegrid's model classes,
    records its RSS, loads the model, runs it at batch 1 and at ``batch_size``, and reports
    ``increase_mb`` (RSS peak minus RSS before loading), ``peak_mb`` and ``before_mb`` (absolute),
    and on ``device="cuda"`` ``cuda_peak_mb``, the CUDA peak allocation with the model on the GPU.
    Nothing this process did before (training, datasets, MLflow) can count.
    """
    cmd = [sys.executable, "-m", "prunegrid.measure", str(path), "--input-size", str(input_size),
           "--batch-size", str(batch_size), "--threads", str(threads or 0), "--device", device,
           "--channels", str(channels)]
    return json_subprocess(cmd, "memory probe", timeout_s)


def json_subprocess(cmd: list[str], what: str, timeout_s: float) -> dict[str, float]:
    """Run a measuring child process and read the JSON object on its last line of output; a
    failure is one ``RuntimeError`` line naming ``what`` and the child's last error line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{what} exited with {proc.returncode}: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe(path: str, input_size: int, batch_size: int, threads: int, device: str, channels: int) -> dict[str, float]:
    import gc

    if threads:
        torch.set_num_threads(threads)
    classes = model_classes(path)  # imports are not the model
    inputs = [torch.randn(b, channels, input_size, input_size) for b in sorted({1, batch_size})]
    gc.collect()
    cuda = device.startswith("cuda")
    with PeakMemory() as mem:
        model = load_model(path, classes=classes).eval()
        if cuda:
            model = model.to(device)
        with torch.inference_mode():
            for _ in range(2):
                for x in inputs:
                    model(x.to(device) if cuda else x)
        _sync(torch.device(device))
    out = {"increase_mb": mem.increase_mb, "peak_mb": mem.peak_mb, "before_mb": mem.start_mb}
    if cuda and mem.cuda_peak_mb is not None:
        out["cuda_peak_mb"] = mem.cuda_peak_mb
    return out


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
        with warnings.catch_warnings(), torch.no_grad(), _exportable_pools(model, x):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        model.train(was_training)
    return path


@contextlib.contextmanager
def _exportable_pools(model: nn.Module, x: torch.Tensor):
    """Swap, for the export, every adaptive average pool that *enlarges* its map by whole factors
    (VGG's 7x7 pool on the 1x1 map of a 32 px input) for nearest upsampling to the same size. Each
    output cell then averages exactly one input cell, so the values are the same; ONNX has no
    adaptive pooling whose output size is not a factor of its input size."""
    sizes: dict[str, tuple] = {}

    def record(name: str):
        def hook(_module, inputs, output) -> None:
            sizes.setdefault(name, (tuple(inputs[0].shape[-2:]), tuple(output.shape[-2:])))
        return hook

    pools = {n: m for n, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)}
    hooks = [m.register_forward_hook(record(n)) for n, m in pools.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    swapped = {}
    for name, ((h, w), (oh, ow)) in sizes.items():
        if (oh, ow) != (h, w) and oh % h == 0 and ow % w == 0 and oh >= h and ow >= w:
            parent, _, attr = name.rpartition(".")
            swapped[name] = (model.get_submodule(parent), attr, pools[name])
            setattr(swapped[name][0], attr, nn.Upsample(size=(oh, ow), mode="nearest"))
    try:
        yield
    finally:
        for owner, attr, pool in swapped.values():
            setattr(owner, attr, pool)


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session with fixed intra-op threads (sequential execution).

    Its threads do not spin-wait after a run (``session.intra_op.allow_spinning=0``): interleaved
    timing keeps two sessions alive, and one's spinning threads would steal the cores the other
    is being timed on.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_latency_ms(path: str | Path, input_size: int, batch_size: int = 1, *, warmup: int = 10, repeats: int = 50,
                    threads: int | None = None, channels: int = 3) -> float:
    """Median wall time of one ONNX Runtime (CPU) run per image, in ms, like :func:`latency_ms` (one model
    alone; the grid uses :func:`compare_onnx`)."""
    import numpy as np

    sess = onnx_session(path, threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch_size, channels, input_size, input_size)).astype(np.float32)
    (times,) = interleaved([lambda: sess.run(None, {name: x})], repeats, warmup)
    return statistics.median(times) * 1000.0 / batch_size


def main(argv: list[str] | None = None) -> None:
    """``python -m prunegrid.measure MODEL.pt``: the memory probe :func:`model_memory` starts; prints JSON."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m prunegrid.measure", description=main.__doc__)
    p.add_argument("model")
    p.add_argument("--input-size", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels", type=int, default=3)
    a = p.parse_args(argv)
    print(json.dumps(_probe(a.model, a.input_size, a.batch_size, a.threads, a.device, a.channels)))


if __name__ == "__main__":
    main()
