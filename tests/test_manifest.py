"""Building the patch manifest over many slides, on a real local Ray."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

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
    # Physical scale is exact: 1 um/px is 2 px of the 0.5 um/px slides, 2.004 of cmu's 0.499.
    cmu = table.slide_path.str.endswith("cmu-1-small-region.svs")
    assert (table.extent[~cmu] == 256).all() and (table.extent[cmu] == 257).all()
    assert (table.extent_y == table.extent).all() and (table.patch_size == 128).all()
    assert np.allclose(table.mpp[~cmu], 1.0) and np.allclose(table.mpp[cmu], 0.499 * 257 / 128)
    assert (table.base_mpp_x[cmu] == 0.499).all() and (table.mpp_source == "openslide-mpp").all()
    # Every patch lies on the grid and inside its slide.
    assert (table.x % table.extent == 0).all() and (table.y % table.extent == 0).all()

    rows = _bad_slides(result.bad_slides_path)
    assert {row["status"] for row in rows.values()} == {"skipped"}
    assert result.num_bad_slides == 4 and result.num_partial_slides == 0
    bad = {name: row["reason"] for name, row in rows.items()}
    assert set(bad) == {"broken.svs", "unopenable.tiff", "kidney-48-5.tif", "glass.tiff"}
    assert "no tissue" in bad["glass.tiff"]
    assert "not a slide format OpenSlide reads" in bad["broken.svs"]
    # a plain strip TIFF now opens as an image, but records no pixel size
    assert "pixel size and base magnification unknown" in bad["kidney-48-5.tif"]
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
        match=r"small.svs: patch of 1024 px at 0.5 um/px \(20x\) covers 1024x1024 level-0 px, "
        r"larger than the slide \(16x16",
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


# -- physical units, plain images, balanced sampling -----------------------------------------
def test_slide_quotas_by_hand():
    from histokd.manifest import slide_quotas

    candidates, area = np.array([100, 10, 50]), np.array([6.0, 1.0, 3.0])
    assert slide_quotas(candidates, area, 20, "uniform").tolist() == [100, 10, 50]
    assert slide_quotas(candidates, area, 20, "capped", 8).tolist() == [8, 8, 8]
    assert slide_quotas(candidates, area, 20, "proportional").tolist() == [12, 2, 6]
    # capped at 8: slide 0 fills up, its 4 go 1:3 to the others; slide 2 then fills up too
    assert slide_quotas(candidates, area, 20, "proportional", 8).tolist() == [8, 4, 8]
    # a slide with fewer candidates than its share gives the rest away
    assert slide_quotas(np.array([1, 10, 10]), np.ones(3), 7, "proportional").tolist() == [1, 3, 3]
    # rounding: largest remainders (2 x 3/6 = 1, 2 x 2/6 = 0.67, 2 x 1/6 = 0.33)
    assert slide_quotas(np.full(3, 10), np.array([3.0, 2, 1]), 2, "proportional").tolist() == [
        1,
        1,
        0,
    ]


def _disc_slide(tiled_tiff, name: str, size: int, radius: float, seed: int):
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 242, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * radius) ** 2
    image[disc] = np.clip(np.array(PURPLE) + rng.integers(-20, 20, (int(disc.sum()), 3)), 0, 255)
    return tiled_tiff(name, image, mpp=0.5, levels=3)


def test_sampling_rules_cap_and_share_the_patches(tiled_tiff, tmp_path):
    """Three slides with 4x, 1x and a quarter of the tissue: uniform follows the tissue; capped
    and proportional keep the uniform order's first patches of each slide, under each quota."""
    from histokd.manifest import balance_line, slide_quotas

    slides = [_disc_slide(tiled_tiff, "big.tiff", 2048, 0.45, 1),
              _disc_slide(tiled_tiff, "mid.tiff", 1024, 0.45, 2),
              _disc_slide(tiled_tiff, "small.tiff", 512, 0.45, 3)]  # fmt: skip
    base = {"mpp": 2.0, "patch_size": 32, "seed": 3}  # 64 level-0 px a patch

    def build(name, **kwargs):
        result = build_manifest(
            slides, tmp_path / name, ManifestConfig(**base, **kwargs), use_ray=False
        )
        table = read_manifest(result.manifest_path).to_pandas()
        counts = table.slide_path.map(lambda p: p.rsplit("/", 1)[1]).value_counts().to_dict()
        assert result.summary["patches_per_slide"] == table.slide_path.value_counts().to_dict()
        return result, table, counts

    _, every, all_counts = build("all", num_patches=None)
    # tissue ~16:4:1; the small slide's 16 cells are mostly cut by its disc's edge
    assert (
        all_counts["big.tiff"] > 3 * all_counts["mid.tiff"] > 9 * all_counts["small.tiff"] >= 9 * 12
    )
    _, uniform, counts = build("uniform", num_patches=60)
    assert uniform.patch_id.tolist() == every.patch_id.tolist()[:60]  # the one seeded order
    line, lopsided = balance_line(uniform.slide_path.value_counts().to_dict())
    assert lopsided and f"max {counts['big.tiff']} over 3 slides" in line and "(big.tiff)" in line

    def expected(quota: dict[str, int], n: int) -> list[str]:
        """The rule, computed from the full uniform manifest: each slide's first `quota`
        patches in the seeded order, then the first n of those."""
        rank = every.groupby("slide_path").cumcount()
        name = every.slide_path.map(lambda p: p.rsplit("/", 1)[1])
        return every[rank < name.map(quota)].patch_id.tolist()[:n]

    capped, table, counts = build("capped", num_patches=60, max_patches_per_slide=25)
    assert capped.summary["sampling"] == "capped"
    assert max(counts.values()) == 25 and sum(counts.values()) == 60 and len(counts) == 3
    assert table.patch_id.tolist() == expected(
        {"big.tiff": 25, "mid.tiff": 25, "small.tiff": 25}, 60
    )
    assert not balance_line(capped.summary["patches_per_slide"])[1]

    scans = [scan_slide(str(p), ManifestConfig(**base)) for p in slides]
    areas = np.array([s.tissue_area_mm2 for s in scans])
    # tissue area: the discs' (radius 0.45 x side at 0.5 um/px), not the candidates' cells
    discs = [np.pi * (0.45 * side * 0.5e-3) ** 2 for side in (2048, 1024, 512)]
    assert areas.tolist() == pytest.approx(discs, rel=0.03)
    quota = slide_quotas(np.array([len(s.xs) for s in scans]), areas, 60, "proportional", 40)
    assert quota.sum() == 60 and quota[0] == 40  # 4/5.25 of 60 is 46: capped at 40
    proportional, table, counts = build(
        "prop", num_patches=60, sampling="proportional", max_patches_per_slide=40
    )
    names = ["big.tiff", "mid.tiff", "small.tiff"]
    assert counts == dict(zip(names, quota.tolist(), strict=True))
    assert table.patch_id.tolist() == expected(dict(zip(names, quota.tolist(), strict=True)), 60)
    assert list(table.sample_index) == list(range(60))


def test_manifest_records_units_and_sources(tiled_tiff, slides_dir, tmp_path):
    """Each slide's base um/px and its source, each patch's effective um/px and level-0
    height, with an anisotropic scan, an objective-only SVS and a plain TIFF assumed at 0.5."""
    import tifffile

    from histokd.slides import SlideReader

    from .test_slides import _smooth_tissue, _svs

    tissue = np.clip(_smooth_tissue(1024, seed=1).astype(int) // 2 + (100, 40, 90), 0, 255).astype(
        np.uint8
    )
    aniso = tmp_path / "aniso.tiff"
    tifffile.imwrite(aniso, np.repeat(tissue, 2, axis=1), tile=(256, 256), photometric="rgb",
                     compression="zlib", resolution=(1e4 / 0.25, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")  # fmt: skip
    objective = _svs(tmp_path / "objective.svs", tissue, app_mag=20)
    kidney = slides_dir / "kidney-48-5.tif"
    # 128 um patches at 1 um/px: 128 px
    # kidney-48-5.tif is nearly white (mean 252): no tissue rule, no upper mean bound
    config = ManifestConfig(mpp=1.0, patch_size_um=128, num_patches=None, assume_mpp=0.5,
                            tissue={"min_tissue_fraction": 0.0, "max_mean_intensity": 255})  # fmt: skip
    assert (config.patch_size, config.magnification) == (128, 10)
    result = build_manifest([aniso, objective, kidney], tmp_path / "m", config, use_ray=False)
    assert result.num_bad_slides == 0
    table = read_manifest(result.manifest_path).to_pandas()
    by_slide = table.groupby(table.slide_path.map(lambda p: p.rsplit("/", 1)[1]))
    got = {name: tuple(g[["base_mpp_x", "base_mpp_y", "mpp_source", "extent", "extent_y", "mpp"]].iloc[0])
           for name, g in by_slide}  # fmt: skip
    assert got["aniso.tiff"] == (
        pytest.approx(0.25),
        pytest.approx(0.5),
        "openslide-mpp",
        512,
        256,
        pytest.approx(1.0),
    )
    assert got["objective.svs"] == (0.5, 0.5, "objective-power", 256, 256, 1.0)
    assert got["kidney-48-5.tif"] == (0.5, 0.5, "user", 256, 256, 1.0)
    assert (table.base_magnification == 10 / table.base_mpp_x).all() and (
        table.magnification == 10
    ).all()
    assert (
        result.summary["num_slides_mpp_from_objective"],
        result.summary["num_slides_mpp_assumed"],
    ) == (1, 1)
    # aniso: 2048 x 1024 level-0 px in cells of 512 x 256: a 4 x 4 grid
    assert len(by_slide.get_group("aniso.tiff")) == 16
    reader = PatchReader()
    for name in ("aniso.tiff", "kidney-48-5.tif"):
        row = by_slide.get_group(name).iloc[0].to_dict()
        patch = reader.read(row)
        assert patch.shape == (128, 128, 3)
        assert float(patch.mean()) == pytest.approx(row["mean_intensity"], abs=0.01)
    row = by_slide.get_group("aniso.tiff").iloc[0]
    with SlideReader(aniso) as r:  # the same tissue as the isotropic source, at 1 um/px
        x, y = int(row.x) // 2, int(row.y)
        source = np.asarray(Image.fromarray(tissue[y : y + 256, x : x + 256]).reduce(2)).astype(int)
        assert np.abs(r.read_region(int(row.x), int(row.y), 128, mpp=1.0) - source).mean() < 2


def test_plain_image_tiles_as_slides(testdata, tmp_path):
    """A folder of PNG tiles: found, read at the assumed um/px; tiles smaller than a patch are
    listed in bad_slides.csv, one by one; a dataset's PNGs beside them are not slides."""
    folder = tmp_path / "tiles"
    names = ["tissue-level0-4302-10273-4814-10785.png", "tissue-level0-7352-11762-7864-12274.png",
             "liver-level2-10907-7808-11707-8608.png", "kidney-ihc-level0-350-530-360-540.png"]  # fmt: skip
    (folder / "sub").mkdir(parents=True)
    for name in names:
        shutil.copy(testdata / "tiles" / name, folder / "sub" / name)
    (folder / "patches" / "tumor").mkdir(parents=True)
    shutil.copy(testdata / "tiles" / names[0], folder / "patches" / "tumor" / "p.png")
    (folder / "patches" / "dataset.json").write_text("{}")
    found = discover_slides(folder)
    assert sorted(p.rsplit("/", 1)[1] for p in found) == sorted(names)
    config = ManifestConfig(mpp=0.5, patch_size=128, num_patches=None, assume_mpp=0.5)
    result = build_manifest(folder, tmp_path / "m", config, use_ray=False)
    rows = _bad_slides(result.bad_slides_path)
    assert set(rows) == set(names[2:]) and result.num_bad_slides == 2
    assert "larger than the slide (50x50 px" in rows[names[2]]["reason"]
    assert "larger than the slide (10x10 px" in rows[names[3]]["reason"]
    table = read_manifest(result.manifest_path).to_pandas()
    assert set(table.slide_path.map(lambda p: p.rsplit("/", 1)[1])) == set(names[:2])
    assert (table.mpp_source == "user").all() and (table.extent == 128).all()
    without = tmp_path / "m2"
    with pytest.raises(ManifestError, match="pixel size and base magnification unknown"):
        build_manifest(
            folder / "sub" / names[0],
            without,
            ManifestConfig(mpp=0.5, patch_size=128),
            use_ray=False,
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mpp": 0.25, "magnification": 20}, "mpp=0.25 and magnification=20 disagree: 20x is 0.5 um/px"),
        ({"patch_size": 256, "patch_size_um": 512}, "patch_size=256 and patch_size_um=512 disagree: 512 um at 0.5 um/px is 1024 px"),
        ({"patch_size_um": -1}, "patch_size_um=-1: must be positive"),
        ({"assume_mpp": 0.5, "base_magnification": 40}, "assume_mpp=0.5 and base_magnification=40 disagree"),
        ({"sampling": "capped"}, "sampling='capped' needs max_patches_per_slide"),
        ({"sampling": "uniform", "max_patches_per_slide": 5}, "max_patches_per_slide=5: not used by sampling='uniform'"),
        ({"sampling": "stratified"}, "sampling='stratified': allowed: uniform, capped, proportional"),
        ({"max_patches_per_slide": 0}, "max_patches_per_slide=0: must be a positive integer"),
    ],
)  # fmt: skip
def test_unit_and_sampling_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ManifestConfig(**kwargs)


def test_units_resolve_the_paper_way():
    paper = ManifestConfig()
    assert (paper.mpp, paper.magnification, paper.patch_size, paper.sampling) == (
        0.5,
        20,
        1024,
        "uniform",
    )
    assert ManifestConfig(patch_size_um=512).patch_size == 1024  # RCKD: 1024 px at 20x
    assert ManifestConfig(magnification=40, patch_size_um=512).patch_size == 2048
    assert ManifestConfig(base_magnification=40).assume_mpp == 0.25
    assert ManifestConfig(max_patches_per_slide=10).sampling == "capped"
