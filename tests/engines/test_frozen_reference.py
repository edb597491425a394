"""Frozen encoders saved by reference: checkpoints (model.pt, last_checkpoint) hold no frozen weights, resume is
exact, and a frozen source that differs from the one trained with fails loading in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, create_supervised_trainer
from torch import nn

from medfusion.encoders.text import TINY_BERT_CONFIG, BertEncoder
from medfusion.engines.checkpoint import AtomicCheckpointSaver, attach_checkpointing, find_last_checkpoint
from medfusion.engines.frozen import FROZEN_KEY, ByReference, complete_state
from medfusion.engines.record import load_model, read_checkpoint


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny transformers model directory (the stand-in for the packaged MiniLM)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bert_src")
    BertModel(BertConfig(**TINY_BERT_CONFIG), add_pooling_layer=False).save_pretrained(str(out))
    return out


class Net(nn.Module):
    def __init__(self, bert_dir: Path) -> None:
        super().__init__()
        self.report = BertEncoder(model_dir=str(bert_dir), freeze=True, out_dim=8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.report(x).pooled)


def _data(n: int = 8, length: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    x = torch.stack([ids, torch.ones_like(ids)], dim=1)
    y = torch.randint(0, 2, (n,), generator=g)
    return [(x[i : i + 4], y[i : i + 4]) for i in range(0, n, 4)]


def _train(bert_dir: Path, ckpt_dir: Path, epochs: int, resume: bool) -> Net:
    torch.manual_seed(0)
    net = Net(bert_dir)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    trainer = create_supervised_trainer(net, opt, nn.CrossEntropyLoss())
    attach_checkpointing(trainer, ckpt_dir, {"model": net, "optimizer": opt}, resume=resume)
    trainer.run(_data(), max_epochs=epochs)
    return net


def _frozen_keys(net: nn.Module) -> list[str]:
    return [k for k in net.state_dict() if k.startswith("report.bert.")]


def test_checkpoints_hold_no_frozen_weights_and_resume_is_exact(bert_dir, tmp_path):
    full = _train(bert_dir, tmp_path / "full", epochs=2, resume=False)
    _train(bert_dir, tmp_path / "split", epochs=1, resume=False)
    resumed = _train(bert_dir, tmp_path / "split", epochs=2, resume=True)
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    ckpt = read_checkpoint(find_last_checkpoint(tmp_path / "split"))
    saved = ckpt["model"]
    frozen = _frozen_keys(full)
    assert frozen and not set(frozen) & set(saved)
    assert "head.weight" in saved and "report.proj.weight" in saved
    ref = saved[FROZEN_KEY]["report.bert"]
    assert ref["source"] == {"dir": str(bert_dir.resolve())} and len(ref["sha256"]) == 64
    # the trained projection/head changed; the frozen BERT did not and equals its source
    fresh = Net(bert_dir)
    assert not torch.equal(fresh.head.weight, full.head.weight)
    for key in frozen:
        assert torch.equal(fresh.state_dict()[key], full.state_dict()[key]), key


def test_best_model_file_loads_through_the_checked_loader(bert_dir, tmp_path):
    net = Net(bert_dir)
    with torch.no_grad():
        net.head.weight.add_(1.0)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_final=True, final_filename="model.pt")
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    path = tmp_path / "model.pt"
    assert not set(_frozen_keys(net)) & set(read_checkpoint(path).get("model", read_checkpoint(path)))
    other = Net(bert_dir)
    load_model(path, other)
    for key, value in net.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key


def test_a_mismatched_frozen_source_fails_in_one_line(bert_dir, tmp_path):
    import shutil

    from transformers import AutoModel

    source = tmp_path / "bert"
    shutil.copytree(bert_dir, source)
    net = Net(source)
    torch.save({"model": ByReference(net).state_dict()}, tmp_path / "model.pt")
    # the source directory is replaced by other weights after training (another version, a corrupted copy)
    other = AutoModel.from_pretrained(str(source), add_pooling_layer=False)
    with torch.no_grad():
        other.embeddings.word_embeddings.weight[0, 0] += 1.0
    other.save_pretrained(str(source))
    changed = Net(source)
    with pytest.raises(
        ValueError, match="frozen encoder report.bert differs from the one the model was trained"
    ) as err:
        load_model(tmp_path / "model.pt", changed)
    assert "\n" not in str(err.value) and str(source.resolve()) in str(err.value)
    # a network without the frozen encoder the checkpoint refers to
    plain = Net(bert_dir)
    plain.report._source = None  # e.g. a randomly initialised BERT: no source
    with pytest.raises(ValueError, match="saved by reference but the configured network has no frozen encoder"):
        load_model(tmp_path / "model.pt", plain)
    # full-weight checkpoints (written before references) still load
    full = {k: v for k, v in net.state_dict().items()}
    assert complete_state(net, full) == full


def test_a_missing_frozen_source_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BertEncoder(model_dir=str(tmp_path / "gone"), freeze=True)


def test_trainable_or_sourceless_bert_is_saved_in_full(bert_dir):
    trainable = BertEncoder(model_dir=str(bert_dir), freeze=False)
    tiny = BertEncoder(config=dict(TINY_BERT_CONFIG), freeze=True)
    for enc in (trainable, tiny):
        state = ByReference(enc).state_dict()
        assert FROZEN_KEY not in state and set(state) == set(enc.state_dict())


def test_export_of_a_model_loaded_by_reference_is_self_contained(bert_dir, tmp_path):
    from transformers import AutoModel

    from medfusion.apps.export import export_encoder_from_model
    from medfusion.models.classifier import Classifier

    def build() -> nn.Module:
        torch.manual_seed(0)
        encoders = {
            "ehr": {"name": "gru", "in_features": 4, "hidden": 8},
            "report": {"name": "bert", "model_dir": str(bert_dir), "freeze": True, "out_dim": 8},
        }
        return Classifier(encoders=encoders, head="concat", num_classes=2)

    trained = build()
    torch.save({"model": ByReference(trained).state_dict()}, tmp_path / "model.pt")
    model = build()
    load_model(tmp_path / "model.pt", model)
    out = export_encoder_from_model(model, "report", tmp_path / "report_encoder")
    reloaded = AutoModel.from_pretrained(str(out), add_pooling_layer=False)
    bert = model.encoders["report"].bert.state_dict()
    got = reloaded.state_dict()
    assert set(bert) <= set(got)
    for key, value in bert.items():
        assert torch.equal(got[key], value), key
