"""benchmarks/device_report.py --quick: the GPU report's every row runs (on the CPU, small sizes), so
the prepared GPU command cannot rot; plus its re-rank data really holds the hard cases."""

import importlib.util
import json
import os
import re

import numpy as np
import torch
from conftest import ROOT, run_script

ROWS = ["rerank_exactness", "rerank_speed", "training_step", "extraction", "end_to_end", "torchrun"]


def _load():
    spec = importlib.util.spec_from_file_location("device_report", os.path.join(ROOT, "benchmarks", "device_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_report_runs_every_row(tmp_path):
    out_json = tmp_path / "report.json"
    # Generous limits: a busy CI machine must not turn slowness into a failure (speed is not the point).
    result = run_script(
        [
            "benchmarks/device_report.py",
            "--quick",
            "--json",
            str(out_json),
            "--row_limit_s",
            "900",
            "--budget_s",
            "5000",
        ],
        timeout=3000,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    table = result.stdout[result.stdout.rindex("\nrow ") :]
    for name in ROWS:
        assert re.search(rf"^{name}\s+ok\s", table, re.M), table
    report = json.loads(out_json.read_text())
    assert [r["row"] for r in report["rows"]] == ROWS and all(r["status"] == "ok" for r in report["rows"])
    rows = {r["row"]: r for r in report["rows"]}
    exact = rows["rerank_exactness"]
    for k in (5, 10):
        assert exact[f"k{k}"]["queries_run"] == 2 and exact[f"k{k}"]["differing_scores"] == 0
        assert exact[f"k{k}"]["queries_with_differing_order"] == 0
        assert exact[f"k{k}"]["gpu_engine_forced"]["differing_scores"] == 0  # the GPU engine's code ran too
    assert exact["engine_path"].startswith(("screened-bf16+tiled-fp32", "tiled-fp32")), exact["engine_path"]
    assert exact["gpu_engine_forced_path"].startswith("gpu-screened-bf16x3+fp32"), exact["gpu_engine_forced_path"]
    assert exact["tile_self_check"]["passed"] and exact["tile_self_check"]["needed_by"]
    assert 0 <= exact["recomputed"]["rows"] < 0.5
    assert "tile self-check (needed by the tiled / screened paths only): passed" in exact["summary"]
    speed = rows["rerank_speed"]
    assert speed["queries_with_scores_unequal_to_plain"] == 0
    assert speed["k10"]["engine_ms_per_query"] > 0 and speed["k10"]["plain_ms_per_query"] > 0
    assert speed["k10"]["engine_from_host_ms_per_query"] > 0
    train = rows["training_step"]
    assert train["fp32"]["s_per_step"] > 0 and train["bf16"]["s_per_step"] > 0
    assert train["first_losses_fp32"]["max_relative_difference"] == 0.0  # CPU vs CPU here
    extraction = rows["extraction"]
    assert 0 < extraction["max_abs_deviation_bf16"]["local"] < 0.1
    assert extraction["bf16_vs_fp32_orders"]["queries"] == 8
    e2e = rows["end_to_end"]
    assert e2e["identical_recalls"] and e2e["identical_predictions"]  # CPU vs CPU here
    assert e2e["rankings"]["rankings_ok"] and e2e["rankings"]["identical_reranked"] == e2e["rankings"]["queries"]
    probe = rows["torchrun"]["group_probe"]
    assert probe["backend"] == "gloo" and probe["all_ok"] and len(probe["checks"]) == 6
    assert rows["torchrun"]["train"]["reranked"].startswith("R@1:")


def test_rerank_data_has_ties_and_one_ulp_near_ties():
    report = _load()
    q, x = report.rerank_query_data(3, k=8, grid=12, channels=16, device=torch.device("cpu"))
    assert q.shape == (144, 16) and x.shape == (8, 144, 16)
    assert torch.equal(x[1], x[0])  # tied candidates
    assert torch.equal(x[2, 36:72], x[2, 0:36])  # tied rows inside one
    near = x[3, ::2] != q[::2]
    assert near.any()
    ulps = (x[3, ::2].view(torch.int32) - q[::2].view(torch.int32)).abs()
    assert int(ulps.max()) == 1  # one float32 ulp apart
    assert torch.equal(q[72 : 72 + 9], q[:9])  # tied query vectors
    # The public algorithm and the engine agree on them (scores and orders).
    want = report.public_scores(q, x)
    got = report.engine_scores(q, x)
    assert torch.equal(got, want)
    assert np.array_equal(report.local_matching.rerank(got), report.local_matching.rerank(want))


def test_over_budget_rows_are_skipped_and_json_is_written(tmp_path):
    out_json = tmp_path / "r.json"
    assert _load().main(["--quick", "--json", str(out_json), "--budget_s", "1", "--rows", "rerank_speed"]) == 1
    report = json.loads(out_json.read_text())
    assert report["rows"][0]["status"] == "skipped" and "over budget" in report["rows"][0]["summary"]


def _record(first, reranked):
    return dict(
        first_stage=[dict(index=i, l2_distance=d) for i, d in first],
        reranked=[dict(index=i, mutual_nn=m) for i, m in reranked],
    )


def test_predictions_are_compared_as_rankings_with_tolerances():
    """Not as text: float distances that differ in the last digits and swaps of near-tied candidates
    pass, within the tolerances; a real change of order does not."""
    report = _load()
    tol = report.TOLERANCES["fp32"]
    cpu = [_record([(3, 0.5), (7, 0.50001), (1, 0.9)], [(7, 400.0), (3, 398.0), (1, 20.0)])]
    same = [_record([(3, 0.5000004), (7, 0.5000104), (1, 0.9)], [(7, 400.0), (3, 398.0), (1, 20.0)])]
    out = report.compare_predictions(cpu, same, tol=tol)
    assert out["rankings_ok"] and out["identical_first_stage"] == 1 and out["identical_reranked"] == 1
    assert 0 < out["max_l2_distance_difference"] < 1e-5
    swapped = [_record([(7, 0.50001), (3, 0.5), (1, 0.9)], [(3, 399.0), (7, 399.0), (1, 20.0)])]
    out = report.compare_predictions(cpu, swapped, tol=tol)
    assert out["rankings_ok"] and out["near_tie_first"] == 1 and out["near_tie_reranked"] == 1
    moved = [_record([(1, 0.5), (3, 0.5), (7, 0.50001)], [(1, 400.0), (7, 398.0), (3, 20.0)])]
    out = report.compare_predictions(cpu, moved, tol=tol)
    assert not out["rankings_ok"]
    far = [_record([(3, 0.5), (7, 0.5003), (1, 0.9)], [(7, 400.0), (3, 398.0), (1, 20.0)])]
    assert not report.compare_predictions(cpu, far, tol=tol)["rankings_ok"]  # a distance beyond 1e-4
    assert report.compare_predictions(cpu, far, tol=report.TOLERANCES["tf32"])["rankings_ok"]
