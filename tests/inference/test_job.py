"""Whole-slide inference on a real local Ray: real slide formats, bad fixtures, MLflow, reruns."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from histokd.inference import PredictConfig, PredictError, run_prediction
from histokd.inference.outputs import file_record
from histokd.slides import SlideReader

REPO = Path(__file__).resolve().parents[2]
# The fixtures of ../shared/testdata/slides that cannot be used, and why (see its README).
# kidney-48-5.tif, a plain strip TIFF without a pixel size, is a slide once one is assumed
# (--base-magnification 20 below: 0.5 um/px), and refused without one.
BAD_FIXTURES = {"broken.svs", "unopenable.tiff", "unreadable.svs"}


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_real_slide_formats_give_outputs_of_the_right_size_and_place(
    ray_cluster, slides_dir, tmp_path, classification_model_file
):
    """The job's command line on every fixture: DICOM, generic TIFF, Aperio JPEG and JPEG 2000 SVS."""
    sys.path.insert(0, str(REPO / "jobs"))
    import predict_slides

    code = predict_slides.main([
        "--model", str(classification_model_file), "--slides", str(slides_dir), "--storage-path", str(tmp_path),
        "--run-name", "real", "--magnification", "20", "--patch-size", "256", "--base-magnification", "20",
        "--min-tissue-fraction", "0", "--output-magnification", "2.5", "--mlflow-overlays", "2",
    ])  # fmt: skip
    assert code == 0
    run_dir = tmp_path / "real"
    bad = {Path(r["slide_path"]).name: r for r in _read_csv(run_dir / "bad_slides.csv")}
    assert set(bad) == BAD_FIXTURES
    for name, row in bad.items():
        assert (
            row["reason"].startswith(str(slides_dir / name)) or name in row["reason"]
        )  # names the file
    assert bad["unreadable.svs"]["stage"] == "read"  # opens, but no tile can be read
    good = sorted(
        p.name
        for p in slides_dir.iterdir()
        if p.name not in BAD_FIXTURES and p.suffix in (".svs", ".tiff", ".tif", ".dcm")
    )
    summaries = {
        Path(s["slide_path"]).name: s
        for s in (json.loads(p.read_text()) for p in run_dir.glob("slides/*/summary.json"))
    }
    assert sorted(summaries) == good
    run = json.loads((run_dir / "run.json").read_text())
    assert (run["num_slides"], run["num_predicted"], run["num_bad"]) == (
        len(good) + len(BAD_FIXTURES),
        len(good),
        len(BAD_FIXTURES),
    )
    for name, summary in summaries.items():
        folder = run_dir / "slides" / summary["slide_id"]
        with SlideReader(slides_dir / name, 20) as reader:
            width, height = reader.info.dimensions
            out_w, out_h = reader.size_at(2.5)
        extent = summary["tiles"]["extent"]
        assert (
            extent == 256 and summary["tiles"]["stride"] == 256
        )  # 256 px at 20x on a 20x scan, no overlap
        cols, rows = (
            -(-max(width - extent, 0) // extent) + 1,
            -(-max(height - extent, 0) // extent) + 1,
        )
        table = pq.read_table(folder / "predictions.parquet").to_pydict()
        assert len(table["x"]) == cols * rows == summary["num_tiles"]  # every lattice tile, once
        assert sorted(zip(table["y"], table["x"], strict=True)) == [
            (r * extent, c * extent) for r in range(rows) for c in range(cols)
        ]
        probs = np.stack([table[f"prob_{c}"] for c in ("a", "b", "c")], 1)
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
        assert table["label"] == probs.argmax(1).tolist()
        heat = tifffile.imread(folder / "heatmap.ome.tif")
        labels = tifffile.imread(folder / "labels.ome.tif")
        assert heat.shape == (3, out_h, out_w) and labels.shape == (out_h, out_w)
        assert (labels != 255).all()  # the lattice covers the whole slide
        # each tile's label is painted at its place: 256 level-0 px are 32 output px at 2.5x
        for x, y, label in zip(table["x"][:5], table["y"][:5], table["label"][:5], strict=True):
            assert labels[min(y // 8 + 4, out_h - 1), min(x // 8 + 4, out_w - 1)] == label
        assert summary["output"]["width"] == out_w
        # 2.5x is 4 um/px exactly, whatever the scan's pixel size (0.499 um/px: 8.016x down)
        pixel_um = summary["output"]["pixel_size_um"]
        assert pixel_um == (pytest.approx(4.0) if summary["slide"]["mpp"] else None)
    assert summaries["cmu-1-small-region.svs"]["num_tiles"] == 9 * 12
    assert summaries["kidney-48-5.tif"]["num_tiles"] == 6 * 4  # 1493 x 901 px as one level

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("histokd-predict").experiment_id])
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    metrics, params = found[0].data.metrics, found[0].data.params
    assert metrics["num_bad"] == len(BAD_FIXTURES) and metrics["num_predicted"] == len(good)
    assert metrics["num_tiles"] == sum(s["num_tiles"] for s in summaries.values())
    assert params["task"] == "classification" and params["resolved_patch_size"] == "256"
    overlays = client.list_artifacts(found[0].info.run_id, "overlays")
    assert len(overlays) == 2
    assert {a.path for a in client.list_artifacts(found[0].info.run_id)} >= {
        "bad_slides.csv",
        "run.json",
        "summary.csv",
        "overlays",
    }


def test_segmentation_tiles_overlap_on_tissue_only(
    ray_cluster, slides_dir, tmp_path, segmentation_model_file
):
    config = PredictConfig(
        model=str(segmentation_model_file), slides=[str(slides_dir / "cmu-1-small-region.svs")], storage_path=str(tmp_path),
        magnification=20, patch_size=256, output_magnification=5,
    )  # fmt: skip
    result = run_prediction(config, tracking=False)
    summary = result.slides[0]
    assert (result.num_predicted, result.num_bad) == (1, 0)
    assert summary["tiles"]["overlap"] == 0.25 and summary["tiles"]["stride"] == 192
    table = pq.read_table(Path(summary["dir"]) / "predictions.parquet").to_pydict()
    assert 0 < len(table["x"]) < 12 * 16  # tissue only, out of the 12 x 16 lattice
    assert min(table["tissue_fraction"]) >= 0.1
    assert all(x % 192 == 0 and y % 192 == 0 for x, y in zip(table["x"], table["y"], strict=True))
    heat = tifffile.imread(Path(summary["dir"]) / "heatmap.ome.tif").astype(int)
    labels = tifffile.imread(Path(summary["dir"]) / "labels.ome.tif")
    # 2967 x 2220 px at 0.499 um/px (MPP first: not snapped to 20x) shown at 5x, 2 um/px
    assert heat.shape == (4, 740, 553)
    covered = labels != 255
    assert 0.2 < covered.mean() < 1
    assert np.abs(heat[:, covered].sum(0) - 255).max() <= 4  # probabilities, rounded per class
    assert (heat[:, ~covered] == 0).all()
    assert sum(summary["class_fractions"].values()) == pytest.approx(1)


class _Stop(Exception):
    pass


def test_a_rerun_after_a_stop_skips_finished_slides(
    ray_cluster, tmp_path, small_demo_slides, classification_model_file
):
    paths = [str(s.slide_path) for s in small_demo_slides]
    config = PredictConfig(
        model=str(classification_model_file), slides=paths, storage_path=str(tmp_path), run_name="resume",
        magnification=20, patch_size=128, output_magnification=5,
    )  # fmt: skip
    done: list[str] = []

    def stop_after_first(summary: dict) -> None:
        done.append(summary["slide_path"])
        raise _Stop

    with pytest.raises(_Stop):
        run_prediction(config, on_slide_done=stop_after_first, tracking=False)
    slides_dir = tmp_path / "resume" / "slides"
    first = [p for p in slides_dir.iterdir()]
    assert len(done) == 1 and len(first) == 1  # only the finished slide has a folder
    marker = first[0] / "summary.json"
    stamp = marker.stat().st_mtime_ns
    (slides_dir / ".partial-leftover-0001").mkdir()  # what a crash mid-write leaves

    result = run_prediction(config, tracking=False)
    assert (result.num_skipped, result.num_predicted, result.num_bad) == (1, 2, 0)
    assert marker.stat().st_mtime_ns == stamp  # not written again
    assert sorted(s["slide_path"] for s in result.slides) == sorted(paths)
    assert sorted(p.name for p in slides_dir.iterdir()) == sorted(
        s["slide_id"] for s in result.slides
    )
    assert len(_read_csv(result.files["summary_table"])) == 3

    again = run_prediction(config, tracking=False)  # nothing left: no stream at all
    assert (again.num_skipped, again.num_predicted, again.num_tiles) == (3, 0, 0)
    changed = run_prediction(PredictConfig(**{**config.__dict__, "overlap": 0.5}), tracking=False)
    assert changed.num_predicted == 3  # other settings: the outputs are made again


def test_a_rerun_predicts_again_only_the_slides_whose_outputs_are_damaged(
    ray_cluster, tmp_path, small_demo_slides, classification_model_file, capsys
):
    """summary.json alone does not make a slide done: its outputs must be there, whole."""
    paths = [str(s.slide_path) for s in small_demo_slides]
    config = PredictConfig(
        model=str(classification_model_file), slides=paths, storage_path=str(tmp_path), run_name="damage",
        magnification=20, patch_size=128, output_magnification=5,
    )  # fmt: skip
    first = run_prediction(config, tracking=False)
    assert first.num_predicted == 3
    deleted, truncated, kept = (Path(s["dir"]) for s in first.slides)
    recorded = json.loads((truncated / "summary.json").read_text())["outputs"]
    assert set(recorded) == {p.name for p in truncated.iterdir()} - {"summary.json"}
    assert (
        recorded["predictions.parquet"]["bytes"]
        == (truncated / "predictions.parquet").stat().st_size
    )
    (deleted / "predictions.parquet").unlink()
    with open(truncated / "predictions.parquet", "r+b") as f:
        f.truncate(100)
    stamp = (kept / "summary.json").stat().st_mtime_ns
    capsys.readouterr()

    again = run_prediction(config, tracking=False)
    assert (again.num_predicted, again.num_skipped, again.num_bad) == (2, 1, 0)
    assert (kept / "summary.json").stat().st_mtime_ns == stamp  # not written again
    printed = capsys.readouterr().out
    assert f"slide {deleted.name}: predicting again, predictions.parquet is missing" in printed
    assert (
        f"slide {truncated.name}: predicting again, predictions.parquet has 100 bytes, "
        f"summary.json records {recorded['predictions.parquet']['bytes']}"
    ) in printed
    assert printed.count("predicting again") == 2  # one line each, none for the whole slide
    for folder in (deleted, truncated):
        summary = json.loads((folder / "summary.json").read_text())
        assert pq.read_table(folder / "predictions.parquet").num_rows == summary["num_tiles"] > 0
        assert not [p for p in folder.parent.iterdir() if p.name.startswith(".partial-")]

    summary = json.loads((kept / "summary.json").read_text())  # a checksum that does not match
    summary["outputs"]["heatmap.ome.tif"]["sha256"] = "0" * 64
    (kept / "summary.json").write_text(json.dumps(summary))
    third = run_prediction(config, tracking=False)
    assert (third.num_predicted, third.num_skipped) == (1, 2)
    assert [s["slide_id"] for s in third.slides if s["dir"] == str(kept)] == [kept.name]
    assert (
        f"slide {kept.name}: predicting again, heatmap.ome.tif's SHA-256 differs"
        in capsys.readouterr().out
    )
    rewritten = json.loads((kept / "summary.json").read_text())["outputs"]["heatmap.ome.tif"]
    assert rewritten == file_record(kept / "heatmap.ome.tif")


def test_only_bad_slides_fail_the_run_with_a_report(
    ray_cluster, slides_dir, tmp_path, classification_model_file
):
    slides = [
        str(slides_dir / "broken.svs"),
        str(slides_dir / "unopenable.tiff"),
        str(tmp_path / "missing.svs"),
    ]
    config = PredictConfig(
        model=str(classification_model_file),
        slides=slides,
        storage_path=str(tmp_path),
        magnification=20,
    )
    with pytest.raises(
        PredictError,
        match=r"(?s)no usable slides among 3; 3 bad:\n.*broken\.svs: not a slide format.*report: .*bad_slides\.csv",
    ) as info:
        run_prediction(config, tracking=False)
    assert "missing.svs: file not found" in str(info.value)
    rows = _read_csv(tmp_path / "predict" / "bad_slides.csv")
    assert sorted(os.path.basename(r["slide_path"]) for r in rows) == [
        "broken.svs",
        "missing.svs",
        "unopenable.tiff",
    ]
    assert {r["status"] for r in rows} == {"skipped"}


def test_settings_are_checked_before_any_slide_is_read(tmp_path, classification_model_file):
    with pytest.raises(
        ValueError, match=r"best_model\.pt: the file does not record the magnification"
    ):
        run_prediction(
            PredictConfig(model=str(classification_model_file), slides=["x.svs"]), tracking=False
        )
    with pytest.raises(
        ValueError, match=r"output_magnification=40: above the model's 20x; allowed: at most 20"
    ):
        run_prediction(
            PredictConfig(
                model=str(classification_model_file),
                slides=["x.svs"],
                magnification=20,
                output_magnification=40,
            ),
            tracking=False,
        )
    with pytest.raises(ValueError, match=r"model is empty"):
        run_prediction(PredictConfig(slides=["x.svs"]), tracking=False)
    with pytest.raises(PredictError, match=r"no slides found"):
        run_prediction(
            PredictConfig(
                model=str(classification_model_file), magnification=20, storage_path=str(tmp_path)
            ),
            tracking=False,
        )


@pytest.mark.slow
def test_memory_stays_flat_few_slides_in_flight_and_every_slide_gets_its_outputs(
    ray_cluster, tmp_path, classification_model_file
):
    """Six slides, each cut into several model batches: the driver holds at most 2 at once."""
    from histokd.demos.synthetic import make_demo_slides

    slides = make_demo_slides(tmp_path / "slides", n=6, seed=12, width=512, height=512)
    paths = [str(s.slide_path) for s in slides]
    config = PredictConfig(
        model=str(classification_model_file), slides=paths, storage_path=str(tmp_path), run_name="flat",
        magnification=20, patch_size=128, output_magnification=5, min_tissue_fraction=0, batch_size=4,
    )  # fmt: skip
    result = run_prediction(config, tracking=False)
    # 512 px at 20x in 128 px tiles: a 4 x 4 lattice, 16 tiles in 4 batches per slide
    assert (result.num_slides, result.num_predicted, result.num_bad, result.num_tiles) == (
        6,
        6,
        0,
        6 * 16,
    )
    assert 1 <= result.max_slides_in_flight <= 2, result.max_slides_in_flight
    assert (
        json.loads((Path(result.run_dir) / "run.json").read_text())["max_slides_in_flight"]
        == result.max_slides_in_flight
    )
    assert sorted(s["slide_path"] for s in result.slides) == sorted(paths)
    for summary in result.slides:
        folder = Path(summary["dir"])
        assert summary["num_tiles"] == 16 and summary["num_unreadable_tiles"] == 0
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [
                "summary.json",
                "predictions.parquet",
                "heatmap.ome.tif",
                "labels.ome.tif",
                "overlay.png",
                "heatmap.png",
                "predictions.geojson",
            ]
        )
        assert pq.read_table(folder / "predictions.parquet").num_rows == 16
        assert tifffile.imread(folder / "labels.ome.tif").shape == (128, 128)  # 512 px at 5x of 20x
    assert len(_read_csv(result.files["summary_table"])) == 6
