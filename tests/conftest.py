"""Shared test fixtures: deterministic seeds, few threads, paths to the shared real data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
REAL_CASE = SHARED / "data" / "real" / "BraTS2021_00006"


#: markers by location: (path fragment relative to tests/, markers). Location decides, so a new test file in
#: tests/bundles/ is ``slow`` without anyone remembering to mark it.
_MARKS_BY_PATH: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bundles/", ("slow",)),
    ("tutorials/", ("slow",)),
    ("apps/dicom/", ("slow", "pacs")),
    ("engines/test_resume.py", ("slow",)),
    ("multi_gpu", ("slow", "torchrun")),
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests ``slow``/``torchrun``/``pacs`` by where they live (``make test-fast`` deselects ``slow``)."""
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(tests_dir).as_posix()
        for fragment, marks in _MARKS_BY_PATH:
            if fragment in rel:
                for mark in marks:
                    item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def real_case() -> Path:
    """The real BraTS 2021 case next to the project, or skip with the reason."""
    if not REAL_CASE.is_dir():
        pytest.skip(f"real BraTS case not found at {REAL_CASE} (expected ../shared/data/real/ beside the project)")
    return REAL_CASE


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny full-batch fits (2 threads on a busy 2-core machine are far slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def latent_table(tmp_path_factory) -> Path:
    """A small two-modality latent factor regression table (30% missing blocks) from ``write_latent_table``."""
    from medfusion.data.synth_latent import write_latent_table

    out = tmp_path_factory.mktemp("latent") / "latent"
    write_latent_table(out, latent=(4, 4, 2), p=(8, 6), n=300, missing_rate=0.3, seed=1)
    return out / "table.csv"


@pytest.fixture(scope="session")
def sparse_cohort(tmp_path_factory) -> dict:
    """A 60-row generated manifest shaped like real data (``medfusion.data.synth_manifest``): CXR + long inline
    notes + sparse EHR columns, several images per patient, absent image files, an 81/19 outcome.

    Returns the generator's summary (``manifest``, ``columns``, ``absent_files``, ...). Read-only: copy it before
    changing files.
    """
    from medfusion.data.synth_manifest import write_manifest_cohort

    out = tmp_path_factory.mktemp("sparse") / "cohort"
    return write_manifest_cohort(out, rows=60, seed=3, image_size=32, absent_file_rate=0.08)


@pytest.fixture(scope="session")
def brats_cohort(tmp_path_factory) -> Callable[..., Path]:
    """``brats_cohort(cases, size, seed, style="brats2021")``: a generated BraTS cohort (``write_brats_cohort``).

    One cohort per set of arguments for the whole session, shared by every test asking for it: read-only (copy it
    before changing files).
    """
    from medfusion.data.synth_brats import write_brats_cohort

    made: dict[tuple, Path] = {}

    def make(cases: int, size: int, seed: int, style: str = "brats2021") -> Path:
        key = (cases, size, seed, style)
        if key not in made:
            out = tmp_path_factory.mktemp(f"brats_{cases}x{size}_s{seed}") / "cohort"
            write_brats_cohort(out, cases=cases, size=size, seed=seed, style=style)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def clinical_cohort(tmp_path_factory) -> Callable[..., Path]:
    """``clinical_cohort(samples, seed, manifest_cohort=True)``: a generated clinical cohort (MIMIC-style layout,
    plus the PET/CT/labs manifest unless ``manifest_cohort`` is false; ``write_clinical_cohort``).

    One cohort per set of arguments for the whole session, shared by every test asking for it: read-only.
    """
    from medfusion.data.synth_clinical import write_clinical_cohort

    made: dict[tuple, Path] = {}

    def make(samples: int, seed: int, manifest_cohort: bool = True) -> Path:
        key = (samples, seed, manifest_cohort)
        if key not in made:
            out = tmp_path_factory.mktemp(f"clinical_{samples}_s{seed}") / "cohort"
            write_clinical_cohort(out, samples=samples, seed=seed, manifest_cohort=manifest_cohort)
            made[key] = out
        return made[key]

    return make
