"""The one-command demo: the paper's experiment in miniature, on the CPU, with nothing to download.

    python3 demo.py [--variant selavpr|full_finetune|from_scratch]

1. The built-in synthetic data set is generated under ./datasets if missing (seed 0).
2. The project's small foundation model (weights/foundation_vit_tiny_d4.pth: a 4-block ViT in the DINOv2
   layout, pre-trained by tools/pretrain_foundation.py without place labels, on other synthetic streets
   than these) is evaluated FROZEN, without adaptation: GeM of its patch tokens retrieves, and mutual
   nearest neighbours of its L2-normalised patch tokens re-rank (there is no trained local head yet).
3. SelaVPR's recipe trains: the foundation stays frozen, only the adapters of every block, the local head
   (LocalAdapt) and GeM's p learn, with the global triplet loss and the local mutual-NN loss.
4. The adapted model is evaluated (GeM retrieval, re-ranking with its LocalAdapt features), and a table
   compares both, with the share of parameters trained.

--variant full_finetune trains the whole backbone from the foundation too; --variant from_scratch
trains everything from random weights (the demo before the project had a foundation model).
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import network
import synthetic_dataset

ROOT = os.path.dirname(os.path.abspath(__file__))
FOUNDATION = os.path.join(ROOT, "weights", "foundation_vit_tiny_d4.pth")
BACKBONE, DEPTH = "vit_tiny", 4

# A small configuration that adapts visibly in a few minutes on 2 CPU cores.
MODEL_FLAGS = [
    "--backbone",
    BACKBONE,
    "--backbone_depth",
    str(DEPTH),
    "--resize",
    "112",
    "112",
    "--device",
    "cpu",
    "--num_workers",
    "1",
    "--infer_batch_size",
    "32",
    "--rerank_num",
    "20",
    "--seed",
    "0",
]
TRAIN_FLAGS = [
    "--lr",
    "1e-3",
    "--train_batch_size",
    "8",
    "--cache_refresh_rate",
    "300",
    "--queries_per_epoch",
    "300",
    "--neg_samples_num",
    "300",
    "--epochs_num",
    "2",
    "--patience",
    "4",
]
# What each variant trains from, and the flags that say so (after TRAIN_FLAGS: a later flag wins).
# full_finetune changes only what is trained, so that it compares with selavpr; from_scratch is the demo
# as it was before the project had a foundation model, its learning rate included.
VARIANTS = {
    "selavpr": (
        "SelaVPR (adapters + LocalAdapt, {share} of parameters trained)",
        ["--foundation_model_path", FOUNDATION],
    ),
    "full_finetune": (
        "Full fine-tuning (foundation + adapters + LocalAdapt, {share} of parameters trained)",
        ["--foundation_model_path", FOUNDATION, "--train_backbone"],
    ),
    "from_scratch": (
        "From random weights (everything, {share} of parameters trained)",
        ["--allow_random_weights", "--train_backbone", "--lr", "1e-4"],
    ),
}
RECALLS = re.compile(r"R@(\d+): ([\d.]+)")


def run(step: str, args: list) -> str:
    """Run a repository script, streaming its output; returns it."""
    print(f"\n=== {step}: python3 {' '.join(args)}", flush=True)
    proc = subprocess.Popen(
        [sys.executable] + args, cwd=os.getcwd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        if "Arguments:" not in line:
            print(line, end="", flush=True)
        lines.append(line)
    if proc.wait() != 0:
        sys.exit(f"demo: step '{step}' failed (exit code {proc.returncode}); see its output above.")
    return "".join(lines)


def recalls_of(output: str) -> Tuple[str, str]:
    """(global-only, re-ranked) recall strings of an eval.py run's output ("R@1: …, R@5: …")."""
    first = re.findall(r"First ranking recalls: (.*)", output)
    final = re.findall(r"Recalls on < .*? >: (.*)", output)
    return (first[-1].strip() if first else "?"), (final[-1].strip() if final else "?")


def parameter_counts(*, train_backbone: bool) -> Tuple[int, int]:
    """(trained, all) parameters of the demo's model with the given trainable set."""
    model = network.GeoLocalizationNet(backbone=BACKBONE, backbone_depth=DEPTH)
    trained = set(model.trainable_parameter_names(train_backbone=train_backbone))
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in trained), sum(p.numel() for p in params.values())


def table(rows: List[Dict[str, str]]) -> str:
    """A Markdown table: model, trained parameters, global-only and re-ranked R@1/5/10/20."""

    def short(recalls: str) -> str:
        return " / ".join(v for _, v in RECALLS.findall(recalls)) or "?"

    lines = [
        "| model | parameters trained | global only R@1/5/10/20 | re-ranked R@1/5/10/20 | re-ranked with |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['trained']} | {short(r['global'])} | {short(r['reranked'])} | {r['dense']} |")
    return "\n".join(lines)


def main(args):
    start = time.time()
    root = synthetic_dataset.ensure_dataset(args.datasets_folder, args.dataset_name)
    print(f"Synthetic data set ready in {root} ({time.time() - start:.0f} s)")
    data = ["--datasets_folder", args.datasets_folder, "--dataset_name", args.dataset_name]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    label, weights = VARIANTS[args.variant]
    weights = [args.foundation_model_path if w == FOUNDATION else w for w in weights]
    train_backbone = "--train_backbone" in weights
    if args.variant != "from_scratch" and not os.path.isfile(args.foundation_model_path):
        sys.exit(
            f"demo: the foundation model {args.foundation_model_path} is missing: restore it from the repository "
            "(git checkout weights/) or regenerate it with tools/pretrain_foundation.py (see weights/README.md)."
        )

    rows = []
    if args.variant != "from_scratch":
        frozen = run(
            "1/3 frozen foundation model, no adaptation",
            [
                os.path.join(ROOT, "eval.py"),
                *data,
                *MODEL_FLAGS,
                "--foundation_model_path",
                args.foundation_model_path,
                "--rerank_features",
                "patch",
                "--save_dir",
                f"demo_frozen_{stamp}",
            ],
        )
        rows.append(dict(name="Foundation, frozen, no adaptation", trained="0", dense="patch tokens"))
        rows[-1]["global"], rows[-1]["reranked"] = recalls_of(frozen)
    run(
        "2/3 training",
        [
            os.path.join(ROOT, "train.py"),
            *data,
            *MODEL_FLAGS,
            *TRAIN_FLAGS,
            *weights,
            "--save_dir",
            f"demo_{stamp}",
        ],
    )
    best = sorted(glob.glob(os.path.join("logs", f"demo_{stamp}", "*", "best_model.pth")))[-1]
    adapted = run(
        "3/3 trained model",
        [
            os.path.join(ROOT, "eval.py"),
            *data,
            *MODEL_FLAGS,
            "--resume",
            best,
            "--num_preds_to_save",
            "5",
            "--save_dir",
            f"demo_trained_{stamp}",
        ],
    )
    trained, total = parameter_counts(train_backbone=train_backbone)
    share = f"{100 * trained / total:.0f}%"
    rows.append(dict(name=label.format(share=share), trained=f"{trained:,} of {total:,} ({share})", dense="LocalAdapt"))
    rows[-1]["global"], rows[-1]["reranked"] = recalls_of(adapted)
    pictures = sorted(glob.glob(os.path.join("test", f"demo_trained_{stamp}", "*", "preds")))

    print("\n=== Demo finished in %.1f minutes" % ((time.time() - start) / 60))
    print(f"Test split of {args.dataset_name}, --rerank_num 20:\n")
    print(table(rows))
    if args.variant != "from_scratch":
        print(
            "\nGlobal only: GeM descriptors, nearest first. The frozen foundation has no trained local head: it "
            "re-ranks with mutual nearest neighbours of its L2-normalised patch tokens (--rerank_features patch).\n"
        )
        print(f"Foundation, frozen, no adaptation, re-ranked: {rows[0]['reranked']}")
    else:
        print()
    print(f"{label.format(share=share)}, re-ranked: {rows[-1]['reranked']}")
    print(f"Checkpoint: {best}; prediction pictures: {pictures[-1] if pictures else '-'}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--datasets_folder", type=os.path.expanduser, default="datasets", help="where the synthetic data set lives"
    )
    p.add_argument("--dataset_name", default="synthetic")
    p.add_argument(
        "--foundation_model_path",
        type=os.path.expanduser,
        default=FOUNDATION,
        help="the foundation model (default: the project's, shipped in weights/)",
    )
    p.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        default="selavpr",
        help="selavpr: the paper's recipe (foundation frozen); full_finetune: the foundation trained too; "
        "from_scratch: everything from random weights",
    )
    main(p.parse_args())
