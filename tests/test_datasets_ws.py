"""Tests of datasets_ws.py: layout, UTMs, positives, preprocessing, triplets and their collation.

Every data set is built here, in tmp_path, from tiny random JPEGs with hand-chosen UTM names, so the
expected positives are known (brute-force distances) independently of the code under test.
"""

import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import datasets_ws as dw

BASE_E, BASE_N = 551234.0, 4183456.0  # realistic UTM magnitudes: boundary tests must survive them


# ----------------------------------------------------------------------------------------------
# Helpers that build data sets
# ----------------------------------------------------------------------------------------------


def utm_name(east, north, key="", note=""):
    """Benchmark file name @east@north@zone@letter@lat@lon@key@tile@heading@pitch@roll@height@time@note@.jpg"""
    fields = ["", f"{east}", f"{north}", "10", "S", "", "", key, "", "", "", "", "", "", note, ".jpg"]
    return "@".join(fields)


def write_jpg(path, size=(14, 10), seed=0, mode="RGB"):
    """A random JPEG of size (W, H)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format="JPEG")
    return str(path)


def make_dataset(root, name="toy", split="test", database=(), queries=(), size=(14, 10)):
    """database: [(east, north)], queries: [(east, north, key, note)] offsets from BASE_E/BASE_N.

    Returns (database_paths, queries_paths) in creation order."""
    folder = os.path.join(root, name, "images", split)
    db, qs = [], []
    for i, (e, n) in enumerate(database):
        db.append(write_jpg(os.path.join(folder, "database", utm_name(BASE_E + e, BASE_N + n)), size, seed=i))
    for i, q in enumerate(queries):
        e, n = q[0], q[1]
        key = q[2] if len(q) > 2 else f"key{i}"
        note = q[3] if len(q) > 3 else ""
        qs.append(
            write_jpg(os.path.join(folder, "queries", utm_name(BASE_E + e, BASE_N + n, key, note)), size, seed=1000 + i)
        )
    return db, qs


def brute_positives(database_utms, queries_utms, radius):
    """Database indexes within radius (boundary included) by exact squared distances."""
    d2 = ((queries_utms[:, None, :] - database_utms[None, :, :]) ** 2).sum(-1)
    return [set(np.flatnonzero(row <= radius**2).tolist()) for row in d2]


# ----------------------------------------------------------------------------------------------
# File names and image files
# ----------------------------------------------------------------------------------------------


def test_read_utm_uses_the_basename(tmp_path):
    path = os.path.join(str(tmp_path), "folder@7@8", utm_name(123.5, 456.25))
    assert dw.read_utm(path) == (123.5, 456.25)


@pytest.mark.parametrize(
    "name, message",
    [
        ("no_fields.jpg", "does not carry UTM"),
        ("@abc@12@.jpg", "non-numeric"),
        ("@12@@.jpg", "non-numeric"),
        ("@nan@12@.jpg", "non-finite"),
    ],
)
def test_read_utm_errors_name_the_file(tmp_path, name, message):
    with pytest.raises(ValueError, match=message) as err:
        dw.read_utm(os.path.join(str(tmp_path), name))
    assert name in str(err.value)


def test_note_parsing():
    assert dw.parse_note("night_sideways") == (True, True)
    assert dw.parse_note("day_sideways") == (False, True)
    assert dw.parse_note("night") == (True, False)
    assert dw.parse_note("") == (False, False)
    assert dw.read_note(utm_name(1, 2, "k", "night_front")) == "night_front"


def test_open_image_converts_to_rgb(tmp_path):
    gray = write_jpg(tmp_path / "gray.jpg", mode="L")
    cmyk = write_jpg(tmp_path / "cmyk.jpg", mode="CMYK")
    png = str(tmp_path / "png_named.jpg")
    Image.new("RGBA", (9, 7), (10, 20, 30, 40)).save(png, format="PNG")
    for path in (gray, cmyk, png):
        img = dw.open_image(path)
        assert img.mode == "RGB"
    assert dw.open_image(png).size == (9, 7)
    assert dw.open_image(png).getpixel((0, 0)) == (10, 20, 30)


def test_open_image_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    good = write_jpg(tmp_path / "good.jpg", size=(64, 64))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(good, "rb").read()[:300])
    for path in (empty, truncated):
        with pytest.raises(ValueError, match="truncated or not an image") as err:
            dw.open_image(str(path))
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        dw.open_image(str(tmp_path / "missing.jpg"))


def test_collect_jpgs_recursive_sorted_hidden_skipped(tmp_path):
    root = str(tmp_path / "db[1]")  # glob pattern characters in the folder must not matter
    wanted = [
        os.path.join(root, "b", "@9@0@.jpg"),
        os.path.join(root, "@10@0@.jpg"),
        os.path.join(root, "a", "sub", "@1@0@.jpg"),
        os.path.join(root, "a", "@2@0@.jpg"),
        os.path.join(root, "dir.jpg", "@3@0@.jpg"),
    ]
    skipped = [
        os.path.join(root, ".hidden", "@4@0@.jpg"),
        os.path.join(root, "a", ".@5@0@.jpg"),
        os.path.join(root, "@6@0@.JPG"),
    ]
    for i, p in enumerate(wanted + skipped):
        write_jpg(p, seed=i)
    Image.new("RGB", (4, 4)).save(os.path.join(root, "@7@0@.png"))
    found = dw.collect_jpgs(root)
    # sorted() on full path strings: '@10' < '@9' and 'a/...' after '@...'; not a natural sort.
    assert found == sorted(wanted)
    assert found.index(os.path.join(root, "@10@0@.jpg")) < found.index(os.path.join(root, "b", "@9@0@.jpg"))


# ----------------------------------------------------------------------------------------------
# Preprocessing: equal to torchvision on tensors (antialias off)
# ----------------------------------------------------------------------------------------------

SHAPES = [(37, 53), (53, 37), (31, 31), (97, 200), (45, 44)]
RESIZES = [(23, 29), (17, 17), (30, 21), (64, 40)]


@pytest.mark.parametrize("hw", SHAPES)
@pytest.mark.parametrize("resize", RESIZES)
def test_preprocessing_equals_torchvision(hw, resize):
    img = torch.randn(3, *hw, generator=torch.Generator().manual_seed(hw[0] * 1000 + hw[1]))
    assert torch.equal(dw.hard_resize(img, resize), TF.resize(img, list(resize), antialias=False))
    s = min(resize)
    shorter = dw.resize_shorter_side(img, s)
    assert torch.equal(shorter, TF.resize(img, s, antialias=False))
    assert min(shorter.shape[-2:]) == s
    scale = max(resize[0] / hw[0], resize[1] / hw[1])
    scaled = nnf.interpolate(img[None], scale_factor=scale)[0]
    central = dw.central_crop(img, resize)
    assert central.shape == (3, *resize)
    assert torch.equal(central, TF.center_crop(scaled, list(resize)))
    crops = dw.five_crops(img, resize)
    assert crops.shape == (5, 3, s, s)
    assert torch.equal(crops, torch.stack(TF.five_crop(TF.resize(img, s, antialias=False), [s, s])))


def test_resized_output_size_matches_torchvision():
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w, s = (int(v) for v in rng.integers(5, 120, size=3))
        expected = TF.resize(torch.zeros(1, h, w), s, antialias=False).shape[-2:]
        assert dw.resized_output_size(h, w, s) == tuple(expected), (h, w, s)
    assert dw.resized_output_size(10, 20, (7, 9)) == (7, 9)


@pytest.mark.parametrize("hw, crop", [((5, 8), (9, 6)), ((6, 6), (9, 11)), ((7, 12), (4, 12))])
def test_center_crop_pads_like_torchvision(hw, crop):
    img = torch.randn(3, *hw)
    assert torch.equal(dw._center_crop(img, crop), TF.center_crop(img, list(crop)))


def test_batched_and_unknown_method():
    imgs = torch.randn(2, 3, 19, 27)
    assert torch.equal(dw.hard_resize(imgs, (11, 13)), TF.resize(imgs, [11, 13], antialias=False))
    assert dw.apply_test_method(imgs[0], "maj_voting", (11, 13)).shape == (5, 3, 11, 11)
    with pytest.raises(ValueError, match="--test_method"):
        dw.apply_test_method(imgs[0], "bogus", (11, 13))
    with pytest.raises(ValueError, match="--resize"):
        dw.hard_resize(imgs, (11,))


# ----------------------------------------------------------------------------------------------
# BaseDataset
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_num", [8, 60])  # brute-force and kd-tree searches in scikit-learn
def test_soft_positives_match_brute_force_boundary_included(tmp_path, database_num):
    rng = np.random.default_rng(database_num)
    database = [tuple(int(v) for v in rng.integers(0, 120, size=2)) for _ in range(database_num)]
    # Queries at exactly 25 m from a database image (boundary), just beyond it, and random ones.
    offsets = [(15, 20), (-20, 15), (25, 0), (0, -25), (7, 24)]
    queries = [(database[i][0] + dx, database[i][1] + dy) for i, (dx, dy) in enumerate(offsets)]
    queries += [(database[0][0] + 25.001, database[0][1])]
    queries += [tuple(int(v) for v in rng.integers(0, 120, size=2)) for _ in range(6)]
    make_dataset(str(tmp_path), database=database, queries=queries)
    ds = dw.BaseDataset(str(tmp_path), "toy", "test", resize=(8, 8), positive_dist_threshold=25)
    expected = brute_positives(ds.database_utms, ds.queries_utms, 25)
    got = ds.get_positives()
    assert len(got) == ds.queries_num == len(queries)
    assert [set(p.tolist()) for p in got] == expected
    # Each boundary query has its database image among its positives (distance == 25 exactly).
    for i in range(len(offsets)):
        q = ds.queries_paths.index(next(p for p in ds.queries_paths if f"@key{i}@" in p))
        db_index = ds.database_paths.index(
            next(p for p in ds.database_paths if dw.read_utm(p) == (BASE_E + database[i][0], BASE_N + database[i][1]))
        )
        assert db_index in got[q]


def test_layout_attributes_sorting_and_repr(tmp_path):
    db, qs = make_dataset(
        str(tmp_path / "data@9@9"),
        name="toy",
        split="val",
        database=[(10, 0), (9, 0), (100, 0)],
        queries=[(9, 3), (200, 0)],
    )
    ds = dw.BaseDataset(str(tmp_path / "data@9@9"), "toy", "val", resize=(8, 12))
    assert ds.database_paths == sorted(db) and ds.queries_paths == sorted(qs)
    assert ds.images_paths == sorted(db) + sorted(qs)
    assert (ds.database_num, ds.queries_num, len(ds)) == (3, 2, 5)
    assert ds.database_utms.shape == (3, 2) and ds.database_utms.dtype == np.float64
    assert [tuple(u) for u in ds.database_utms] == [dw.read_utm(p) for p in sorted(db)]
    assert [tuple(u) for u in ds.queries_utms] == [dw.read_utm(p) for p in sorted(qs)]
    assert (ds.dataset_name, ds.split, ds.resize, ds.test_method) == ("toy", "val", (8, 12), "hard_resize")
    assert repr(ds) == "< BaseDataset, toy - #database: 3; #queries: 2 >"


@pytest.mark.parametrize(
    "method, shape, resize",
    [
        ("hard_resize", (3, 8, 12), (8, 12)),
        ("central_crop", (3, 8, 12), (8, 12)),
        # single_query: shorter side 28, longer int(28 * 15 / 11) = 38, centre-cropped to a multiple of 14.
        ("single_query", (3, 28, 28), (28, 42)),
        ("five_crops", (5, 3, 8, 8), (8, 12)),
        ("nearest_crop", (5, 3, 8, 8), (8, 12)),
        ("maj_voting", (5, 3, 8, 8), (8, 12)),
    ],
)
def test_getitem_database_hard_resize_queries_test_method(tmp_path, method, shape, resize):
    make_dataset(str(tmp_path), database=[(0, 0), (5, 5)], queries=[(1, 1)], size=(15, 11))
    ds = dw.BaseDataset(str(tmp_path), "toy", "test", resize=resize, test_method=method)
    db_img, db_index = ds[1]
    assert db_index == 1 and db_img.shape == (3, *resize)
    q_img, q_index = ds[2]
    assert q_index == 2 and q_img.shape == shape
    # Tensor path: normalise first, then bilinear without antialias.
    reference = dw.base_transform(dw.open_image(ds.images_paths[2]))
    assert torch.equal(q_img, dw.apply_test_method(reference, method, resize))
    assert torch.equal(ds.load(2, method), q_img)
    with pytest.raises(ValueError, match="--test_method"):
        ds.load(2, "nope")


def test_query_keys_file_protocol(tmp_path, caplog):
    queries = [(i, 0, f"k{i}") for i in range(6)]
    make_dataset(str(tmp_path), name="msls", split="val", database=[(0, 0), (3, 0), (60, 0)], queries=queries)
    keys = tmp_path / "keys.txt"
    keys.write_text("k1  k3\nk5\tunknown\n")
    with caplog.at_level(logging.INFO):
        ds = dw.BaseDataset(str(tmp_path), "msls", "val", query_keys_file=str(keys))
    assert [os.path.basename(p).split("@")[7] for p in ds.queries_paths] == ["k1", "k3", "k5"]
    assert ds.queries_num == 3 and len(ds.images_paths) == 6
    assert [set(p.tolist()) for p in ds.get_positives()] == brute_positives(ds.database_utms, ds.queries_utms, 25)
    assert "kept 3 of 6 queries" in caplog.text and str(keys) in caplog.text
    with pytest.raises(FileNotFoundError, match="--query_keys_file"):
        dw.BaseDataset(str(tmp_path), "msls", "val", query_keys_file=str(tmp_path / "none.txt"))
    keys.write_text("zz yy")
    with pytest.raises(ValueError, match="None of the 6 queries"):
        dw.BaseDataset(str(tmp_path), "msls", "val", query_keys_file=str(keys))


def test_error_messages(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="--datasets_folder"):
        dw.BaseDataset(os.path.join(root, "nowhere"), "toy")
    make_dataset(root, name="toy", split="test", database=[(0, 0)], queries=[(1, 1)])
    with pytest.raises(FileNotFoundError, match=r"--dataset_name.*toy"):
        dw.BaseDataset(root, "pitts30k", "test")
    with pytest.raises(FileNotFoundError, match=r"Split 'train'.*test"):
        dw.BaseDataset(root, "toy", "train")
    with pytest.raises(ValueError, match="--test_method"):
        dw.BaseDataset(root, "toy", "test", test_method="best")
    with pytest.raises(ValueError, match="--resize"):
        dw.BaseDataset(root, "toy", "test", resize=(224,))

    os.makedirs(os.path.join(root, "noq", "images", "test", "database"))
    with pytest.raises(FileNotFoundError, match=r"noq.*queries"):
        dw.BaseDataset(root, "noq", "test")
    os.makedirs(os.path.join(root, "nodb", "images", "test", "queries"))
    with pytest.raises(FileNotFoundError, match=r"nodb.*database"):
        dw.BaseDataset(root, "nodb", "test")

    make_dataset(root, name="empty", split="test", queries=[(1, 1)])
    os.makedirs(os.path.join(root, "empty", "images", "test", "database"))
    png = os.path.join(root, "empty", "images", "test", "database", utm_name(0, 0)[:-4] + ".png")
    Image.new("RGB", (4, 4)).save(png)
    with pytest.raises(ValueError, match=r"empty.*database.*no \.jpg"):
        dw.BaseDataset(root, "empty", "test")

    make_dataset(root, name="badname", split="test", database=[(0, 0)], queries=[(1, 1)])
    write_jpg(os.path.join(root, "badname", "images", "test", "database", "photo_001.jpg"))
    with pytest.raises(ValueError, match="photo_001.jpg"):
        dw.BaseDataset(root, "badname", "test")


# ----------------------------------------------------------------------------------------------
# TripletsDataset
# ----------------------------------------------------------------------------------------------


def _training_set(root, **kwargs):
    database = [(0, 0), (8, 0), (20, 0), (100, 0), (107, 0), (300, 0)]
    queries = [
        (1, 0, "a", "day_sideways"),  # hard: 0, 8   soft: 0, 8, 20
        (50, 0, "b", "night_front"),  # no hard positive -> dropped
        (103, 0, "c", "night_sideways"),  # hard: 100, 107
        (200, 0, "d", "night"),  # no hard positive -> dropped
        (300, 5, "e", "day"),  # hard: 300
    ]
    make_dataset(root, name="toy", split="train", database=database, queries=queries, size=(17, 13))
    return dw.TripletsDataset(root, "toy", "train", resize=(8, 12), **kwargs)


def test_triplets_dataset_drops_queries_and_keeps_lists_aligned(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        ds = _training_set(str(tmp_path))
    assert "There are 2 queries without any positive" in caplog.text
    assert ds.queries_num == 3 == len(ds.queries_paths) == len(ds.queries_utms)
    assert len(ds.hard_positives_per_query) == len(ds.soft_positives_per_query) == len(ds.get_positives()) == 3
    assert ds.images_paths == ds.database_paths + ds.queries_paths
    assert [tuple(u) for u in ds.queries_utms] == [dw.read_utm(p) for p in ds.queries_paths]
    assert [os.path.basename(p).split("@")[7] for p in ds.queries_paths] == ["a", "c", "e"]
    hard, soft = (brute_positives(ds.database_utms, ds.queries_utms, r) for r in (10, 25))
    assert [set(p.tolist()) for p in ds.hard_positives_per_query] == hard
    assert [set(p.tolist()) for p in ds.soft_positives_per_query] == soft
    assert ds.is_night.tolist() == [False, True, False]
    assert ds.is_sideways.tolist() == [True, True, False]
    assert len(ds) == 0 and ds.triplets_global_indexes.shape == (0, 4)
    assert repr(ds) == "< TripletsDataset, toy - #database: 6; #queries: 3 >"


def test_triplets_getitem_pil_resize_path_and_collate(tmp_path):
    ds = _training_set(str(tmp_path), negs_num_per_query=2)
    dbn = ds.database_num
    ds.triplets_global_indexes = np.array([[dbn + 0, 0, 3, 5], [dbn + 2, 5, 0, 1]], dtype=np.int64)
    assert len(ds) == 2
    images, local, global_ = ds[1]
    assert images.shape == (4, 3, 8, 12)
    assert local.dtype == torch.long and local.tolist() == [[0, 1, 2], [0, 1, 3]]
    assert global_.tolist() == [dbn + 2, 5, 0, 1]
    # Training images: PIL resize (bilinear, antialiased by PIL) first, then normalisation ...
    pil = dw.open_image(ds.images_paths[dbn + 2]).resize((12, 8), Image.BILINEAR)
    assert torch.equal(images[0], dw.base_transform(pil))
    pil = dw.open_image(ds.database_paths[5]).resize((12, 8), Image.BILINEAR)
    assert torch.equal(images[1], dw.base_transform(pil))
    # ... which is not the evaluation path (normalise, then tensor resize without antialias).
    assert not torch.allclose(images[0], ds.load(dbn + 2, "hard_resize"), atol=1e-3)

    batch = [ds[0], ds[1]]
    b_images, b_local, b_global = dw.collate_fn(batch)
    assert b_images.shape == (8, 3, 8, 12)
    assert b_local.tolist() == [[0, 1, 2], [0, 1, 3], [4, 5, 6], [4, 5, 7]]
    assert b_global.shape == (2, 4) and b_global.tolist() == ds.triplets_global_indexes.tolist()
    assert torch.equal(b_images[4:], images)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=dw.collate_fn)
    assert next(iter(loader))[1].shape == (4, 3)


def test_query_augmentations_in_order(tmp_path):
    ds = _training_set(
        str(tmp_path),
        brightness=0.1,
        contrast=0.2,
        saturation=0.3,
        hue=0.1,
        rand_perspective=0.4,
        random_resized_crop=0.5,
        random_rotation=7,
    )
    steps = ds.query_transform.transforms
    assert [type(t).__name__ for t in steps] == ["ColorJitter"] * 4 + [
        "RandomPerspective",
        "RandomResizedCrop",
        "RandomRotation",
        "Compose",
    ]
    assert steps[0].brightness is not None and steps[0].contrast is None
    assert steps[1].contrast is not None and steps[1].saturation is None
    assert steps[2].saturation is not None and steps[3].hue is not None
    assert steps[4].distortion_scale == 0.4 and steps[4].p == 0.5
    assert steps[5].scale == (0.5, 1) and tuple(steps[5].size) == (8, 12)
    assert steps[6].degrees == [-7.0, 7.0]
    assert isinstance(steps[7].transforms[0], T.Resize)
    ds.triplets_global_indexes = np.array([[ds.database_num, 0, 3, 5]])
    assert ds[0][0].shape == (4, 3, 8, 12)
    plain = _training_set(str(tmp_path / "plain"))
    assert len(plain.query_transform.transforms) == 1


def test_images_subset_and_pca_dataset(tmp_path):
    ds = _training_set(str(tmp_path))
    subset = dw.ImagesSubset(ds, [ds.database_num + 1, 2])
    img, index = subset[0]
    assert len(subset) == 2 and index == ds.database_num + 1
    assert torch.equal(img, ds.load(ds.database_num + 1, "hard_resize"))

    pca = dw.PCADataset(str(tmp_path), "toy/images", resize=(6, 10))
    all_queries = dw.collect_jpgs(str(tmp_path / "toy/images/train/queries"))  # dropped ones included
    assert pca.images_paths == sorted(ds.database_paths + all_queries)
    assert len(pca) == 11 and pca[0].shape == (3, 6, 10)
    assert torch.equal(pca[0], dw.hard_resize(dw.base_transform(dw.open_image(pca.images_paths[0])), (6, 10)))
    with pytest.raises(FileNotFoundError, match="--pca_dataset_folder"):
        dw.PCADataset(str(tmp_path), "missing", resize=(6, 10))
    os.makedirs(tmp_path / "emptydir")
    with pytest.raises(ValueError, match="no .jpg"):
        dw.PCADataset(str(tmp_path), "emptydir", resize=(6, 10))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_positives_of_the_synthetic_set_equal_brute_force(synthetic_root, split):
    """Soft (25 m) and, on train, hard (10 m) positives against an independent distance matrix."""
    folder, name = synthetic_root
    ds = dw.BaseDataset(folder, name, split)
    brute = np.sqrt(((ds.queries_utms[:, None, :] - ds.database_utms[None]) ** 2).sum(-1))
    for q, positives in enumerate(ds.get_positives()):
        assert sorted(positives.tolist()) == np.flatnonzero(brute[q] <= 25).tolist()
    if split == "train":
        tds = dw.TripletsDataset(folder, name, "train", resize=(112, 112))
        brute = np.sqrt(((tds.queries_utms[:, None, :] - tds.database_utms[None]) ** 2).sum(-1))
        for q in range(tds.queries_num):
            assert sorted(tds.hard_positives_per_query[q].tolist()) == np.flatnonzero(brute[q] <= 10).tolist()
            assert sorted(tds.soft_positives_per_query[q].tolist()) == np.flatnonzero(brute[q] <= 25).tolist()


# ----------------------------------------------------------------------------------------------
# Query key files as editors save them, the built-in MSLS-val list, and labels that cannot match
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoding,newline",
    [("utf-8-sig", "\r\n"), ("utf-8-sig", "\n"), ("utf-16", "\r\n"), ("utf-8", "\r\n"), ("utf-8", "\r")],
    ids=["bom_crlf", "bom_lf", "utf16_crlf", "crlf", "cr"],
)
def test_key_files_as_editors_save_them(tmp_path, caplog, encoding, newline):
    """A byte-order mark (Windows Notepad) used to glue itself to the first key, which then matched no
    query: that query was silently dropped."""
    queries = [(i, 0, f"k{i}") for i in range(6)]
    make_dataset(str(tmp_path), name="msls", split="val", database=[(0, 0), (3, 0)], queries=queries)
    keys = tmp_path / "keys.txt"
    keys.write_bytes(newline.join(["k1", "k3", "k5", ""]).encode(encoding))
    with caplog.at_level(logging.INFO):
        ds = dw.BaseDataset(str(tmp_path), "msls", "val", query_keys_file=str(keys))
    assert [os.path.basename(p).split("@")[7] for p in ds.queries_paths] == ["k1", "k3", "k5"]
    assert ds.query_keys.found_num == ds.query_keys.keys_num == 3 and not ds.query_keys.unmatched
    assert "match no query image" not in caplog.text


def test_unmatched_keys_are_a_warning_with_their_count_and_examples(tmp_path, caplog):
    queries = [(i, 0, f"k{i}") for i in range(4)]
    make_dataset(str(tmp_path), name="msls", split="val", database=[(0, 0)], queries=queries)
    keys = tmp_path / "keys.txt"
    keys.write_text("k0 k2 gone1 gone2 gone3 gone4 gone5 gone6\n")
    with caplog.at_level(logging.INFO):
        ds = dw.BaseDataset(str(tmp_path), "msls", "val", query_keys_file=str(keys))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "6 of the 8 keys of --query_keys_file" in warnings[0]
    assert "e.g. gone1, gone2, gone3, gone4, gone5)" in warnings[0]
    assert ds.query_keys.describe() == f"query keys listed in {keys}: 2 of its 8 keys found (kept 2 of 4 queries)"
    assert not ds.query_keys.official


def _msls_like(root, keys, extra=()):
    """An MSLS-val-like split whose query file names carry `keys` (+ `extra` keys) in field 7."""
    folder = os.path.join(root, "msls", "images", "val")
    write_jpg(os.path.join(folder, "database", utm_name(BASE_E, BASE_N)), seed=1)
    source = write_jpg(os.path.join(folder, "queries", "source.jpg"), seed=2)
    for i, key in enumerate(list(keys) + list(extra)):
        os.link(source, os.path.join(folder, "queries", utm_name(BASE_E + i % 7, BASE_N, key)))
    os.remove(source)


def test_the_built_in_msls_val_list_by_name_and_the_official_label(tmp_path, caplog):
    """--query_keys_file msls_val_740 is the shipped list (data/); the run is called the official MSLS-val
    protocol only when every one of its 740 keys has its query here, "PARTIAL" (a warning) otherwise."""
    official = dw.read_query_keys("msls_val_740")
    assert len(official) == 740 and len(set(official)) == 740 and all(len(k) == 22 for k in official)
    assert dw.query_keys_path("msls_val_740").startswith(dw.DATA_FOLDER)
    _msls_like(str(tmp_path), official, extra=["notInTheList_000000000", "notInTheList_000000001"])
    with caplog.at_level(logging.INFO):
        ds = dw.BaseDataset(str(tmp_path), "msls", "val", query_keys_file="msls_val_740")
    assert ds.queries_num == 740 and ds.query_keys.official
    assert {os.path.basename(p).split("@")[7] for p in ds.queries_paths} == set(official)
    assert "official MSLS-val protocol (all 740 keys of msls_val_740 found; kept 740 of 742 queries)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    partial = tmp_path / "partial"
    _msls_like(str(partial), official[:700])
    copy = tmp_path / "copy_of_the_list.txt"  # the same keys in a file of the user's: the same protocol
    copy.write_text("\r\n".join(official), encoding="utf-8-sig")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ds = dw.BaseDataset(str(partial), "msls", "val", query_keys_file=str(copy))
    assert ds.query_keys.builtin == "msls_val_740" and not ds.query_keys.official
    assert "PARTIAL MSLS-val protocol: only 700 of the 740 keys of msls_val_740 have a query image" in caplog.text
    assert "40 of the 740 keys of --query_keys_file" in caplog.text and "official MSLS-val protocol" not in caplog.text


def test_a_key_file_that_is_no_text_or_holds_no_key(tmp_path):
    make_dataset(str(tmp_path), name="msls", split="val", database=[(0, 0)], queries=[(0, 0, "k0")])
    cases = ((b"\xff\x00\xfe\x81garbage", "is not a text file"), (b"\xef\xbb\xbf \r\n", "holds no key"))
    for content, message in cases:
        (tmp_path / "keys.txt").write_bytes(content)
        with pytest.raises(ValueError, match=message):
            dw.BaseDataset(str(tmp_path), "msls", "val", query_keys_file=str(tmp_path / "keys.txt"))


def test_labels_that_cannot_match_are_a_warning(tmp_path, caplog):
    """Easting and northing swapped (or another zone, or too small a threshold): recalls 0.0 and exit 0 used
    to be all the user saw."""
    database = [(i * 10.0, 0) for i in range(5)]
    make_dataset(str(tmp_path), name="ok", database=database, queries=[(i * 10.0 + 2, 0) for i in range(4)])
    with caplog.at_level(logging.INFO):
        dw.BaseDataset(str(tmp_path), "ok", "test")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    # The queries' coordinates swapped: 4 of them, none with a database image within 25 m.
    folder = os.path.join(str(tmp_path), "swapped", "images", "test")
    for i, (e, n) in enumerate(database):
        write_jpg(os.path.join(folder, "database", utm_name(BASE_E + e, BASE_N + n)), seed=i)
    for i in range(4):
        write_jpg(os.path.join(folder, "queries", utm_name(BASE_N, BASE_E + i * 10.0 + 2, f"k{i}")), seed=9 + i)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ds = dw.BaseDataset(str(tmp_path), "swapped", "test")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(
        "Every query (4) of swapped/test has no database image within --val_positive_dist_threshold 25 m"
    )
    nearest = np.sqrt(((ds.queries_utms[:3, None] - ds.database_utms[None]) ** 2).sum(-1)).min(1)
    assert "(nearest database image of the first 3: " + ", ".join(f"{d:,.1f} m" for d in nearest) + ")" in warning
    assert "easting and northing swapped" in warning

    # More than half, not all: counted.
    make_dataset(
        str(tmp_path), name="half", database=database, queries=[(2, 0), (5000, 0), (6000, 0), (7000, 0), (8000, 0)]
    )
    caplog.clear()
    with caplog.at_level(logging.INFO):
        dw.BaseDataset(str(tmp_path), "half", "test", positive_dist_threshold=25)
    assert "4 of the 5 queries of half/test have no database image within" in caplog.text


@pytest.mark.parametrize("size", [(14, 10), (224, 224), (333, 517), (1, 1)])
def test_base_transform_is_torchvisions_to_the_bit(size):
    """base_transform is written in torch (evaluation then never imports torchvision, ~170 MB of RSS): it
    must give exactly torchvision's ToTensor + Normalize."""
    rng = np.random.default_rng(size[0])
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    reference = T.Compose([T.ToTensor(), T.Normalize(mean=dw.IMAGENET_MEAN, std=dw.IMAGENET_STD)])
    ours = dw.base_transform(image)
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert torch.equal(ours, reference(image))
