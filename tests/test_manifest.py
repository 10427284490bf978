"""Building the patch manifest over many slides, on a real local Ray."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from histokd.manifest import (
    ManifestConfig,
    ManifestError,
    PatchReader,
    build_manifest,
    discover_slides,
    read_manifest,
    scan_slide,
)
from histokd.slides import SlideError

PURPLE = (150, 80, 140)
FAINT_STAIN = (240, 212, 242)  # grey 231: tissue on the thumbnail (max_gray 235), hue 296
DARK_STAIN = (60, 20, 60)  # grey 47: tissue on the thumbnail, under the rule's 50
# Level-0 corners of the 10x grid cells (256 px) of each square of _tissue_slide.
FAINT_CELLS = {(0, 0), (256, 0), (0, 256), (256, 256)}
DARK_CELLS = {(1536, 1536), (1792, 1536), (1536, 1792), (1792, 1792)}


def _tissue_slide(tiled_tiff, name: str, seed: int, size: int = 2048):
    """White glass with a purple tissue disc, one nearly-white-but-stained square and one
    dark-stained square, both outside the disc.

    The nearly-white square is bright glass (255) with faint-stain stripes over 96 of each
    cell's 256 px: 37.5 % of its thumbnail pixels are tissue (over min_tissue_fraction 0.35),
    so its cells are candidates, yet their mean intensity is about 246, over RCKD's 245. The
    dark square (mean about 47, under 50) is all tissue on the thumbnail too. Only the mean
    rule keeps their 2x2 cells each (FAINT_CELLS, DARK_CELLS at 10x, 128 px) out of a manifest.
    """
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 242, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.35) ** 2
    image[disc] = PURPLE
    image[disc] = np.clip(
        image[disc].astype(int) + rng.integers(-20, 20, (int(disc.sum()), 3)), 0, 255
    )
    image[:512, :512] = 255
    for x0 in (0, 256):
        image[:512, x0 : x0 + 96] = FAINT_STAIN
    image[1536:, 1536:] = DARK_STAIN
    return tiled_tiff(name, image, mpp=0.5, levels=3)


@pytest.fixture
def slide_set(tmp_path, slides_dir, tiled_tiff):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ["cmu-1-small-region.svs", "broken.svs", "unopenable.tiff", "kidney-48-5.tif"]:
        shutil.copy(slides_dir / name, folder / name)
    (folder / "a.tiff").write_bytes(_tissue_slide(tiled_tiff, "a.tiff", 1).read_bytes())
    (folder / "b.tiff").write_bytes(_tissue_slide(tiled_tiff, "b.tiff", 2).read_bytes())
    (folder / "glass.tiff").write_bytes(
        tiled_tiff("glass.tiff", np.full((1024, 1024, 3), 245, np.uint8), mpp=0.5).read_bytes()
    )
    return folder


CONFIG = ManifestConfig(magnification=10, patch_size=128, num_patches=40, seed=7)


def test_build_on_ray_skips_and_reports_bad_slides(ray_cluster, slide_set, tmp_path):
    result = build_manifest(slide_set, tmp_path / "m", CONFIG)
    assert not result.reused
    assert result.num_slides == 7
    table = read_manifest(result.manifest_path).to_pandas()
    assert len(table) == 40 == result.num_patches
    assert table.patch_id.is_unique
    assert list(table.sample_index) == list(range(40))
    assert set(table.slide_path.map(lambda p: p.rsplit("/", 1)[1])) <= {
        "a.tiff",
        "b.tiff",
        "cmu-1-small-region.svs",
    }
    assert table.mean_intensity.between(50, 245).all()
    assert (table.extent == 256).all() and (table.patch_size == 128).all()
    # Every patch lies on the grid and inside its slide.
    assert (table.x % 256 == 0).all() and (table.y % 256 == 0).all()

    rows = _bad_slides(result.bad_slides_path)
    assert {row["status"] for row in rows.values()} == {"skipped"}
    assert result.num_bad_slides == 4 and result.num_partial_slides == 0
    bad = {name: row["reason"] for name, row in rows.items()}
    assert set(bad) == {"broken.svs", "unopenable.tiff", "kidney-48-5.tif", "glass.tiff"}
    assert "no tissue" in bad["glass.tiff"]
    assert "not a slide format OpenSlide reads" in bad["broken.svs"]
    assert all(name in reason for name, reason in bad.items())

    # A manifest row reads back as the patch it describes.
    reader = PatchReader()
    row = table.iloc[0].to_dict()
    patch = reader.read(row)
    assert patch.shape == (128, 128, 3)
    assert float(patch.mean()) == pytest.approx(row["mean_intensity"], abs=0.01)


def test_seeded_reproducible_and_reused(ray_cluster, slide_set, tmp_path):
    first = build_manifest(slide_set, tmp_path / "one", CONFIG)
    again = build_manifest(slide_set, tmp_path / "one", CONFIG)
    assert again.reused
    local = build_manifest(slide_set, tmp_path / "two", CONFIG, use_ray=False)
    ids = read_manifest(first.manifest_path).column("patch_id").to_pylist()
    assert read_manifest(local.manifest_path).column("patch_id").to_pylist() == ids
    other = build_manifest(
        slide_set,
        tmp_path / "three",
        ManifestConfig(magnification=10, patch_size=128, num_patches=40, seed=8),
        use_ray=False,
    )
    assert read_manifest(other.manifest_path).column("patch_id").to_pylist() != ids
    # Changing the settings rebuilds rather than reusing a stale manifest.
    bigger = build_manifest(
        slide_set,
        tmp_path / "one",
        ManifestConfig(magnification=10, patch_size=128, num_patches=50, seed=7),
    )
    assert not bigger.reused and bigger.num_patches == 50
    assert pq.read_metadata(bigger.manifest_path).num_rows == 50


def test_all_patches_when_num_patches_is_none(slide_set, tmp_path):
    config = ManifestConfig(magnification=10, patch_size=128, num_patches=None)
    result = build_manifest([slide_set / "a.tiff"], tmp_path / "m", config, use_ray=False)
    scan = scan_slide(str(slide_set / "a.tiff"), config)
    # a.tiff is 1024x1024 at 10x: 64 grid cells, the disc covers about 38 % of them, and the
    # two stained squares 4 cells each.
    assert scan.grid_cells == 64
    candidates = set(zip(scan.xs.tolist(), scan.ys.tolist(), strict=True))
    assert FAINT_CELLS | DARK_CELLS <= candidates  # the thumbnail mask calls them tissue
    # RCKD's mean rule drops exactly the squares' cells; every disc cell passes it.
    table = read_manifest(result.manifest_path).to_pandas()
    kept = set(zip(table.x, table.y, strict=True))
    assert kept == candidates - FAINT_CELLS - DARK_CELLS
    assert 16 <= result.num_patches == len(candidates) - 8 <= 32
    assert table.mean_intensity.between(50, 245).all()


def test_mean_rule_bounds_in_the_manifest(tiled_tiff, tmp_path):
    """RCKD Sec. 2.1.1's [50, 245], bounds included, decides alone: with no tissue-fraction
    threshold every cell of a slide of flat grey cells is a candidate."""
    greys = [0, 49, 50, 51, 128, 244, 245, 246, 255]
    image = np.zeros((256, 256 * len(greys), 3), np.uint8)
    for i, grey in enumerate(greys):
        image[:, 256 * i : 256 * (i + 1)] = grey
    # Lossless and read at level 0 (20x, full resolution): each cell's mean is its grey exactly.
    slide = tiled_tiff("greys.tiff", image, mpp=0.5, compression="deflate")
    config = ManifestConfig(magnification=20, patch_size=256, num_patches=None, rule_size=None,
                            tissue={"min_tissue_fraction": 0.0})  # fmt: skip
    result = build_manifest([slide], tmp_path / "m", config, use_ray=False)
    assert result.summary["num_candidates"] == len(greys)
    table = read_manifest(result.manifest_path).to_pandas().sort_values("x")
    assert table.x.tolist() == [256 * greys.index(g) for g in (50, 51, 128, 244, 245)]
    assert table.mean_intensity.tolist() == [50.0, 51.0, 128.0, 244.0, 245.0]


def test_every_slide_bad_fails_with_summary(slides_dir, tmp_path):
    with pytest.raises(ManifestError) as err:
        build_manifest(
            [slides_dir / "broken.svs", slides_dir / "unopenable.tiff", tmp_path / "missing.svs"],
            tmp_path / "m", CONFIG, use_ray=False,
        )  # fmt: skip
    message = str(err.value)
    assert "no usable patches in 3 slides; 3 bad" in message
    assert "missing.svs: file not found" in message and "broken.svs" in message
    assert (tmp_path / "m" / "bad_slides.csv").exists()


def _bad_slides(path) -> dict[str, dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    columns = ["slide_path", "stage", "reason", "status", "unreadable_patches", "tried_patches"]
    assert rows == [] or list(rows[0]) == columns
    return {row["slide_path"].rsplit("/", 1)[1]: row for row in rows}


def _corrupt_tiles(path, tiles) -> None:
    """Overwrite level-0 tiles of a tiled TIFF with zeros: OpenSlide then fails to decode them."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        spans = [(page.dataoffsets[t], page.databytecounts[t]) for t in tiles]
    with open(path, "r+b") as f:
        for offset, count in spans:
            f.seek(offset)
            f.write(b"\0" * count)


def test_unreadable_tiles_are_reported(slides_dir, tiled_tiff, tmp_path):
    config = ManifestConfig(
        magnification=20, patch_size=16, num_patches=None, tissue={"min_tissue_fraction": 0.0}
    )
    with pytest.raises(ManifestError, match="unreadable.svs: tiles cannot be read"):
        build_manifest([slides_dir / "unreadable.svs"], tmp_path / "m", config, use_ray=False)
    (row,) = _bad_slides(tmp_path / "m" / "bad_slides.csv").values()
    assert (row["stage"], row["status"], row["unreadable_patches"]) == (
        "scan",
        "skipped",
        "",
    )  # its thumbnail fails
    assert "unreadable.svs: tiles cannot be read" in row["reason"]

    # Tissue everywhere, 4x4 patches of 256 px at 20x, each one level-0 tile; the thumbnail
    # reads level 2, so only the patches' own tiles fail. One tile bad: the slide is used in
    # part and listed as partial. Every level-0 tile bad: skipped, as a read failure.
    rng = np.random.default_rng(0)
    image = np.clip(np.array(PURPLE) + rng.integers(-20, 20, (1024, 1024, 3)), 0, 255).astype(
        np.uint8
    )
    some, dead = (
        tiled_tiff("some.tiff", image, mpp=0.5, levels=3),
        tiled_tiff("dead.tiff", image, mpp=0.5, levels=3),
    )
    _corrupt_tiles(some, [5])  # x=256, y=256
    _corrupt_tiles(dead, range(16))
    config = ManifestConfig(magnification=20, patch_size=256, num_patches=None, rule_size=None)
    result = build_manifest([some, dead], tmp_path / "m2", config, use_ray=False)
    rows = _bad_slides(result.bad_slides_path)
    assert set(rows) == {"some.tiff", "dead.tiff"}
    assert {k: rows["some.tiff"][k] for k in ("stage", "status", "unreadable_patches", "tried_patches")} == {
        "stage": "read", "status": "partial", "unreadable_patches": "1", "tried_patches": "16"
    }  # fmt: skip
    assert "some.tiff: tiles cannot be read at x=256, y=256" in rows["some.tiff"]["reason"]
    assert {k: rows["dead.tiff"][k] for k in ("stage", "status", "unreadable_patches", "tried_patches")} == {
        "stage": "read", "status": "skipped", "unreadable_patches": "16", "tried_patches": "16"
    }  # fmt: skip
    assert (result.num_bad_slides, result.num_partial_slides, result.num_patches) == (1, 1, 15)
    summary = result.summary
    assert (
        summary["num_bad_slides"],
        summary["num_partial_slides"],
        summary["num_slides_used"],
    ) == (1, 1, 1)
    assert summary["num_unreadable_patches"] == 17
    table = read_manifest(result.manifest_path).to_pandas()
    assert set(table.slide_path) == {str(some)} and "256_256" not in {
        p.rsplit("/", 1)[1] for p in table.patch_id
    }
    again = build_manifest([some, dead], tmp_path / "m2", config, use_ray=False)
    assert again.reused and (again.num_bad_slides, again.num_partial_slides) == (1, 1)


def test_patch_larger_than_slide(slides_dir):
    with pytest.raises(
        SlideError,
        match=r"small.svs: patch of 1024 px at 20x covers 1024 level-0 px, larger than the slide \(16x16",
    ):
        scan_slide(str(slides_dir / "small.svs"), ManifestConfig())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"patch_size": 0}, "patch_size=0"),
        ({"magnification": -5}, "magnification=-5"),
        ({"num_patches": -1}, "num_patches=-1"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ManifestConfig(**kwargs)


def test_rule_at_rule_size_matches_full_resolution(slides_dir):
    """The mean-intensity rule read at 128 px gives the full-resolution mean within a grey level."""
    from histokd.slides import SlideReader

    for name, base in [("cmu-1-small-region.svs", None), ("tcga-cr-7395-01a-01-ts1.svs", 40.0)]:
        with SlideReader(slides_dir / name, base) as r:
            extent = round(512 * r.info.base_magnification / 20)
            for x, y in [(0, 0), (extent, extent), (2 * extent, extent)]:
                full = r.read_region(x, y, 512, 20).mean()
                low = r.read_region(x, y, 128, 20 * 128 / 512).mean()
                assert abs(full - low) < 1.0, (name, x, y, full, low)


def test_discover_slides_sorted_deduplicated_and_skips_demo_truth(demo_slides_dir, tmp_path):
    listed = tmp_path / "slides.txt"
    first = demo_slides_dir / "demo-s0-000.svs"
    listed.write_text(f"# a comment\n{first}\n\n{first}\n")
    found = discover_slides([demo_slides_dir, listed])
    # the demo's .nuclei.tif / .regions.tif masks sit beside a .json and are not slides
    assert [p.rsplit("/", 1)[1] for p in found] == ["demo-s0-000.svs", "demo-s0-001.svs"]
    # a .tif with the same suffix but no demo sidecar is a slide like any other
    (tmp_path / "x.nuclei.tif").write_bytes(b"")
    assert discover_slides(tmp_path) == [str(tmp_path / "x.nuclei.tif")]
