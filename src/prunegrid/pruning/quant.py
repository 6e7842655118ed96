"""``prune=quant_int8``: post-training static INT8 quantization for CPU inference.

Named as future work in Ju & Kang (on-device lightweight methods) (static vs dynamic L1 pruning for edge devices). Weights
become 8-bit integers (per-channel scales) and activations 8-bit with scales calibrated on
training images (Jacob et al., CVPR 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference"), using PyTorch's FX graph mode quantization
(``prepare_fx`` / ``convert_fx``, conv+BN+ReLU fused) and the ``x86`` / ``fbgemm`` /
``onednn`` / ``qnnpack`` kernels. The trained model is quantized in ``after_fit``; the
pipeline's normal test step then measures the accuracy of the quantized model itself.

``net.features`` and ``net.head`` are quantized as two graphs so the result is still a
:class:`~prunegrid.models.net.Net` (``arch``, ``num_classes``, ``stages``); it runs in eager
PyTorch on CPU but has no gradients (no fine-tuning, no Grad-CAM). Ops the backend has no
INT8 kernel for (e.g. SiLU, sigmoid) stay in float between dequantize / quantize steps; the
run records how many conv / linear layers were quantized and how many stayed float.
"""

from __future__ import annotations

import copy
import io
import warnings

import torch
from torch import nn

from prunegrid.errors import ConfigError
from prunegrid.pruning.base import Context, PruningMethod


def quantize_module(module: nn.Module, batches, backend: str = "x86") -> nn.Module:
    """Static INT8 quantization of ``module`` (FX graph mode), calibrated on ``batches`` of inputs."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation and observer notices, on every call
        prepared = prepare_fx(module.eval(), get_default_qconfig_mapping(backend), (batches[0],))
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

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph
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
        return Int8Graph(copy.deepcopy(self.graph, memo))


def quantize_net(net: nn.Module, batches, backend: str = "x86") -> nn.Module:
    """INT8 copy of a Net: ``features`` and ``head`` quantized as two graphs, the Net itself kept."""
    net = copy.deepcopy(net).cpu().eval()
    with torch.no_grad():
        feats = [net.features(x) for x in batches]
    net.features = Int8Graph(quantize_module(net.features, batches, backend))
    net.head = Int8Graph(quantize_module(net.head, feats, backend))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


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
        calibration_batches: training batches run through the observers to set activation scales.
    """

    name = "quant_int8"
    from_baseline = True

    def __init__(self, backend: str = "x86", calibration_batches: int = 8, finetune_epochs: int = 0,
                 baseline_ckpt: str | None = None):
        if finetune_epochs:
            raise ConfigError(f"prune.finetune_epochs={finetune_epochs}: an INT8 model cannot be trained; set it to 0")
        super().__init__(baseline_ckpt=baseline_ckpt, finetune_epochs=0)
        engines = torch.backends.quantized.supported_engines
        if backend not in engines or backend == "none":
            usable = ", ".join(e for e in engines if e != "none")
            raise ConfigError(f"prune.backend={backend} is not a quantized engine of this torch; use one of {usable}")
        if calibration_batches is None or calibration_batches < 1:
            raise ConfigError(f"prune.calibration_batches={calibration_batches} must be 1 or more")
        self.backend = backend
        self.calibration_batches = int(calibration_batches)
        self.float_acc: float | None = None

    def check(self, net: nn.Module, ctx: Context) -> None:
        """FX-trace ``features`` and ``head`` now: a backbone FX cannot trace fails before training.

        (Ops without an INT8 kernel do not fail: they stay float and ``quant_int8/float_layers`` counts them.)
        """
        import torch.fx

        for part in ("features", "head"):
            try:
                torch.fx.symbolic_trace(getattr(net, part))
            except Exception as exc:
                raise self._unquantizable(net, exc) from exc

    def _unquantizable(self, net: nn.Module, exc: Exception) -> ConfigError:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        return ConfigError(f"backbone {getattr(net, 'arch', type(net).__name__)} cannot be INT8-quantized with backend "
                           f"{self.backend} ({type(exc).__name__}: {first}); use another prune method")

    def after_fit(self, net: nn.Module, ctx: Context) -> nn.Module:
        batches = []
        for i, (x, _) in enumerate(ctx.loader("train", shuffle=True)):
            if i >= self.calibration_batches:
                break
            batches.append(x.cpu())
        self.float_acc = ctx.evaluate(net, "val")["acc"]
        try:
            return quantize_net(net, batches, self.backend)
        except Exception as exc:
            raise self._unquantizable(net, exc) from exc

    def report(self, net: nn.Module, ctx: Context) -> dict[str, float]:
        return {
            f"{self.name}/quantized_layers": float(quantized_layers(net)),
            f"{self.name}/float_layers": float(float_layers(net)),
            f"{self.name}/val_acc_float": self.float_acc if self.float_acc is not None else float("nan"),
            f"{self.name}/val_acc_int8": ctx.evaluate(net, "val")["acc"],
            f"{self.name}/calibration_batches": float(self.calibration_batches),
        }
