import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.data.segfixtures import (
    ADE20K_RAW,
    CAMVID_RAW,
    CITYSCAPES_LABEL_IDS,
    FIXTURE_SIZE,
    PASCAL_CONTEXT_RAW,
    VOC_RAW,
    make_ade20k,
    make_camvid,
    make_cityscapes,
    make_pascal_context,
    make_voc,
)

from anchorlearn.data.segmentation_sets import (
    SEGMENTATION_KINDS,
    SegmentationDataset,
    open_segmentation,
)

CAMVID = Path("/work/shared/data/CamVid")
MAKERS = {
    "ade20k": make_ade20k,
    "camvid": make_camvid,
    "cityscapes": make_cityscapes,
    "pascal_context": make_pascal_context,
    "voc": make_voc,
}
NUM_CLASSES = {"ade20k": 150, "cityscapes": 19, "pascal_context": 59, "voc": 21, "camvid": 11}
SPLIT_SIZES = {
    "ade20k": {"train": 4, "val": 2},
    "cityscapes": {"train": 4, "val": 2},
    "pascal_context": {"train": 4, "val": 2},
    "voc": {"train": 4, "val": 2, "trainval": 6},
    "camvid": {"train": 4, "val": 2, "test": 2},
}


def raw_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def expected_ids(raw: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Map pixel by pixel with a plain dict (independent of the lookup table)."""
    return np.vectorize(mapping.__getitem__, otypes=[np.int64])(raw)


def check_mapping(ds: SegmentationDataset, mapping: dict[int, int]) -> None:
    for i in range(len(ds)):
        raw = raw_mask(ds.files[i][1])
        image, mask = ds[i]
        assert set(np.unique(raw)) == set(mapping)  # the fixture holds every chosen value
        assert mask.dtype == np.int64 and mask.shape == FIXTURE_SIZE
        np.testing.assert_array_equal(mask, expected_ids(raw, mapping))
        assert image.dtype == np.uint8 and image.shape == (*FIXTURE_SIZE, 3)


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_every_layout_opens_with_its_classes_and_splits(tmp_path, kind):
    root = MAKERS[kind](tmp_path)
    for split, size in SPLIT_SIZES[kind].items():
        ds = open_segmentation(f"{kind}:{root}", split)
        assert (ds.name, ds.split, ds.root, len(ds)) == (kind, split, root, size)
        assert ds.num_classes == len(ds.class_names) == NUM_CLASSES[kind]
        assert len(set(ds.class_names)) == ds.num_classes
        assert ds.palette.shape == (ds.num_classes, 3) and ds.palette.dtype == np.uint8
        assert ds.ignore_index == 255
        assert ds.label_map.shape == (256,) and ds.label_map.dtype == np.int64
        assert all(image.is_file() and ann.is_file() for image, ann in ds.files)
        assert ds.image_path(0) == ds.files[0][0]
        np.testing.assert_array_equal(ds.read_mask(0), ds[0][1])
        np.testing.assert_array_equal(ds.read_image(-1), ds[len(ds) - 1][0])


@pytest.mark.parametrize(
    ("kind", "nests"),
    [
        ("ade20k", 1),
        ("cityscapes", 1),
        ("camvid", 1),
        ("pascal_context", 2),
        ("voc", 2),
    ],
)
def test_root_may_be_the_folder_or_its_usual_parents(tmp_path, kind, nests):
    root = MAKERS[kind](tmp_path / "data")
    for up in range(nests + 1):
        folder = root.parents[up - 1] if up else root
        assert open_segmentation(f"{kind}:{folder}", "train").root == root


def test_ade20k_maps_zero_to_ignore_and_shifts_the_rest(tmp_path):
    ds = open_segmentation(f"ade20k:{make_ade20k(tmp_path)}", "train")
    assert ADE20K_RAW == (0, 1, 2, 5, 13, 150)
    check_mapping(ds, {0: 255, 1: 0, 2: 1, 5: 4, 13: 12, 150: 149})
    assert ds.class_names[:5] == ["wall", "building", "sky", "floor", "tree"]
    assert ds.class_names[-1] == "flag" and ds.class_names[7] == "bed"
    assert ds.files[0][0].suffix == ".jpg" and ds.files[0][1].parent.name == "training"


def test_cityscapes_label_ids_use_the_official_train_ids(tmp_path):
    ds = open_segmentation(f"cityscapes:{make_cityscapes(tmp_path, train_ids=False)}", "val")
    assert CITYSCAPES_LABEL_IDS == (0, 7, 8, 11, 21, 23, 24, 26, 33)
    # road, sidewalk, building, vegetation, sky, person, car, bicycle; unlabeled -> ignore
    check_mapping(ds, {0: 255, 7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18})
    assert all(ann.name.endswith("_gtFine_labelIds.png") for _, ann in ds.files)
    ignored = [i for i in range(34) if i not in (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23)]
    ignored = [i for i in ignored if i not in range(24, 29) and i not in (31, 32, 33)]
    assert (ds.label_map[ignored] == 255).all() and len(ignored) == 34 - 19
    assert ds.class_names[0] == "road" and ds.class_names[13] == "car"
    assert ds.class_names[18] == "bicycle"
    assert ds.palette[0].tolist() == [128, 64, 128]


def test_cityscapes_prefers_label_train_ids(tmp_path):
    root = make_cityscapes(tmp_path, train_ids=True)
    ds = open_segmentation(f"cityscapes:{root}", "train")
    assert all(ann.name.endswith("_gtFine_labelTrainIds.png") for _, ann in ds.files)
    np.testing.assert_array_equal(ds.label_map[:19], np.arange(19))
    assert (ds.label_map[19:] == 255).all()
    # the trainIds file is what is read: overwrite one and see it
    path = ds.files[0][1]
    Image.fromarray(np.full(FIXTURE_SIZE, 5, np.uint8)).save(path)
    np.testing.assert_array_equal(ds[0][1], np.full(FIXTURE_SIZE, 5))
    # a labelIds value (26, car) in a trainIds file is refused
    Image.fromarray(np.full(FIXTURE_SIZE, 26, np.uint8)).save(path)
    with pytest.raises(ValueError, match=rf"{path}: annotation value 26 .*\(expected 0..18 or 255"):
        ds[0]


def test_cityscapes_falls_back_to_label_ids_unless_every_image_has_train_ids(tmp_path):
    root = make_cityscapes(tmp_path, train_ids=True)
    next(root.glob("gtFine/train/*/*_labelTrainIds.png")).unlink()
    ds = open_segmentation(f"cityscapes:{root}", "train")
    assert all(ann.name.endswith("_gtFine_labelIds.png") for _, ann in ds.files)
    assert ds.label_map[26] == 13
    missing = next(root.glob("gtFine/train/*/*_labelIds.png"))
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=rf"has no annotation: expected {missing}"):
        open_segmentation(f"cityscapes:{root}", "train")


def test_pascal_context_maps_background_to_ignore(tmp_path):
    ds = open_segmentation(f"pascal_context:{make_pascal_context(tmp_path)}", "val")
    assert PASCAL_CONTEXT_RAW == (0, 1, 15, 30, 59)
    check_mapping(ds, {0: 255, 1: 0, 15: 14, 30: 29, 59: 58})
    assert ds.class_names[0] == "aeroplane" and ds.class_names[58] == "wood"
    assert ds.class_names[36] == "person"


def test_voc_reads_palette_indices_and_keeps_255(tmp_path):
    root = make_voc(tmp_path)
    ds = open_segmentation(f"voc:{root}", "train")
    assert Image.open(ds.files[0][1]).mode == "P"
    assert VOC_RAW == (0, 1, 15, 20, 255)
    check_mapping(ds, {0: 0, 1: 1, 15: 15, 20: 20, 255: 255})
    assert ds.class_names[0] == "background" and ds.class_names[15] == "person"
    assert ds.palette[:3].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert ds.palette[15].tolist() == [192, 128, 128]


def test_voc_train_aug(tmp_path):
    root = make_voc(tmp_path, aug=True)
    ds = open_segmentation(f"voc:{root}", "train_aug")
    assert len(ds) == 6
    assert all(ann.parent.name == "SegmentationClassAug" for _, ann in ds.files)
    check_mapping(ds, {v: v for v in VOC_RAW})
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train_aug.txt").rename(lists / "aug.txt")
    assert len(open_segmentation(f"voc:{root}", "train_aug")) == 6
    (lists / "aug.txt").write_text(
        "/JPEGImages/2011_000000.jpg /SegmentationClassAug/2011_000000.png\n\n"
    )
    assert open_segmentation(f"voc:{root}", "train_aug").files == [
        (root / "JPEGImages" / "2011_000000.jpg", root / "SegmentationClassAug/2011_000000.png")
    ]


def test_voc_train_aug_missing_says_what_is_expected(tmp_path):
    root = make_voc(tmp_path, aug=False)
    expected = (
        rf"voc split 'train_aug' needs the SBD augmentation: expected folder "
        rf"{root / 'SegmentationClassAug'} and list "
        rf"{root / 'ImageSets/Segmentation/train_aug.txt'} \(or .*aug.txt\)"
    )
    with pytest.raises(FileNotFoundError, match=expected):
        open_segmentation(f"voc:{root}", "train_aug")


def test_camvid_maps_unlabelled_to_ignore_and_uses_the_lists(tmp_path):
    root = make_camvid(tmp_path)
    ds = open_segmentation(f"camvid:{root}", "test")
    assert CAMVID_RAW == (0, 1, 3, 4, 8, 11)
    check_mapping(ds, {0: 0, 1: 1, 3: 3, 4: 4, 8: 8, 11: 255})
    assert ds.class_names == [
        "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
        "pedestrian", "bicyclist",
    ]  # fmt: skip
    # the list decides which pairs (and their order) when present ...
    lines = (root / "train.txt").read_text().splitlines()
    (root / "train.txt").write_text(f"{lines[2]}\n{lines[0]}\n")
    ds = open_segmentation(f"camvid:{root}", "train")
    names = [line.split()[0].rsplit("/", 1)[1] for line in (lines[2], lines[0])]
    assert [image.name for image, _ in ds.files] == names
    assert ds.files[0] == (root / "train" / names[0], root / "trainannot" / names[0])
    # ... else the folder listing
    (root / "train.txt").unlink()
    assert len(open_segmentation(f"camvid:{root}", "train")) == 4


def test_images_are_converted_to_rgb(tmp_path):
    root = make_camvid(tmp_path)
    ds = open_segmentation(f"camvid:{root}", "val")
    grey = np.arange(FIXTURE_SIZE[0] * FIXTURE_SIZE[1], dtype=np.uint8).reshape(FIXTURE_SIZE)
    Image.fromarray(grey).save(ds.files[0][0])
    image = ds[0][0]
    assert image.shape == (*FIXTURE_SIZE, 3)
    np.testing.assert_array_equal(image, np.repeat(grey[..., None], 3, axis=2))
    rgba = np.dstack([np.full(FIXTURE_SIZE, c, np.uint8) for c in (10, 20, 30, 40)])
    Image.fromarray(rgba).save(ds.files[1][0])
    np.testing.assert_array_equal(ds[1][0], rgba[..., :3])


def test_dataset_pickles_for_loader_workers(tmp_path):
    import torch

    ds = open_segmentation(f"camvid:{make_camvid(tmp_path)}", "train")
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy[1][1], ds[1][1])
    images, masks = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert images.shape == (2, *FIXTURE_SIZE, 3) and masks.dtype == torch.int64


def test_importing_the_data_package_stays_light():
    code = (
        "import sys, anchorlearn.data as d; assert 'torch' not in sys.modules; "
        "assert d.open_segmentation.__module__ == 'anchorlearn.data.segmentation_sets'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------
# errors


def test_unknown_kind_and_missing_root(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"KIND one of ade20k, camvid, cityscapes, pascal_context, voc, got 'cifar:/x'",
    ):
        open_segmentation("cifar:/x", "train")
    assert SEGMENTATION_KINDS == ("ade20k", "camvid", "cityscapes", "pascal_context", "voc")
    with pytest.raises(ValueError, match=r"spec 'voc:' needs a data folder: voc:ROOT"):
        open_segmentation("voc:", "train")
    with pytest.raises(FileNotFoundError, match=rf"ade20k data folder not found: {tmp_path}/no"):
        open_segmentation(f"ade20k:{tmp_path / 'no'}", "train")
    with pytest.raises(TypeError, match="split must be a str, got int"):
        open_segmentation(f"ade20k:{tmp_path}", 0)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("ade20k", "{r}/images or {r}/ADEChallengeData2016/images"),
        ("cityscapes", "{r}/leftImg8bit or {r}/cityscapes/leftImg8bit"),
        ("pascal_context", "{r}/JPEGImages or {r}/VOC2010/JPEGImages or {r}/VOCdevkit/VOC2010"),
        ("voc", "{r}/JPEGImages or {r}/VOC2012/JPEGImages or {r}/VOCdevkit/VOC2012/JPEGImages"),
        ("camvid", "{r}/trainannot or {r}/CamVid/trainannot"),
    ],
)
def test_wrong_root_names_the_expected_path(tmp_path, kind, expected):
    with pytest.raises(FileNotFoundError, match=rf"^{kind} data not found under {tmp_path}: "):
        open_segmentation(f"{kind}:{tmp_path}", "train")
    with pytest.raises(FileNotFoundError) as info:
        open_segmentation(f"{kind}:{tmp_path}", "train")
    assert expected.format(r=tmp_path) in str(info.value)


def test_unknown_or_absent_split(tmp_path):
    root = make_ade20k(tmp_path)
    with pytest.raises(
        ValueError,
        match=rf"ade20k has no split 'test' \(no folder {root}/images/test\); "
        r"available splits: train, val$",
    ):
        open_segmentation(f"ade20k:{root}", "test")
    (root / "images" / "validation").rename(root / "images" / "old")
    with pytest.raises(
        FileNotFoundError,
        match=rf"ade20k split 'val' not found: expected folder {root}/images/validation; "
        r"available splits: train$",
    ):
        open_segmentation(f"ade20k:{root}", "val")
    context = make_pascal_context(tmp_path / "pc")
    (context / "ImageSets/SegmentationContext/val.txt").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=rf"expected list file {context}/ImageSets/SegmentationContext/val.txt; "
        r"available splits: train$",
    ):
        open_segmentation(f"pascal_context:{context}", "val")
    with pytest.raises(ValueError, match=r"cityscapes has no split 'train_aug'"):
        open_segmentation(f"cityscapes:{make_cityscapes(tmp_path / 'cs')}", "train_aug")


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_image_without_annotation_names_both(tmp_path, kind):
    root = MAKERS[kind](tmp_path)
    image, annotation = open_segmentation(f"{kind}:{root}", "val").files[1]
    annotation.unlink()
    if kind == "cityscapes":  # the labelIds file is the fallback
        Path(str(annotation).replace("labelTrainIds", "labelIds")).unlink()
        annotation = Path(str(annotation).replace("labelTrainIds", "labelIds"))
    with pytest.raises(
        FileNotFoundError, match=rf"image {image} has no annotation: expected {annotation}"
    ):
        open_segmentation(f"{kind}:{root}", "val")


def test_listed_image_missing_and_bad_list_lines(tmp_path):
    root = make_voc(tmp_path)
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_999999\n")
    with pytest.raises(
        FileNotFoundError, match=r"val.txt lists .*JPEGImages/2007_999999.jpg, which does not"
    ):
        open_segmentation(f"voc:{root}", "val")
    (root / "ImageSets/Segmentation/val.txt").write_text("a b c\n")
    with pytest.raises(ValueError, match=r"val.txt: line 1: expected an id or 'IMAGE ANNOT"):
        open_segmentation(f"voc:{root}", "val")
    camvid = make_camvid(tmp_path / "cv")
    (camvid / "val.txt").write_text("/SegNet/CamVid/val/x.png\n")
    with pytest.raises(ValueError, match=r"val.txt: entry 1: expected 'IMAGE ANNOTATION'"):
        open_segmentation(f"camvid:{camvid}", "val")


def test_empty_split(tmp_path):
    root = make_ade20k(tmp_path)
    for image in (root / "images" / "validation").iterdir():
        image.unlink()
    with pytest.raises(
        ValueError,
        match=rf"ade20k split 'val' is empty: no \*.jpg images in {root}/images/validation",
    ):
        open_segmentation(f"ade20k:{root}", "val")
    voc = make_voc(tmp_path / "voc")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"voc split 'train' is empty: no entries in .*train.txt"):
        open_segmentation(f"voc:{voc}", "train")


@pytest.mark.parametrize(
    ("kind", "value", "allowed"),
    [
        ("ade20k", 151, "0..150"),
        ("camvid", 12, "0..11"),
        ("pascal_context", 60, "0..59"),
        ("voc", 21, "0..20 or 255"),
        ("cityscapes", 34, "0..18 or 255"),
    ],
)
def test_raw_value_outside_the_range_names_file_and_value(tmp_path, kind, value, allowed):
    ds = open_segmentation(f"{kind}:{MAKERS[kind](tmp_path)}", "train")
    path = ds.files[0][1]
    mask = raw_mask(path).astype(np.uint8)
    mask[3, 4] = value
    Image.fromarray(mask).save(path)
    with pytest.raises(
        ValueError,
        match=rf"^{path}: annotation value {value} is not a {kind} label \(expected {allowed}\)$",
    ):
        ds[0]
    with pytest.raises(ValueError, match=rf"annotation value {value} "):
        ds.read_mask(0)


def test_cityscapes_label_ids_range(tmp_path):
    ds = open_segmentation(f"cityscapes:{make_cityscapes(tmp_path, train_ids=False)}", "train")
    path = ds.files[0][1]
    Image.fromarray(np.full(FIXTURE_SIZE, 255, np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"annotation value 255 is not a cityscapes label \(expe"):
        ds[0]


def test_size_mismatch_names_both_files(tmp_path):
    ds = open_segmentation(f"ade20k:{make_ade20k(tmp_path)}", "train")
    image, annotation = ds.files[2]
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(annotation)
    with pytest.raises(
        ValueError,
        match=rf"^{annotation}: annotation size 10x12 differs from its image {image} \(64x96\)$",
    ):
        ds[2]


def test_colour_annotation_and_unreadable_files(tmp_path):
    ds = open_segmentation(f"camvid:{make_camvid(tmp_path)}", "train")
    Image.fromarray(np.zeros((*FIXTURE_SIZE, 3), np.uint8)).save(ds.files[0][1])
    with pytest.raises(ValueError, match=r"single-channel image of label ids .* got mode RGB"):
        ds[0]
    ds.files[1][0].write_bytes(b"not an image")
    with pytest.raises(ValueError, match=rf"{ds.files[1][0]}: cannot be read as an image"):
        ds[1]
    with pytest.raises(IndexError, match=r"index 4 is out of range for camvid train \(4 images\)"):
        ds[4]


# ---------------------------------------------------------------------------------------
# the real CamVid copy


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid not installed at /work/shared/data")
def test_real_camvid():
    sizes = {}
    for split in ("train", "val", "test"):
        ds = open_segmentation(f"camvid:{CAMVID}", split)
        sizes[split] = len(ds)
        for i in (0, len(ds) - 1):
            image, mask = ds[i]
            assert image.shape == (360, 480, 3) and image.dtype == np.uint8
            assert mask.shape == (360, 480) and mask.dtype == np.int64
            values = set(np.unique(mask).tolist())
            assert values <= set(range(11)) | {255} and len(values - {255}) >= 3
    assert sizes == {"train": 367, "val": 101, "test": 233}
    assert open_segmentation(f"camvid:{CAMVID.parent}", "val").root == CAMVID
