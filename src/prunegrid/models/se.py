"""Squeeze-and-excitation ResNets of BaiNa & Joe (explainable channel attention) ("SE channel attention with Grad-CAM").

``se_*`` puts an SE module (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018) in every
residual block; ``sse_*`` is the paper's s_se_ResNet50: one SE module per stage, the *same*
module object called by every block of that stage, so its parameters exist (and count) once.
Both are built by :func:`prunegrid.models.backbones.resnet` through its ``block_factory``
hook, so units, stages, freezing, Grad-CAM and pretrained loading (ResNet weights for the
shared layers, SE layers initialised fresh) are those of the plain ResNets.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import SqueezeExcitation

from prunegrid.errors import ConfigError
from prunegrid.models.backbones import resnet
from prunegrid.models.net import Net


class SEModule(SqueezeExcitation):
    """Channel attention: ``x * sigmoid(FC(ReLU(FC(avgpool(x)))))``, FC sizes C -> C/r -> C.

    The squeeze is global average pooling, the excitation two fully connected layers (1x1
    convolutions on the pooled 1x1 map, which is the same thing) with ReLU between and a
    sigmoid gate at the end; the gate scales each channel of the input. torchvision's
    ``SqueezeExcitation`` does exactly this; this class only sizes it by a reduction ratio.
    """

    def __init__(self, channels: int, reduction: int = 16):
        if channels < 1 or reduction < 1:
            raise ConfigError(f"backbone.reduction={reduction} must be a positive integer")
        super().__init__(channels, max(1, channels // reduction))
        self.channels, self.reduction = channels, reduction


def out_channels(block: nn.Module) -> int:
    """Channels at the end of a torchvision residual block's residual branch."""
    if isinstance(block, Bottleneck):
        return block.bn3.num_features
    if isinstance(block, BasicBlock):
        return block.bn2.num_features
    raise ConfigError(f"SE wraps torchvision BasicBlock/Bottleneck only, not {type(block).__name__}")


class SEBlock(nn.Module):
    """A torchvision ``BasicBlock``/``Bottleneck`` with SE on its residual branch before the
    addition (the standard SE-ResNet block, Fig. 3 of Hu et al.).

    ``block`` keeps its own layers (and pretrained weights); ``se`` may be shared with other
    blocks (``sse_*``).
    """

    def __init__(self, block: nn.Module, se: SEModule):
        super().__init__()
        out_channels(block)
        self.block, self.se = block, se

    def forward(self, x):
        b = self.block
        identity = x if b.downsample is None else b.downsample(x)
        out = b.relu(b.bn1(b.conv1(x)))
        if isinstance(b, Bottleneck):
            out = b.relu(b.bn2(b.conv2(out)))
            out = b.bn3(b.conv3(out))
        else:
            out = b.bn2(b.conv2(out))
        return b.relu(self.se(out) + identity)


class SEFactory:
    """``block_factory`` for :func:`~prunegrid.models.backbones.resnet`: wraps every block in an
    :class:`SEBlock`, with a fresh SE module per block, or (``shared``) one per stage."""

    def __init__(self, reduction: int = 16, shared: bool = False):
        self.reduction, self.shared = int(reduction), bool(shared)
        self.per_stage: dict[int, SEModule] = {}

    def __call__(self, block: nn.Module, stage: int) -> SEBlock:
        channels = out_channels(block)
        if not self.shared:
            return SEBlock(block, SEModule(channels, self.reduction))
        se = self.per_stage.setdefault(stage, SEModule(channels, self.reduction))
        if se.channels != channels:
            raise ConfigError(f"stage {stage} mixes {se.channels} and {channels} channels; use shared=false")
        return SEBlock(block, se)


def se_resnet(arch: str, num_classes: int, input_size: int, shared: bool = False, reduction: int = 16,
              pretrained: bool = False, weights_path: str | None = None, dropout: float = 0.3,
              freeze: int = 0, min_input_size: int = 16) -> Net:
    """SE-ResNet (``shared=False``, ``se_<arch>``) or the stage-shared SE-ResNet (``sse_<arch>``).

    ``arch`` is the torchvision ResNet whose weights ``pretrained``/``weights_path`` load
    (a plain ResNet state dict: the SE layers are new and start from their default init).
    """
    if not isinstance(reduction, int) or reduction < 1:
        raise ConfigError(f"backbone.reduction={reduction} must be a positive integer (16 in Hu et al.)")
    net = resnet(arch, num_classes, input_size, pretrained=pretrained, weights_path=weights_path, dropout=dropout,
                 freeze=freeze, min_input_size=min_input_size, block_factory=SEFactory(reduction, shared))
    net.arch = f"{'sse' if shared else 'se'}_{arch}"
    return net
