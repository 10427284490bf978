"""Empty pseudo labels are seen: per-slide nucleus shares, merged over workers, warned about."""

from __future__ import annotations

import numpy as np
import pytest

from histokd.pretrain.label_share import LabelShare, read_label_share, summary_line


def test_counts_by_hand_and_merge_over_workers(tmp_path):
    a = LabelShare(empty_patch_share=0.005)
    a.add(["s1.svs", "s1.svs", b"s2.svs"], np.array([0.2, 0.001, 0.0]))
    b = LabelShare(empty_patch_share=0.005)
    b.add(["s2.svs", "s3.svs"], np.array([0.004, 0.3]))
    merged = a.merge([b.counts])
    rows = {r["slide"]: r for r in merged.rows()}
    assert rows["s1.svs"] == {
        "slide": "s1.svs",
        "patches": 2,
        "mean_nucleus_share": 0.1005,
        "empty_patches": 1,
        "empty_fraction": 0.5,
    }
    assert rows["s2.svs"]["patches"] == 2 and rows["s2.svs"]["empty_fraction"] == 1.0
    assert merged.rows()[0]["slide"] == "s2.svs"  # emptiest first
    assert merged.mean_share == pytest.approx((0.2 + 0.001 + 0.0 + 0.004 + 0.3) / 5)
    assert [r["slide"] for r in merged.mostly_empty(0.9)] == ["s2.svs"]
    assert [r["slide"] for r in merged.mostly_empty(0.4)] == ["s2.svs", "s1.svs"]
    path = merged.write_csv(tmp_path / "label_share.csv")
    assert read_label_share(path) == merged.rows()
    line = summary_line(merged.rows(), 0.005, 0.9)
    assert "min 0.2%, median 10.1%, max 30.0% over 3 slides" in line
    assert "3/5 patches (60%) below 0.5%" in line and "1 slide(s) mostly empty" in line


def test_warning_names_each_mostly_empty_slide(capsys):
    from histokd.pretrain.loop import _warn_empty_slides

    shares = LabelShare(0.005)
    shares.add(["glassy.svs"] * 10 + ["good.svs"] * 10, np.r_[np.zeros(10), np.full(10, 0.2)])
    _warn_empty_slides(shares, {"empty_patch_share": 0.005, "empty_slide_fraction": 0.9})
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(
        "warning: glassy.svs: 10/10 patches have pseudo labels with less than 0.5%"
    )
    assert "jobs/check_teacher.py" in out[0]
