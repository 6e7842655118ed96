"""``prune=quant_int8``: post-training static INT8 quantization for CPU inference.

Named as future work in Ju & Kang (on-device lightweight methods) (static vs dynamic L1 pruning for edge devices). Weights
become 8-bit integers (per-channel scales) and activations 8-bit with scales calibrated on
training images (Jacob et al., CVPR 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference"), using PyTorch's FX graph mode quantization
(``prepare_fx`` / ``convert_fx``, conv+BN+ReLU fused) and the ``x86`` / ``fbgemm`` /
``onednn`` / ``qnnpack`` kernels. The trained model is quantized in ``after_fit``; the
pipeline's normal test step then measures the accuracy of the quantized model itself.

For ONNX Runtime the method gives its own INT8 model (:meth:`QuantInt8.to_onnx`): the float model
exported to ONNX and quantized by onnxruntime's static quantization (QDQ by default, per-channel
INT8 weights, UINT8 activations), calibrated on the same training images. Its speed-up is
measured against the float ONNX model in ONNX Runtime, never against eager PyTorch.

Quantization removes no parameter: the INT8 graphs declare the parameter counts of the float
model they quantized (``weight_counts``), so ``model/params`` and ``model/params_nonzero`` read as
the float model's and the grid shows 0 % parameter reduction; ``model/size_mb`` is the real
INT8 file. Weights that INT8 rounding made zero are reported as ``quant_int8/int8_zero_share``.

The backbone must be FX-traceable (``requires``). ``net.features`` and ``net.head`` are quantized as two graphs so the result is still a
:class:`~prunegrid.models.net.Net` (``arch``, ``num_classes``, ``stages``); it runs in eager
PyTorch on CPU but has no gradients (no fine-tuning, no Grad-CAM). Ops the backend has no
INT8 kernel for (e.g. SiLU, sigmoid) stay in float between dequantize / quantize steps; the
run records how many conv / linear layers were quantized and how many stayed float.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from prunegrid import measure
from prunegrid.errors import ConfigError, one_line
from prunegrid.models.net import FX, Net

log = logging.getLogger("prunegrid")
from prunegrid.pruning.base import Context, PruningMethod


OBSERVERS = ("minmax", "histogram")


def qconfig_mapping(backend: str, observer: str = "minmax"):
    """The backend's default FX quantization settings, with activation ranges from ``observer``:
    ``minmax`` (the running min and max, as onnxruntime's default calibration, so the eager and the
    ONNX Runtime INT8 models are calibrated alike) or ``histogram`` (torch's default: an L2 search
    over a histogram per activation, slower: 50 s for EfficientNet-B5 here)."""
    from torch.ao.quantization import MinMaxObserver, QConfig, get_default_qconfig_mapping

    mapping = get_default_qconfig_mapping(backend)
    if observer == "minmax":
        default = mapping.global_qconfig
        reduce_range = getattr(default.activation, "p", None)
        keywords = dict(reduce_range.keywords) if reduce_range is not None else {}
        mapping.set_global(QConfig(activation=MinMaxObserver.with_args(reduce_range=keywords.get("reduce_range", False)),
                                   weight=default.weight))
    return mapping


def quantize_module(module: nn.Module, batches, backend: str = "x86", observer: str = "minmax") -> nn.Module:
    """Static INT8 quantization of ``module`` (FX graph mode), calibrated on ``batches`` of inputs."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation and observer notices, on every call
        prepared = prepare_fx(module.eval(), qconfig_mapping(backend, observer), (batches[0],))
        with torch.no_grad():
            for x in batches:
                prepared(x)
        return convert_fx(prepared)


class Int8Graph(nn.Module):
    """A quantized FX graph that runs, and pickles, as TorchScript.

    The FX ``graph`` stays the registered submodule (parameter counts, FLOPs and introspection see
    its quantized layers); ``forward`` runs its ``torch.jit.script`` compilation, 2-3x faster at
    batch 1 than the Python-level graph. ``torch.save`` of torch's quantized layers loses their
    Module state (torch 2.x: a loaded ``torch.ao.nn.quantized.Conv2d`` cannot run), so pickling
    (``measure.save_model``) stores the TorchScript bytes (``torch.jit.save``) instead; a loaded
    model runs, and is counted, from the TorchScript module.
    """

    def __init__(self, graph: nn.Module, weight_counts: tuple[int, int] | None = None):
        super().__init__()
        self.graph = graph
        if weight_counts is not None:
            self.weight_counts = tuple(int(n) for n in weight_counts)
        if isinstance(graph, torch.jit.ScriptModule):
            script = graph
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation notices
                script = torch.jit.script(graph)
        self.__dict__["script"] = script  # not a registered submodule: its weights are the graph's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.script(x)

    def __getstate__(self) -> dict:
        buf = io.BytesIO()
        torch.jit.save(self.script, buf)
        state = {k: v for k, v in self.__dict__.items() if k != "script"}
        state["_modules"] = {k: v for k, v in self._modules.items() if k != "graph"}
        state["_torchscript"] = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)  # bytes pickle 1.5x larger
        return state

    def __setstate__(self, state: dict) -> None:
        blob = state.pop("_torchscript")
        self.__dict__.update(state)
        self._modules["graph"] = torch.jit.load(io.BytesIO(blob.numpy().tobytes()), map_location="cpu")
        self.__dict__["script"] = self._modules["graph"]

    def __deepcopy__(self, memo: dict) -> "Int8Graph":
        return Int8Graph(copy.deepcopy(self.graph, memo), getattr(self, "weight_counts", None))


def quantize_net(net: Net, batches, backend: str = "x86", input_size: int | None = None,
                 observer: str = "minmax") -> Net:
    """INT8 copy of a Net: ``features`` and ``head`` quantized as two graphs, the Net itself kept
    (its contract re-declared at ``input_size``, default the calibration images' size)."""
    net = copy.deepcopy(net).cpu().eval()
    with torch.no_grad():
        feats = [net.features(x) for x in batches]
    counts = {"features": (measure.count_params(net.features), measure.count_nonzero_params(net.features)),
              "head": (measure.count_params(net.head), measure.count_nonzero_params(net.head))}
    net.features = Int8Graph(quantize_module(net.features, batches, backend, observer), counts["features"])
    net.head = Int8Graph(quantize_module(net.head, feats, backend, observer), counts["head"])
    for p in net.parameters():
        p.requires_grad_(False)
    net.declare(input_size or int(batches[0].shape[-1]))
    return net


def quantize_onnx(float_path: str | Path, out_path: str | Path, batches, *, quant_format: str = "qdq",
                  per_channel: bool = True, reduce_range: bool = True) -> Path:
    """Static INT8 quantization of an ONNX model by onnxruntime, calibrated (min-max) on ``batches``.

    ``quant_format``: ``qdq`` (QuantizeLinear / DequantizeLinear pairs that ONNX Runtime fuses into
    INT8 kernels) or ``qoperator`` (QLinearConv ...). Weights are INT8, activations UINT8;
    ``reduce_range`` keeps weights to 7 bits, which avoids the U8S8 saturation of AVX2 / AVX-512
    CPUs without VNNI (onnxruntime's quantization guide).
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if quant_format not in formats:
        raise ConfigError(f"prune.onnx_format={quant_format} must be one of: {', '.join(formats)}")
    float_path, out_path = Path(float_path), Path(out_path)
    pre = out_path.with_name(out_path.stem + "_pre.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x.cpu().numpy()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(float_path), str(pre))
        quantize_static(str(pre), str(out_path), Reader(), quant_format=formats[quant_format], per_channel=per_channel,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, reduce_range=reduce_range)
    pre.unlink(missing_ok=True)
    return out_path


def onnx_accuracy(path: str | Path, loader) -> float:
    """Top-1 accuracy of an ONNX model in ONNX Runtime over a loader's batches."""
    sess = measure.onnx_session(path)
    name = sess.get_inputs()[0].name
    correct = total = 0
    for x, y in loader:
        logits = sess.run(None, {name: x.numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(1) == y).sum())
        total += len(y)
    return correct / max(1, total)


def float_layers(model: nn.Module) -> int:
    """Conv / Linear layers still in float (the backend had no INT8 path for them)."""
    return sum(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())


def quantized_layers(model: nn.Module) -> int:
    return sum(callable(getattr(m, "weight", None)) and not isinstance(m.weight, torch.Tensor)
               for m in model.modules())


class QuantInt8(PruningMethod):
    """Quantize the trained model to INT8 after training (no fine-tuning: INT8 ops have no gradients).

    Args:
        backend: quantized engine, ``x86`` (default, fbgemm + onednn), ``fbgemm``, ``onednn`` or ``qnnpack`` (ARM).
        calibration_batches: training batches run through the observers to set activation scales
            (the same images calibrate the ONNX Runtime INT8 model).
        onnx_format, onnx_per_channel, onnx_reduce_range: the ONNX Runtime INT8 model (:func:`quantize_onnx`).
        activation_observer: ``minmax`` or ``histogram``, how eager INT8 sets activation ranges (:func:`qconfig_mapping`).
    """

    name = "quant_int8"
    from_baseline = True
    requires = (FX,)

    def __init__(self, backend: str = "x86", calibration_batches: int = 8, finetune_epochs: int = 0,
                 baseline_ckpt: str | None = None, onnx_format: str = "qdq", onnx_per_channel: bool = True,
                 onnx_reduce_range: bool = True, activation_observer: str = "minmax"):
        if finetune_epochs:
            raise ConfigError(f"prune.finetune_epochs={finetune_epochs}: an INT8 model cannot be trained; set it to 0")
        super().__init__(baseline_ckpt=baseline_ckpt, finetune_epochs=0)
        engines = torch.backends.quantized.supported_engines
        if backend not in engines or backend == "none":
            usable = ", ".join(e for e in engines if e != "none")
            raise ConfigError(f"prune.backend={backend} is not a quantized engine of this torch; use one of {usable}")
        if calibration_batches is None or calibration_batches < 1:
            raise ConfigError(f"prune.calibration_batches={calibration_batches} must be 1 or more")
        if activation_observer not in OBSERVERS:
            raise ConfigError(f"prune.activation_observer={activation_observer} must be one of: {', '.join(OBSERVERS)}")
        self.backend = backend
        self.activation_observer = activation_observer
        self.calibration_batches = int(calibration_batches)
        self.float_acc: float | None = None
        self.onnx_format, self.onnx_per_channel, self.onnx_reduce_range = onnx_format, bool(onnx_per_channel), \
            bool(onnx_reduce_range)
        self._float_net: nn.Module | None = None
        self._batches: list[torch.Tensor] = []
        self.onnx_path: Path | None = None

    def _unquantizable(self, net: Net, exc: Exception) -> ConfigError:
        return ConfigError(f"backbone {net.arch} cannot be INT8-quantized with backend {self.backend} "
                           f"({one_line(exc)[:200]}); use another prune method")

    def after_fit(self, net: nn.Module, ctx: Context) -> nn.Module:
        batches = []
        log.info("INT8 calibration on %d training batches (%s)", self.calibration_batches, self.activation_observer)
        for i, (x, _) in enumerate(ctx.loader("train", shuffle=True)):
            if i >= self.calibration_batches:
                break
            batches.append(x.cpu())
        self.float_acc = ctx.evaluate(net, "val")["acc"]
        self._float_net, self._batches = net, batches
        try:
            return quantize_net(net, batches, self.backend, ctx.input_size, self.activation_observer)
        except Exception as exc:
            raise self._unquantizable(net, exc) from exc

    def to_onnx(self, net: nn.Module, input_size: int, path: str | Path) -> Path:
        """The ONNX Runtime INT8 model: the float model exported, then quantized statically by onnxruntime."""
        if self._float_net is None:
            raise RuntimeError("to_onnx needs the float model: call after_fit first")
        path = Path(path)
        float_path = measure.export_onnx(self._float_net, input_size, path.with_name(path.stem + "_float.onnx"))
        try:
            self.onnx_path = quantize_onnx(float_path, path, self._batches, quant_format=self.onnx_format,
                                           per_channel=self.onnx_per_channel, reduce_range=self.onnx_reduce_range)
        finally:
            float_path.unlink(missing_ok=True)
        return self.onnx_path

    def explained(self, net: nn.Module) -> tuple[nn.Module, str | None]:
        """INT8 layers have no gradients: Grad-CAM draws the float model they were quantized from."""
        if self._float_net is None:
            return net, None
        return self._float_net, "the float model before INT8 quantization (INT8 has no gradients)"

    def report(self, net: nn.Module, ctx: Context) -> dict[str, float]:
        int8 = list(measure.weight_tensors(net, declared=False))
        m = {"int8_zero_share": measure.sparsity(int8),
             "quantized_layers": float(quantized_layers(net)),
             "float_layers": float(float_layers(net)),
             "val_acc_float": self.float_acc if self.float_acc is not None else float("nan"),
             "val_acc_int8": ctx.evaluate(net, "val")["acc"],
             "calibration_batches": float(self.calibration_batches)}
        if self.onnx_path is not None and self.onnx_path.is_file():
            m["val_acc_int8_onnx"] = onnx_accuracy(self.onnx_path, ctx.loader("val", shuffle=False))
        return {self.key(k): v for k, v in m.items()}
