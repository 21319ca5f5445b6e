"""The demo's recipe as a regression test: the shipped foundation model, frozen, with adapters, LocalAdapt and
GeM trained by train.py (triplet + local mutual-NN loss) for about a minute on the tiny synthetic set.

The losses, recalls and two continuous margins it reached are recorded below. The tolerances cover what
another thread count changes (float sums in another order) and no change of the method: halving the
parallel adapter's 0.2 or the local loss weight moves the margins well outside (the numbers beside
RECORDED); the recalls of the tiny set's 15 test queries move by whole queries only. Record new values
only for an intended change of the recipe, the foundation file or the generator, and say why in the commit.
"""

import os
import re

from conftest import run_script

import demo

# The demo's recipe (demo.py's flags: model, input size, learning rate, mining, re-ranking), scaled to the
# tiny set: 12 mined queries an epoch in batches of 4, 2 epochs, no loader processes.
SCALED = {
    "--num_workers": "0",
    "--infer_batch_size": "16",
    "--train_batch_size": "4",
    "--cache_refresh_rate": "12",
    "--queries_per_epoch": "12",
    "--neg_samples_num": "30",
    "--epochs_num": "2",
    "--patience": "2",
}


def _flags():
    flags = [*demo.MODEL_FLAGS, *demo.TRAIN_FLAGS, "--foundation_model_path", demo.FOUNDATION]
    for name, value in SCALED.items():
        flags[flags.index(name) + 1] = value
    return flags


FLAGS = _flags()

# Recorded on a 2-core x86-64 CPU, torch 2.14.1, 2 threads. What moves them (measured, margins' change):
#   1 thread instead of 2:                   global 1.8e-7, local 2.4e-8 (same losses and recalls)
#   parallel adapter scale 0.2 -> 0.1:       global 1.2e-4, local 3.9e-4 (epoch-2 triplet loss 0.0809)
#   local loss weight 1 -> 0.5:              global 1.5e-4, local 3.8e-4 (test R@1 33.3 / 66.7)
# The margin tolerances sit about a hundred times above the thread-order drift and several times below
# either change of the method.
RECORDED = {
    "losses": [(0.0857, 0.0021), (0.0799, 0.0)],  # per epoch: (average triplet loss, average local loss)
    "test_global": [26.7, 60.0, 80.0, 100.0],  # final test, R@1/5/10/20 before re-ranking
    "test_reranked": [73.3, 80.0, 93.3, 100.0],  # and after
    "global_margin": -0.010640635093053182,  # margins(last_model.pth)
    "local_margin": 0.019484285513559976,
}
RECALL_TOLERANCE = 7.0  # points: one query of the tiny set's 15
LOSS_TOLERANCE = 0.02  # relative
GLOBAL_MARGIN_TOLERANCE = 2e-5
LOCAL_MARGIN_TOLERANCE = 1e-4


def run_recipe(synthetic_root, cwd, save_dir="regression"):
    """train.py with FLAGS; returns the numbers the test compares: per-epoch (triplet, local) losses,
    per-epoch validation recalls (re-ranked), and the final test's global-only and re-ranked recalls."""
    folder, name = synthetic_root
    result = run_script(
        ["train.py", "--datasets_folder", folder, "--dataset_name", name, *FLAGS, "--save_dir", save_dir],
        cwd=str(cwd),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = sorted(os.listdir(os.path.join(str(cwd), "logs", save_dir)))
    log = open(os.path.join(str(cwd), "logs", save_dir, runs[-1], "info.log")).read()
    losses = [
        (float(g), float(l))
        for g, l in re.findall(r"average epoch triplet loss = ([\d.]+), local loss = ([\d.]+)", log)
    ]

    def recalls(text):
        return [float(v) for v in re.findall(r"R@\d+: ([\d.]+)", text)]

    val = [recalls(line) for line in re.findall(r"Reranking recalls on val set .*?>: (.*)", log)]
    first = recalls(re.findall(r"First ranking recalls: (.*)", log)[-1])
    final = recalls(re.findall(r"Recalls on < BaseDataset.*?>: (.*)", log)[-1])
    return {"losses": losses, "val": val, "test_global": first, "test_reranked": final}


def margins(checkpoint, synthetic_root):
    """Two continuous measures of a trained model on the test split, each what one loss term optimises
    (means over the queries): the global margin, distance of the query's global descriptor to the nearest
    database image that is not a positive minus to the nearest positive; the local margin, mutual-NN
    similarity of the local features with that nearest positive minus with that nearest non-positive."""
    import torch

    import datasets_ws
    import local_matching
    import network

    folder, name = synthetic_root
    model = network.load_model(backbone="vit_tiny", backbone_depth=4, checkpoint=checkpoint).eval()
    ds = datasets_ws.BaseDataset(folder, name, "test", resize=[112, 112])
    images = torch.stack([ds.load(i, "hard_resize") for i in range(ds.database_num + ds.queries_num)])
    with torch.inference_mode():
        local, descriptors = model(images)
    distances = torch.cdist(descriptors[ds.database_num :], descriptors[: ds.database_num])
    global_margins, local_margins = [], []
    for q, positives in enumerate(ds.get_positives()):
        is_positive = torch.zeros(ds.database_num, dtype=torch.bool)
        is_positive[torch.as_tensor(positives, dtype=torch.long)] = True
        d = distances[q]
        pos = torch.where(is_positive, d, torch.inf).argmin()
        neg = torch.where(is_positive, torch.inf, d).argmin()
        global_margins.append((d[neg] - d[pos]).item())
        query = local[ds.database_num + q].unsqueeze(0)
        sims = local_matching.mutual_nn_similarity(query.expand(2, -1, -1, -1), local[torch.stack([pos, neg])])
        local_margins.append((sims[0] - sims[1]).item())
    return sum(global_margins) / len(global_margins), sum(local_margins) / len(local_margins)


def test_the_demo_recipe_reaches_the_recorded_recalls(synthetic_root, tmp_path):
    got = run_recipe(synthetic_root, tmp_path)
    runs = sorted(os.listdir(os.path.join(str(tmp_path), "logs", "regression")))
    got["global_margin"], got["local_margin"] = margins(
        os.path.join(str(tmp_path), "logs", "regression", runs[-1], "last_model.pth"), synthetic_root
    )
    print(got)  # shown by pytest on a failure: what to compare with, or to record after an intended change
    for key in ("test_global", "test_reranked"):
        assert len(got[key]) == len(RECORDED[key])
        assert all(abs(g - r) <= RECALL_TOLERANCE for g, r in zip(got[key], RECORDED[key])), key
    assert len(got["losses"]) == len(RECORDED["losses"])
    for g, r in zip(got["losses"], RECORDED["losses"]):
        assert abs(g[0] - r[0]) <= LOSS_TOLERANCE * r[0], "triplet loss"
    assert abs(got["global_margin"] - RECORDED["global_margin"]) <= GLOBAL_MARGIN_TOLERANCE
    assert abs(got["local_margin"] - RECORDED["local_margin"]) <= LOCAL_MARGIN_TOLERANCE
