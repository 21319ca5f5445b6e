"""Smoke runs of benchmarks/extract.py and benchmarks/memory_pitts30k.py at tiny sizes, plus their
pure parts (the explicit-attention reference forward, the free-space check)."""

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT = r"([0-9.]+(?:e[+-]?[0-9]+)?)"


def _load(name):
    """Import benchmarks/<name>.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def extract():
    return _load("extract")


@pytest.fixture(scope="module")
def memory():
    return _load("memory_pitts30k")


def _run(args, timeout=120):
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_explicit_attention_equals_sdpa(extract):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=gen) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(extract.explicit_attention(q, k, v), expected, atol=1e-6)


@pytest.mark.parametrize("registers, resize", [(False, (56, 56)), (True, (42, 70))])
def test_reference_forward_matches_the_model(extract, registers, resize):
    torch.manual_seed(0)
    model = network.GeoLocalizationNet(backbone="vit_tiny", backbone_depth=2, registers=registers).eval()
    extract.randomize_adapters(model, std=0.05)
    with torch.no_grad():
        model.aggregation[1].p.fill_(2.5)  # a GeM exponent other than the initial 3 must be followed too
    images = torch.randn(2, 3, *resize)
    with torch.inference_mode():
        local, glob = model(images)
    with torch.no_grad():
        ref_local, ref_glob = extract.reference_forward(model, images)
    assert ref_local.shape == local.shape == (2, 4 * resize[0] // 14 - 3, 4 * resize[1] // 14 - 3, 128)
    assert ref_glob.shape == glob.shape == (2, 192)
    assert (ref_local - local).abs().max().item() < 1e-5
    assert (ref_glob - glob).abs().max().item() < 1e-5


def test_randomize_adapters_makes_them_count(extract):
    torch.manual_seed(0)
    model = network.GeoLocalizationNet(backbone="vit_tiny", backbone_depth=1).eval()
    images = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        before = model(images)[1]
        extract.randomize_adapters(model, std=0.05)
        after = model(images)[1]
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if ".D_fc2.weight" in n)
    assert (before - after).abs().max().item() > 1e-4


def test_extract_script_smoke():
    # As a script (its own process: the DataLoader workers fork from it); 112x112 keeps it quick.
    out = _run(
        [
            "benchmarks/extract.py",
            "--backbone",
            "vit_tiny",
            "--backbone_depth",
            "2",
            "--images",
            "2",
            "--batch_size",
            "1",
            "--resize",
            "112",
            "112",
            "--loader_images",
            "2",
            "--loader_batch_size",
            "1",
        ]
    )
    assert out.returncode == 0, out.stderr
    match = re.search(
        rf"extract: project {FLOAT} img/s, reference {FLOAT} img/s, {FLOAT}x, max \|diff\| {FLOAT}", out.stdout
    )
    assert match, out.stdout
    project, reference, ratio, diff = map(float, match.groups())
    assert project > 0 and reference > 0
    assert ratio == pytest.approx(project / reference, rel=0.02)
    assert diff < 1e-4
    loader = re.search(
        rf"num_workers 0: {FLOAT} img/s \(loader alone {FLOAT} img/s\) \| "
        rf"num_workers 2: {FLOAT} img/s \(loader alone {FLOAT} img/s\)",
        out.stdout,
    )
    assert loader, out.stdout
    assert all(float(v) > 0 for v in loader.groups())
    assert re.search(rf"peak RSS {FLOAT} GiB", out.stdout)


def test_extract_rejects_bad_size(extract, capsys):
    assert (
        extract.main(
            ["--backbone", "vit_tiny", "--backbone_depth", "1", "--resize", "50", "56", "--loader_images", "0"]
        )
        == 2
    )
    assert "--resize 50 56" in capsys.readouterr().err


def test_memory_script_smoke(memory, tmp_path, capsys):
    folder = tmp_path / "store"
    # In this process (the imports are already paid); the entry point is main(argv) alone.
    assert (
        memory.main(
            [
                "--database_num",
                "30",
                "--queries_num",
                "12",
                "--rerank_queries",
                "2",
                "--rerank_num",
                "10",
                "--dense_size",
                "13",
                "13",
                "16",
                "--folder",
                str(folder),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    expected = (30 + 2) * 13 * 13 * 16 * 4
    match = re.search(r"store: ([0-9,]+) bytes", out)
    assert match and int(match.group(1).replace(",", "")) == expected, out
    disk = re.search(r"on disk ([0-9,]+) bytes", out)
    assert disk and int(disk.group(1).replace(",", "")) > 0
    assert re.search(rf"peak RSS {FLOAT} GB \(limit 4.00 GB\) PASS", out), out
    assert folder.is_dir() and not any(folder.iterdir())  # the store was deleted


def test_memory_run_benchmark_numbers_and_fail_line(memory, capsys):
    r = memory.run_benchmark(
        memory.Sizes(
            database_num=20, queries_num=9, rerank_queries=3, rerank_num=8, dense_size=(9, 9, 8), global_dim=16
        ),
        batch_size=7,
        touch_database=True,
        progress=False,
    )
    assert r["store_bytes"] == r["expected_store_bytes"] == (20 + 3) * 9 * 9 * 8 * 4
    assert r["peak_rss_bytes"] >= r["start_rss_bytes"] > 0
    assert r["touched_peak_rss_bytes"] == r["peak_rss_bytes"]
    assert np.isfinite(r["touch_checksum"]) and r["touch_checksum"] != 0
    # A limit below any real process size must report FAIL with exit status 1.
    assert (
        memory.main(
            [
                "--database_num",
                "5",
                "--queries_num",
                "4",
                "--rerank_queries",
                "1",
                "--rerank_num",
                "3",
                "--dense_size",
                "5",
                "5",
                "4",
                "--global_dim",
                "8",
                "--rss_limit_gb",
                "0.001",
            ]
        )
        == 1
    )
    assert "FAIL" in capsys.readouterr().out


def test_memory_free_space_check(memory, tmp_path):
    assert memory.check_free_space(str(tmp_path), 1) > 0
    with pytest.raises(ValueError, match="--folder .* GB free"):
        memory.check_free_space(str(tmp_path), 10**18)
    assert memory.store_bytes(database_num=10_000, rerank_queries=0, dense_size=(61, 61, 128)) == 19_051_520_000


def test_memory_bad_options(memory):
    with pytest.raises(ValueError, match="--rerank_queries"):
        memory.run_benchmark(memory.Sizes(database_num=4, queries_num=2, rerank_queries=3, dense_size=(3, 3, 2)))
    with pytest.raises(ValueError, match="--dense_size"):
        memory.run_benchmark(memory.Sizes(database_num=4, queries_num=2, rerank_queries=1, dense_size=(3, 0, 2)))


def test_rerank_staging_benchmark_runs_and_prints_ratios():
    result = _run(["benchmarks/rerank_staging.py", "--images", "3", "--rounds", "2"])
    assert result.returncode == 0, result.stderr[-2000:]
    for store in ("memmap (read-only)", "DenseStore in RAM", "DenseStore on disk"):
        assert re.search(
            rf"^{re.escape(store)} -> cpu: before {FLOAT} ms/candidate, staged {FLOAT} ms/candidate",
            result.stdout,
            re.M,
        ), result.stdout


def test_scale_projection_and_twin_folder(tmp_path):
    """benchmarks/scale.py's pure parts: the store sizes of the paper's large sets at ViT-L size, and run
    B's folder as run A's would be after its search (finished stage files linked, no re-ranking)."""
    scale = _load("scale")
    rows = {r["dataset"]: r for r in scale.projection(0.01, 100)}
    per_image = 61 * 61 * 128 * 4  # 1.9 MB
    assert rows["Pitts250k-test"]["store_float32_bytes"] == (83_952 + 8_280) * per_image  # 175.7 GB
    assert rows["Pitts250k-test"]["store_float16_bytes"] * 2 == rows["Pitts250k-test"]["store_float32_bytes"]
    assert rows["Nordland (benchmark)"]["rerank_pairs"] == 27_592 * 100
    assert abs(rows["Nordland (benchmark)"]["rerank_hours"] - 27_592 * 100 * 0.01 / 3600) < 1e-9

    a, b = tmp_path / "a", tmp_path / "b"
    (a / "progress").mkdir(parents=True)
    (a / "dense_features").mkdir()
    for name in ("info.log", "debug.log", "run.json", "progress/search.npz", "progress/reranked.json"):
        (a / name).write_text(name)
    (a / "dense_features" / "database.dense").write_bytes(b"x" * 8)
    scale.make_twin(str(a), str(b))
    assert sorted(os.listdir(b / "progress")) == ["search.npz"]  # nothing of A's re-ranking
    assert os.path.samefile(a / "dense_features" / "database.dense", b / "dense_features" / "database.dense")
    assert (b / "run.json").read_text() == "run.json" and not os.path.samefile(a / "run.json", b / "run.json")


def test_predictions_ram_benchmark_writes_the_same_file_both_ways(capsys):
    bench = _load("predictions_ram")
    assert bench.main(["--queries", "40", "--database", "300", "--k", "10"]) == 0
    out = capsys.readouterr().out
    assert "files byte-identical: yes" in out and "every record first" in out
