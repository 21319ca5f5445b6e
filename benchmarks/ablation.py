"""The paper's ablations in miniature, on the demo's data set and foundation model (minutes, not CI).

    python3 benchmarks/ablation.py [--datasets_folder datasets] [--epochs_num 2] [--output ablation.md]

Rows, each trained with the demo's settings (demo.py: 4-block ViT, 112x112, 2 epochs of 300 mined
queries, best epoch by validation R@5) and tested on the test split of the synthetic data set:

* frozen foundation: no training; GeM of the patch tokens retrieves, mutual nearest neighbours of the
  L2-normalised patch tokens re-rank;
* + global adaptation: the adapters trained with the global triplet loss alone (--local_loss_weight 0);
  re-ranked with the patch tokens (the local head is untrained);
* + local adaptation: SelaVPR, adapters and LocalAdapt trained with both losses, re-ranked with LocalAdapt;
* full fine-tuning: the same, with the whole backbone trained too (--train_backbone);
* SelaVPR re-ranking with --rerank_num 20 and 100 (recalls and re-ranking time per query).

Columns: trained parameters, training time per epoch, global-only and re-ranked R@1/5/10/20. Every row
runs in this one process tree, one after the other, so the times compare within a run; on a machine
shared with other jobs they move with its load.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch

import datasets_ws
import demo
import network
import synthetic_dataset
import test


def train(*, name: str, data: list, extra: list, out: str, epochs_num: int) -> dict:
    """train.py with the demo's settings and `extra` flags; returns its best model and epoch times (s)."""
    flags = list(demo.TRAIN_FLAGS)
    flags[flags.index("--epochs_num") + 1] = str(epochs_num)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *data, *demo.MODEL_FLAGS, *flags, *extra, "--save_dir", name]
    print(f"--- training {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"ablation: training {name} failed:\n{proc.stdout[-3000:]}")
    run = sorted(os.listdir(os.path.join(out, "logs", name)))[-1]
    folder = os.path.join(out, "logs", name, run)
    log = open(os.path.join(folder, "info.log")).read()
    epochs = [
        timedelta(hours=int(h), minutes=int(m), seconds=int(s)).total_seconds()
        for h, m, s in re.findall(r"Finished epoch \d+ in (\d+):(\d+):(\d+)", log)
    ]
    print(f"    {len(epochs)} epochs in {time.perf_counter() - start:.0f} s", flush=True)
    return {"best": os.path.join(folder, "best_model.pth"), "epoch_s": sum(epochs) / max(1, len(epochs))}


def evaluate(model: torch.nn.Module, dataset, *, rerank_features: str, rerank_num: int) -> dict:
    """Global-only and re-ranked recalls of `model` on `dataset`, and the re-ranking time per query."""
    result = test.evaluate(
        network.ranking_model(model, rerank_features=rerank_features),
        dataset,
        test.EvalSettings(rerank_num=rerank_num, batch_size=32, num_workers=0, device="cpu"),
    )
    return {
        "global": result.recalls_first,
        "reranked": result.recalls,
        "rerank_s_per_query": result.times.rerank_s / max(1, dataset.queries_num),
    }


def load(*, foundation: bool = False, checkpoint: str = None) -> network.GeoLocalizationNet:
    return network.load_model(
        backbone=demo.BACKBONE,
        backbone_depth=demo.DEPTH,
        foundation_model_path=demo.FOUNDATION if foundation else None,
        checkpoint=checkpoint,
    )


def count(*, train_backbone: bool, global_only: bool = False) -> str:
    """Trained parameters of a row, as "N (share %)". global_only: without LocalAdapt, which the global loss
    alone gives no gradient (GeM's p, which it does reach, stays counted)."""
    model = network.GeoLocalizationNet(backbone=demo.BACKBONE, backbone_depth=demo.DEPTH)
    params = dict(model.named_parameters())
    names = model.trainable_parameter_names(train_backbone=train_backbone)
    if global_only:
        names = [n for n in names if not n.startswith("LocalAdapt.")]
    trained = sum(params[n].numel() for n in names)
    return f"{trained:,} ({100 * trained / sum(p.numel() for p in params.values()):.0f}%)"


def fmt(recalls) -> str:
    return " / ".join(f"{r:.1f}" for r in recalls)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets_folder", default=os.path.join(ROOT, "datasets"))
    p.add_argument("--dataset_name", default="synthetic")
    p.add_argument("--epochs_num", type=int, default=2)
    p.add_argument("--output", default=None, help="also write the table (Markdown) to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    synthetic_dataset.ensure_dataset(args.datasets_folder, args.dataset_name)
    datasets_folder = os.path.abspath(args.datasets_folder)
    data = ["--datasets_folder", datasets_folder, "--dataset_name", args.dataset_name]
    dataset = datasets_ws.BaseDataset(datasets_folder, args.dataset_name, "test", resize=[112, 112])
    out = tempfile.mkdtemp(prefix="selavpr-ablation-")
    print(f"Runs in {out}", flush=True)

    rows = []
    frozen = evaluate(load(foundation=True), dataset, rerank_features="patch", rerank_num=20)
    rows.append(("Frozen foundation", "0 (0%)", "-", frozen, "patch tokens"))

    trained = train(
        name="global",
        data=data,
        extra=["--foundation_model_path", demo.FOUNDATION, "--local_loss_weight", "0"],
        out=out,
        epochs_num=args.epochs_num,
    )
    result = evaluate(load(checkpoint=trained["best"]), dataset, rerank_features="patch", rerank_num=20)
    rows.append(
        (
            "+ global adaptation (adapters)",
            count(train_backbone=False, global_only=True),
            f"{trained['epoch_s']:.0f}",
            result,
            "patch tokens",
        )
    )

    selavpr = train(
        name="selavpr",
        data=data,
        extra=["--foundation_model_path", demo.FOUNDATION],
        out=out,
        epochs_num=args.epochs_num,
    )
    model = load(checkpoint=selavpr["best"])
    result = evaluate(model, dataset, rerank_features="local", rerank_num=20)
    rows.append(
        ("+ local adaptation (SelaVPR)", count(train_backbone=False), f"{selavpr['epoch_s']:.0f}", result, "LocalAdapt")
    )
    result100 = evaluate(model, dataset, rerank_features="local", rerank_num=100)
    rows.append(("SelaVPR, --rerank_num 100", count(train_backbone=False), "-", result100, "LocalAdapt"))

    full = train(
        name="full",
        data=data,
        extra=["--foundation_model_path", demo.FOUNDATION, "--train_backbone"],
        out=out,
        epochs_num=args.epochs_num,
    )
    result = evaluate(load(checkpoint=full["best"]), dataset, rerank_features="local", rerank_num=20)
    rows.append(("Full fine-tuning", count(train_backbone=True), f"{full['epoch_s']:.0f}", result, "LocalAdapt"))

    lines = [
        f"Test split of {args.dataset_name} ({dataset.database_num} database images, {dataset.queries_num} queries); "
        "--rerank_num 20 unless said otherwise; recalls R@1 / R@5 / R@10 / R@20",
        "",
        "| setting | parameters trained | s / epoch | global only | re-ranked | re-ranked with | re-rank s / query |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, params, epoch_s, r, dense in rows:
        lines.append(
            f"| {name} | {params} | {epoch_s} | {fmt(r['global'])} | {fmt(r['reranked'])} | {dense} | "
            f"{r['rerank_s_per_query']:.3f} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
