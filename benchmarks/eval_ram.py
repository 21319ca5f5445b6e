"""Peak RSS of eval.py at two database sizes, with and without --efficient_ram_testing.

Generates two synthetic data sets whose test split has --small and --large database images (same
queries), runs eval.py on each in a fresh process (random tiny model, CPU) and prints the peak RSS of
every run side by side: with --efficient_ram_testing it should not grow with the database, in RAM mode
it grows by the dense features (29x29x128 float32 = 431 KB per image at 112x112).

    python3 benchmarks/eval_ram.py [--small 500] [--large 2000] [--folder DIR]
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import synthetic_dataset

# Runs eval.py in this child and prints its own peak RSS at the end. VmHWM, not getrusage's ru_maxrss:
# Linux carries ru_maxrss across fork + exec, so a child would report its parent's peak (the data set
# generation) when that was higher.
CHILD = """
import runpy, sys
sys.path.insert(0, {root!r})
sys.argv = {argv!r}
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        print("PEAK_RSS_KB", [l.split()[1] for l in f if l.startswith("VmHWM")][0], flush=True)
"""


def run_eval(folder, name, efficient, workdir):
    argv = [
        "eval.py",
        "--datasets_folder",
        folder,
        "--dataset_name",
        name,
        "--backbone",
        "vit_tiny",
        "--backbone_depth",
        "2",
        "--resize",
        "112",
        "112",
        "--device",
        "cpu",
        "--num_workers",
        "0",
        "--allow_random_weights",
        "--rerank_num",
        "5",
        "--recall_values",
        "1",
        "5",
        "--save_dir",
        f"{name}_{'efficient' if efficient else 'ram'}",
    ]
    if efficient:
        argv.append("--efficient_ram_testing")
    code = CHILD.format(argv=argv, script=os.path.join(ROOT, "eval.py"), root=ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"eval.py failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    rss = int(re.findall(r"PEAK_RSS_KB (\d+)", out.stdout)[-1]) / 1024**2
    recalls = re.findall(r"Recalls on < .*? >: (.*)", out.stdout)[-1]
    return rss, recalls


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=500)
    p.add_argument("--large", type=int, default=2000)
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--folder", default=None, help="where the data sets go (default: a temp folder)")
    args = p.parse_args()
    folder = args.folder or tempfile.mkdtemp(prefix="eval_ram_")
    rows = []
    for n in (args.small, args.large):
        name = f"db{n}"
        synthetic_dataset.ensure_dataset(
            folder,
            name,
            synthetic_dataset.SyntheticOptions(preset="tiny", test_database_num=n, test_queries_num=args.queries),
        )
        for efficient in (True, False):
            rss, recalls = run_eval(folder, name, efficient, folder)
            rows.append((n, efficient, rss, recalls))
            print(
                f"database {n:5d}, {'--efficient_ram_testing' if efficient else 'in RAM          '}: "
                f"peak RSS {rss:.2f} GiB  ({recalls})",
                flush=True,
            )
    eff = {n: rss for n, e, rss, _ in rows if e}
    ram = {n: rss for n, e, rss, _ in rows if not e}
    print(
        f"efficient: {eff[args.large] / eff[args.small]:.2f}x peak RSS for {args.large / args.small:.0f}x "
        f"the database; in RAM: {ram[args.large] / ram[args.small]:.2f}x"
    )


if __name__ == "__main__":
    main()
