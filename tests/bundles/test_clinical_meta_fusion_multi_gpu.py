"""Meta Fusion under torchrun (2 gloo processes): train.json + meta_fusion.json + multi_gpu_train.json +
meta_fusion_multi_gpu.json gives the same encoders, cohort and probabilities as the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from medfusion.apps.bundle import bundle_workflow, torchrun_command
from medfusion.fusion.meta_fusion_head import MetaFusionHead

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "clinical_fusion"

# As in test_clinical_multi_gpu.py: nothing random that differs between 1 and 2 processes (no augmentation,
# modality dropout or shuffling, no BatchNorm); rank r with batch 1 sees sample 2i + r, the single process
# sees (2i, 2i + 1) with batch 2, so stage (a) gives the same encoders (up to float rounding). Stages (b)-(d)
# of the torchrun run start from the single run's encoder checkpoint (rank 0 reads it, the weights are
# broadcast) and both runs extract with batch 1: PCA of near-equal eigenvalues would turn a 1e-6 difference of
# the features into different components, so the comparison of the cohort needs bit-identical features.
COMMON = {
    "modalities": ["ehr", "cxr"],
    "encoders#ehr": {"name": "mlp", "in_features": 1824, "hidden": [16], "out_dim": 16},
    "encoders#cxr": {"name": "mlp", "in_features": 1024, "hidden": [16], "out_dim": 16},
    "image_size": 32,
    "meta_fraction": 0.15,  # 40 stays -> 24 training stays (even)
    "modality_dropout": "none",
    "max_epochs": 1,
    "num_workers": 0,
    "train#preprocessing": "$medfusion.apps.clinical_bundle.clinical_preprocessing(@modalities, "
    "@modality_kinds, 'eval', @tabular_features, **@transform_kwargs)",
    "train#dataloader#shuffle": False,
    "check_data": False,
    "device": "$torch.device('cpu')",
    "meta_fusion_kwargs": {"epochs": 3, "hidden": [8], "rho_grid": [0.0, 1.0], "batch_size": 8, "seed": 0},
    "meta_fusion_grids": {"ehr": ["null", "identity", "pca:4"], "cxr": ["null", "pca:4"]},
    "meta_fusion#loaders#train#batch_size": 1,
    "meta_fusion#loaders#val#batch_size": 1,
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from medfusion.data.synth_clinical import write_clinical_cohort

    out = tmp_path_factory.mktemp("clinical_mf_ddp") / "cohort"
    write_clinical_cohort(out, samples=40, seed=2, manifest_cohort=False)
    return out


def _head(models: Path) -> MetaFusionHead:
    kwargs = json.loads((models / "meta_fusion_config.json").read_text())["head_kwargs"]
    cfg = kwargs["config"]
    head = MetaFusionHead(cfg["modalities"], cfg["in_dims"], num_classes=2, **kwargs)
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)["model"]
    head.load_state_dict({k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")})
    return head.eval()


def test_meta_fusion_torchrun_matches_single_process(cohort, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    wf = bundle_workflow(
        BUNDLE,
        ["train.json", "meta_fusion.json"],
        "train",
        {**COMMON, "dataset_dir": str(cohort), "batch_size": 2, "ckpt_dir": str(single / "models"),
         "output_dir": str(single / "runs")},
    )  # fmt: skip
    wf.initialize()
    wf.run()
    wf.finalize()
    split = wf.parser.get_parsed_content("split")
    assert len(split["train"]) == 24 and len(split["val"]) >= 2

    overrides = {
        **COMMON,
        "dataset_dir": str(cohort),
        "batch_size": 1,
        "ckpt_dir": str(ddp / "models"),
        "output_dir": str(ddp / "runs"),
        "train#sampler#shuffle": False,
        "meta_fusion#stages#encoder_checkpoint": str(single / "models" / "supervised_model.pt"),
    }
    cmd = torchrun_command(
        BUNDLE, ["train.json", "meta_fusion.json", "multi_gpu_train.json", "meta_fusion_multi_gpu.json"], overrides
    )
    proc = subprocess.run(
        cmd, cwd=BUNDLE, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    # stage (b) ran sharded: each rank extracted its half of the 24 training stays
    assert log.count("rank 0 of 2 extracted 12 samples") == 1 and log.count("rank 1 of 2 extracted 12 samples") == 1

    # stage (a) under DDP: the same encoders as the single process (up to float rounding)
    enc_a, enc_b = (
        torch.load(d / "models" / "supervised_model.pt", weights_only=False)["model"] for d in (single, ddp)
    )
    for k, v in enc_a.items():
        torch.testing.assert_close(enc_b[k], v, rtol=1e-4, atol=1e-5, msg=f"encoder weight {k}")

    a = torch.load(single / "models" / "model.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(ddp / "models" / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert set(a) == set(b)
    for k, v in a.items():  # encoders (stage a) and every Meta Fusion state (PCA, students, teachers, committee)
        torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-6, msg=f"state {k}")
    sa, sb = (json.loads((d / "runs" / "meta_fusion_summary.json").read_text()) for d in (single, ddp))
    assert (sb["teachers"], sb["committee"], sb["rho"]) == (sa["teachers"], sa["committee"], sa["rho"])
    assert not (ddp / "models" / "meta_fusion_stages.pt").exists()

    # the two fitted heads give the same probabilities for every modality combination
    ha, hb = _head(single / "models"), _head(ddp / "models")
    gen = torch.Generator().manual_seed(0)
    n = 6
    feats = {m: torch.randn(3 * n, int(d), generator=gen) for m, d in ha.meta.get_config()["in_dims"].items()}
    mask = torch.tensor([[True, False]] * n + [[False, True]] * n + [[True, True]] * n)
    with torch.no_grad():
        pa = ha(feats, mask).logits.exp()
        pb = hb(feats, mask).logits.exp()
    torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["sequential", "distributed_padded"])
def test_shards_reassemble_in_dataset_order(sampler):
    """Each rank's shard + the gather give every sample once, in dataset order (padding duplicates dropped)."""
    from monai.data import DistributedSampler
    from torch.utils.data import DataLoader

    from medfusion.apps.meta_fusion_stages import _reassemble, _shard

    n, world = 7, 2
    dataset = list(range(n))
    parts = []
    for rank in range(world):
        loader = (
            DataLoader(dataset, batch_size=2, shuffle=False)
            if sampler == "sequential"
            else DataLoader(
                dataset,
                batch_size=2,
                sampler=DistributedSampler(dataset, even_divisible=True, num_replicas=2, rank=rank),
            )
        )
        part, indices = _shard(loader, rank, world)
        seen = torch.cat(list(part)).tolist()
        assert seen == indices and len(indices) == (4 if sampler == "distributed_padded" or rank == 0 else 3)
        value = torch.tensor(seen, dtype=torch.float32)
        parts.append((indices, ({"m": value[:, None]}, value > 2, value.long())))
    data = _reassemble(parts, n)
    assert data.x["m"][:, 0].tolist() == list(range(n)) and data.y.tolist() == list(range(n))
    assert data.mask.tolist() == [i > 2 for i in range(n)]
    truncated = [(idx[:-1], ({"m": d[0]["m"][:-1]}, d[1][:-1], d[2][:-1])) for idx, d in parts]
    with pytest.raises(ValueError, match="distinct samples, expected indices 0..6"):  # index 6 is gone
        _reassemble(truncated, n)
