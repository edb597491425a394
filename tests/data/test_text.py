from __future__ import annotations

import logging

import pytest
import torch

from medfusion.data.text import (
    LoadReportd,
    TokenizeReport,
    TokenizeReportd,
    extract_findings,
    get_tokenizer,
    load_report,
)

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)

 INDICATION:  Intubated patient.

 FINDINGS:

 The lungs are   clear.
 No pleural effusion.

 IMPRESSION:

 No acute process.
"""


def test_extract_findings_sections():
    assert extract_findings(REPORT) == "The lungs are clear. No pleural effusion."
    no_findings = REPORT.replace("FINDINGS:", "COMPARISON:")
    assert extract_findings(no_findings) == "No acute process."
    empty_findings = "FINDINGS:\n\nIMPRESSION: Stable tube."
    assert extract_findings(empty_findings) == "Stable tube."
    assert extract_findings("  plain\ttext \n here ") == "plain text here"
    long = " ".join(f"w{i}" for i in range(200))
    out = extract_findings(long)
    assert len(out.split()) == 150 and out.split()[-1] == "w149"
    assert len(extract_findings(long, max_words=5).split()) == 5


def test_load_report_path_inline_empty(tmp_path, caplog):
    p = tmp_path / "s50414267.txt"
    p.write_text(REPORT)
    assert load_report(p) == "The lungs are clear. No pleural effusion."
    assert load_report(str(p)) == "The lungs are clear. No pleural effusion."
    assert load_report("Heart size normal.") == "Heart size normal."
    assert load_report(p, extract=False) == REPORT
    assert load_report(None) is None
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\t ")
    with caplog.at_level(logging.INFO, logger="medfusion.data.text"):
        assert load_report(empty) is None
        assert load_report("   ") is None
    assert "empty.txt" in caplog.text
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_report(str(tmp_path / "missing.txt"))


def test_undecodable_bytes_name_the_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"FINDINGS: ok \xff\xfe broken")
    with pytest.raises(ValueError, match=r"bad\.txt.*UTF-8"):
        load_report(bad)


def test_tokenize_report_shape_and_values():
    tok = get_tokenizer()
    assert get_tokenizer() is tok  # cached per folder
    x = TokenizeReport(max_length=16)("lungs")
    assert x.dtype == torch.long and x.shape == (2, 16)
    # [CLS] lungs [SEP] then padding
    assert x[0, :3].tolist() == [tok.cls_token_id, tok("lungs")["input_ids"][1], tok.sep_token_id]
    assert x[0, 3:].tolist() == [tok.pad_token_id] * 13
    assert x[1].tolist() == [1, 1, 1] + [0] * 13
    long = TokenizeReport(max_length=8)(" ".join(["lungs"] * 50))
    assert long.shape == (2, 8) and long[1].all() and long[0, -1] == tok.sep_token_id


def test_dict_transforms(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text(REPORT)
    d = LoadReportd(keys="report")({"report": str(p), "other": 1})
    assert d["report"] == "The lungs are clear. No pleural effusion."
    out = TokenizeReportd(keys="report", max_length=12)(d)
    assert out["report"].shape == (2, 12) and out["other"] == 1
    with pytest.raises(TypeError, match="'report'"):
        TokenizeReportd(keys="report")({"report": None})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_tokenizer(tmp_path / "nowhere")
