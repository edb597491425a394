"""Encoder reuse: load_encoder, TorchScript / transformers export, the CLI handler, MONAI bundle export, tutorial."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from medfusion.apps.export import (
    INFO_FILE,
    export_encoder,
    export_encoder_from_model,
    load_encoder,
    load_exported_encoder,
    parse_overrides,
)
from medfusion.data.volume import brats_transforms
from medfusion.modality import BRATS_MODALITIES
from medfusion.models.classifier import Classifier
from medfusion.models.segmenter import Segmenter

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "brats_metakd"
TUTORIAL = ROOT / "tutorials" / "use_trained_encoder.py"
CHANNELS = [8, 16, 32, 64]
OVR = {"network_def#channels": CHANNELS}


@pytest.fixture(scope="module")
def tutorial_run(tmp_path_factory):
    """Run the tutorial once (tiny cohort, 1 epoch); its trained checkpoint serves the other tests too."""
    spec = importlib.util.spec_from_file_location("use_trained_encoder", TUTORIAL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    work = tmp_path_factory.mktemp("encoder_tutorial")
    result = mod.main(work)
    return work, result


@pytest.fixture(scope="module")
def ckpt(tutorial_run) -> Path:
    return tutorial_run[0] / "models" / "model.pt"


@pytest.fixture(scope="module")
def case(tutorial_run) -> dict:
    from medfusion.data.brats import discover_brats

    return discover_brats(tutorial_run[0] / "cohort", require_label=True)[0]


def test_tutorial_outputs(tutorial_run, capsys):
    work, result = tutorial_run
    assert result["features"].shape == (6, 64)
    assert sorted(result["target"].tolist()) == [0, 0, 0, 1, 1, 1]  # median split of 6 distinct volumes
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["export"] == work / "t1ce_encoder.ts" and result["export"].is_file()
    assert result["info"]["modality"] == "t1ce"


def _full_model(ckpt_path: Path, **kw) -> Segmenter:
    net = Segmenter(BRATS_MODALITIES, channels=CHANNELS, **kw)
    net.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"])
    return net.eval()


def test_load_encoder_shared_matches_full_model(ckpt, case):
    encoder, pre = load_encoder(BUNDLE, "t1ce", checkpoint=ckpt, overrides=OVR)
    assert not encoder.training
    x = pre(case["t1ce"])
    # the preprocessing equals channel t1ce of the bundle's own inference chain (32^3: no padding needed)
    ref_img = brats_transforms(BRATS_MODALITIES, "infer")(dict(case))["image"]
    assert x.shape == (1, 32, 32, 32)
    torch.testing.assert_close(x, torch.as_tensor(ref_img[2:3]), rtol=0, atol=1e-6)
    net = _full_model(ckpt)
    with torch.no_grad():
        levels = net.encode(torch.as_tensor(ref_img)[None])  # [1, M, C, d, h, w] per level
        pooled = encoder(x[None]).pooled
    assert pooled.shape == (1, 64)
    torch.testing.assert_close(pooled, levels[-1][:, 2].flatten(2).mean(2), rtol=1e-5, atol=1e-6)


def test_load_encoder_per_modality_encoders(tmp_path):
    torch.manual_seed(3)
    net = Segmenter(BRATS_MODALITIES, channels=CHANNELS, shared_encoder=False).eval()
    (tmp_path / "models").mkdir()
    torch.save({"model": net.state_dict()}, tmp_path / "models" / "model.pt")
    (tmp_path / "configs").mkdir()
    for name in ("inference.json", "metadata.json"):
        (tmp_path / "configs" / name).write_text((BUNDLE / "configs" / name).read_text())
    ovr = {**OVR, "network_def#shared_encoder": False}
    enc_t1, _ = load_encoder(tmp_path, "t1", overrides=ovr)  # default checkpoint <bundle>/models/model.pt
    enc_t2, _ = load_encoder(tmp_path, "t2", overrides=ovr)
    x = torch.randn(1, 4, 32, 32, 16)
    with torch.no_grad():
        bottleneck = net.encode(x)[-1]
        torch.testing.assert_close(enc_t1(x[:, 1:2]).pooled, bottleneck[:, 1].flatten(2).mean(2))
        torch.testing.assert_close(enc_t2(x[:, 3:4]).pooled, bottleneck[:, 3].flatten(2).mean(2))
        # per-modality weights really differ: t1's encoder on t2's channel is not t2's feature
        assert not torch.allclose(enc_t1(x[:, 3:4]).pooled, bottleneck[:, 3].flatten(2).mean(2))


def test_export_round_trip_equals_eager(ckpt, tmp_path):
    out = export_encoder(BUNDLE, "flair", tmp_path / "flair.ts", checkpoint=ckpt, overrides=OVR)
    module, info = load_exported_encoder(out)
    assert info["modality"] == "flair" and info["out_dim"] == 64
    assert [f["channels"] for f in info["feature_info"]] == CHANNELS
    assert [f["reduction"] for f in info["feature_info"]] == [2, 4, 8, 16]
    assert info["preprocessing"]["steps"][1] == "Orientation(axcodes='RAS')"
    assert info["source"]["overrides"] == OVR
    encoder, _ = load_encoder(BUNDLE, "flair", checkpoint=ckpt, overrides=OVR)
    x = torch.randn(3, 1, 48, 32, 16)  # other batch and spatial size than the trace input [2, 1, 32, 32, 32]
    with torch.no_grad():
        ref = encoder(x)
        got = module(x)
    assert len(got) == 1 + len(CHANNELS)
    torch.testing.assert_close(got[0], ref.pooled)
    for a, b in zip(got[1:], ref.maps):
        torch.testing.assert_close(a, b)
    assert got[-1].shape == (3, 64, 3, 2, 1)


def test_errors(ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"unknown modality 'cxr'.*\['flair', 't1', 't1ce', 't2'\]"):
        load_encoder(BUNDLE, "cxr", checkpoint=ckpt, overrides=OVR)
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(FileNotFoundError, match="--checkpoint") as err:
        load_encoder(BUNDLE, "t1", checkpoint=missing, overrides=OVR)
    assert str(missing) in str(err.value)
    channels = r"network#channels: trained with \[8, 16, 32, 64\], asked for \[16, 32, 64, 128\]"
    with pytest.raises(ValueError, match=f"does not match the configuration: {channels}"):
        load_encoder(BUNDLE, "t1", checkpoint=ckpt)  # default channels [16, ...] vs trained [8, ...]
    out = tmp_path / "exists.ts"
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_encoder(BUNDLE, "t1", out, checkpoint=ckpt, overrides=OVR)
    assert out.read_bytes() == b"keep"
    export_encoder(BUNDLE, "t1", out, checkpoint=ckpt, overrides=OVR, overwrite=True)
    assert load_exported_encoder(out)[1]["modality"] == "t1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["network_def#channels"])


def test_cli_handler(ckpt, tmp_path):
    from medfusion.cli import build_parser

    parser = build_parser()
    out = tmp_path / "t2.ts"
    argv = ["export-encoder", "--bundle", str(BUNDLE), "--modality", "t2", "--out", str(out)]
    argv += ["--checkpoint", str(ckpt), "--override", "network_def#channels=[8,16,32,64]"]
    args = parser.parse_args(argv)
    assert args.override == ["network_def#channels=[8,16,32,64]"]
    assert parse_overrides(args.override) == OVR
    assert args.func(args) == 0
    assert load_exported_encoder(out)[1]["modality"] == "t2"
    with pytest.raises(FileExistsError):
        args.func(parser.parse_args(argv))
    assert parser.parse_args([*argv, "--overwrite"]).overwrite


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    torch.manual_seed(0)
    return Classifier(
        {
            "ehr": {"name": "gru", "in_features": 76, "hidden": 8},
            "cxr": {"name": "resnet10", "spatial_dims": 2},
            "report": {"name": "bert_tiny", "out_dim": 4},
        },
        head="concat",
        num_classes=2,
    ).eval()


@pytest.mark.parametrize("modality", ["ehr", "cxr"])
def test_export_classifier_encoders(classifier, modality, tmp_path):
    enc = classifier.encoders[modality]
    torch.manual_seed(1)
    out = export_encoder_from_model(classifier, modality, tmp_path / f"{modality}.pt", enc.example_input(2, 32))
    module, info = load_exported_encoder(out)
    assert info["modality"] == modality and info["out_dim"] == enc.out_dim
    assert info["preprocessing"]["steps"][0].startswith("medfusion.data.clinical.LoadModalitiesByKindd")
    x = enc.example_input(3, 40)  # another batch size and length/side
    with torch.no_grad():
        ref = enc(x)
        got = module(x)
    torch.testing.assert_close(got[0], ref.pooled)
    assert len(got) == 1 + len(ref.maps)
    assert classifier.encoders[modality] is enc and not enc.training  # the model itself was not modified


def test_export_bert_directory(classifier, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    enc = classifier.encoders["report"]
    out = export_encoder_from_model(classifier, "report", tmp_path / "report_encoder")
    assert out.is_dir() and (out / "config.json").is_file() and (out / "projection.pt").is_file()
    info = json.loads((out / INFO_FILE).read_text())
    assert info["pooling"] == "mean" and info["out_dim"] == 4 and info["feature_info"][0]["channels"] == 32
    bert = AutoModel.from_pretrained(str(out), add_pooling_layer=False).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    batch = tok(["no acute findings", "small left pleural effusion seen"], padding="max_length", max_length=12)
    x = torch.stack([torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])], dim=1)
    proj = torch.nn.Linear(32, 4)
    proj.load_state_dict(torch.load(out / "projection.pt", weights_only=True))
    with torch.no_grad():
        tokens = bert(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state
        w = x[:, 1].unsqueeze(-1).float()
        pooled = proj((tokens * w).sum(1) / w.sum(1))  # the pooling the JSON documents
        torch.testing.assert_close(pooled, enc(x).pooled)
    with pytest.raises(FileExistsError):
        export_encoder_from_model(classifier, "report", out)


def test_monai_bundle_ckpt_export_and_verify(ckpt, tmp_path):
    from monai.bundle.scripts import ckpt_export, verify_net_in_out

    cfg = dict(
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        config_file=str(BUNDLE / "configs" / "inference.json"),
        bundle_root=str(BUNDLE),
    )
    ts = tmp_path / "model.ts"
    # scripting fails (see docs/encoder_reuse.md); trace + the nested checkpoint key are required
    ckpt_export(
        "network_def",
        filepath=str(ts),
        ckpt_file=str(ckpt),
        key_in_ckpt="model",
        use_trace=True,
        input_shape=[1, 4, 32, 32, 32],
        **cfg,
        **OVR,
    )
    module = torch.jit.load(str(ts))
    net = _full_model(ckpt)
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(x), net(x), rtol=1e-4, atol=1e-5)
    shape = "_meta_#network_data_format#{}#spatial_shape"
    verify_net_in_out(
        "network_def",
        **cfg,
        **OVR,
        **{shape.format("inputs#image"): [32, 32, 32], shape.format("outputs#pred"): [32, 32, 32]},
    )


def test_clinical_preprocessing_feeds_the_encoder(classifier, tmp_path):
    from PIL import Image

    from medfusion.apps.export import encoder_preprocessing

    report = encoder_preprocessing(classifier, "report")("FINDINGS: small left pleural effusion.")
    assert report.shape == (2, 128) and report.dtype == torch.long and report[1].sum() > 2
    png = tmp_path / "cxr.png"
    Image.fromarray((torch.arange(80 * 60) % 251).reshape(60, 80).numpy().astype("uint8")).save(png)
    image = encoder_preprocessing(classifier, "cxr")(str(png))
    assert image.shape == (1, 64, 64) and float(image.min()) == 0.0 and float(image.max()) == 1.0
    with torch.no_grad():
        assert classifier.encoders["cxr"](image[None]).pooled.shape == (1, classifier.encoders["cxr"].out_dim)
        assert classifier.encoders["report"](report[None]).pooled.shape == (1, 4)


def test_top_level_load_encoder_is_lazy_alias():
    import medfusion
    import medfusion.apps.export

    assert medfusion.load_encoder is medfusion.apps.export.load_encoder
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        medfusion.nope  # noqa: B018
