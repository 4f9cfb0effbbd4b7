"""The reader finds every layout it claims to know and reports every kind of bad input."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from melanoma_tf.build_tfrecords import build
from melanoma_tf.data import images, isic


def _lesion(h: int = 40, w: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(h * w)
    rgb = rng.integers(120, 220, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    rgb[mask > 0] //= 3
    return rgb, mask


def _save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def _write_csv(path: Path, header: list[str] | None, rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def _pair(img_dir: Path, mask_dir: Path | None, image_id: str, suffix="_segmentation") -> None:
    rgb, mask = _lesion()
    _save(img_dir / f"{image_id}.jpg", rgb, quality=92)
    if mask_dir is not None:
        _save(mask_dir / f"{image_id}{suffix}.png", mask)


def test_isic2016_layout(tmp_path):
    _pair(tmp_path / "ISBI2016_ISIC_Part1_Training_Data", tmp_path / "ISBI2016_ISIC_Part1_Training_GroundTruth",
          "ISIC_0000001", "_Segmentation")
    _pair(tmp_path / "ISBI2016_ISIC_Part1_Training_Data", None, "ISIC_0000002")
    _write_csv(tmp_path / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv", None,
               [["ISIC_0000001", "malignant"], ["ISIC_0000002", "benign"]])
    items, problems = isic.read_dataset(tmp_path)
    assert isic.detect_layouts(tmp_path) == ["isic2016/Training"]
    assert [(i.image_id, i.label, i.mask_path is not None) for i in items] == [
        ("ISIC_0000001", "melanoma", True), ("ISIC_0000002", "nevus", False)]
    assert problems == []


def test_isic2017_layout_skips_superpixels_and_excludes_keratosis(tmp_path):
    for split in ("Training", "Validation", "Test_v2"):
        data = tmp_path / f"ISIC-2017_{split}_Data"
        _pair(data, tmp_path / f"ISIC-2017_{split}_Part1_GroundTruth", f"ISIC_{split}")
        _save(data / f"ISIC_{split}_superpixels.png", _lesion()[0])
        _pair(data, None, f"ISIC_{split}_sk")
        _write_csv(tmp_path / f"ISIC-2017_{split}_Part3_GroundTruth.csv",
                   ["image_id", "melanoma", "seborrheic_keratosis"],
                   [[f"ISIC_{split}", "1.0", "0.0"], [f"ISIC_{split}_sk", "0.0", "1.0"]])
    items, problems = isic.read_dataset(tmp_path)
    assert sorted(i.source for i in items) == ["isic2017/Test_v2", "isic2017/Training", "isic2017/Validation"]
    assert all(i.label == "melanoma" and i.mask_path for i in items) and problems == []
    with_other, _ = isic.read_dataset(tmp_path, include_other=True)
    assert sorted(i.label for i in with_other) == ["melanoma"] * 3 + ["other"] * 3


def test_isic2018_and_ham10000_layouts_share_labels_and_lesion_ids(tmp_path):
    _pair(tmp_path / "ISIC2018_Task1-2_Training_Input", tmp_path / "ISIC2018_Task1_Training_GroundTruth", "ISIC_1")
    _pair(tmp_path / "ISIC2018_Task3_Training_Input", None, "ISIC_2")
    _write_csv(tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv", ["image", "MEL", "NV", "BKL"],
               [["ISIC_1", "0.0", "1.0", "0.0"], ["ISIC_2", "1.0", "0.0", "0.0"]])
    _pair(tmp_path / "HAM10000_images_part_1", tmp_path / "HAM10000_segmentations_lesion_tschandl", "ISIC_3")
    _pair(tmp_path / "HAM10000_images_part_2", None, "ISIC_4")
    _write_csv(tmp_path / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx"],
               [["HAM_1", "ISIC_3", "mel"], ["HAM_1", "ISIC_4", "mel"]])
    items, problems = isic.read_dataset(tmp_path)
    got = {i.image_id: (i.label, i.lesion_id, i.mask_path is not None) for i in items}
    assert got == {"ISIC_1": ("nevus", None, True), "ISIC_2": ("melanoma", None, False),
                   "ISIC_3": ("melanoma", "HAM_1", True), "ISIC_4": ("melanoma", "HAM_1", False)}
    assert problems == []


def test_isic_cli_layout(tmp_path):
    for image_id in ("ISIC_9000001", "ISIC_9000002", "ISIC_9000003"):
        _pair(tmp_path, None, image_id)
    _write_csv(tmp_path / "metadata.csv", ["isic_id", "diagnosis_1", "diagnosis_2", "diagnosis_3", "lesion_id"],
               [["ISIC_9000001", "Malignant", "Malignant melanocytic proliferations (Melanoma)",
                 "Melanoma Invasive", "IL_1"],
                ["ISIC_9000002", "Benign", "Benign melanocytic proliferations", "Nevus", "IL_2"],
                ["ISIC_9000003", "Benign", "Benign epidermal proliferations", "Seborrheic keratosis", ""]])
    items, _ = isic.read_dataset(tmp_path)
    assert isic.detect_layouts(tmp_path) == ["isic-cli"]
    assert [(i.image_id, i.label, i.lesion_id) for i in items] == [
        ("ISIC_9000001", "melanoma", "IL_1"), ("ISIC_9000002", "nevus", "IL_2")]


def test_unknown_folder_is_a_clear_error(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(ValueError, match="no known ISIC layout"):
        isic.read_dataset(tmp_path)


# --- bad input ---------------------------------------------------------------------------------

def _jpeg_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def bad_dataset(tmp_path) -> Path:
    """A simple-layout folder with one good image and one file for each kind of bad input."""
    root = tmp_path / "bad"
    img_dir, mask_dir = root / "images", root / "masks"
    rgb, mask = _lesion()
    ids = []

    def add(image_id: str, data: bytes | None = None, suffix=".jpg", mask_arr=mask):
        ids.append(image_id)
        img_dir.mkdir(parents=True, exist_ok=True)
        (img_dir / f"{image_id}{suffix}").write_bytes(data if data is not None else _jpeg_bytes(rgb))
        if mask_arr is not None:
            _save(mask_dir / f"{image_id}_segmentation.png", mask_arr)

    add("good")
    add("corrupt", b"this is not a jpeg at all" * 10)
    add("truncated", _jpeg_bytes(rgb)[:400])
    add("empty_file", b"")
    (img_dir / "unreadable.jpg").symlink_to(tmp_path / "missing-target.jpg")
    ids.append("unreadable")
    add("cmyk", _jpeg_bytes(rgb, "CMYK"))
    add("gray", _jpeg_bytes(rgb, "L"))
    opaque = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    add("rgba_opaque", _png(opaque), ".png")
    see_through = opaque.copy()
    see_through[0, 0, 3] = 0
    add("rgba_transparent", _png(see_through), ".png")
    add("gray16", _png(rgb[..., 0].astype(np.uint16) * 257), ".png")
    add("mask_wrong_size", mask_arr=np.pad(mask, 2))
    add("mask_empty", mask_arr=np.zeros_like(mask))
    add("mask_values", mask_arr=np.where(mask > 0, 128, 0).astype(np.uint8))
    add("no_label")
    add("dup")
    add("dup", suffix=".png", data=_png(rgb))
    labels = [[i, 0, 0] for i in dict.fromkeys(ids) if i != "no_label"] + [["missing_file", 1, 0]]
    _write_csv(root / "labels.csv", ["image_id", "melanoma", "seborrheic_keratosis"], labels)
    return root


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


EXPECTED_SKIPS = {
    "corrupt": "not a decodable image",
    "truncated": "not a decodable image",
    "empty_file": "empty file",
    "unreadable": "unreadable file",
    "rgba_transparent": "transparent pixels",
    "mask_wrong_size": "mask is 54x44 but its image is 50x40",
    "mask_empty": "mask is empty",
    "mask_values": "values other than 0/255 (0, 128)",
    "no_label": "image without label",
    "dup": "duplicate image id dup",
    "missing_file": "missing_file is labelled but has no image file",
}


def test_every_bad_input_is_skipped_and_reported_with_its_file(bad_dataset, tmp_path):
    out = tmp_path / "records"
    manifest = build(bad_dataset, out, test_fraction=0, folds=1, progress=False)
    report = list(csv.DictReader(open(out / "build_report.csv")))
    skipped = {r["image_id"]: r for r in report if r["action"] == "skipped"}
    assert set(skipped) == set(EXPECTED_SKIPS)
    for image_id, reason in EXPECTED_SKIPS.items():
        assert reason in skipped[image_id]["reason"], skipped[image_id]
        assert "object at 0x" not in skipped[image_id]["reason"], skipped[image_id]
        expected_file = "labels.csv" if image_id == "missing_file" else image_id
        assert Path(skipped[image_id]["path"]).name.startswith(expected_file)
    assert "corrupt.jpg" in skipped["corrupt"]["reason"]
    converted = {r["image_id"] for r in report if r["action"] == "converted"}
    assert converted == {"cmyk", "gray", "rgba_opaque", "gray16"}
    assert set(manifest["images"]) == {"good", "dup", "cmyk", "gray", "rgba_opaque", "gray16"}
    assert manifest["problems"] == len(EXPECTED_SKIPS)


def test_strict_fails_on_first_problem_and_writes_nothing(bad_dataset, tmp_path):
    out = tmp_path / "records"
    with pytest.raises(images.BadInput):
        build(bad_dataset, out, test_fraction=0, folds=1, strict=True, progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".records")]


def test_converted_images_keep_their_pixels(bad_dataset):
    gray = images.load_image(bad_dataset / "images" / "gray.jpg")
    source = np.asarray(Image.open(bad_dataset / "images" / "gray.jpg"))
    decoded = np.asarray(Image.open(io.BytesIO(gray.encoded)))
    assert gray.format == "png" and decoded.shape == source.shape + (3,)
    assert all(np.array_equal(decoded[..., c], source) for c in range(3))
    g16 = np.asarray(Image.open(io.BytesIO(images.load_image(bad_dataset / "images" / "gray16.png").encoded)))
    assert np.array_equal(g16[..., 0], _lesion()[0][..., 0])  # 16-bit values v*257 >> 8 == v


def test_cli_reports_problems_and_exit_status(bad_dataset, tmp_path, capsys):
    from melanoma_tf.build_tfrecords import main

    assert main(["--data-dir", str(bad_dataset), "--output-dir", str(tmp_path / "o"),
                 "--test-fraction", "0", "--folds", "1", "--num-workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "skipped:" in out and "mask_empty_segmentation.png: mask is empty" in out
    assert main(["--data-dir", str(bad_dataset), "--output-dir", str(tmp_path / "s"), "--strict",
                 "--num-workers", "1"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.fixture
def isic2017_download(tmp_path) -> Path:
    """An ISIC 2017 download in miniature: Training (8), Validation (4), Test_v2 (4), half melanoma."""
    root = tmp_path / "isic2017"
    for split, n in (("Training", 8), ("Validation", 4), ("Test_v2", 4)):
        rows = []
        for i in range(n):
            image_id = f"ISIC_{split}_{i}"
            _pair(root / f"ISIC-2017_{split}_Data", root / f"ISIC-2017_{split}_Part1_GroundTruth", image_id)
            rows.append([image_id, f"{i % 2}.0", "0.0"])
        _write_csv(root / f"ISIC-2017_{split}_Part3_GroundTruth.csv", ["image_id", "melanoma", "seborrheic_keratosis"],
                   rows)
    return root


def test_official_test_set_becomes_the_test_split_and_validation_joins_training(isic2017_download, tmp_path):
    manifest = build(isic2017_download, tmp_path / "official", folds=2, progress=False)
    splits = {i: r["split"] for i, r in manifest["images"].items()}
    assert manifest["options"]["split_rule"] == "official"
    assert {i for i, s in splits.items() if s == "test"} == {f"ISIC_Test_v2_{i}" for i in range(4)}
    assert all(manifest["images"][f"ISIC_Validation_{i}"]["fold"] in (0, 1) for i in range(4))
    stratified = build(isic2017_download, tmp_path / "stratified", split="stratified", test_fraction=0.25, folds=2,
                       progress=False)
    test = {i for i, r in stratified["images"].items() if r["split"] == "test"}
    assert stratified["options"]["split_rule"] == "stratified" and len(test) == 4
    assert test != {f"ISIC_Test_v2_{i}" for i in range(4)}


def test_official_split_without_a_test_set_is_an_error(bad_dataset, tmp_path):
    with pytest.raises(ValueError, match="no labelled official test set"):
        build(bad_dataset, tmp_path / "o", split="official", folds=1, progress=False)
    assert build(bad_dataset, tmp_path / "a", test_fraction=0, folds=1, progress=False)["options"]["split_rule"] == \
        "stratified"


def test_a_separate_test_folder_is_the_test_split_and_every_training_image_trains(isic2017_download, tmp_path):
    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    shutil.copytree(isic2017_download, train_dir, ignore=shutil.ignore_patterns("*Test_v2*"))
    shutil.copytree(isic2017_download, test_dir, ignore=shutil.ignore_patterns("*Training*", "*Validation*"))
    manifest = build(train_dir, tmp_path / "records", folds=2, test_data_dir=test_dir, progress=False)
    assert manifest["options"]["split_rule"] == "test_data_dir"
    assert set(manifest["splits"]["test"]) == {f"ISIC_Test_v2_{i}" for i in range(4)}
    assert len(manifest["splits"]["train"]) == 12
    shutil.copytree(isic2017_download / "ISIC-2017_Validation_Data", test_dir / "images")
    _write_csv(test_dir / "labels.csv", ["image_id", "melanoma", "seborrheic_keratosis"],
               [["ISIC_Validation_2", 0, 0]])
    with pytest.raises(ValueError, match=f"{test_dir}: image ISIC_Validation_2 is also in the training folder"):
        build(train_dir, tmp_path / "shared", folds=2, test_data_dir=test_dir, progress=False)
    assert not (tmp_path / "shared").exists()


def _ham10000(root: Path, lesions: list[tuple[str, str, list[str]]]) -> Path:
    """A HAM10000 download in miniature: (lesion_id, dx, image ids) per lesion, every image masked."""
    rows = []
    for lesion_id, dx, image_ids in lesions:
        for image_id in image_ids:
            _pair(root / "HAM10000_images", root / "HAM10000_segmentations_lesion_tschandl", image_id)
            rows.append([lesion_id, image_id, dx, "histo"])
    _write_csv(root / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx", "dx_type"], rows)
    return root


def test_two_downloads_build_into_one_set_of_records_with_duplicates_reported_once(isic2017_download, tmp_path):
    ham = _ham10000(tmp_path / "ham", [("HAM_1", "mel", ["ISIC_H1", "ISIC_H2"]), ("HAM_2", "nv", ["ISIC_H3"]),
                                       ("HAM_3", "nv", ["ISIC_Training_0"]), ("HAM_4", "bkl", ["ISIC_H4"])])
    out = tmp_path / "records"
    manifest = build([isic2017_download, ham], out, folds=2, progress=False)
    downloads = {i: r["download"] for i, r in manifest["images"].items()}
    assert {i for i, d in downloads.items() if d == "ham"} == {"ISIC_H1", "ISIC_H2", "ISIC_H3"}
    assert sum(d == "isic2017" for d in downloads.values()) == 16
    assert list(manifest["downloads"]) == ["isic2017", "ham"] and manifest["downloads"]["ham"]["images"] == 3
    # The duplicate id is one problem row naming the second file, and the first folder's image is kept.
    with open(out / "build_report.csv", newline="") as f:
        dup = [r for r in csv.DictReader(f) if r["image_id"] == "ISIC_Training_0"]
    assert len(dup) == 1 and "ham" in dup[0]["path"] and "two downloads" in dup[0]["reason"]
    assert manifest["images"]["ISIC_Training_0"]["source"] == "isic2017/Training"
    import tensorflow as tf

    from melanoma_tf import tfrecords
    stored = {}
    for serialized in tf.data.TFRecordDataset(tf.io.gfile.glob(tfrecords.split_pattern(out, "*"))):
        example = tf.train.Example.FromString(serialized.numpy())
        f = example.features.feature
        stored[f["image/lesion/image_id"].bytes_list.value[0].decode()] = \
            f["image/lesion/download"].bytes_list.value[0].decode()
    assert stored == downloads
    # The official test split of the first download is the test split; the extra folder only trains.
    assert set(manifest["splits"]["test"]) == {f"ISIC_Test_v2_{i}" for i in range(4)}


def test_extra_downloads_leave_the_first_ones_test_split_and_folds_as_a_build_of_it_alone(tmp_path):
    from melanoma_tf.data import synthetic

    data = synthetic.generate_dataset(tmp_path / "isic", num_images=40, seed=2, image_size=(48, 64))
    ham = _ham10000(tmp_path / "ham", [(f"HAM_{i}", "mel" if i % 3 == 0 else "nv", [f"ISIC_H{i}a", f"ISIC_H{i}b"])
                                       for i in range(12)])
    alone = build(data, tmp_path / "alone", folds=3, progress=False)
    both = build([data, ham], tmp_path / "both", folds=3, progress=False)
    assert both["splits"]["test"] == alone["splits"]["test"]
    assert {i: both["images"][i]["fold"] for i in alone["images"]} == {i: r["fold"] for i, r in alone["images"].items()}
    assert all(both["images"][f"ISIC_H{i}a"]["split"] == "train" for i in range(12))


def _items(download: int, lesions: int, per_lesion: int, prefix: str, other_every: int = 0):
    return [isic.LesionItem(f"{prefix}{g}_{k}", Path(f"{prefix}{g}_{k}.jpg"),
                            isic.OTHER if other_every and g % other_every == 0 else
                            isic.MELANOMA if g % 4 == 0 else isic.NEVUS, f"d{download}", Path("m.png"),
                            f"L{g}") for g in range(lesions) for k in range(per_lesion)]


@pytest.mark.parametrize("seed", range(8))
def test_no_lesion_straddles_the_split_or_two_folds_across_downloads_for_any_seed(seed):
    from melanoma_tf import tfrecords

    # Lesions L0..L29 appear in both downloads (an isic-cli folder beside HAM10000, say).
    first, second = _items(0, 40, 2, "A", other_every=5), _items(1, 30, 3, "B", other_every=5)
    items, downloads = first + second, [0] * len(first) + [1] * len(second)
    for include_other in (True, False):
        chosen = [i for i, it in enumerate(items) if include_other or it.label != isic.OTHER]
        is_test, fold, _ = tfrecords.split_items([items[i] for i in chosen], "stratified", 0.2, 3, seed,
                                                 downloads=[downloads[i] for i in chosen])
        placement: dict[str, set] = {}
        for i, t, f in zip(chosen, is_test, fold):
            placement.setdefault(items[i].lesion_id, set()).add((bool(t), int(f)))
        assert all(len(p) == 1 for p in placement.values()), "a lesion straddles the split or two folds"
        assert any(t for p in placement.values() for t, _ in p)
        by_id = {items[i].image_id: (bool(t), int(f)) for i, t, f in zip(chosen, is_test, fold)}
        if include_other:
            with_other = by_id
        else:  # the other lesions change nothing for melanomas and nevi
            assert by_id == {k: v for k, v in with_other.items() if k in by_id}
