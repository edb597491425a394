"""ResNet encoder: feature_info, MedicalNet-layout weights from a local file, shortcut, tracing."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ResNetFeatures

from medfusion.encoders import create_encoder
from medfusion.encoders.resnet import ResNetEncoder, _ZeroPadShortcut


def test_feature_info_default_and_no_max_pool() -> None:
    enc = create_encoder("resnet50", spatial_dims=2)
    assert [f.channels for f in enc.feature_info] == [64, 256, 512, 1024, 2048]
    assert [f.reduction for f in enc.feature_info] == [2, 4, 8, 16, 32]
    assert [f.name for f in enc.feature_info] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert enc.out_dim == 2048 and enc.input_kind == "image" and enc.divisor == 32

    small = ResNetEncoder("resnet10", spatial_dims=3, widen_factor=0.25, conv1_t_stride=1, no_max_pool=True)
    assert [f.channels for f in small.feature_info] == [16, 16, 32, 64, 128]
    assert [f.reduction for f in small.feature_info] == [1, 1, 2, 4, 8]
    assert small.input_kind == "volume" and small.example_input(2, 12).shape == (2, 1, 16, 16, 16)


def test_pooled_is_global_mean_of_last_stage() -> None:
    enc = create_encoder("resnet18", spatial_dims=2, widen_factor=0.125, in_channels=2).eval()
    x = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        out = enc(x)
    assert out.maps[-1].shape == (2, 64, 2, 2)
    torch.testing.assert_close(out.pooled, out.maps[-1].mean(dim=(2, 3)))


@pytest.mark.parametrize("depth", ["resnet10", "resnet18"])  # shortcut B and A
def test_loads_medicalnet_layout_and_matches_monai(tmp_path, depth: str) -> None:
    ref = ResNetFeatures(depth, pretrained=False, spatial_dims=3, in_channels=1).eval()
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(3)  # MedicalNet segmentation head: ignored
    path = tmp_path / "w.pth"
    torch.save({"state_dict": state}, path)

    enc = create_encoder(depth, spatial_dims=3, pretrained_path=str(path)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        want = ref(x)
        got = enc(x)
    assert len(got.maps) == len(want) == 5
    for w, g in zip(want, got.maps):
        torch.testing.assert_close(g, w)


def test_pretrained_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        create_encoder("resnet10", spatial_dims=2, pretrained_path=str(tmp_path / "missing.pt"))
    src = create_encoder("resnet10", spatial_dims=2, widen_factor=0.125)
    path = tmp_path / "w.pt"
    torch.save(src.net.state_dict(), path)
    with pytest.raises(ValueError, match="conv1.weight"):  # in_channels differs
        create_encoder("resnet10", spatial_dims=2, widen_factor=0.125, in_channels=3, pretrained_path=str(path))
    with pytest.raises(ValueError, match="missing"):  # other depth
        create_encoder("resnet18", spatial_dims=2, widen_factor=0.125, pretrained_path=str(path))
    torch.save([1, 2], tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        create_encoder("resnet10", spatial_dims=2, pretrained_path=str(tmp_path / "bad.pt"))
    ok = create_encoder("resnet10", spatial_dims=2, widen_factor=0.125, pretrained_path=str(path))
    assert torch.equal(ok.net.conv1.weight, src.net.conv1.weight)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="depth"):
        ResNetEncoder("resnet11")
    with pytest.raises(ValueError, match="spatial_dims"):
        ResNetEncoder("resnet10", spatial_dims=1)
    with pytest.raises(ValueError, match="shortcut_type"):
        ResNetEncoder("resnet10", shortcut_type="C")


def test_zero_pad_shortcut_passes_gradient() -> None:
    """MONAI's type-A shortcut detaches the identity path; ours must not."""
    sc = _ZeroPadShortcut(out_channels=3, stride=2, spatial_dims=2)
    x = torch.arange(16.0).reshape(1, 1, 4, 4).requires_grad_(True)
    y = sc(x)
    assert y.shape == (1, 3, 2, 2)
    assert torch.equal(y[0, 0], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))
    assert torch.equal(y[0, 1:], torch.zeros(2, 2, 2))
    y.sum().backward()
    want = torch.zeros(4, 4)
    want[::2, ::2] = 1.0
    assert torch.equal(x.grad[0, 0], want)
    enc = create_encoder("resnet18", spatial_dims=2, widen_factor=0.125)
    assert any(isinstance(m, _ZeroPadShortcut) for m in enc.modules())


def test_trace_2d_matches_eager() -> None:
    enc = create_encoder("resnet18", spatial_dims=2, widen_factor=0.25).eval()
    x = torch.randn(2, 1, 64, 64)
    traced = torch.jit.trace(enc, x, strict=False)
    x2 = torch.randn(3, 1, 32, 32)  # other batch and size
    with torch.no_grad():
        want = enc(x2)
        got = traced(x2)
    torch.testing.assert_close(got[0], want.pooled)
    for g, w in zip(got[1], want.maps):
        torch.testing.assert_close(g, w)
