"""Peak RSS of a whole eval.py with a ViT-L/14 checkpoint: weights read whole and copied into the model
(the oldest supported torch's way) against weights memory-mapped into the model (one copy), side by side.

Writes a checkpoint of a randomly initialised ViT-L/14 (about 1.2 GB, once: reused when the file exists)
and the tiny synthetic data set, then runs eval.py twice in fresh processes on the CPU (--resume CKPT,
224x224, the test split's 40 database images and 15 queries): once with checkpoints.torch_can_map_files
forced off, once as installed. Prints both peaks, their ratio, and whether the two runs wrote
byte-identical predictions.jsonl.

    python3 benchmarks/weights_ram.py [--checkpoint /tmp/selavpr_vitl_random.pth] [--folder DIR]

Needs about 4 GB of free RAM and 1.3 GB of disk for the checkpoint (keep it out of the repository).
"""

import argparse
import filecmp
import glob
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Runs eval.py in this child and prints its own peak RSS (VmHWM: Linux carries getrusage's ru_maxrss
# across fork + exec, so a child could report its parent's peak). mapped=False forces the copy path.
CHILD = """
import runpy, sys
sys.path.insert(0, {root!r})
import checkpoints
if not {mapped!r}:
    checkpoints.torch_can_map_files = lambda: False
sys.argv = {argv!r}
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        print("PEAK_RSS_KB", [l.split()[1] for l in f if l.startswith("VmHWM")][0], flush=True)
"""


def write_checkpoint(path: str) -> None:
    """A train.py-layout checkpoint of a randomly initialised ViT-L/14 SelaVPR model (seed 0)."""
    import torch

    import checkpoints
    import network

    torch.manual_seed(0)
    model = network.GeoLocalizationNet(backbone="vit_large")
    checkpoints.save_checkpoint(path, model=model, resize=(224, 224))


def run_eval(*, folder: str, name: str, checkpoint: str, mapped: bool, workdir: str):
    save_dir = "mapped" if mapped else "copied"
    argv = [
        "eval.py",
        "--datasets_folder",
        folder,
        "--dataset_name",
        name,
        "--resume",
        checkpoint,
        "--device",
        "cpu",
        "--num_workers",
        "0",
        "--infer_batch_size",
        "16",
        "--save_dir",
        save_dir,
    ]
    code = CHILD.format(argv=argv, script=os.path.join(ROOT, "eval.py"), root=ROOT, mapped=mapped)
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"eval.py failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    rss_gib = int(re.findall(r"PEAK_RSS_KB (\d+)", out.stdout)[-1]) / 1024**2
    recalls = re.findall(r"Recalls on < .*? >: (.*)", out.stdout)[-1]
    (predictions,) = glob.glob(os.path.join(workdir, "test", save_dir, "*", "predictions.jsonl"))
    return rss_gib, recalls, predictions, "memory-mapped" in out.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=os.path.join(tempfile.gettempdir(), "selavpr_vitl_random.pth"))
    p.add_argument("--folder", default=None, help="data set and outputs (default: a new temp folder)")
    args = p.parse_args()

    import synthetic_dataset

    if not os.path.exists(args.checkpoint):
        print(f"writing a random ViT-L/14 checkpoint to {args.checkpoint} ...", flush=True)
        write_checkpoint(args.checkpoint)
    folder = args.folder or tempfile.mkdtemp(prefix="weights_ram_")
    synthetic_dataset.ensure_dataset(folder, "synthetic", preset="tiny")
    rows = {}
    for mapped in (False, True):
        workdir = os.path.join(folder, "mapped" if mapped else "copied")
        os.makedirs(workdir, exist_ok=True)
        rows[mapped] = run_eval(
            folder=folder, name="synthetic", checkpoint=args.checkpoint, mapped=mapped, workdir=workdir
        )
        rss, recalls, _, was_mapped = rows[mapped]
        how = "memory-mapped, one copy" if was_mapped else "read whole and copied"
        print(f"eval.py, ViT-L/14 weights {how:24s}: peak RSS {rss:.2f} GiB  ({recalls})", flush=True)
    same = filecmp.cmp(rows[False][2], rows[True][2], shallow=False)
    print(
        f"memory-mapped / copied peak RSS: {rows[True][0] / rows[False][0]:.2f}x; "
        f"predictions.jsonl byte-identical: {'yes' if same else 'NO'}"
    )


if __name__ == "__main__":
    main()
