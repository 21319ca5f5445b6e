"""How images and folders are read (image_files.py), everywhere: data sets, localize.py, the picture tools.

EXIF orientation, high-bit-depth grayscale, photos above Pillow's pixel limit, decompression bombs;
folder links (loops, links into the other part of a split, data on another drive), broken links and
the counts of skipped files.
"""

import logging
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image, ImageOps

import datasets_ws
import image_files
import localize
import network
import retrieval
import synthetic_dataset
import visualizations

RESIZE = (112, 112)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The tiny synthetic set: (datasets folder, name, its test split's database and query paths)."""
    folder = tmp_path_factory.mktemp("datasets")
    synthetic_dataset.generate(str(folder), "synthetic", synthetic_dataset.SyntheticOptions(seed=0, preset="tiny"))
    split = os.path.join(folder, "synthetic", "images", "test")
    return (
        str(folder),
        "synthetic",
        datasets_ws.collect_jpgs(os.path.join(split, "database")),
        datasets_ws.collect_jpgs(os.path.join(split, "queries")),
    )


def _copy_dataset(synthetic, destination):
    """A private copy of the synthetic data set (tests change its folders); returns its datasets folder."""
    folder, name = synthetic[0], synthetic[1]
    shutil.copytree(os.path.join(folder, name), os.path.join(destination, name), symlinks=True)
    return str(destination)


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _stored_for(upright: Image.Image, orientation: int) -> Image.Image:
    """The pixels a camera stores so that a viewer applying `orientation` shows `upright`."""
    inverse = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    return upright.copy() if orientation == 1 else upright.transpose(inverse[orientation])


def _array(image):
    return np.asarray(image, dtype=np.int16)


# ------------------------------------------------------------------------------------------------
# Reading one image
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_a_viewer_does(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    upright = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    path = str(tmp_path / "photo.png")  # lossless, so the pixels can be compared exactly
    _stored_for(upright, orientation).save(path, exif=_exif(orientation))
    with Image.open(path) as stored:
        viewer = ImageOps.exif_transpose(stored).convert("RGB")
    read = datasets_ws.open_image(path)
    assert read.size == (20, 12) and np.array_equal(_array(read), _array(viewer))
    assert np.array_equal(_array(read), _array(upright))


def test_16_bit_grayscale_png_reads_as_its_8_bit_copy(tmp_path):
    gray8 = np.random.default_rng(0).integers(0, 256, (24, 32), dtype=np.uint8)
    Image.fromarray(gray8).save(tmp_path / "gray8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # the usual widening
    Image.fromarray(gray8.astype(np.uint16) << 8).save(tmp_path / "gray16_shift.png")  # zero-filled low byte
    with Image.open(tmp_path / "gray16.png") as check:
        assert check.mode == "I;16"  # what this Pillow makes of it (and what convert("RGB") clipped to white)
    reference = _array(datasets_ws.open_image(str(tmp_path / "gray8.png")))
    assert np.array_equal(_array(datasets_ws.open_image(str(tmp_path / "gray16.png"))), reference)
    shifted = _array(datasets_ws.open_image(str(tmp_path / "gray16_shift.png")))
    assert np.abs(shifted - reference).max() <= 1


def test_16_bit_big_endian_32_bit_integer_and_float_tiffs_read_as_their_8_bit_copy(tmp_path):
    gray8 = np.random.default_rng(1).integers(0, 256, (16, 24), dtype=np.uint8)
    reference = np.repeat(gray8[..., None], 3, axis=2).astype(np.int16)
    files = {
        "be16.tif": Image.fromarray((gray8.astype(np.uint16) * 257).astype(">u2")),
        "int32.tif": Image.fromarray(np.rint(gray8.astype(np.float64) * ((2**31 - 1) / 255)).astype(np.int32)),
        "float.tif": Image.fromarray((gray8.astype(np.float32) / 255)),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as check:
            assert check.mode in ("I;16B", "I", "F"), (name, check.mode)
        read = _array(datasets_ws.open_image(str(tmp_path / name)))
        assert np.abs(read - reference).max() <= 1, name
    # A 32-bit integer image whose file does not declare its depth: the 16-bit convention.
    in_memory = Image.fromarray(gray8.astype(np.int32) * 257)
    assert in_memory.mode == "I"
    assert np.array_equal(np.asarray(image_files.to_8bit(in_memory)), gray8)
    # Float beyond [0, 1] and NaN: clipped, NaN black.
    odd = Image.fromarray(np.array([[-1.0, 0.5, 2.0, np.nan]], dtype=np.float32))
    assert np.asarray(image_files.to_8bit(odd)).tolist() == [[0, 128, 255, 0]]


def test_plain_8_bit_images_are_read_pixel_for_pixel_as_before(synthetic, tmp_path):
    """Benchmark JPEGs (no EXIF orientation, 8-bit): exactly Image.open(...).convert('RGB')."""
    paths = synthetic[2][:3] + synthetic[3][:2]
    gray = str(tmp_path / "gray.jpg")
    Image.open(paths[0]).convert("L").save(gray)
    for path in paths + [gray]:
        with Image.open(path) as img:
            expected = img.convert("RGB")
        assert np.array_equal(_array(datasets_ws.open_image(path)), _array(expected))


def _jpeg_with_size(path, width, height, source):
    """A valid small JPEG whose frame header declares width x height (what a decompression bomb does)."""
    data = bytearray(open(source, "rb").read())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    open(path, "wb").write(bytes(data))


def _png_with_size(path, width, height):
    """A PNG whose header declares width x height (chunk CRC fixed, so only the size is odd)."""
    buffer = path + ".small.png"
    Image.new("L", (8, 8)).save(buffer)
    data = bytearray(open(buffer, "rb").read())
    os.remove(buffer)
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF)
    open(path, "wb").write(bytes(data))


def test_what_cannot_be_a_photo_is_refused_with_the_file_named(synthetic, tmp_path):
    bomb = str(tmp_path / "bomb.jpg")
    _jpeg_with_size(bomb, 60000, 60000, synthetic[2][0])
    with pytest.raises(ValueError, match=r"declares 60000x60000 pixels in only \d+ bytes: no photo") as error:
        datasets_ws.open_image(bomb)
    assert bomb in str(error.value)
    huge_png = str(tmp_path / "huge.png")
    _png_with_size(huge_png, 20000, 20000)
    with pytest.raises(ValueError, match="is not a JPEG, so it cannot be read at a reduced size") as error:
        datasets_ws.open_image(huge_png)
    assert huge_png in str(error.value)


def test_above_the_pixel_limit_jpegs_are_draft_decoded_below_it_pixels_are_unchanged(synthetic, tmp_path, monkeypatch):
    """With a small limit (read per call: nothing global is changed by the code), a 256x192 JPEG is
    below it and a 1024x768 JPEG above twice it: the latter is read at a reduced size, never under
    min_side, close to its full decode shrunk the same way."""
    small = synthetic[2][0]
    big = str(tmp_path / "big.jpg")
    with Image.open(small) as img:
        full_small = img.convert("RGB")
    full_small.resize((1024, 768), Image.Resampling.BICUBIC).save(big, quality=95)
    with Image.open(big) as img:
        full_big = img.convert("RGB")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 256 * 192)
    assert np.array_equal(_array(datasets_ws.open_image(small)), _array(full_small))
    with pytest.raises(Image.DecompressionBombError):
        Image.open(big)  # what the old reading did with such a file
    read = datasets_ws.open_image(big, min_side=150)
    assert read.size == (256, 192)  # 1/4: the largest reduction keeping both sides >= 150
    assert datasets_ws.open_image(big, min_side=300).size == (512, 384)
    shrunk = full_big.resize((256, 192), Image.Resampling.BOX)
    assert np.abs(_array(read) - _array(shrunk)).mean() < 3
    # Between once and twice the limit Pillow reads the file (with its warning): drafted too.
    band = str(tmp_path / "band.jpg")
    full_big.resize((280, 200)).save(band, quality=95)
    with pytest.warns(Image.DecompressionBombWarning):
        assert datasets_ws.open_image(band, min_side=100).size == (140, 100)
    assert Image.MAX_IMAGE_PIXELS == 256 * 192  # the code only read it


@pytest.fixture(scope="module")
def huge_query(synthetic, tmp_path_factory):
    """Database image 0 as a 16128 x 12096 JPEG (195 megapixels: above twice Pillow's default limit,
    so Image.open refuses it), as a 200-megapixel phone camera writes."""
    folder = tmp_path_factory.mktemp("huge")
    with Image.open(synthetic[2][0]) as img:
        pixels = np.asarray(img.convert("RGB"))
    big = np.repeat(np.repeat(pixels, 63, axis=0), 63, axis=1)
    path = str(folder / "huge.jpg")
    Image.fromarray(big).save(path, quality=80)
    del big
    return path


def test_a_195_megapixel_photo_is_read_at_a_fraction_of_its_size(huge_query):
    assert Image.MAX_IMAGE_PIXELS is not None and 16128 * 12096 > 2 * Image.MAX_IMAGE_PIXELS
    read = datasets_ws.open_image(huge_query, min_side=datasets_ws.draft_min_side(RESIZE))
    assert read.size == (2016, 1512)  # 1/8: both sides still >= 1024


# ------------------------------------------------------------------------------------------------
# End to end through localize: the query finds its own place as its upright 8-bit copy does
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_queries(synthetic, tmp_path_factory):
    """Database: 20 synthetic images. Queries, for database images 0, 5, 10, 15: an upright JPEG copy,
    the same stored rotated with EXIF Orientation 6 and 8, its grayscale as 8-bit and 16-bit PNG."""
    root = tmp_path_factory.mktemp("odd")
    db, q = root / "db", root / "q"
    db.mkdir()
    q.mkdir()
    for i, src in enumerate(synthetic[2][:20]):
        shutil.copy(src, db / f"img_{i:02d}.jpg")
    for i in (0, 5, 10, 15):
        with Image.open(synthetic[2][i]) as img:
            upright = img.convert("RGB")
        upright.save(q / f"{i:02d}_upright.jpg", quality=95)
        for tag in (6, 8):
            _stored_for(upright, tag).save(q / f"{i:02d}_tag{tag}.jpg", quality=95, exif=_exif(tag))
        gray8 = np.asarray(upright.convert("L"))
        Image.fromarray(gray8).save(q / f"{i:02d}_gray8.png")
        Image.fromarray(gray8.astype(np.uint16) * 257).save(q / f"{i:02d}_gray16.png")
    return str(db), str(q)


@pytest.fixture(scope="module")
def odd_database(odd_queries):
    """(retrieval engine of a random tiny model, retrieval.Database of the 20 database images)."""
    torch.manual_seed(0)
    model = network.GeoLocalizationNet(**TINY).eval()
    paths = localize.collect_images(odd_queries[0])
    with retrieval.Retrieval(model, batch_size=4, num_workers=0, device="cpu") as engine:
        yield engine, engine.build_database(localize.FolderImages(paths, resize=RESIZE), range(len(paths)), paths=paths)


def _localize(odd_database, queries):
    """{query file name: (first-stage list, re-ranked list)} of localize's two stages."""
    engine, database = odd_database
    extracted = engine.extract_queries(
        localize.FolderImages(queries, resize=RESIZE), range(len(queries)), method="hard_resize"
    )
    ranking = engine.rank(database, extracted, rerank_num=5)
    return {
        os.path.basename(p): (ranking.first_predictions[k].tolist(), ranking.predictions[k].tolist())
        for k, p in enumerate(queries)
    }


@pytest.fixture(scope="module")
def odd_localized(odd_queries, odd_database):
    return _localize(odd_database, localize.collect_images(odd_queries[1], flag="--queries_folder"))


@pytest.mark.parametrize("i", [0, 5, 10, 15])
def test_queries_stored_rotated_with_exif_find_their_place_as_the_upright_copy(odd_localized, odd_queries, i):
    upright_first, upright = odd_localized[f"{i:02d}_upright.jpg"]
    assert upright_first[0] == i and upright[0] == i  # a random model finds an identical image first
    for tag in (6, 8):
        first, reranked = odd_localized[f"{i:02d}_tag{tag}.jpg"]
        assert first[0] == i and reranked[0] == i, tag
    # What the model sees: the upright picture (up to the JPEG noise of the two encodings).
    images = localize.FolderImages(
        [os.path.join(odd_queries[1], f"{i:02d}_{kind}.jpg") for kind in ("upright", "tag6", "tag8")], resize=RESIZE
    )
    upright_tensor = images.load(0, "hard_resize")
    for k in (1, 2):
        assert (images.load(k, "hard_resize") - upright_tensor).abs().mean() < 0.05


@pytest.mark.parametrize("i", [0, 5, 10, 15])
def test_a_16_bit_grayscale_query_ranks_exactly_as_its_8_bit_copy(odd_localized, i):
    assert odd_localized[f"{i:02d}_gray16.png"] == odd_localized[f"{i:02d}_gray8.png"]


def test_a_195_megapixel_query_finds_its_place(odd_database, huge_query):
    first, reranked = _localize(odd_database, [huge_query])["huge.jpg"]
    assert first[0] == 0 and reranked[0] == 0


def test_picture_rows_show_exif_rotated_and_16_bit_queries_as_a_viewer(odd_queries):
    q = odd_queries[1]
    rows = {
        kind: visualizations.prediction_row(os.path.join(q, name), [], [], border=0)
        for kind, name in (
            ("upright", "05_upright.jpg"),
            ("tag6", "05_tag6.jpg"),
            ("tag8", "05_tag8.jpg"),
            ("gray8", "05_gray8.png"),
            ("gray16", "05_gray16.png"),
        )
    }
    assert rows["upright"].size == (213, 160)  # 256 x 192 shown 160 high
    for kind in ("tag6", "tag8"):
        assert rows[kind].size == rows["upright"].size
        assert np.abs(_array(rows[kind]) - _array(rows["upright"])).mean() < 4
    assert np.array_equal(_array(rows["gray16"]), _array(rows["gray8"]))
    assert _array(rows["gray16"]).mean() < 250  # not the blank white of a clipped 16-bit image


# ------------------------------------------------------------------------------------------------
# Folders: links, broken links, skipped files
# ------------------------------------------------------------------------------------------------


def _split(datasets, part=""):
    return os.path.join(datasets, "synthetic", "images", "test", part)


def test_a_link_looping_back_inside_a_split_does_not_grow_the_database(synthetic, tmp_path, caplog):
    datasets = _copy_dataset(synthetic, tmp_path)
    os.symlink("..", _split(datasets, "database/loop"))
    with caplog.at_level(logging.INFO):
        ds = datasets_ws.BaseDataset(datasets, "synthetic", "test", resize=RESIZE)
    assert ds.database_num == len(synthetic[2]) == 40 and ds.queries_num == len(synthetic[3]) == 15
    assert [os.path.basename(p) for p in ds.database_paths] == [os.path.basename(p) for p in synthetic[2]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Did not enter" in w and "database/loop" in w and "contains" in w for w in warnings)
    assert any("did not enter 1 linked folders" in r.getMessage() for r in caplog.records)


def test_links_between_the_database_and_the_queries_are_not_followed(synthetic, tmp_path, caplog):
    datasets = _copy_dataset(synthetic, tmp_path)
    os.symlink("../queries", _split(datasets, "database/queries_link"))
    os.symlink("../database", _split(datasets, "queries/database_link"))
    with caplog.at_level(logging.INFO):
        ds = datasets_ws.BaseDataset(datasets, "synthetic", "test", resize=RESIZE)
    assert ds.database_num == 40 and ds.queries_num == 15
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("database/queries_link" in w and "do not belong here" in w for w in warnings)
    assert any("queries/database_link" in w and "do not belong here" in w for w in warnings)


def test_localize_folders_with_a_looping_link_list_each_image_once(synthetic, tmp_path, caplog):
    db = tmp_path / "db"
    (db / "street").mkdir(parents=True)
    for src in synthetic[2][:5]:
        shutil.copy(src, db / "street")
    os.symlink("..", db / "street" / "up")
    os.symlink(str(db / "street"), db / "alias")  # a second path to a folder that is read anyway
    q = tmp_path / "q"
    q.mkdir()
    shutil.copy(synthetic[3][0], q)
    os.symlink(str(db), q / "db_link")  # the database must not become queries
    with caplog.at_level(logging.INFO):
        assert len(localize.collect_images(str(db))) == 5
        assert len(localize.collect_images(str(q), flag="--queries_folder", protect=[str(db)])) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("Did not enter" in w for w in warnings) == 3


def test_links_to_folders_elsewhere_are_followed_once_each(synthetic, tmp_path, caplog):
    """Data on another drive: followed, its files listed under the link's path; two links to one folder,
    a folder inside it reached again, and a loop inside it are read once / not at all."""
    datasets = _copy_dataset(synthetic, tmp_path / "data")
    drive = tmp_path / "other_drive" / "extra"
    (drive / "sub").mkdir(parents=True)
    for src in synthetic[2][:2]:
        shutil.copy(src, drive / ("copy" + os.path.basename(src)))
    shutil.copy(synthetic[2][2], drive / "sub" / ("copy" + os.path.basename(synthetic[2][2])))
    os.symlink(str(drive), _split(datasets, "database/extra"))
    os.symlink(str(drive), _split(datasets, "database/extra_again"))
    os.symlink(str(drive / "sub"), _split(datasets, "database/extra_sub"))
    os.symlink(str(drive.parent), drive / "back")  # a loop on the other drive
    with caplog.at_level(logging.INFO):
        paths = datasets_ws.collect_jpgs(_split(datasets, "database"), protect=(_split(datasets),))
    linked = [p for p in paths if "copy@" in os.path.basename(p)]
    assert len(paths) == 40 + 3 and len(linked) == 3
    assert all(p.startswith(_split(datasets, "database/extra") + os.sep) for p in linked)
    assert paths == sorted(paths)
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "through 1 followed folder links and 0 file links" in log
    assert "did not enter 3 linked folders" in log


def test_links_to_image_files_are_read(synthetic, tmp_path):
    db = tmp_path / "db"
    db.mkdir()
    os.symlink(synthetic[2][0], db / "linked.jpg")
    shutil.copy(synthetic[2][1], db / "real.jpg")
    assert [os.path.basename(p) for p in localize.collect_images(str(db))] == ["linked.jpg", "real.jpg"]
    assert datasets_ws.open_image(str(db / "linked.jpg")).size == (256, 192)


def test_link_free_tree_lists_the_same_files_in_the_same_order_as_before(synthetic):
    import glob

    for part in ("database", "queries"):
        folder = _split(synthetic[0], part)
        assert datasets_ws.collect_jpgs(folder) == sorted(
            glob.glob(os.path.join(folder, "**", "*.jpg"), recursive=True)
        )


def test_broken_links(synthetic, tmp_path, caplog):
    db = tmp_path / "db"
    db.mkdir()
    shutil.copy(synthetic[2][0], db / "@1@2@.jpg")
    os.symlink(str(tmp_path / "gone"), db / "old_folder")
    with caplog.at_level(logging.INFO):
        assert len(datasets_ws.collect_jpgs(str(db))) == 1
    assert any("skipped 1 broken symbolic links" in r.getMessage() for r in caplog.records)
    os.symlink(str(tmp_path / "gone.jpg"), db / "@3@4@.jpg")
    with pytest.raises(FileNotFoundError, match=r"@3@4@\.jpg' is a broken symbolic link .*gone\.jpg"):
        datasets_ws.collect_jpgs(str(db))


def test_msls_test_split_left_as_a_dangling_absolute_link_says_how_to_fix_it(synthetic, tmp_path):
    """The benchmark's formatter makes MSLS's `test` an absolute link to `val`; moved, it dangles."""
    datasets = _copy_dataset(synthetic, tmp_path / "moved")
    images = os.path.join(datasets, "synthetic", "images")
    shutil.rmtree(os.path.join(images, "test"))
    os.symlink(str(tmp_path / "where_it_was" / "images" / "val"), os.path.join(images, "test"))
    with pytest.raises(FileNotFoundError) as error:
        datasets_ws.BaseDataset(datasets, "synthetic", "test", resize=RESIZE)
    message = str(error.value)
    assert "is a broken symbolic link" in message and "where_it_was" in message
    assert f"cd {images} && ln -sfn val test" in message
    os.remove(os.path.join(images, "test"))
    os.symlink("val", os.path.join(images, "test"))  # the fix the message gives
    assert datasets_ws.BaseDataset(datasets, "synthetic", "test", resize=RESIZE).queries_num > 0
    with pytest.raises(FileNotFoundError, match="--queries_folder .* is a broken symbolic link"):
        os.symlink(str(tmp_path / "nowhere"), tmp_path / "q_link")
        localize.collect_images(str(tmp_path / "q_link"), flag="--queries_folder")


def test_skipped_files_are_counted_by_suffix_and_image_formats_warned(synthetic, tmp_path, caplog):
    db = tmp_path / "db"
    db.mkdir()
    shutil.copy(synthetic[2][0], db / "@1@2@.jpg")
    shutil.copy(synthetic[2][0], db / "@1@2@b.JPG")
    shutil.copy(synthetic[2][0], db / ".@1@2@c.jpg")
    for name in ("a.webp", "b.tiff", "c.heic", "d.HEIC", "notes.txt"):
        (db / name).write_bytes(b"x")
    with caplog.at_level(logging.INFO):
        assert len(datasets_ws.collect_jpgs(str(db))) == 1
        assert len(localize.collect_images(str(db))) == 2  # localize reads .JPG too
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    infos = [m for level, m in messages if level == logging.INFO]
    warnings = [m for level, m in messages if level == logging.WARNING]
    assert any(
        "skipped 6 files by their name (1 .HEIC, 1 .JPG, 1 .heic, 1 .tiff, 1 .txt, 1 .webp" in m
        and "lower-case .jpg" in m
        for m in infos
    )
    assert any("skipped 1 hidden entries" in m for m in infos)
    assert any("5 image files were skipped" in m for m in warnings)
    assert any("4 image files were skipped (1 .HEIC, 1 .heic, 1 .tiff, 1 .webp)" in m for m in warnings)


def test_a_195_megapixel_query_in_a_data_set_is_evaluated(synthetic, huge_query, tmp_path):
    """What eval.py reads: BaseDataset items, for every query test method."""
    datasets = _copy_dataset(synthetic, tmp_path)
    name = "@" + "@".join(os.path.basename(synthetic[2][0]).split("@")[1:3]) + "@huge@.jpg"
    shutil.copy(huge_query, _split(datasets, "queries/" + name))
    for method in ("hard_resize", "single_query", "five_crops"):
        ds = datasets_ws.BaseDataset(datasets, "synthetic", "test", resize=RESIZE, test_method=method)
        index = ds.images_paths.index(_split(datasets, "queries/" + name))
        image, _ = ds[index]
        assert torch.isfinite(image).all()
        assert image.shape[-2:] == ((112, 140) if method == "single_query" else (112, 112)), method
