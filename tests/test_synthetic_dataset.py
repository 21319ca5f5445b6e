"""synthetic_dataset.py: determinism, layout, file names, positives, atomic generation, option errors.

Image-producing tests share three tiny sets built once per module (about a second each); the
geometric guarantees of the default-size set are checked on its plan, which draws no pixels.
"""

import hashlib
import importlib.util
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.neighbors import NearestNeighbors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import synthetic_dataset as sd
from synthetic import writer
from synthetic.buildings import LOOKALIKE_MIN_DIST_M
from synthetic.camera import (
    OBLIQUE_PER_DEGREE,
    QUERY_MAX_YAW_DEG,
    QUERY_PAN,
    QUERY_ROLL_DEG,
    QUERY_TILT,
    QUERY_ZOOM_RANGE,
    make_geometry,
)
from synthetic.geometry import (
    ImageLabel,
    format_image_name,
    make_route,
    make_route_shape,
    min_distances,
    pano_id,
    route_position,
    utm_to_latlon,
)
from synthetic.plan import plan_split
from synthetic.views import perspective_coefficients, view_quad

SCRIPT = os.path.join(ROOT, "synthetic_dataset.py")
NOTES = {"day_forward", "day_sideways", "night_forward", "night_sideways"}


def _hashes(root):
    """{relative path: sha256} of every file under ``root``."""
    out = {}
    for folder, _dirs, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _images(root, split, kind):
    folder = os.path.join(root, "images", split, kind)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))


def _utms(paths):
    return np.array([[float(v) for v in os.path.basename(p).split("@")[1:3]] for p in paths])


def _run_cli(args, env=None):
    full_env = dict(os.environ)
    full_env.pop("DATASETS_FOLDER", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, SCRIPT] + list(args), capture_output=True, text=True, timeout=120, env=full_env, cwd=ROOT
    )


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    """Three tiny sets: seed 0 by the library, seed 0 again by the command, seed 1 by the library."""
    base = tmp_path_factory.mktemp("synthetic")
    a = sd.generate(str(base / "a"), "tiny", sd.SyntheticOptions(seed=0, preset="tiny"))
    result = _run_cli(
        ["--datasets_folder", str(base / "b"), "--dataset_name", "tiny", "--preset", "tiny", "--seed", "0"]
    )
    assert result.returncode == 0, result.stderr
    c = sd.generate(str(base / "c"), "tiny", sd.SyntheticOptions(seed=1, preset="tiny"))
    return dict(a=str(a), b=str(base / "b" / "tiny"), c=str(c), base=base)


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_byte_identical_files(tiny_sets):
    first, second = _hashes(tiny_sets["a"]), _hashes(tiny_sets["b"])
    assert len(first) == 3 * (40 + 15) + 1  # images + manifest
    assert first == second


def test_different_seed_gives_different_files(tiny_sets):
    first, other = _hashes(tiny_sets["a"]), _hashes(tiny_sets["c"])
    image_names = {k for k in first if k.endswith(".jpg")}
    assert image_names.isdisjoint(k for k in other if k.endswith(".jpg"))
    assert set(first.values()).isdisjoint(other.values())


# ---------------------------------------------------------------------------------------- layout


def test_layout_counts_and_image_size(tiny_sets):
    root = tiny_sets["a"]
    manifest = sd.read_manifest(root)
    for split in sd.SPLITS:
        for kind, n in (("database", 40), ("queries", 15)):
            paths = _images(root, split, kind)
            assert len(paths) == n == manifest["splits"][split][f"{kind}_num"]
        with Image.open(_images(root, split, "queries")[0]) as image:
            assert image.size == (256, 192) and image.mode == "RGB" and image.format == "JPEG"
    assert sorted(os.listdir(os.path.join(root, "images"))) == sorted(sd.SPLITS)
    # Nothing but the published folder is left beside it (no temporary folders).
    assert os.listdir(os.path.dirname(root)) == ["tiny"]


def test_configurable_sizes(tmp_path):
    root = sd.generate(
        str(tmp_path),
        "small",
        sd.SyntheticOptions(
            preset="tiny",
            image_size=(48, 64),
            train_database_num=12,
            train_queries_num=3,
            val_database_num=10,
            val_queries_num=2,
            test_database_num=11,
            test_queries_num=4,
            routes_per_split=1,
        ),
    )
    counts = {(s, k): len(_images(root, s, k)) for s in sd.SPLITS for k in ("database", "queries")}
    assert counts == {
        ("train", "database"): 12,
        ("train", "queries"): 3,
        ("val", "database"): 10,
        ("val", "queries"): 2,
        ("test", "database"): 11,
        ("test", "queries"): 4,
    }
    with Image.open(_images(root, "val", "database")[0]) as image:
        assert image.size == (64, 48)


# ------------------------------------------------------------------------------------ file names


def test_file_names_parse(tiny_sets):
    root = tiny_sets["a"]
    keys = []
    number = re.compile(r"^-?\d+\.\d{2}$")
    for split in sd.SPLITS:
        for kind in ("database", "queries"):
            for path in _images(root, split, kind):
                fields = os.path.basename(path).split("@")
                assert len(fields) == 16 and fields[0] == "" and fields[-1] == ".jpg", path
                east, north = fields[1:3]
                assert number.match(east) and number.match(north), path
                assert 160_000 < float(east) < 840_000 and 0 < float(north) < 9_400_000
                assert fields[3:5] == ["17", "T"]
                lat, lon = float(fields[5]), float(fields[6])
                assert 40 <= lat < 48 and -84 <= lon <= -78  # zone 17, band T
                assert re.fullmatch(r"[A-Za-z0-9_-]{22}", fields[7]), fields[7]
                keys.append(fields[7])
                assert 0 <= float(fields[9]) < 360
                int(fields[13])
                assert fields[14] in NOTES
                if kind == "database":
                    assert fields[14].startswith("day_")
    assert len(set(keys)) == len(keys)


def test_format_image_name_round_trip():
    name = format_image_name(
        ImageLabel(
            east=612345.678,
            north=4830000.0,
            lat=43.6,
            lon=-79.4,
            key="k" * 22,
            tile="r0",
            heading=-10.0,
            pitch=0.0,
            roll=0.0,
            height=2.5,
            timestamp=1600000000,
            note="night_sideways",
        )
    )
    fields = name.split("@")
    assert fields[1:3] == ["612345.68", "4830000.00"]
    assert fields[7] == "k" * 22 and fields[9] == "350.00" and fields[-2] == "night_sideways"
    with pytest.raises(ValueError, match="@"):
        format_image_name(
            ImageLabel(
                east=0,
                north=0,
                lat=0,
                lon=0,
                key="a@b",
                tile="",
                heading=0,
                pitch=0,
                roll=0,
                height=0,
                timestamp=0,
                note="day_forward",
            )
        )


def test_pano_id_is_a_pure_function():
    assert pano_id(0, "train", "queries", 3) == pano_id(0, "train", "queries", 3)
    ids = {
        pano_id(s, split, kind, i)
        for s in (0, 1)
        for split in sd.SPLITS
        for kind in ("database", "queries")
        for i in range(50)
    }
    assert len(ids) == 2 * 3 * 2 * 50 and all(len(k) == 22 for k in ids)


# ------------------------------------------------------------------------------- positives, notes


def test_every_query_has_database_images_within_25_and_10_m(tiny_sets):
    root = tiny_sets["a"]
    for split in sd.SPLITS:
        db, q = _utms(_images(root, split, "database")), _utms(_images(root, split, "queries"))
        knn = NearestNeighbors().fit(db)
        soft = knn.radius_neighbors(q, radius=25.0, return_distance=False)
        hard = knn.radius_neighbors(q, radius=10.0, return_distance=False)
        assert all(len(p) >= 1 for p in soft) and all(len(p) >= 1 for p in hard), split
        assert np.mean([len(p) for p in soft]) > 2  # "1-several" positives, not a single one


@pytest.mark.parametrize("spacing", [6.0, 12.0])
def test_default_size_plans_keep_queries_within_10_m(spacing):
    # The plan draws no pixels, so the default sizes (and the largest allowed spacing) are cheap to check.
    params = sd.resolve_options(sd.SyntheticOptions(preset="default", db_spacing_m=spacing))
    for seed in (0, 1):
        for split in sd.SPLITS:
            plan = plan_split(
                seed=seed,
                split=split,
                database_num=params[f"{split}_database_num"],
                queries_num=params[f"{split}_queries_num"],
                routes_num=params["routes_per_split"][split],
                db_spacing_m=spacing,
                night_fraction=0.25,
                sideways_fraction=0.4,
            )
            q = np.array([[s.east, s.north] for s in plan.queries])
            d = np.array([[s.east, s.north] for s in plan.database])
            assert min_distances(q, d).max() <= 10.0
            assert len(plan.database) == params[f"{split}_database_num"]


def test_queries_hold_night_and_sideways_and_database_is_day(tiny_sets):
    root = tiny_sets["a"]
    for split in sd.SPLITS:
        notes = [os.path.basename(p).split("@")[-2] for p in _images(root, split, "queries")]
        assert any(n.split("_")[0] == "night" for n in notes), split
        assert any(n.split("_")[1] == "sideways" for n in notes), split
        assert any(n.split("_")[0] == "day" for n in notes), split


def test_splits_lie_in_separate_areas(tiny_sets):
    root = tiny_sets["a"]
    utm = {s: _utms(_images(root, s, "database") + _images(root, s, "queries")) for s in sd.SPLITS}
    for i, a in enumerate(sd.SPLITS):
        for b in sd.SPLITS[i + 1 :]:
            assert min_distances(utm[a], utm[b]).min() > 1000.0


def test_lookalikes_are_far_apart_and_look_alike(tiny_sets):
    root = tiny_sets["a"]
    manifest = sd.read_manifest(root)
    p = manifest["params"]
    for split in sd.SPLITS:
        runs = manifest["splits"][split]["lookalikes"]
        assert runs and all(r["distance_m"] >= LOOKALIKE_MIN_DIST_M for r in runs)
        plan = plan_split(
            seed=0,
            split=split,
            database_num=40,
            queries_num=15,
            routes_num=p["routes_per_split"][split],
            db_spacing_m=p["db_spacing_m"],
            night_fraction=p["night_fraction"],
            sideways_fraction=p["sideways_fraction"],
        )

        def thumb(shot):
            with Image.open(os.path.join(root, "images", split, "database", shot.name)) as image:  # noqa: B023
                x = np.asarray(image.convert("L").resize((16, 12), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
            return (x - x.mean()) / x.std()

        def nearest_shot(route, s):
            return min((sh for sh in plan.database if sh.route == route), key=lambda sh: abs(sh.s - s))  # noqa: B023

        thumbs = np.stack([thumb(sh) for sh in plan.database])
        all_d = np.linalg.norm(thumbs[:, None] - thumbs[None], axis=-1)[np.triu_indices(len(thumbs), 1)]
        for r in runs:
            a = thumb(nearest_shot(r["source_route"], r["source_s"]))
            b = thumb(nearest_shot(r["copy_route"], r["copy_s"]))
            # A look-alike pair is more similar than a typical pair of database images.
            assert np.linalg.norm(a - b) < np.quantile(all_d, 0.25), (split, r)


# ------------------------------------------------------------------------- ensure / atomic writes


def test_ensure_dataset_reuses_matching_set_and_rejects_other_options(tiny_sets):
    root = tiny_sets["a"]
    before = _hashes(root)
    mtime = os.path.getmtime(os.path.join(root, sd.MANIFEST_NAME))
    again = sd.ensure_dataset(os.path.dirname(root), "tiny", sd.SyntheticOptions(seed=0, preset="tiny"))
    assert str(again) == root
    assert os.path.getmtime(os.path.join(root, sd.MANIFEST_NAME)) == mtime and _hashes(root) == before
    with pytest.raises(sd.OptionError, match="seed"):
        sd.ensure_dataset(os.path.dirname(root), "tiny", sd.SyntheticOptions(seed=1, preset="tiny"))


def test_ensure_dataset_generates_when_missing(tmp_path):
    root = sd.ensure_dataset(
        str(tmp_path / "new"),
        "x",
        sd.SyntheticOptions(
            preset="tiny",
            image_size=(32, 48),
            routes_per_split=1,
            train_database_num=6,
            train_queries_num=2,
            val_database_num=6,
            val_queries_num=2,
            test_database_num=6,
            test_queries_num=2,
        ),
    )
    assert len(_images(root, "test", "database")) == 6
    assert sd.read_manifest(root)["params"]["image_size"] == [32, 48]


def test_generate_refuses_existing_and_overwrite_replaces(tmp_path):
    small = dict(
        preset="tiny",
        image_size=(32, 48),
        routes_per_split=1,
        train_database_num=6,
        train_queries_num=2,
        val_database_num=6,
        val_queries_num=2,
        test_database_num=6,
        test_queries_num=2,
    )
    root = sd.generate(str(tmp_path), "s", sd.SyntheticOptions(seed=0, **small))
    with pytest.raises(FileExistsError, match="overwrite"):
        sd.generate(str(tmp_path), "s", sd.SyntheticOptions(seed=1, **small))
    sd.generate(str(tmp_path), "s", sd.SyntheticOptions(seed=1, **small), overwrite=True)
    assert sd.read_manifest(root)["params"]["seed"] == 1
    assert os.listdir(tmp_path) == ["s"]


def test_interrupted_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = writer.render_shot

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "render_shot", failing)
    with pytest.raises(KeyboardInterrupt):
        sd.generate(str(tmp_path), "broken", sd.SyntheticOptions(preset="tiny"))
    assert os.listdir(tmp_path) == []
    # A later run does not trust any leftover: it builds the set from scratch.
    monkeypatch.setattr(writer, "render_shot", real)
    root = sd.ensure_dataset(str(tmp_path), "broken", sd.SyntheticOptions(preset="tiny", image_size=(32, 48)))
    assert len(_images(root, "train", "queries")) == 15


# ---------------------------------------------------------------------------------- option errors


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--db_spacing_m", "50"], "--db_spacing_m"),
        (["--train_database_num", "3"], "--train_database_num"),
        (["--image_size", "10", "10"], "--image_size"),
        (["--jpeg_quality", "0"], "--jpeg_quality"),
        (["--night_fraction", "1.5"], "--night_fraction"),
        (["--dataset_name", ".hidden"], "--dataset_name"),
    ],
)
def test_command_rejects_bad_options_naming_the_flag(tmp_path, flags, named):
    result = _run_cli(["--datasets_folder", str(tmp_path), "--preset", "tiny"] + flags)
    assert result.returncode != 0
    assert named in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_command_needs_a_datasets_folder(tmp_path):
    result = _run_cli(["--preset", "tiny"])
    assert result.returncode != 0 and "--datasets_folder" in result.stderr


def test_command_refuses_to_overwrite_without_flag(tiny_sets):
    result = _run_cli(
        ["--datasets_folder", os.path.dirname(tiny_sets["a"]), "--dataset_name", "tiny", "--preset", "tiny"]
    )
    assert result.returncode != 0 and "--overwrite" in result.stderr
    result = _run_cli(
        [
            "--datasets_folder",
            os.path.dirname(tiny_sets["a"]),
            "--dataset_name",
            "tiny",
            "--preset",
            "tiny",
            "--if_missing",
        ]
    )
    assert result.returncode == 0, result.stderr


def test_library_errors_are_value_errors_naming_the_option(tmp_path):
    with pytest.raises(ValueError, match="--test_queries_num"):
        sd.generate(str(tmp_path), "x", sd.SyntheticOptions(preset="tiny", test_queries_num=1))
    with pytest.raises(ValueError, match="--seed"):
        sd.generate(str(tmp_path), "x", sd.SyntheticOptions(seed=-1))
    with pytest.raises(ValueError, match="--preset"):
        sd.ensure_dataset(str(tmp_path), "x", sd.SyntheticOptions(preset="huge"))
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------- pure geometry


def _latlon_to_utm(lat, lon, zone):
    """Forward transverse Mercator (USGS series), written independently for the round trip."""
    a, f, k0 = 6378137.0, 1 / 298.257223563, 0.9996
    e2 = f * (2 - f)
    ep2 = e2 / (1 - e2)
    phi, lam = math.radians(lat), math.radians(lon - (zone * 6 - 183))
    n = a / math.sqrt(1 - e2 * math.sin(phi) ** 2)
    t, c, aa = math.tan(phi) ** 2, ep2 * math.cos(phi) ** 2, lam * math.cos(phi)
    m = a * (
        (1 - e2 / 4 - 3 * e2**2 / 64 - 5 * e2**3 / 256) * phi
        - (3 * e2 / 8 + 3 * e2**2 / 32 + 45 * e2**3 / 1024) * math.sin(2 * phi)
        + (15 * e2**2 / 256 + 45 * e2**3 / 1024) * math.sin(4 * phi)
        - (35 * e2**3 / 3072) * math.sin(6 * phi)
    )
    x = k0 * n * (aa + (1 - t + c) * aa**3 / 6 + (5 - 18 * t + t**2 + 72 * c - 58 * ep2) * aa**5 / 120)
    y = k0 * (
        m
        + n
        * math.tan(phi)
        * (
            aa**2 / 2
            + (5 - t + 9 * c + 4 * c**2) * aa**4 / 24
            + (61 - 58 * t + t**2 + 600 * c - 330 * ep2) * aa**6 / 720
        )
    )
    return x + 500000.0, y


def test_utm_to_latlon():
    lat, lon = utm_to_latlon(500000.0, 0.0, 17)
    assert abs(lat) < 1e-9 and abs(lon + 81.0) < 1e-9  # equator on the central meridian
    for east, north in [(610000.0, 4825000.0), (670123.45, 4865432.1), (420000.0, 5200000.0)]:
        lat, lon = utm_to_latlon(east, north, 17)
        e2, n2 = _latlon_to_utm(lat, lon, 17)
        assert abs(e2 - east) < 0.01 and abs(n2 - north) < 0.01
    # One degree of latitude is about 111 km.
    lat0, _ = utm_to_latlon(500000.0, 4825000.0)
    lat1, _ = utm_to_latlon(500000.0, 4825000.0 + 111_000.0)
    assert abs((lat1 - lat0) - 1.0) < 0.01


def test_route_position_and_bearing():
    route = make_route(np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]]))
    assert route.length == 20.0
    e, n, b = route_position(route, np.array([5.0, 15.0, 30.0]))
    np.testing.assert_allclose(np.stack([e, n], 1), [[5, 0], [10, 5], [10, 10]], atol=1e-12)
    np.testing.assert_allclose(b, [90.0, 0.0, 0.0], atol=1e-9)


def test_route_shapes_do_not_fold_back():
    rng = np.random.default_rng(3)
    for _ in range(50):
        route = make_route(make_route_shape(rng, 900.0))
        assert abs(route.length - 900.0) < 1e-6
        # All segment directions within 45 degrees of one main direction: any two differ by <= 90.
        d = np.diff(route.vertices, axis=0)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        assert (d @ d.T).min() >= -1e-9
        s = np.arange(0.0, 900.0, 5.0)
        e, n, _ = route_position(route, s)
        pts = np.stack([e, n], 1)
        dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
        arc = np.abs(s[:, None] - s[None])
        assert np.all(dist >= arc * math.cos(math.pi / 4) - 1e-6)


def test_perspective_coefficients_identity_and_shift():
    np.testing.assert_allclose(
        perspective_coefficients((40, 30), np.array([[0, 0], [40, 0], [40, 30], [0, 30]])),
        [1, 0, 0, 0, 1, 0, 0, 0],
        atol=1e-9,
    )
    coeffs = perspective_coefficients((40, 30), np.array([[5, 2], [45, 2], [45, 32], [5, 32]]))
    np.testing.assert_allclose(coeffs, [1, 0, 5, 0, 1, 2, 0, 0], atol=1e-9)


@pytest.mark.parametrize("image_size", [(192, 256), (224, 224), (96, 200)])
def test_extreme_query_views_stay_inside_the_rendered_canvas(image_size):
    g = make_geometry(image_size)
    hc, wc = g.canvas
    for zoom in QUERY_ZOOM_RANGE:
        for oblique in (0.0, QUERY_MAX_YAW_DEG * OBLIQUE_PER_DEGREE):
            for pan in (-1, 1):
                for tilt in (-1, 1):
                    for roll in (-1, 1):
                        quad = view_quad(
                            g,
                            zoom=zoom,
                            pan_px=pan * QUERY_PAN * g.width,
                            tilt_px=tilt * QUERY_TILT * g.height,
                            roll_deg=roll * QUERY_ROLL_DEG,
                            oblique=-oblique,
                        )
                        assert quad[:, 0].min() >= 0 and quad[:, 0].max() <= wc, (zoom, oblique, pan, roll)
                        assert quad[:, 1].min() >= 0 and quad[:, 1].max() <= hc, (zoom, oblique, tilt, roll)


# ------------------------------------------------------------------------------------- benchmark


def _baseline_module():
    spec = importlib.util.spec_from_file_location(
        "synthetic_baseline", os.path.join(ROOT, "benchmarks", "synthetic_baseline.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_baseline_recall_helpers():
    bl = _baseline_module()
    predictions = np.array([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    positives = [np.array([0]), np.array([1]), np.array([3])]
    np.testing.assert_allclose(bl.recalls_at(predictions, positives, [1, 2, 3]), [100 / 3, 100 / 3, 200 / 3])
    # One positive among 4: random R@1 = 1/4, R@2 = 1/2.
    np.testing.assert_allclose(bl.chance_recalls([np.array([0])], 4, [1, 2]), [25.0, 50.0])


def test_baseline_script_runs_on_a_kept_set(tiny_sets):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "synthetic_baseline.py"),
            "--datasets_folder",
            os.path.dirname(tiny_sets["a"]),
            "--dataset_name",
            "tiny",
            "--preset",
            "tiny",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "thumbnail 16x12 L2" in result.stdout and "chance" in result.stdout
    assert "reused" in result.stdout
