"""The ResNet backbone: both normalisations, loading a local torchvision checkpoint, and the MSRA
(Detectron2) variant."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from tensormask_ray.config import BackboneConfig, ConfigError, load_config
from tensormask_ray.errors import UserError
from tensormask_ray.modeling.backbone import DetectronFrozenBatchNorm2d, build_backbone


@pytest.fixture(scope="module")
def torchvision_checkpoint(tmp_path_factory):
    """A torchvision ResNet-18 state_dict as torch.save writes it (batch norm with non-trivial
    statistics and `num_batches_tracked`, the classifier included)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


@pytest.mark.parametrize("norm, layer", [("FrozenBN", FrozenBatchNorm2d), ("GN", nn.GroupNorm)])
def test_both_norms_give_the_c2_to_c5_maps(norm, layer):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(depth=18, freeze_at=0, norm=norm))
    norms = [
        m
        for m in backbone.modules()
        if isinstance(m, (FrozenBatchNorm2d, nn.GroupNorm, nn.BatchNorm2d))
    ]
    assert norms and all(isinstance(m, layer) for m in norms)
    feats = backbone(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats.values()] == [
        (2, 64, 16, 24),
        (2, 128, 8, 12),
        (2, 256, 4, 6),
        (2, 512, 2, 3),
    ]


def test_group_norm_trains_its_affine_weights_frozen_bn_has_none():
    gn = build_backbone(BackboneConfig(depth=18, freeze_at=0, norm="GN"))
    frozen = build_backbone(BackboneConfig(depth=18, freeze_at=0, norm="FrozenBN"))
    gn_params = {n for n, p in gn.named_parameters() if p.requires_grad}
    assert "stem.1.weight" in gn_params and "res2.0.bn1.bias" in gn_params
    assert not any(".bn" in n or n.startswith("stem.1") for n, _ in frozen.named_parameters())


def test_frozen_bn_loads_the_checkpoint_with_its_statistics(torchvision_checkpoint):
    path, state = torchvision_checkpoint
    backbone = build_backbone(BackboneConfig(depth=18, weights=str(path), norm="FrozenBN"))
    assert torch.equal(backbone.stem[0].weight, state["conv1.weight"])
    assert torch.equal(backbone.stem[1].running_var, state["bn1.running_var"])
    assert torch.equal(backbone.res4[1].bn2.weight, state["layer3.1.bn2.weight"])
    # Frozen BN with the checkpoint's statistics is the trained network's eval-mode batch norm.
    ref = torchvision.models.resnet18(weights=None)
    ref.load_state_dict(state)
    ref.eval()
    x = torch.randn(1, 3, 64, 64)
    expected = ref.layer4(
        ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x)))))))
    )
    torch.testing.assert_close(backbone(x)["C5"], expected, rtol=1e-4, atol=1e-5)


def test_group_norm_takes_the_affine_weights_and_drops_the_statistics(torchvision_checkpoint):
    path, state = torchvision_checkpoint
    backbone = build_backbone(BackboneConfig(depth=18, weights=str(path), norm="GN"))
    assert torch.equal(backbone.stem[0].weight, state["conv1.weight"])
    assert torch.equal(backbone.stem[1].weight, state["bn1.weight"])
    assert torch.equal(backbone.res3[0].downsample[1].bias, state["layer2.0.downsample.1.bias"])
    assert not any("running" in k for k in backbone.state_dict())


def test_a_checkpoint_of_another_depth_is_refused_by_name(torchvision_checkpoint):
    path, _ = torchvision_checkpoint
    with pytest.raises(
        UserError, match=r"resnet18.pth do not match this ResNet: missing \['layer1.0.bn3"
    ):
        build_backbone(BackboneConfig(depth=50, weights=str(path)))


def test_an_unknown_norm_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="model.backbone.norm"):
        load_config(preset="cpu-small", overrides={"model.backbone.norm": "BN"})


def test_msra_stride_in_1x1_moves_the_stride_not_the_shapes():
    msra = build_backbone(BackboneConfig(depth=50, freeze_at=0, stride_in_1x1=True))
    plain = build_backbone(BackboneConfig(depth=50, freeze_at=0))
    for stage in ("res3", "res4", "res5"):
        first = getattr(msra, stage)[0]
        assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1)
        assert getattr(plain, stage)[0].conv2.stride == (2, 2)
    assert msra.res2[0].conv1.stride == (1, 1)
    assert {k: v.shape for k, v in msra.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert {k: v.shape for k, v in msra(x).items()} == {k: v.shape for k, v in plain(x).items()}
    with pytest.raises(ValueError, match="stride_in_1x1"):
        build_backbone(BackboneConfig(depth=18, stride_in_1x1=True))


def test_detectron_frozen_bn_computes_as_detectron2():
    bn = DetectronFrozenBatchNorm2d(8)
    g = torch.Generator().manual_seed(0)
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).copy_(torch.randn(8, generator=g))
    bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    x = torch.randn(2, 8, 5, 7, generator=g)
    expected = torch.nn.functional.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, 1e-5
    )
    assert torch.equal(bn(x), expected)  # inference: one fused batch_norm, as Detectron2
    x.requires_grad_(True)
    y = bn(x)  # with gradients: x * scale + bias, as Detectron2 (and torchvision)
    scale = bn.weight * (bn.running_var + 1e-5).rsqrt()
    assert torch.equal(
        y, x * scale.view(1, -1, 1, 1) + (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1)
    )
