"""identity.py: fingerprints of weights, files and image lists, and the differences between identities."""

import hashlib
import os

import torch
from conftest import TINY

import identity
import network
import reproduce
import retrieval


def test_weights_sha256_follows_the_weights_only():
    torch.manual_seed(0)
    a = network.GeoLocalizationNet(**TINY)
    torch.manual_seed(0)
    b = network.GeoLocalizationNet(**TINY)
    assert identity.weights_sha256(a) == identity.weights_sha256(b)
    with torch.no_grad():
        b.aggregation[1].p += 1e-6
    assert identity.weights_sha256(a) != identity.weights_sha256(b)


def test_database_settings_differences_name_every_difference():
    saved = dict(
        backbone="vit_tiny",
        registers=False,
        depth=2,
        embed_dim=192,
        resize=[112, 112],
        precision="fp32",
        database_method="hard_resize",
        weights_sha256="a" * 64,
    )
    assert identity.differences(saved, dict(saved)) == []
    now = dict(saved, resize=[224, 224], weights_sha256="b" * 64)
    problems = identity.differences(saved, now)
    assert len(problems) == 2
    assert "resize: [112, 112] saved, [224, 224] now" in problems[0] and "weights differ" in problems[1]


def _images(folder, names):
    paths = []
    for name in names:
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(name.encode())
        paths.append(path)
    return paths


def test_image_list_fingerprint_is_reproduce_s_key_and_counts_per_folder(tmp_path):
    """The fingerprint hashes what reproduce.py's results cache has always hashed (name, size, mtime per
    image, in order), so its existing results files keep their keys."""
    paths = _images(str(tmp_path), ["database/a.jpg", "database/b.jpg", "queries/c.jpg"])
    fingerprint = identity.ImageList.of(paths, str(tmp_path)).fingerprint()
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, tmp_path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    assert fingerprint == {"sha256": h.hexdigest(), "counts": {"database": 2, "queries": 1}}
    assert reproduce.images_fingerprint(str(tmp_path)) == fingerprint


def test_image_list_changes_and_record_round_trip(tmp_path):
    paths = _images(str(tmp_path), ["0.jpg", "1.jpg", "2.jpg"])
    saved = identity.ImageList.of(paths, str(tmp_path))
    assert identity.ImageList.from_record(saved.record()) == saved
    assert identity.ImageList.of(paths, str(tmp_path)).changes_since(saved) == []
    os.remove(paths[0])
    with open(paths[1], "ab") as f:
        f.write(b"more")
    now = identity.ImageList.of(paths[1:] + _images(str(tmp_path), ["new.jpg"]), str(tmp_path))
    assert now.changes_since(saved) == ["1 added (new.jpg)", "1 deleted (0.jpg)", "1 modified (1.jpg)"]


def test_differences_of_run_identities_in_words():
    saved = {
        "weights_sha256": "a" * 64,
        "images": {"sha256": "x", "counts": {"database": 15, "queries": 7}},
        "settings": {"resize": [224, 224], "rerank_num": 100},
    }
    assert identity.differences(saved, dict(saved)) == []
    now = {
        "weights_sha256": "b" * 64,
        "images": {"sha256": "y", "counts": {"database": 22, "queries": 7}},
        "settings": {"resize": [112, 112], "rerank_num": 100},
    }
    assert identity.differences(saved, now) == [
        "the model weights differ (fingerprint aaaaaaaaaaaa… saved, bbbbbbbbbbbb… now)",
        "the images changed (database: 15 -> 22 images)",
        "resize: [224, 224] saved, [112, 112] now",
    ]
    same_counts = dict(saved, images={"sha256": "z", "counts": saved["images"]["counts"]})
    assert identity.differences(saved, same_counts) == [
        "the images changed (same numbers; names, sizes or modification times differ)"
    ]
    assert identity.differences({}, {"checkpoint": {"sha256": "c"}}) == ["the checkpoint changed (other contents)"]


def test_file_fingerprint_follows_the_contents(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    assert (
        identity.file_fingerprint(str(a))
        == identity.file_fingerprint(str(b))
        == {
            "sha256": hashlib.sha256(b"weights").hexdigest(),
            "size": 7,
        }
    )
    b.write_bytes(b"Weights")
    assert identity.file_fingerprint(str(a)) != identity.file_fingerprint(str(b))


def test_descriptor_identity_records_the_model_and_flags(tiny_model):
    settings = retrieval.descriptor_identity(
        tiny_model, backbone="vit_tiny", registers=False, resize=(112, 112), precision="fp32"
    )
    assert settings == {
        "backbone": "vit_tiny",
        "registers": False,
        "depth": 2,
        "embed_dim": 192,
        "resize": [112, 112],
        "precision": "fp32",
        "database_method": "hard_resize",
        "weights_sha256": identity.weights_sha256(tiny_model),
        "dense_store_dtype": "float32",
    }
