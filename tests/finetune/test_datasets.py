"""Reading the dataset layouts of docs/datasets.md, and the images the model sees."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histokd.finetune.datasets import load_task_dataset
from histokd.finetune.samples import ImageSamples

TILES = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "tiles"


def _png(path: Path, size=(40, 30), value=0, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


def test_folder_per_class_finds_images_recursively(tmp_path):
    # BreakHis-like nesting under each class folder
    _png(tmp_path / "benign" / "SOB" / "adenosis" / "a.png")
    _png(tmp_path / "benign" / "b.tif")
    _png(tmp_path / "malignant" / "deep" / "c.jpg")
    (tmp_path / "malignant" / "notes.txt").write_text("not an image")
    data = load_task_dataset(tmp_path, "classification")
    assert data.class_names == ("benign", "malignant")
    assert sorted(zip([Path(p).name for p in data.images], data.labels, strict=True)) == [
        ("a.png", 0),
        ("b.tif", 0),
        ("c.jpg", 1),
    ]
    assert data.fixed is None and data.class_counts() == {"benign": 2, "malignant": 1}


def test_folder_with_split_folders(tmp_path):
    # CRC-like: a training and a test folder, each a folder per class
    _png(tmp_path / "train" / "ADI" / "1.png")
    _png(tmp_path / "train" / "TUM" / "2.png")
    _png(tmp_path / "test" / "TUM" / "3.png")
    data = load_task_dataset(tmp_path, "classification")
    assert data.class_names == ("ADI", "TUM")
    assert sorted(zip(data.fixed, data.labels, strict=True)) == [
        ("test", 1),
        ("train", 0),
        ("train", 1),
    ]


def test_csv_with_relative_paths_and_split(tmp_path):
    _png(tmp_path / "img" / "x.png")
    _png(tmp_path / "img" / "y.png")
    (tmp_path / "labels.csv").write_text(
        "path,label,split\nimg/x.png,FL,train\nimg/y.png,CLL,test\n"
    )
    data = load_task_dataset(tmp_path / "labels.csv", "classification")
    assert (
        data.class_names == ("CLL", "FL")
        and data.labels == [1, 0]
        and data.fixed == ["train", "test"]
    )


def test_csv_errors_name_the_line(tmp_path):
    (tmp_path / "a.csv").write_text("path,label\nmissing.png,FL\n")
    with pytest.raises(ValueError, match="line 2: path 'missing.png' does not exist"):
        load_task_dataset(tmp_path / "a.csv", "classification")
    (tmp_path / "b.csv").write_text("file,label\nx.png,FL\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['path'\]"):
        load_task_dataset(tmp_path / "b.csv", "classification")


def test_segmentation_pairs_with_class_names(tmp_path):
    _png(tmp_path / "images" / "g1.bmp", value=200)
    _png(tmp_path / "masks" / "g1.png", value=2, mode="L")
    (tmp_path / "classes.txt").write_text("background\nbenign gland\nmalignant gland\n")
    data = load_task_dataset(tmp_path, "segmentation")
    assert data.class_names == ("background", "benign gland", "malignant gland")
    assert [Path(m).name for m in data.masks] == ["g1.png"]


def test_segmentation_class_count_from_masks_and_missing_mask(tmp_path):
    _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "masks" / "a.png", value=3, mode="L")
    assert load_task_dataset(tmp_path, "segmentation").num_classes == 4
    _png(tmp_path / "images" / "b.png")
    with pytest.raises(ValueError, match="b.png has no mask"):
        load_task_dataset(tmp_path, "segmentation")


def test_empty_or_missing_folders(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        load_task_dataset(tmp_path / "nope", "classification")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_task_dataset(tmp_path, "classification")


def test_samples_resize_any_size_to_the_input(tmp_path):
    image = _png(tmp_path / "wide.png", size=(2048, 1536), value=90)  # BACH microscopy size
    mask = _png(tmp_path / "wide_mask.png", size=(2048, 1536), value=1, mode="L")
    classification = ImageSamples([str(image)], 48, labels=[2])
    x, y, i = classification[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.uint8 and int(y) == 2 and i == 0
    segmentation = ImageSamples([str(image)], 32, masks=[str(mask)], cache=True)
    x, y, _ = segmentation[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and set(y.unique().tolist()) == {1}
    assert len(segmentation._cache) == 1


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        ImageSamples([str(bad)], 32, labels=[0])[0]


def test_scale_from_dataset_json_and_the_images_common_side(tmp_path):
    for name in ("a", "b"):
        _png(tmp_path / name / "1.png", size=(40, 40))
    dataset = load_task_dataset(tmp_path, "classification")
    assert (dataset.magnification, dataset.patch_size, dataset.common_side()) == (None, None, 40)
    (tmp_path / "dataset.json").write_text('{"magnification": 20, "patch_size": 256}')
    dataset = load_task_dataset(tmp_path, "classification")
    assert (dataset.magnification, dataset.patch_size) == (20.0, 256)
    _png(tmp_path / "b" / "2.png", size=(40, 30))
    assert (
        load_task_dataset(tmp_path, "classification").common_side() is None
    )  # mixed sizes: unknown


@pytest.mark.parametrize(
    ("text", "message"),
    [("{", "not JSON"), ("[20]", "holds a list"), ('{"magnification": 0}', "magnification=0"),
     ('{"patch_size": 25.6}', "patch_size=25.6")],
)  # fmt: skip
def test_bad_dataset_json_names_the_file_and_value(tmp_path, text, message):
    _png(tmp_path / "a" / "1.png", size=(8, 8))
    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_task_dataset(tmp_path, "classification")
    assert "dataset.json" in str(info.value)


def _real_tiles(tmp_path: Path, n: int = 4) -> tuple[list[str], list[str]]:
    """Crops of a real H&E tile and masks marking one corner, as image and mask files."""
    tile = np.array(Image.open(TILES / "high-nuclei-score-level0.png").convert("RGB"))
    images, masks = [], []
    for i in range(n):
        images.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(tile[50 * i : 50 * i + 48, 40 * i : 40 * i + 48]).save(images[-1])
        mask = np.zeros((48, 48), np.uint8)
        mask[:6, : 10 + i] = 1
        masks.append(str(tmp_path / f"{i}_mask.png"))
        Image.fromarray(mask).save(masks[-1])
    return images, masks


def test_loader_and_device_augmentation_give_the_same_images_each_epoch(tmp_path):
    """augment_device cpu (in loader processes, EpochSampler) and device (the batch, by its
    indices) draw each sample's augmentation from (seed, epoch, index): the same images."""
    from torch.utils.data import DataLoader, SequentialSampler

    from histokd.augment import AUGMENTATIONS, Augmentation
    from histokd.finetune.samples import EpochSampler

    images, masks = _real_tiles(tmp_path)
    augmentation = Augmentation(tuple(AUGMENTATIONS))
    in_loader = ImageSamples(images, 48, masks=masks, augmentation=augmentation, seed=3)
    plain = ImageSamples(images, 48, masks=masks)
    sampler = EpochSampler(SequentialSampler(in_loader))
    loader = DataLoader(
        in_loader, batch_size=4, sampler=sampler, num_workers=1, persistent_workers=True
    )
    seen = []
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        ((cpu_images, cpu_masks, index),) = list(loader)
        x, y, _ = next(iter(DataLoader(plain, batch_size=4)))
        draws = augmentation.draw_per_sample(3, epoch, index.tolist())
        dev_images, dev_masks = augmentation(x, y, draws=draws)
        assert torch.equal(cpu_images, dev_images) and torch.equal(cpu_masks, dev_masks)
        assert not torch.equal(cpu_images, x)
        seen.append(cpu_images)
    assert not torch.equal(seen[0], seen[1])  # the loader process saw the new epoch


def test_stain_normalisation_is_applied_when_an_image_is_read(tmp_path):
    from histokd.stain import macenko_normalize, stain_normalization

    images, _ = _real_tiles(tmp_path, 2)
    record = stain_normalization("macenko")
    normalised = ImageSamples(images, 48, labels=[0, 1], stain=record, cache=True)
    plain = ImageSamples(images, 48, labels=[0, 1])
    for i in range(2):
        x = plain[i][0]
        assert torch.equal(normalised[i][0], macenko_normalize(x[None])[0])
        assert not torch.equal(normalised[i][0], x)


def _columns_png(path: Path, width: int, height: int, mode: str = "RGB") -> Path:
    """An image whose pixel value is 10 x its column (+1 for masks), to see where a crop starts."""
    row = (np.arange(width) * 10 if mode == "RGB" else np.arange(width) + 1).astype(np.uint8)
    plane = np.tile(row, (height, 1))
    array = np.stack([plane] * 3, -1) if mode == "RGB" else plane
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_resize_modes_make_a_non_square_image_square(tmp_path):
    image = _columns_png(tmp_path / "wide.png", 8, 4)  # 8 wide, 4 high
    mask = _columns_png(tmp_path / "wide_mask.png", 8, 4, mode="L")

    def read(resize: str, size: int):
        x, y, _ = ImageSamples(
            [str(image)], size, masks=[str(mask)], resize=resize, ignore_index=200
        )[0]
        return x[0].numpy(), y.numpy()

    x, y = read("center-crop", 4)  # the centred 4 x 4: columns 2..5, no resampling
    assert (x == [20, 30, 40, 50]).all() and (y == [3, 4, 5, 6]).all()
    x, y = read("pad", 8)  # 8 x 8: two white (ignored) rows above and below
    assert (x[:2] == 255).all() and (x[6:] == 255).all() and (x[2:6] == np.arange(8) * 10).all()
    assert (y[:2] == 200).all() and (y[6:] == 200).all() and (y[2:6] == np.arange(1, 9)).all()
    x, y = read("squash", 8)  # stretched: every row is the original row
    assert (x == np.arange(8) * 10).all() and (y == np.arange(1, 9)).all()
    with pytest.raises(ValueError, match="resize='stretch': allowed: squash, center-crop, pad"):
        ImageSamples([str(image)], 8, labels=[0], resize="stretch")


def test_mixed_sizes_are_reported_with_the_resize_mode(tmp_path):
    from histokd.finetune.config import FinetuneConfig
    from histokd.finetune.job import image_sizes

    _png(tmp_path / "a" / "1.png", size=(480, 640))
    _png(tmp_path / "a" / "2.png", size=(1000, 1000))
    _png(tmp_path / "b" / "3.png", size=(700, 460))
    dataset = load_task_dataset(tmp_path, "classification")
    assert dataset.size_range() == ((480, 640), (1000, 1000))  # by area: 307,200 < 322,000
    config = FinetuneConfig(data=str(tmp_path), storage_path=str(tmp_path / "runs"), resize="pad")
    assert image_sizes(config, dataset) == "of mixed sizes: 480x640 to 1000x1000 px (resize: pad)"
    _png(tmp_path / "b" / "3.png", size=(1200, 100))
    dataset = load_task_dataset(tmp_path, "classification")
    assert image_sizes(config, dataset) == "of mixed sizes: 1200x100 to 1000x1000 px (resize: pad)"
    assert (
        image_sizes(FinetuneConfig(storage_path=str(tmp_path), patch_size=224), dataset) == "224 px"
    )
    with pytest.raises(ValueError, match="resize='crop': allowed: squash, center-crop, pad"):
        FinetuneConfig(storage_path=str(tmp_path), resize="crop")


def test_csv_group_column(tmp_path):
    for name in ("a", "b", "c"):
        _png(tmp_path / f"{name}.png")
    (tmp_path / "labels.csv").write_text(
        "path,label,patient\na.png,benign,P1\nb.png,malignant,P1\nc.png,benign,P2\n"
    )
    data = load_task_dataset(tmp_path / "labels.csv", "classification", group_by="patient")
    assert data.groups == ["P1", "P1", "P2"] and data.fixed is None
    assert data.take([2, 0]).groups == ["P2", "P1"]
    assert load_task_dataset(tmp_path / "labels.csv", "classification").groups is None
    with pytest.raises(
        ValueError,
        match=r"group_by='slide': .*labels.csv has no such column; its columns: path, label, patient",
    ):
        load_task_dataset(tmp_path / "labels.csv", "classification", group_by="slide")
    (tmp_path / "gap.csv").write_text("path,label,patient\na.png,benign,P1\nb.png,benign, \n")
    with pytest.raises(ValueError, match=r"gap.csv: line 3: empty 'patient'"):
        load_task_dataset(tmp_path / "gap.csv", "classification", group_by="patient")
    with pytest.raises(ValueError, match="only a CSV dataset has group columns"):
        load_task_dataset(tmp_path, "classification", group_by="patient")
