"""medfusion.batch: the batch and wrapper helpers evaluation shares with training."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from medfusion.batch import OutputsWrapper, forward_outputs, model_inputs, to_device, unwrap


def test_to_device_moves_tensors_drops_meta_and_passes_the_rest():
    out = to_device({"a": MetaTensor(torch.ones(2)), "b": torch.zeros(1), "id": ["c1"]}, "cpu")
    assert type(out["a"]) is torch.Tensor and out["b"].device.type == "cpu" and out["id"] == ["c1"]


def test_model_inputs_stacked_image_or_one_key_per_modality():
    image = torch.zeros(1, 2, 4)
    assert model_inputs({"image": image, "a": 1}, ("a", "b")) is image
    assert set(model_inputs({"a": 1, "b": 2, "label": 0}, ("a", "b"))) == {"a", "b"}
    with pytest.raises(KeyError, match=r"\['b'\]"):
        model_inputs({"a": 1}, ("a", "b"))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def forward_outputs(self, x):
        return {"logits": self.lin(x)}


def test_unwrap_and_forward_outputs_through_the_wrapper():
    net = Net()
    wrapped = nn.DataParallel(OutputsWrapper(net))
    assert unwrap(wrapped) is net
    x = torch.ones(3, 2)
    torch.testing.assert_close(forward_outputs(wrapped, x)["logits"], net.lin(x))
    torch.testing.assert_close(forward_outputs(net, x)["logits"], net.lin(x))


def test_evaluation_imports_the_helpers_without_the_training_engine():
    code = (
        "import sys, medfusion.batch, medfusion.evaluation.classification; "
        "print(sorted(m for m in sys.modules if m.startswith('medfusion.engines.') and m != 'medfusion.engines.utils'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
