"""SE-ResNets of BaiNa & Joe (explainable channel attention): the SE gate, per-stage sharing, pretrained loading, saving, pruning."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from prunegrid import measure
from prunegrid.config import build, compose
from prunegrid.errors import ConfigError
from prunegrid.models.se import SEBlock, SEModule, se_resnet


def _net(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build(compose([f"backbone={name}"]).backbone, num_classes=10, input_size=32, **kw)


def _se_modules(net) -> list[SEModule]:
    return [u.se for u in net.features if isinstance(u, SEBlock)]


def test_se_module_scales_channels_by_sigmoid_gate_of_pooled_input():
    se = SEModule(4, reduction=2)
    assert (se.fc1.in_channels, se.fc1.out_channels, se.fc2.out_channels) == (4, 2, 4)
    w1 = torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.0, 2.0, -1.0, 1.0]])
    b1 = torch.tensor([0.1, -0.2])
    w2 = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.5, 0.5], [0.0, -2.0]])
    b2 = torch.tensor([0.0, 0.3, -0.1, 0.2])
    with torch.no_grad():
        se.fc1.weight.copy_(w1.view(2, 4, 1, 1))
        se.fc1.bias.copy_(b1)
        se.fc2.weight.copy_(w2.view(4, 2, 1, 1))
        se.fc2.bias.copy_(b2)
    x = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1))
    pooled = x.mean(dim=(2, 3))                                    # squeeze
    gate = torch.sigmoid(torch.relu(pooled @ w1.T + b1) @ w2.T + b2)  # excitation
    expected = x * gate[:, :, None, None]
    assert torch.allclose(se(x), expected, atol=1e-6)
    # the gate depends on the pooled input only: shuffling positions shuffles the output the same way
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(2))
    xs = x.flatten(2)[:, :, perm].view_as(x)
    assert torch.allclose(se(xs), expected.flatten(2)[:, :, perm].view_as(x), atol=1e-6)


def test_reduction_is_configurable_and_checked():
    assert SEModule(64).fc1.out_channels == 4          # default r = 16
    assert SEModule(64, reduction=4).fc1.out_channels == 16
    with pytest.raises(ConfigError, match="reduction"):
        se_resnet("resnet18", num_classes=2, input_size=32, reduction=0)
    net = _net("se_resnet18", reduction=8)
    assert net.features.layer1_0.se.fc1.out_channels == 64 // 8


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_sse_shares_one_se_per_stage_and_has_fewer_params(arch):
    se, sse, plain = _net(f"se_{arch}"), _net(f"sse_{arch}"), _net(arch)
    assert (se.arch, sse.arch) == (f"se_{arch}", f"sse_{arch}")
    for stage in sse.stages[1:]:
        mods = [sse.features.get_submodule(u).se for u in stage]
        assert all(m is mods[0] for m in mods), "every block of a stage must call the same SE object"
        assert len({id(se.features.get_submodule(u).se) for u in stage}) == len(stage)
    shared = {id(m): m for m in _se_modules(sse)}
    assert len(shared) == 4 and len({id(m) for m in _se_modules(se)}) == len(_se_modules(se))
    # shared parameters count once
    se_params = sum(p.numel() for m in shared.values() for p in m.parameters())
    assert measure.count_params(sse) == measure.count_params(plain) + se_params
    assert measure.count_params(plain) < measure.count_params(sse) < measure.count_params(se)


def test_se_output_at_32px_and_training_step():
    for name in ("se_resnet18", "sse_resnet18"):
        net = _net(name)
        out = net(torch.randn(4, 3, 32, 32))
        assert out.shape == (4, 10)
        out.sum().backward()
        assert all(m.fc1.weight.grad is not None for m in _se_modules(net))


def test_pretrained_loads_resnet_weights_and_keeps_se_fresh(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    net = _net("sse_resnet18", weights_path=str(path))
    assert torch.equal(net.features.layer1_0.block.conv1.weight, state["layer1.0.conv1.weight"])
    assert torch.equal(net.features.layer4_1.block.bn2.running_var, state["layer4.1.bn2.running_var"])
    assert net.features.layer1_0.se.fc1.weight.shape == (4, 64, 1, 1)  # new layer, default init
    assert not any(".se." in k or k.startswith("se.") for k in state)


def test_save_load_keeps_sharing_and_outputs(tmp_path):
    net = _net("sse_resnet18").eval()
    x = torch.randn(2, 3, 32, 32)
    loaded = measure.load_model(measure.save_model(net, tmp_path / "m.pt")).eval()
    assert torch.allclose(loaded(x), net(x), atol=1e-6)
    assert loaded.features.layer2_0.se is loaded.features.layer2_1.se


def test_units_can_be_replaced_by_identity():
    """The layer-importance rebuild drops units; a shared SE module survives in the remaining blocks."""
    net = _net("sse_resnet18").eval()
    net.features.layer3_1 = nn.Identity()
    net.features.layer4_1 = nn.Identity()
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    net.declare(64)
    assert net.contract.cam_layer == "features.layer4_0"             # the last unit left with a 2x2 map
    assert [u.removable for u in net.contract.units if u.name in ("layer3_1", "layer4_1")] == [False, False]


@pytest.mark.parametrize("name", ["se_resnet18", "sse_resnet18"])
def test_torch_pruning_prunes_channels_of_se_resnets(name):
    import torch_pruning as tp

    net = _net(name).eval()
    before = measure.count_params(net)
    x = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.MagnitudePruner(net, x,
                                       importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.3, ignored_layers=[net.head])
    pruner.step()
    assert measure.count_params(net) < 0.75 * before
    assert net(x).shape == (1, 10)
