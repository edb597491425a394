"""fast_instance_norm: GroupNorm(C, C) stands in for non-affine InstanceNorm with identical outputs."""

from __future__ import annotations

import torch
from torch import nn

from medfusion.encoders.base import fast_instance_norm
from medfusion.models.segmenter import Segmenter


def test_swap_is_exact_and_keeps_affine_norms():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv3d(2, 4, 3), nn.InstanceNorm3d(4), nn.Sequential(nn.InstanceNorm3d(4, affine=True)))
    x = torch.randn(2, 2, 8, 8, 8)
    ref = block(x)
    fast_instance_norm(block)
    assert isinstance(block[1], nn.GroupNorm) and block[1].num_groups == 4
    assert isinstance(block[2][0], nn.InstanceNorm3d)  # affine: left alone
    torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


def test_segmenter_has_no_slow_instance_norm_and_same_state_dict_keys():
    net = Segmenter(("flair", "t1"), channels=(4, 8, 16))
    assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in net.modules())
    plain = nn.InstanceNorm3d(4)
    assert not list(plain.state_dict()) and not list(nn.GroupNorm(4, 4, affine=False).state_dict())
