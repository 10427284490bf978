"""histokd.patch_dataset and jobs/make_patch_dataset.py: labelled patches cut from annotated slides.

Squares and a triangle drawn on the real CMU-1 slide region (2220 x 2967 px at 0.499 um/px), in
each of the three annotation formats.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histokd.finetune.datasets import load_task_dataset
from histokd.patch_dataset import make_patch_dataset

REPO = Path(__file__).resolve().parents[1]

TUMOR = [(256, 256), (768, 256), (768, 768), (256, 768)]
HOLE = [(384, 384), (512, 384), (512, 512), (384, 512)]
STROMA = [(1024, 1024), (1536, 1024), (1536, 1280), (1024, 1280)]
NECROSIS = [(1600, 256), (2000, 256), (1800, 640)]
SHAPES = [("Tumor", TUMOR), ("Stroma", STROMA), ("Necrosis", NECROSIS)]


def _closed(ring):
    return [list(p) for p in ring] + [list(ring[0])]


def _qupath(shapes, holes=()):
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_closed(ring)] + [_closed(h) for h in (holes if name == "Tumor" else ())]},
         "properties": {"objectType": "annotation", "classification": {"name": name}}}
        for name, ring in shapes
    ]  # fmt: skip
    return json.dumps({"type": "FeatureCollection", "features": features})


def _aperio(shapes):
    def region(ring):
        vertices = "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in ring)
        return f'<Region Id="1" Type="0" NegativeROA="0"><Vertices>{vertices}</Vertices></Region>'

    body = "".join(
        f'<Annotation Id="{i}" Name="{n}"><Regions>{region(r)}</Regions></Annotation>'
        for i, (n, r) in enumerate(shapes)
    )
    return f'<?xml version="1.0"?><Annotations MicronsPerPixel="0.499">{body}</Annotations>'


def _asap(shapes):
    def annotation(i, name, ring):
        coordinates = "".join(
            f'<Coordinate Order="{k}" X="{x}" Y="{y}"/>' for k, (x, y) in enumerate(ring)
        )
        return f'<Annotation Name="A{i}" Type="Polygon" PartOfGroup="{name}"><Coordinates>{coordinates}</Coordinates></Annotation>'

    body = "".join(annotation(i, n, r) for i, (n, r) in enumerate(shapes))
    return f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{body}</Annotations></ASAP_Annotations>'


@pytest.fixture
def slide_folder(slides_dir, tmp_path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "cmu.svs").symlink_to(slides_dir / "cmu-1-small-region.svs")
    return folder


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _area_and_perimeter(ring) -> tuple[float, float]:
    xy = np.asarray(ring, float)
    x, y = xy[:, 0], xy[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    return area, float(np.linalg.norm(np.roll(xy, -1, 0) - xy, axis=1).sum())


def test_three_formats_of_the_same_shapes_give_the_same_masks_and_areas(slide_folder, tmp_path):
    """Masks layout at 1 um/px (level 0 read and halved): each format gives the same files, and each
    class's mask pixels over all patches are its polygon's area at that scale, up to the pixels
    its outline crosses."""
    outputs = []
    for name, text in (
        ("cmu.geojson", _qupath(SHAPES)),
        ("cmu.xml", _aperio(SHAPES)),
        ("cmu.xml", _asap(SHAPES)),
    ):
        annotations = tmp_path / f"annotations_{len(outputs)}"
        annotations.mkdir()
        (annotations / name).write_text(text)
        out = tmp_path / f"out_{len(outputs)}"
        result = make_patch_dataset([str(slide_folder / "cmu.svs")], annotations, out, mpp=1.0, patch_size=64,
                                    layout="masks", min_coverage=1e-6)  # fmt: skip
        assert result.bad == [] and result.class_names == [
            "background",
            "necrosis",
            "stroma",
            "tumor",
        ]
        outputs.append(out)
    rows = [_rows(out / "dataset.csv") for out in outputs]
    assert (
        rows[0] == rows[1] == rows[2] and len(rows[0]) == 16 + 8 + 9
    )  # the triangle meets 4, 3, 2 cells by row
    totals = np.zeros(4, np.int64)
    for row in rows[0]:
        masks = [np.asarray(Image.open(out / row["mask"])) for out in outputs]
        assert masks[0].shape == (64, 64) and all(np.array_equal(masks[0], m) for m in masks[1:])
        images = [np.asarray(Image.open(out / row["image"])) for out in outputs]
        assert all(np.array_equal(images[0], i) for i in images[1:])
        totals += np.bincount(masks[0].ravel(), minlength=4)
    downsample = 2.0  # 1 um/px read from 0.499 um/px: 128 level-0 px per 64 px patch
    for k, ring in ((3, TUMOR), (2, STROMA), (1, NECROSIS)):
        area, perimeter = _area_and_perimeter(ring)
        assert abs(totals[k] - area / downsample**2) <= perimeter / downsample / 2, (
            k,
            totals[k],
            area / 4,
        )
    assert (
        totals[3] == 512 * 512 / 4 and totals[2] == 512 * 256 / 4
    )  # square edges fall between pixel centres
    meta = json.loads((outputs[0] / "dataset.json").read_text())
    assert (meta["mpp"], meta["magnification"], meta["patch_size"], meta["layout"]) == (
        1.0,
        10.0,
        64,
        "masks",
    )
    assert (
        meta["counts"]["per_class"]["tumor"] == 16
        and meta["counts"]["per_slide"]["cmu"]["stroma"] == 8
    )
    dataset = load_task_dataset(outputs[2] / "dataset.csv", "segmentation", group_by="slide")
    assert (
        dataset.class_names == ("background", "necrosis", "stroma", "tumor") and len(dataset) == 33
    )
    assert (dataset.magnification, dataset.patch_size, set(dataset.groups)) == (10.0, 64, {"cmu"})


def test_class_folders_holes_patients_bad_files_and_reruns(slide_folder, slides_dir, tmp_path):
    from histokd.slides import SlideReader

    (slide_folder / "broken.svs").symlink_to(slides_dir / "broken.svs")
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / "cmu.geojson").write_text(_qupath(SHAPES, holes=[HOLE]))
    (annotations / "broken.geojson").write_text(_qupath(SHAPES))
    (annotations / "orphan.xml").write_text(_asap(SHAPES))
    patients = tmp_path / "patients.csv"
    patients.write_text("slide,patient\ncmu,P7\nbroken.svs,P8\n")
    out = tmp_path / "out"
    slides = sorted(str(p) for p in slide_folder.iterdir())
    result = make_patch_dataset(
        slides, annotations, out, mpp=0.5, patch_size=128, patients=patients
    )
    # the tumour square (16 cells of 128 px) less the hole's cell; the stroma rectangle's 8 cells
    assert (result.counts["tumor"], result.counts["stroma"], result.num_written) == (
        15,
        8,
        result.num_patches,
    )
    # of the 9 cells the triangle meets, 4 are at least half inside it (0.24 and 0.37 at its corners)
    assert sorted(p.name for p in (out / "necrosis").iterdir()) == [
        "cmu_1664_256.png", "cmu_1664_384.png", "cmu_1792_256.png", "cmu_1792_384.png"
    ]  # fmt: skip
    assert not any(out.glob("*/cmu_384_384.png"))  # the hole
    with SlideReader(slide_folder / "cmu.svs") as reader:
        expected = reader.read_region(256, 256, 128, mpp=0.5)
    assert np.array_equal(np.asarray(Image.open(out / "tumor" / "cmu_256_256.png")), expected)
    bad = {Path(r["file"]).name: r for r in _rows(out / "bad_files.csv")}
    assert set(bad) == {"broken.svs", "orphan.xml"} and bad["broken.svs"]["kind"] == "slide"
    assert bad["orphan.xml"]["reason"].startswith("no slide named orphan.*")
    dataset = load_task_dataset(out, "classification", group_by="patient")  # the folder: its CSV
    assert dataset.class_names == ("necrosis", "stroma", "tumor") and set(dataset.groups) == {"P7"}
    assert dataset.class_counts() == result.counts and (
        dataset.magnification,
        dataset.patch_size,
    ) == (20.0, 128)
    # a rerun reads nothing again; a missing patch is cut again
    before = (out / "dataset.csv").read_text()
    (out / "tumor" / "cmu_256_256.png").unlink()
    again = make_patch_dataset(slides, annotations, out, mpp=0.5, patch_size=128, patients=patients)
    assert again.num_written == 1 and (out / "dataset.csv").read_text() == before
    with pytest.raises(ValueError, match=r"holds a dataset cut with patch_size=128 \(now 64\)"):
        make_patch_dataset(
            slides, annotations, out, mpp=0.5, patch_size=64, stride=128, patients=patients
        )


def _job():
    spec = importlib.util.spec_from_file_location(
        "make_patch_dataset_job", REPO / "jobs" / "make_patch_dataset.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_job_cuts_image_mask_pairs_and_names_an_unknown_format(slide_folder, tmp_path, capsys):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / "cmu.xml").write_text(_aperio([SHAPES[0], SHAPES[2]]))
    out = tmp_path / "pairs"
    argv = [
        "--slides",
        str(slide_folder),
        "--annotations",
        str(annotations),
        "--patch-size",
        "256",
        "--layout",
        "masks",
    ]
    assert _job().main([*argv, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    # the tumour square's 4 cells; of the triangle's 4 cells only (1792, 256) is annotated over half
    # (0.55; the others 0.49, 0.05, 0.08)
    assert "slide 1/1 cmu: 5 patches (5 written, 0 on disk)" in printed
    assert "background 1, necrosis 1, tumor 4" in printed
    assert (out / "classes.txt").read_text() == "background\nnecrosis\ntumor\n"
    dataset = load_task_dataset(out / "dataset.csv", "segmentation")
    masks = {Path(m).name: np.asarray(Image.open(m)) for m in dataset.masks}
    assert sorted(masks) == sorted(
        [f"cmu_{x}_{y}.png" for x in (256, 512) for y in (256, 512)] + ["cmu_1792_256.png"]
    )
    assert all((m == 2).all() for name, m in masks.items() if name != "cmu_1792_256.png")
    assert np.bincount(masks["cmu_1792_256.png"].ravel(), minlength=3)[1] / 256**2 == pytest.approx(
        0.552, abs=1e-3
    )
    (annotations / "cmu.xml").write_text("<Slide><Region/></Slide>")
    assert _job().main([*argv, "--output", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err
    assert (
        "error: no patches cut from 1 slide(s) (cmu.xml: XML with root element <Slide> is in no known format"
        in error
    )
