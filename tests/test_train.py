"""train.py end to end: exact resume, kill-safe checkpoints, non-finite loss, public checkpoints, ViT-L step."""

import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, kill_once_marker_appears, run_script, tiny_eval_flags

import checkpoints
import network

TRAIN_FLAGS = [
    "--cache_refresh_rate",
    "6",
    "--queries_per_epoch",
    "6",
    "--neg_samples_num",
    "12",
    "--train_batch_size",
    "2",
    "--infer_batch_size",
    "8",
    "--rerank_num",
    "10",
    "--lr",
    "1e-4",
    "--mining",
    "full",
    "--brightness",
    "0.3",
    "--horizontal_flip",
    "--seed",
    "3",
]


def _train(synthetic_root, cwd, save_dir, *extra, timeout=600):
    result = run_script(
        ["train.py", *tiny_eval_flags(synthetic_root, *TRAIN_FLAGS, "--save_dir", save_dir), *extra],
        cwd=str(cwd),
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folders = sorted(glob.glob(os.path.join(str(cwd), "logs", save_dir, "*")))
    return folders[-1], result.stdout


def _epoch_lines(folder):
    log = open(os.path.join(folder, "info.log")).read()
    losses = re.findall(r"Finished epoch (\d+) in .*?, (average epoch triplet loss = .*)", log)
    val = re.findall(r"Reranking recalls on val set .*?>: (.*)", log)
    final = re.findall(r"Recalls on < BaseDataset.*?>: (.*)", log)
    return losses, val, final, log


def _tensors(path):
    ckpt = checkpoints.load_weights_file(path, what="test")  # weights_only=True, as everywhere
    flat = dict(ckpt["model_state_dict"])
    for i, state in ckpt["optimizer_state_dict"]["state"].items():
        for k, v in state.items():
            flat[f"opt.{i}.{k}"] = v
    return ckpt, flat


def test_interrupted_and_resumed_run_equals_uninterrupted(synthetic_root, tmp_path):
    full, _ = _train(synthetic_root, tmp_path, "full", "--epochs_num", "2", "--patience", "5")
    first, _ = _train(synthetic_root, tmp_path, "first", "--epochs_num", "1", "--patience", "5")
    resumed, _ = _train(
        synthetic_root,
        tmp_path,
        "resumed",
        "--epochs_num",
        "2",
        "--patience",
        "5",
        "--resume",
        os.path.join(first, "last_model.pth"),
    )
    full_losses, full_val, full_final, _ = _epoch_lines(full)
    first_losses, first_val, _, _ = _epoch_lines(first)
    res_losses, res_val, res_final, res_log = _epoch_lines(resumed)
    assert "took epoch_num=0" in res_log and "optimizer state" in res_log and "random states" in res_log
    assert "not an exact continuation" not in res_log  # the same flags: an exact continuation, said by nothing
    assert full_losses[0] == first_losses[0] and full_val[0] == first_val[0]
    assert [l for l in res_losses] == [full_losses[1]]  # only epoch 1 ran, with the same losses
    assert res_val == [full_val[1]]
    ckpt_full, t_full = _tensors(os.path.join(full, "last_model.pth"))
    ckpt_res, t_res = _tensors(os.path.join(resumed, "last_model.pth"))
    assert ckpt_full["epoch_num"] == ckpt_res["epoch_num"] == 1
    assert np.array_equal(ckpt_full["recalls"], ckpt_res["recalls"]) and ckpt_full["best_r5"] == ckpt_res["best_r5"]
    assert t_full.keys() == t_res.keys()
    assert all(torch.equal(t_full[k], t_res[k]) for k in t_full), [
        k for k in t_full if not torch.equal(t_full[k], t_res[k])
    ][:5]
    assert full_final == res_final


SLOW_SAVE = """
import io, os, sys, time, runpy, torch
sys.path.insert(0, {root!r})
real_save = torch.save
count = [0]
def slow_save(obj, f, *a, **k):
    count[0] += 1
    if count[0] < 2 or isinstance(f, io.BytesIO):
        return real_save(obj, f, *a, **k)
    buffer = io.BytesIO(); real_save(obj, buffer, *a, **k); data = buffer.getvalue()
    # checkpoints.atomic_torch_save hands torch.save an open file (a path works too)
    with (open(f, "wb") if isinstance(f, str) else f) as out:
        out.write(data[: len(data) // 2]); out.flush()
        open({marker!r}, "w").close()  # half written: the test kills us now
        time.sleep(60)
        out.write(data[len(data) // 2:])
torch.save = slow_save
sys.argv = ["train.py"] + {argv!r}
runpy.run_path(os.path.join({root!r}, "train.py"), run_name="__main__")
"""


def test_sigkill_while_saving_leaves_the_previous_checkpoint(synthetic_root, tmp_path):
    marker = str(tmp_path / "half_written")
    argv = tiny_eval_flags(synthetic_root, *TRAIN_FLAGS, "--save_dir", "kill", "--epochs_num", "3", "--patience", "5")
    code = SLOW_SAVE.format(root=ROOT, marker=marker, argv=argv)
    kill_once_marker_appears(
        [sys.executable, "-c", code],
        marker,
        cwd=str(tmp_path),
        timeout=300,
        what="the second checkpoint save never started",
    )
    folder = glob.glob(str(tmp_path / "logs" / "kill" / "*"))[0]
    ckpt = checkpoints.load_weights_file(os.path.join(folder, "last_model.pth"), what="--resume")
    assert ckpt["epoch_num"] == 0  # the first epoch's checkpoint, intact
    model = network.GeoLocalizationNet(**TINY)
    checkpoints.load_model_weights(model, os.path.join(folder, "last_model.pth"))

    # The kill left the half-written temp file; resuming from that folder removes it (once no writer holds
    # it and it is older than a minute: made so here), and nothing else.
    (stale,) = [n for n in os.listdir(folder) if n.startswith(".last_model.pth.") and n.endswith(".tmp")]
    old = os.stat(os.path.join(folder, stale)).st_mtime - 3600
    os.utime(os.path.join(folder, stale), (old, old))
    before = set(os.listdir(folder))
    _, stdout = _train(
        synthetic_root, tmp_path, "after_kill", "--epochs_num", "1", "--resume", os.path.join(folder, "last_model.pth")
    )
    assert set(os.listdir(folder)) == before - {stale}
    assert f"Removed 1 temporary file(s) left in {folder} by a run killed while saving: {stale}" in stdout


def test_non_finite_loss_stops_with_a_clear_message(synthetic_root, tmp_path):
    # With --train_backbone (only train.py has it, and hands it to build_model): every weight trains.
    code = (
        "import sys, runpy, torch; sys.path.insert(0, %r); import loss\n"
        "loss.triplet_losses = lambda *a, **k: (torch.tensor(float('nan'), requires_grad=True), torch.tensor(0.0))\n"
        "sys.argv = ['train.py'] + %r\nrunpy.run_path(%r, run_name='__main__')\n"
        % (
            ROOT,
            tiny_eval_flags(synthetic_root, *TRAIN_FLAGS, "--save_dir", "nan", "--epochs_num", "1", "--train_backbone"),
            os.path.join(ROOT, "train.py"),
        )
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "the training loss became nan" in result.stdout and "lower --lr" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    total = sum(p.numel() for p in network.GeoLocalizationNet(**TINY).parameters())
    assert re.findall(r"Trainable parameters: ([\d,]+)", result.stdout) == [f"{total:,}"]


def test_resume_of_a_released_checkpoint_without_optimizer_state(synthetic_root, tmp_path, tiny_model):
    path = str(tmp_path / "SelaVPR_released.pth")
    checkpoints.save_checkpoint(path, model=tiny_model, epoch_num=4, recalls=np.array([1.0, 2.0]), best_r5=2.0)
    folder, _ = _train(synthetic_root, tmp_path, "finetune", "--epochs_num", "6", "--resume", path)
    log = open(os.path.join(folder, "info.log")).read()
    assert "has no optimizer state" in log and "training starts at epoch 5" in log
    assert "Start training epoch: 05" in log and "Start training epoch: 04" not in log


def test_one_vit_large_training_step_on_cpu():
    """The paper's configuration: ViT-L/14, 1 query + 1 positive + 2 negatives at 224x224."""
    import loss

    torch.manual_seed(0)
    model = network.GeoLocalizationNet()
    model.freeze()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    before = model.backbone.blocks[0].adapter1.D_fc2.weight.detach().clone()
    local, glob = model(torch.randn(4, 3, 224, 224))
    g, l = loss.triplet_losses(local, glob, torch.tensor([[0, 1, 2], [0, 1, 3]]), margin=0.1, normaliser=2)
    (g + l).backward()
    optimizer.step()
    assert torch.isfinite(g + l)
    assert not torch.equal(before, model.backbone.blocks[0].adapter1.D_fc2.weight)


def _public_train_py_checkpoint(path, *, epoch_num, best_r5, not_improved_num=0):
    """A file made the way the public train.py makes one: the full model in DataParallel (`module.` keys),
    frozen backbone, Adam over *all* parameters (only trainable ones get state after a step), one real
    step, numpy `recalls` and `best_r5`. Returns (number of model parameters, number of trainable ones)."""
    import loss

    torch.manual_seed(1)
    model = network.GeoLocalizationNet(**TINY)
    model.freeze()
    wrapped = torch.nn.DataParallel(model)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-5)
    local, glob_ = wrapped(torch.randn(4, 3, 112, 112))
    g, l = loss.triplet_losses(local, glob_, torch.tensor([[0, 1, 2], [0, 1, 3]]), margin=0.1, normaliser=2)
    (g + l).backward()
    optimizer.step()
    state = optimizer.state_dict()
    params_num = len(list(model.parameters()))
    trainable_num = sum(p.requires_grad for p in model.parameters())
    assert len(state["param_groups"]) == 1 and len(state["param_groups"][0]["params"]) == params_num
    assert len(state["state"]) == trainable_num < params_num  # as the public file: state only where trained
    torch.save(
        {
            "epoch_num": epoch_num,
            "model_state_dict": wrapped.state_dict(),
            "optimizer_state_dict": state,
            "recalls": np.array([10.0, best_r5, 40.0, 60.0]),
            "best_r5": np.float64(best_r5),
            "not_improved_num": not_improved_num,
        },
        path,
    )
    return params_num, trainable_num


def test_resume_of_a_public_train_py_file_starts_a_fresh_optimizer(synthetic_root, tmp_path):
    path = str(tmp_path / "SelaVPR_public.pth")
    params_num, _ = _public_train_py_checkpoint(path, epoch_num=2, best_r5=0.0, not_improved_num=1)
    folder, _ = _train(synthetic_root, tmp_path, "public", "--epochs_num", "4", "--resume", path)
    log = open(os.path.join(folder, "info.log")).read()
    assert f"optimizer state of the public train.py (Adam over all {params_num} parameters" in log
    assert "the optimizer starts fresh" in log
    assert "took epoch_num=2, best_r5=0.0, not_improved_num=1" in log and "optimizer state," not in log
    assert "Start training epoch: 03" in log and "Start training epoch: 02" not in log
    # The resumed run's checkpoint is ours again: its optimizer state resumes exactly.
    ckpt = checkpoints.load_weights_file(os.path.join(folder, "last_model.pth"), what="test")
    assert ckpt["epoch_num"] == 3 and ckpt["model_settings"]["backbone"] == "vit_tiny"
    assert ckpt["training_flags"]["processes"] == 1


def test_resume_refuses_an_optimizer_state_that_fits_neither_layout(tmp_path, tiny_model):
    import mining
    import train

    path = str(tmp_path / "odd.pth")
    odd = torch.optim.Adam([p for p in tiny_model.parameters()][:3], lr=1e-5)
    checkpoints.save_checkpoint(path, model=tiny_model, optimizer=odd, epoch_num=0)
    tiny_model.freeze()
    optimizer = torch.optim.Adam([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-5)
    with pytest.raises(ValueError, match=r"fits neither this run's optimizer .* nor the public train.py's"):
        train.resume_from(path, model=tiny_model, optimizer=optimizer, miner_state=mining.MiningState(4))


def test_final_test_keeps_the_query_keys_protocol_and_best_model_rules(synthetic_root, tmp_path):
    folder, name = synthetic_root
    keys = []
    for split, n in (("val", 5), ("test", 4)):
        queries = sorted(glob.glob(os.path.join(folder, name, "images", split, "queries", "*.jpg")))
        keys += [os.path.basename(p).split("@")[7] for p in queries[:n]]
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("\n".join(keys) + "\n")
    # A released-style file whose best R@5 (100) is never beaten, beside an unrelated best_model.pth.
    released_dir = tmp_path / "released"
    released_dir.mkdir()
    torch.manual_seed(5)
    released = network.GeoLocalizationNet(**TINY)
    checkpoints.save_checkpoint(str(released_dir / "SelaVPR_x.pth"), model=released, epoch_num=0, best_r5=100.0)
    checkpoints.save_checkpoint(str(released_dir / "best_model.pth"), model=network.GeoLocalizationNet(**TINY))
    run, _ = _train(
        synthetic_root,
        tmp_path,
        "keys",
        "--epochs_num",
        "2",
        "--query_keys_file",
        str(keys_file),
        "--resume",
        str(released_dir / "SelaVPR_x.pth"),
    )
    log = open(os.path.join(run, "info.log")).read()
    assert re.search(r"Val set: < BaseDataset, synthetic - #database: \d+; #queries: 5 >", log)
    assert re.search(r"Recalls on < BaseDataset, synthetic - #database: \d+; #queries: 4 >", log)
    assert log.count("kept 5 of") == 1 and log.count("kept 4 of") == 1
    assert "Testing the current weights" in log and "Testing the weights of" not in log
    assert not os.path.exists(os.path.join(run, "best_model.pth"))
    # Resuming a run's last_model.pth carries its best_model.pth along (copied), and that is tested.
    checkpoints.save_checkpoint(os.path.join(run, "last_model.pth.tmp"), model=released, epoch_num=1, best_r5=100.0)
    os.replace(os.path.join(run, "last_model.pth.tmp"), os.path.join(run, "last_model.pth"))
    checkpoints.save_checkpoint(os.path.join(run, "best_model.pth"), model=released, epoch_num=0, best_r5=100.0)
    again, _ = _train(
        synthetic_root, tmp_path, "again", "--epochs_num", "3", "--resume", os.path.join(run, "last_model.pth")
    )
    log = open(os.path.join(again, "info.log")).read()
    assert f"Copied the resumed run's best model {os.path.join(run, 'best_model.pth')}" in log
    assert f"Testing the weights of {os.path.join('logs', 'again')}" in log
    copied = checkpoints.load_weights_file(os.path.join(again, "best_model.pth"), what="test")["model_state_dict"]
    original = checkpoints.load_weights_file(os.path.join(run, "best_model.pth"), what="test")["model_state_dict"]
    assert all(torch.equal(copied[k], original[k]) for k in original)


def test_a_resume_with_other_training_flags_says_it_is_no_exact_continuation(tmp_path, tiny_model, caplog):
    import logging

    import mining
    import parser
    import train

    argv = ["--datasets_folder", str(tmp_path), "--backbone", "vit_tiny", "--backbone_depth", "2", "--device", "cpu"]
    saved = train.training_flags(parser.parse_arguments(argv + ["--mining", "full"]), world_size=1)
    path = str(tmp_path / "last_model.pth")
    tiny_model.freeze()
    optimizer = torch.optim.Adam([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-5)
    checkpoints.save_checkpoint(path, model=tiny_model, optimizer=optimizer, extra={train.FLAGS_KEY: saved})
    assert checkpoints.load_weights_file(path, what="test")[train.FLAGS_KEY] == saved  # plain types: weights_only

    def resume(*flags, world_size=1):
        current = train.training_flags(parser.parse_arguments(argv + list(flags)), world_size=world_size)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            train.resume_from(
                path, model=tiny_model, optimizer=optimizer, miner_state=mining.MiningState(4), flags=current
            )
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    assert resume("--mining", "full") == []
    (warning,) = resume("--train_batch_size", "8", "--lr", "0.001", world_size=2)
    assert warning.startswith(f"This run is not an exact continuation of the run that wrote --resume {path}")
    assert "--mining full -> partial" in warning and "--train_batch_size 4 -> 8" in warning
    assert "--lr 1e-05 -> 0.001" in warning and "processes (torchrun) 1 -> 2" in warning
    (warning,) = resume("--mining", "full", "--local_loss_weight", "0.5", "--deterministic")
    assert "--local_loss_weight 1.0 -> 0.5" in warning and "--deterministic False -> True" in warning
    # A released file records no flags: nothing to compare, and it says so.
    released = str(tmp_path / "released.pth")
    checkpoints.save_checkpoint(released, model=tiny_model)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train.resume_from(
            released, model=tiny_model, optimizer=optimizer, miner_state=mining.MiningState(4), flags=saved
        )
    assert "records no training flags" in caplog.text and "not an exact continuation" not in caplog.text
