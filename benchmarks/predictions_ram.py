"""Memory of writing predictions.jsonl at benchmark size: every record built first and the file's text
joined in memory (how it was written until the Pitts30k-size run showed it: 1.2 GB at its end) against
records built and written one at a time (predictions_io now), side by side, each in a fresh process.

    python3 benchmarks/predictions_ram.py                          # Pitts30k: 6,816 queries, 10,000 images, k = 100
    python3 benchmarks/predictions_ram.py --queries 27592 --database 27592   # Nordland (benchmark size)

Each child builds the same random Ranking (first-stage and re-ranked lists, distances, scores, one
positive a query; paths as long as a data set's), then writes predictions.jsonl; it reports the growth of
its peak RSS (VmHWM) over its RSS just before writing. Prints both, their ratio, and whether the two files
are byte-identical.
"""

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import json, os, sys
import numpy as np
sys.path.insert(0, {root!r})
import atomic_files, predictions_io, retrieval

def status(key):
    with open("/proc/self/status") as f:
        return int([line.split()[1] for line in f if line.startswith(key)][0]) * 1024

rng = np.random.default_rng(0)
queries, database, k = {queries}, {database}, {k}
# k distinct database indexes a query (a stride of database // k from a random start)
first = (rng.integers(0, database, (queries, 1)) + np.arange(k) * max(1, database // k)) % database
ranking = retrieval.Ranking(
    first_predictions=first,
    first_distances=np.sort(rng.random((queries, k)), axis=1).astype(np.float32),
    predictions=first[:, ::-1].copy(),
    scores=np.sort(rng.integers(0, 3721, (queries, k)), axis=1)[:, ::-1].astype(np.float32),
)
folder = "/datasets/pitts30k/images/test"
records = predictions_io.prediction_records(
    queries_paths=[f"{{folder}}/queries/@0584000.00@4477000.00@{{i:06d}}@.jpg" for i in range(queries)],
    database_paths=[f"{{folder}}/database/@0584000.00@4477000.00@{{i:06d}}@.jpg" for i in range(database)],
    ranking=ranking,
    positives=[first[q, :1] for q in range(queries)],
)
before = status("VmRSS")
if {whole!r}:  # the former way: a list of every record, then the whole text
    everything = list(records)
    atomic_files.atomic_write_text({path!r}, "".join(json.dumps(r, sort_keys=True) + "\\n" for r in everything))
else:
    predictions_io.write_predictions({path!r}, records)
print("GROWTH", status("VmHWM") - before, flush=True)
"""


def run(*, whole: bool, path: str, queries: int, database: int, k: int) -> int:
    code = CHILD.format(root=ROOT, queries=queries, database=database, k=k, whole=whole, path=path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"the child failed:\n{out.stderr[-3000:]}")
    return int(out.stdout.split("GROWTH")[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=6816)
    p.add_argument("--database", type=int, default=10000)
    p.add_argument("--k", type=int, default=100)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {whole: os.path.join(tmp, f"{'whole' if whole else 'stream'}.jsonl") for whole in (True, False)}
        growth = {
            whole: run(whole=whole, path=paths[whole], queries=args.queries, database=args.database, k=args.k)
            for whole in (True, False)
        }
        size = os.path.getsize(paths[False])
        same = filecmp.cmp(paths[True], paths[False], shallow=False)
    gib = 2**30
    print(f"predictions.jsonl of {args.queries:,} queries x {args.k} candidates: {size / gib:.2f} GiB on disk")
    print(
        f"peak RSS growth while writing: every record first {growth[True] / gib:.2f} GiB, "
        f"one at a time {growth[False] / 2**20:.1f} MiB"
    )
    print(f"ratio {growth[False] / max(growth[True], 1):.4f}; files byte-identical: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
