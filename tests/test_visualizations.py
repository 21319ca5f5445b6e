"""Tests of visualizations.py: RANSAC geometry (OpenCV's fit, and that nothing else needs OpenCV), match drawing,
heat maps, prediction rows, atomic saving. Small synthetic inputs only (the whole file runs in a few seconds)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # let the file run from any current directory
    sys.path.insert(0, str(_ROOT))

import visualizations as vis

GREY = (128, 128, 128)


# --------------------------------------------------------------------------------------
# fixtures / helpers
# --------------------------------------------------------------------------------------
def _rotation(axis, angle):
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _camera_pair(rng, *, n_points, size=224.0, noise=0.5):
    """Two pinhole views of random 3-D points: returns (pts_a, pts_b, F_true)."""
    k = np.array([[300.0, 0, size / 2], [0, 300.0, size / 2], [0, 0, 1]])
    points = np.c_[rng.uniform(-3, 3, n_points), rng.uniform(-3, 3, n_points), rng.uniform(6, 12, n_points)]
    rotation = _rotation([0.2, 1.0, 0.1], 0.15)
    translation = np.array([1.0, 0.1, 0.2])

    def project(p):
        h = (k @ p.T).T
        return h[:, :2] / h[:, 2:]

    pts_a = project(points) + rng.normal(0, noise, (n_points, 2))
    pts_b = project((rotation @ points.T).T + translation) + rng.normal(0, noise, (n_points, 2))
    t_cross = np.array(
        [
            [0, -translation[2], translation[1]],
            [translation[2], 0, -translation[0]],
            [-translation[1], translation[0], 0],
        ]
    )
    k_inv = np.linalg.inv(k)
    f_true = k_inv.T @ t_cross @ rotation @ k_inv
    return pts_a, pts_b, f_true / np.linalg.norm(f_true)


def _pairs(a: np.ndarray, b: np.ndarray):
    """The project's mutual_nn_pairs (local_matching) on numpy features."""
    import torch

    from local_matching import mutual_nn_pairs

    ia, ib = mutual_nn_pairs(torch.from_numpy(a), torch.from_numpy(b))
    return np.asarray(ia.cpu() if hasattr(ia, "cpu") else ia), np.asarray(ib.cpu() if hasattr(ib, "cpu") else ib)


def _differs(pixel, colour=GREY, tolerance=30):
    return max(abs(int(p) - int(c)) for p, c in zip(pixel, colour)) > tolerance


# --------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------
def test_grid_indices_to_pixels_are_cell_centres():
    # 2x4 grid on a 40x10 image: cells are 10 px wide and 5 px high.
    points = vis.grid_indices_to_pixels(np.array([0, 3, 5]), (2, 4), (40, 10))
    np.testing.assert_allclose(points, [[5.0, 2.5], [35.0, 2.5], [15.0, 7.5]])
    with pytest.raises(ValueError, match="indices"):
        vis.grid_indices_to_pixels(np.array([8]), (2, 4), (40, 10))


def _epipolar_distances(f, pts_a, pts_b):
    """(N,) symmetric epipolar distances in pixels: for each match the larger of the distance of
    x_b to the line F x_a and of x_a to the line F^T x_b (the error RANSAC thresholds)."""
    ha = np.c_[pts_a, np.ones(len(pts_a))]
    hb = np.c_[pts_b, np.ones(len(pts_b))]
    lines_b, lines_a = ha @ f.T, hb @ f  # F x_a (in B), F^T x_b (in A)
    algebraic = np.abs(np.sum(lines_b * hb, axis=1))
    return np.maximum(
        algebraic / np.hypot(lines_b[:, 0], lines_b[:, 1]), algebraic / np.hypot(lines_a[:, 0], lines_a[:, 1])
    )


def test_ransac_keeps_true_matches_and_rejects_outliers():
    rng = np.random.default_rng(3)
    pts_a, pts_b, f_true = _camera_pair(rng, n_points=200)
    n_out = 80
    out_a = rng.uniform(0, 224, (n_out, 2))
    out_b = rng.uniform(0, 224, (n_out, 2))
    truth = np.r_[np.ones(200, bool), np.zeros(n_out, bool)]
    order = rng.permutation(len(truth))  # outliers mixed among the true matches
    all_a, all_b, truth = np.r_[pts_a, out_a][order], np.r_[pts_b, out_b][order], truth[order]
    # The true geometry itself explains the true matches to within the threshold.
    assert np.median(_epipolar_distances(f_true, pts_a, pts_b)) < 1.5

    f, mask = vis.fundamental_ransac(all_a, all_b, threshold=3.0)
    assert f is not None and f.shape == (3, 3) and f.dtype == np.float64
    assert mask.shape == (len(truth),) and mask.dtype == bool
    assert mask[truth].mean() >= 0.9  # most true matches kept
    assert (~mask[~truth]).mean() >= 0.85  # most outliers rejected (some fall near lines)
    # A proper fundamental matrix: unit norm, rank 2, small error on the true points.
    assert np.linalg.norm(f) == pytest.approx(1.0)
    singular = np.linalg.svd(f, compute_uv=False)
    assert singular[2] < 1e-9 * singular[0]
    assert np.median(_epipolar_distances(f, pts_a, pts_b)) < 1.5
    # The inliers are exactly the matches within the threshold of the returned F.
    distances = _epipolar_distances(f, all_a, all_b)
    np.testing.assert_array_equal(mask, distances <= 3.0)
    # A smaller threshold keeps fewer matches.
    _, strict = vis.fundamental_ransac(all_a, all_b, threshold=0.5)
    assert strict.sum() < mask.sum()


def test_ransac_is_deterministic_and_handles_few_and_degenerate_points():
    rng = np.random.default_rng(4)
    pts_a, pts_b, _ = _camera_pair(rng, n_points=60)
    pts_a[:15] = rng.uniform(0, 224, (15, 2))
    f1, m1 = vis.fundamental_ransac(pts_a, pts_b)
    f2, m2 = vis.fundamental_ransac(pts_a, pts_b)
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(f1, f2)
    # Most of the 15 replaced points are rejected (a random point can fall near its epipolar line).
    assert m1[15:].mean() >= 0.9 and (~m1[:15]).mean() >= 0.8

    # Fewer than 8 matches: nothing can be verified, nothing is kept.
    f, mask = vis.fundamental_ransac(pts_a[:7], pts_b[:7])
    assert f is None and mask.shape == (7,) and mask.dtype == bool and not mask.any()
    f, mask = vis.fundamental_ransac(np.zeros((0, 2)), np.zeros((0, 2)))
    assert f is None and mask.shape == (0,)
    # Degenerate points (all equal, all on one line): no fit, nothing kept.
    line = np.c_[np.arange(20.0), 2.0 * np.arange(20.0) + 3.0]
    for a, b in [(np.full((20, 2), 50.0), np.full((20, 2), 60.0)), (line, line * 1.5)]:
        f, mask = vis.fundamental_ransac(a, b)
        assert f is None and mask.shape == (20,) and not mask.any()

    with pytest.raises(ValueError, match="same number"):
        vis.fundamental_ransac(pts_a[:10], pts_b[:9])
    with pytest.raises(ValueError, match="threshold"):
        vis.fundamental_ransac(pts_a, pts_b, threshold=0.0)
    with pytest.raises(ValueError, match="confidence"):
        vis.fundamental_ransac(pts_a, pts_b, confidence=1.0)
    with pytest.raises(ValueError, match="iterations"):
        vis.fundamental_ransac(pts_a, pts_b, iterations=0)


# --------------------------------------------------------------------------------------
# matches
# --------------------------------------------------------------------------------------
def test_draw_matches_size_and_line_position():
    image_a = Image.new("RGB", (100, 100), GREY)
    image_b = Image.new("RGB", (50, 100), GREY)
    # idx 5 on a 4x4 grid = (row 1, col 1): centre (37.5, 37.5) in A;
    # idx 10 = (row 2, col 2): centre (31.25, 62.5) in B, drawn at x + 100.
    out = vis.draw_matches(
        image_a,
        image_b,
        np.array([5]),
        np.array([10]),
        (4, 4),
        (4, 4),
        ransac=False,
        style=vis.MatchStyle(line_width=1),
    )
    assert out.size == (150, 100)
    start, end = np.array([37.5, 37.5]), np.array([131.25, 62.5])
    for t in (0.1, 0.5, 0.9):
        x, y = start + t * (end - start)
        assert _differs(out.getpixel((int(round(x)), int(round(y))))), (t, x, y)
    assert not _differs(out.getpixel((84, 10)))  # far from the line: untouched
    assert not _differs(out.getpixel((140, 95)))

    # Different heights: B is resized to A's height (aspect kept), or both to `height`.
    tall_b = Image.new("RGB", (60, 200), GREY)
    assert vis.draw_matches(image_a, tall_b, [], [], (4, 4), (4, 4), ransac=False).size == (130, 100)
    assert vis.draw_matches(
        image_a, tall_b, [], [], (4, 4), (4, 4), ransac=False, style=vis.MatchStyle(height=50, gap=4)
    ).size == (
        50 + 4 + 15,
        50,
    )


def test_draw_matches_max_lines_and_bad_input():
    image = Image.new("RGB", (64, 64), GREY)
    plain = vis.draw_matches(image, image, [], [], (8, 8), (8, 8), ransac=False)
    lines = vis.draw_matches(image, image, np.arange(10), np.arange(10), (8, 8), (8, 8), ransac=False)
    none = vis.draw_matches(
        image, image, np.arange(10), np.arange(10), (8, 8), (8, 8), ransac=False, style=vis.MatchStyle(max_lines=0)
    )
    assert np.array_equal(np.asarray(plain), np.asarray(none))
    assert not np.array_equal(np.asarray(plain), np.asarray(lines))
    # Fewer than 8 matches cannot be verified by RANSAC: nothing is drawn.
    few = vis.draw_matches(image, image, np.arange(5), np.arange(5), (8, 8), (8, 8))
    assert np.array_equal(np.asarray(plain), np.asarray(few))
    with pytest.raises(ValueError, match="equal length"):
        vis.draw_matches(image, image, np.arange(3), np.arange(4), (8, 8), (8, 8))
    with pytest.raises(ValueError, match="grid"):
        vis.draw_matches(image, image, np.array([64]), np.array([0]), (8, 8), (8, 8))


def test_draw_matches_ransac_keeps_only_consistent_mutual_matches():
    rng = np.random.default_rng(5)
    grid, size = (61, 61), 244  # 4-px cells, like 61x61 maps on 244 px
    pts_a, pts_b, _ = _camera_pair(rng, n_points=400, size=size, noise=0.0)
    inside = np.all((pts_a >= 0) & (pts_a < size) & (pts_b >= 0) & (pts_b < size), axis=1)

    def to_cell(p):
        return (p[:, 1] // 4).astype(int) * grid[1] + (p[:, 0] // 4).astype(int)

    cell_a, cell_b = to_cell(pts_a[inside]), to_cell(pts_b[inside])
    # Features: cell_a[k] and cell_b[k] share a random descriptor; 40 extra random
    # descriptor pairs make wrong (geometrically inconsistent) mutual matches.
    _, first = np.unique(cell_a, return_index=True)
    keep = first[np.unique(cell_b[first], return_index=True)[1]]
    cell_a, cell_b = cell_a[keep], cell_b[keep]
    wrong_a = rng.choice(np.setdiff1d(np.arange(61 * 61), cell_a), 40, replace=False)
    wrong_b = rng.choice(np.setdiff1d(np.arange(61 * 61), cell_b), 40, replace=False)
    dim = 32
    feats_a = rng.normal(size=(61 * 61, dim)) * 0.01
    feats_b = rng.normal(size=(61 * 61, dim)) * 0.01
    shared = rng.normal(size=(len(cell_a) + 40, dim))
    feats_a[np.r_[cell_a, wrong_a]] += shared
    feats_b[np.r_[cell_b, wrong_b]] += shared
    idx_a, idx_b = _pairs(feats_a.astype(np.float32), feats_b.astype(np.float32))
    idx_a, idx_b = np.asarray(idx_a), np.asarray(idx_b)
    lookup = dict(zip(cell_a.tolist(), cell_b.tolist()))
    good = np.array([lookup.get(int(i)) == int(j) for i, j in zip(idx_a, idx_b)])
    assert good.sum() >= 0.9 * len(cell_a) and (~good).sum() >= 35

    pix_a = vis.grid_indices_to_pixels(idx_a, grid, (size, size))
    pix_b = vis.grid_indices_to_pixels(idx_b, grid, (size, size))
    _, mask = vis.fundamental_ransac(pix_a, pix_b, threshold=5.0)
    assert mask[good].mean() >= 0.9 and (~mask[~good]).mean() >= 0.8

    image = Image.new("RGB", (size, size), GREY)
    drawn = vis.draw_matches(image, image, idx_a, idx_b, grid, grid, threshold=5.0)
    expected = vis.draw_matches(image, image, idx_a[mask], idx_b[mask], grid, grid, ransac=False)
    everything = vis.draw_matches(image, image, idx_a, idx_b, grid, grid, ransac=False)
    assert np.array_equal(np.asarray(drawn), np.asarray(expected))
    assert not np.array_equal(np.asarray(drawn), np.asarray(everything))


def test_distinct_colours():
    colours = vis.distinct_colours(40)
    assert colours.shape == (40, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 40
    assert colours.max(axis=1).min() == 255  # saturated, never grey/black


# --------------------------------------------------------------------------------------
# heat maps
# --------------------------------------------------------------------------------------
def test_feature_heatmap_negates_and_scales():
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(8, 5, 6))
    means = fmap.mean(axis=0)
    heat = vis.feature_heatmap(fmap)
    assert heat.shape == (5, 6)
    assert heat.min() == pytest.approx(0.0) and heat.max() == pytest.approx(1.0)
    # Negated: the highest channel mean is the coldest cell, the lowest the hottest.
    assert np.unravel_index(heat.argmin(), heat.shape) == np.unravel_index(means.argmax(), means.shape)
    assert np.unravel_index(heat.argmax(), heat.shape) == np.unravel_index(means.argmin(), means.shape)
    expected = (means.max() - means) / (means.max() - means.min())
    np.testing.assert_allclose(heat, expected, atol=1e-12)
    # Constant map: zeros, no division by zero.
    np.testing.assert_array_equal(vis.feature_heatmap(np.full((3, 4, 4), 2.5)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="C, h, w"):
        vis.feature_heatmap(np.zeros((4, 4)))


def test_feature_heatmap_accepts_tensors():
    torch = pytest.importorskip("torch")
    fmap = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    heat = vis.feature_heatmap(fmap)
    np.testing.assert_allclose(heat, vis.feature_heatmap(fmap.numpy()))
    assert heat[0, 0] == pytest.approx(1.0) and heat[-1, -1] == pytest.approx(0.0)


def test_jet_colormap_key_colours():
    colours = vis.jet_colormap(np.array([0.0, 0.375, 0.625, 1.0, -1.0, 2.0]))
    assert colours.tolist() == [[0, 0, 128], [0, 255, 255], [255, 255, 0], [128, 0, 0], [0, 0, 128], [128, 0, 0]]


def test_overlay_heatmap_size_and_blend():
    image = Image.new("RGB", (30, 20), (100, 200, 50))
    heat = np.full((4, 5), 0.375)  # cyan everywhere
    out = vis.overlay_heatmap(image, heat, alpha=0.6)
    assert out.size == (30, 20) and out.mode == "RGB"
    # alpha weighs the heat colour: 0.6 * (0, 255, 255) + 0.4 * (100, 200, 50)
    assert out.getpixel((7, 11)) == (40, 233, 173)
    # A ramp: the left edge is cold (blue), the right edge hot (red).
    ramp = np.tile(np.linspace(0.0, 1.0, 8), (3, 1))
    out = np.asarray(vis.overlay_heatmap(Image.new("RGB", (64, 24), (0, 0, 0)), ramp))
    assert out[12, 0, 2] > out[12, 0, 0] and out[12, -1, 0] > out[12, -1, 2]
    assert np.array_equal(np.asarray(vis.overlay_heatmap(image, heat, alpha=0.0)), np.asarray(image))
    with pytest.raises(ValueError, match="alpha"):
        vis.overlay_heatmap(image, heat, alpha=1.5)


# --------------------------------------------------------------------------------------
# prediction rows and saving
# --------------------------------------------------------------------------------------
def test_prediction_row_size_and_frames(tmp_path):
    paths = []
    for i, size in enumerate([(80, 40), (40, 40), (60, 30), (20, 40)]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", size, (90 + 30 * i, 90, 90)).save(path)
        paths.append(path)
    row = vis.prediction_row(paths[0], paths[1:], [True, False, True], tile_height=40, border=5, scores=[12, 7.5, 3])
    # widths at height 40: 80, 40, 80, 20 -> plus 2*5 frame each, plus 3 gaps of 5.
    assert row.size == (80 + 40 + 80 + 20 + 4 * 10 + 3 * 5, 50)
    starts = [0, 95, 150, 245]
    expected = [vis.QUERY_FRAME_COLOUR, vis.CORRECT_FRAME_COLOUR, vis.WRONG_FRAME_COLOUR, vis.CORRECT_FRAME_COLOUR]
    for x, colour in zip(starts, expected):
        assert row.getpixel((x + 1, 1)) == colour
        assert row.getpixel((x + 1, 48)) == colour
    # The bottom-right of each picture is the image itself (the label sits top-left).
    assert row.getpixel((starts[1] + 5 + 38, 5 + 38)) == (120, 90, 90)
    # The label: some white text pixel inside the first prediction's picture.
    label = np.asarray(row)[5:20, starts[1] + 5 : starts[1] + 45]
    assert (label.min(axis=2) > 200).any()

    with pytest.raises(ValueError, match="same length"):
        vis.prediction_row(paths[0], paths[1:], [True])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        vis.prediction_row(paths[0], [tmp_path / "missing.jpg"], [False])


def test_save_image_atomic_leaves_no_temp_file(tmp_path, monkeypatch):
    image = Image.new("RGBA", (12, 8), (10, 20, 30, 255))
    target = tmp_path / "sub" / "picture.jpg"
    assert vis.save_image_atomic(image, target) == target
    with Image.open(target) as saved:
        assert saved.format == "JPEG" and saved.size == (12, 8)
    png = vis.save_image_atomic(image, tmp_path / "picture.png")
    with Image.open(png) as saved:
        assert saved.format == "PNG" and saved.getpixel((3, 3)) == (10, 20, 30, 255)
    with pytest.raises(ValueError, match="extension"):
        vis.save_image_atomic(image, tmp_path / "picture.xyz")

    # An encoder failing half-way must not leave its temp file (nor the target) behind.
    def failing_save(self, stream, *args, **kwargs):
        stream.write(b"half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        vis.save_image_atomic(image, tmp_path / "bad.jpg")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["picture.jpg", "picture.png", "sub"]


# --------------------------------------------------------------------------------------
# command-line scripts (tiny random model, run as subprocesses from another folder)
# --------------------------------------------------------------------------------------
_TINY_MODEL = [
    "--backbone",
    "vit_tiny",
    "--backbone_depth",
    "1",
    "--allow_random_weights",
    "--device",
    "cpu",
    "--resize",
    "56",
    "56",
]


def _run_tool(script: str, args: list, cwd: Path):
    import os
    import subprocess

    return subprocess.run(
        [sys.executable, str(_ROOT / "tools" / script), *map(str, args)],
        cwd=cwd,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _load_tool(script: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{Path(script).stem}", _ROOT / "tools" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_heatmap_tool_in_process(tmp_path):
    heatmap = _load_tool("heatmap.py")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (42, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    args = heatmap.parse_args([str(tmp_path / "a.png"), "--output", str(tmp_path / "out" / "heat.png"), *_TINY_MODEL])
    written = heatmap.main(args)
    with Image.open(written) as heat:
        assert heat.size == (70, 42)  # blended over the original picture
    # User errors raise one clear exception naming the file, before writing anything.
    args = heatmap.parse_args([str(tmp_path / "missing.jpg"), "--output", str(tmp_path / "never.png"), *_TINY_MODEL])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        heatmap.main(args)
    args = heatmap.parse_args([str(tmp_path / "a.png"), "--output", str(tmp_path / "x.pdq"), *_TINY_MODEL])
    with pytest.raises(ValueError, match="extension"):
        heatmap.main(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "out"]


def test_draw_matches_tool_runs_from_another_folder(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (42, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    done = _run_tool("draw_matches.py", ["a.png", "b.png", "--output", "matches.jpg", *_TINY_MODEL], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mutual nearest-neighbour matches" in done.stdout
    assert "consistent with RANSAC (5.0 px)" in done.stdout  # OpenCV's check ran
    with Image.open(tmp_path / "matches.jpg") as matches:
        assert matches.size == (round(70 * 56 / 42) + 56, 56)  # --resize height, aspect kept


# Runs with OpenCV blocked (``sys.modules["cv2"] = None`` makes ``import cv2`` fail): the library,
# the evaluation's prediction pictures and draw_matches --no_ransac work; the RANSAC check, and
# draw_matches without --no_ransac, stop with one message naming the package and how to install it.
_WITHOUT_OPENCV = r"""
import os, runpy, sys
sys.modules["cv2"] = None
root, tmp = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
import eval, localize, predictions_io, visualizations as vis  # noqa: F401  (none may need cv2)
from PIL import Image
a, b = os.path.join(tmp, "a.png"), os.path.join(tmp, "b.png")
record = {"query": a, "query_index": 0, "reranked": [{"path": b, "correct": True, "mutual_nn": 3.0}]}
assert predictions_io.save_prediction_pictures(os.path.join(tmp, "preds"), [record], num_preds=1) == 1
image = Image.open(a)
vis.draw_matches(image, image, list(range(10)), list(range(10)), (8, 8), (8, 8), ransac=False)
try:
    vis.fundamental_ransac([[0, 0]] * 10, [[0, 0]] * 10)
    raise SystemExit("fundamental_ransac ran without OpenCV")
except ValueError as error:
    print("library:", error)
tool_args = ["a.png", "b.png", "--output", "plain.jpg", "--no_ransac", *sys.argv[3:]]
spec = __import__("importlib.util").util.spec_from_file_location(
    "draw_matches_tool", os.path.join(root, "tools", "draw_matches.py"))
tool = __import__("importlib.util").util.module_from_spec(spec)
spec.loader.exec_module(tool)
os.chdir(tmp)
tool.main(tool.parse_args(tool_args))
print("no_ransac ok")
sys.stdout.flush()
sys.argv = [os.path.join(root, "tools", "draw_matches.py"), "a.png", "b.png", "--output", "checked.jpg",
            *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_opencv_is_needed_only_by_the_ransac_check(tmp_path):
    import os
    import subprocess

    rng = np.random.default_rng(2)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / name)
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OPENCV, str(_ROOT), str(tmp_path), *_TINY_MODEL],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = done.stdout + done.stderr
    # Everything up to the last step ran without OpenCV.
    preds = tmp_path / "preds"
    assert preds.is_dir() and len(list(preds.iterdir())) == 1, output
    assert "library: the RANSAC check of matches needs OpenCV" in done.stdout, output
    assert "pip install opencv-python-headless" in done.stdout, output
    assert "no_ransac ok" in done.stdout and (tmp_path / "plain.jpg").is_file(), output
    # The tool with its RANSAC check: one clear error, exit 2, nothing written.
    assert done.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if re.search(r"(^|\s)error: ", line)]
    assert len(errors) == 1, output
    assert (
        "needs OpenCV" in errors[0]
        and "`pip install opencv-python-headless`" in errors[0]
        and "--no_ransac" in errors[0]
    ), output
    assert not (tmp_path / "checked.jpg").exists()
