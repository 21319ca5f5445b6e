"""The one-command demo: built-in synthetic data, untrained recalls, a short CPU training, trained recalls.

    python3 demo.py

No download: the synthetic data set is generated under ./datasets if missing; the model is a small ViT
trained from random weights (there are no pre-trained weights here), so the demo also trains the
backbone (--train_backbone); the paper's recipe keeps the DINOv2 backbone frozen.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import time

import synthetic_dataset

ROOT = os.path.dirname(os.path.abspath(__file__))

# A small configuration that learns visibly in a few minutes on 2 CPU cores.
MODEL_FLAGS = [
    "--backbone",
    "vit_tiny",
    "--backbone_depth",
    "4",
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
    "--train_backbone",
    "--lr",
    "1e-4",
    "--train_batch_size",
    "8",
    "--cache_refresh_rate",
    "300",
    "--queries_per_epoch",
    "300",
    "--neg_samples_num",
    "300",
    "--epochs_num",
    "4",
    "--patience",
    "4",
]


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


def final_recalls(output: str) -> str:
    found = re.findall(r"Recalls on < .*? >: (.*)", output)
    return found[-1] if found else "?"


def main(args):
    start = time.time()
    root = synthetic_dataset.ensure_dataset(args.datasets_folder, args.dataset_name)
    print(f"Synthetic data set ready in {root} ({time.time() - start:.0f} s)")
    data = ["--datasets_folder", args.datasets_folder, "--dataset_name", args.dataset_name]
    stamp = time.strftime("%Y%m%d-%H%M%S")

    untrained = run(
        "1/3 untrained model",
        [
            os.path.join(ROOT, "eval.py"),
            *data,
            *MODEL_FLAGS,
            "--allow_random_weights",
            "--save_dir",
            f"demo_untrained_{stamp}",
        ],
    )
    run(
        "2/3 training",
        [
            os.path.join(ROOT, "train.py"),
            *data,
            *MODEL_FLAGS,
            *TRAIN_FLAGS,
            "--allow_random_weights",
            "--save_dir",
            f"demo_{stamp}",
        ],
    )
    best = sorted(glob.glob(os.path.join("logs", f"demo_{stamp}", "*", "best_model.pth")))[-1]
    trained = run(
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
    pictures = sorted(glob.glob(os.path.join("test", f"demo_trained_{stamp}", "*", "preds")))
    print("\n=== Demo finished in %.1f minutes" % ((time.time() - start) / 60))
    print(f"Untrained model, re-ranked: {final_recalls(untrained)}")
    print(f"Trained model, re-ranked:   {final_recalls(trained)}")
    print(f"Checkpoint: {best}; prediction pictures: {pictures[-1] if pictures else '-'}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--datasets_folder", type=os.path.expanduser, default="datasets", help="where the synthetic data set lives"
    )
    p.add_argument("--dataset_name", default="synthetic")
    main(p.parse_args())
