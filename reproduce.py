"""Reproduce the paper's result tables with one command.

    python3 reproduce.py --datasets_folder DIR --msls_checkpoint SelaVPR_msls.pth \
        --pitts30k_checkpoint SelaVPR_pitts30k.pth [--msls_val_keys FILE | --msls_all_queries] \
        [--rerank_num 100|20|both] [--output results] [--dataset_folders NAME=FOLDER ...] [--only NAME ...] \
        <model/runtime flags>

Every data set of the paper found under --datasets_folder is evaluated with the checkpoint the paper
used for it (the MSLS model: msls val, nordland test, st_lucia test; the Pitts30k model: tokyo247,
pitts30k and pitts250k test), through the same test.evaluate as eval.py. The result is
<output>/results.md: one Markdown row per (data set, rerank_num) with our R@1/5/10 next to the
published ones, the protocol, timings and peak memory. Data sets or checkpoints that are missing get
a "skipped" row saying what is missing.

The paper's protocols are built in: MSLS-val evaluates the 740 queries of the built-in list
msls_val_740 (data/README.md), Nordland is recognised by its image counts (the paper's Nordland-test,
3,450 + 3,450 images with positives within +-2 frames, or the benchmark downloader's 27,592 + 27,592
with 25 m), and a row whose data differ from the paper's says so and shows no difference (delta) to the
paper's numbers. The model settings that a checkpoint written by train.py records (backbone, depth,
registers, input size) are used as eval.py uses them: flags given on the command line win.

Resumable: each finished evaluation is stored in <output>/results.json under a key made of what
determines it: the data set split's image list (every image's relative name, size and modification
time), the MSLS key file's contents, the checkpoint's SHA-256 and every flag that changes results. A
later run with the same key reuses it instead of evaluating again, so an interrupted run continues
with the next data set; a row evaluated again is logged with the reason (e.g. the images changed).
Each run logs to <output>/logs/<date>/.
"""

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import atomic_files
import checkpoints
import commons
import datasets_ws
import network
import numerics
import parser
import test

try:
    import resource
except ImportError:  # not on Windows: peak RAM is then reported as n/a
    resource = None

CACHE_NAME = "results.json"
TABLE_NAME = "results.md"
CACHE_FORMAT = "selavpr-reproduce-results"
CACHE_VERSION = 1
PAPER_RERANK_NUM = 100
TABLE_RECALLS = (1, 5, 10)
MSLS_OFFICIAL_QUERIES = 740
MSLS_KEYS = datasets_ws.OFFICIAL_MSLS_KEYS  # the built-in list reproduce.py uses for MSLS-val by default
# Nordland variants, told apart by their (database, queries) image counts. The paper's Nordland-test
# (its authors' reply in the public repository's issues): positives within +-2 frames. The Visual
# Geo-localization benchmark downloader's Nordland: positives within 25 m, about +-10 frames there.
NORDLAND_PAPER_COUNTS = (3450, 3450)
NORDLAND_PAPER_FRAMES = 2
NORDLAND_DOWNLOADER_COUNTS = (27592, 27592)
NORDLAND_PAPER = "the paper's Nordland-test: 3450 + 3450 images, positives within +-2 frames"
CHECKPOINT_FLAGS = {"msls": "--msls_checkpoint", "pitts30k": "--pitts30k_checkpoint"}


@dataclass(frozen=True)
class PaperEntry:
    """One column group of the paper's tables (published numbers: the seed README, rerank_num 100)."""

    name: str  # default folder name under --datasets_folder
    title: str
    model: str  # "msls" | "pitts30k": the checkpoint that the paper evaluated it with
    split: str
    recalls: Tuple[float, float, float]  # published R@1, R@5, R@10


PAPER_ENTRIES = (
    PaperEntry("msls", "MSLS-val", "msls", "val", (90.8, 96.4, 97.2)),
    PaperEntry("nordland", "Nordland-test", "msls", "test", (85.2, 95.5, 98.5)),
    PaperEntry("st_lucia", "St Lucia", "msls", "test", (99.8, 100.0, 100.0)),
    PaperEntry("tokyo247", "Tokyo24/7", "pitts30k", "test", (94.0, 96.8, 97.5)),
    PaperEntry("pitts30k", "Pitts30k-test", "pitts30k", "test", (92.8, 96.8, 97.7)),
    PaperEntry("pitts250k", "Pitts250k-test", "pitts30k", "test", (95.7, 98.8, 99.2)),
)
ENTRY_NAMES = tuple(e.name for e in PAPER_ENTRIES)


# ---------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------


def parse_rerank_nums(text: str) -> List[int]:
    """--rerank_num: "both" -> [100, 20] (the paper's setting and the README's fast one), N -> [N]."""
    if text.strip().lower() == "both":
        return [PAPER_RERANK_NUM, 20]
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--rerank_num must be a positive integer or 'both', got {text!r}") from None
    if value <= 0:
        raise ValueError(f"--rerank_num must be a positive integer or 'both', got {text!r}")
    return [value]


def parse_dataset_folders(items: Sequence[str]) -> Dict[str, str]:
    """--dataset_folders NAME=FOLDER ...: {paper data set name: folder} (FOLDER relative to
    --datasets_folder, or absolute)."""
    mapping = {}
    for item in items:
        name, sep, folder = item.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise ValueError(f"--dataset_folders {item!r}: expected NAME=FOLDER, e.g. msls=msls_vg")
        if name not in ENTRY_NAMES:
            raise ValueError(
                f"--dataset_folders {item!r}: unknown data set {name!r}; the paper's are {', '.join(ENTRY_NAMES)}"
            )
        if name in mapping:
            raise ValueError(f"--dataset_folders names {name!r} twice")
        mapping[name] = os.path.expanduser(folder)  # NAME=~/x: the shell does not expand this `~`
    return mapping


# eval.py's model, runtime and evaluation flags; no --resume / --load_weights / --foundation_model_path
# (the paper's checkpoints have their own flags), no PCA, no prediction pictures, no --query_keys_file
# (the built-in list, --msls_val_keys or --msls_all_queries), and its own --rerank_num.
REPRODUCE_GROUPS = (parser.MODEL, parser.RUNTIME, parser.EXTRACTION, parser.EVALUATION, parser.DATASETS_FOLDER)


def build_parser():
    """The groups above plus this script's own flags."""
    p = parser.CommandParser(
        "Reproduce the paper's tables: evaluate every data set of the paper found under "
        "--datasets_folder with the paper's checkpoints, given with --msls_checkpoint and "
        "--pitts30k_checkpoint.",
        REPRODUCE_GROUPS,
    )
    own = p.add_argument_group("reproduce.py")
    own.add_argument(
        "--msls_checkpoint",
        type=parser.path,
        default=None,
        help="SelaVPR_msls.pth: evaluates msls (val), nordland and st_lucia (test)",
    )
    own.add_argument(
        "--pitts30k_checkpoint",
        type=parser.path,
        default=None,
        help="SelaVPR_pitts30k.pth: evaluates tokyo247, pitts30k and pitts250k (test)",
    )
    msls = own.add_mutually_exclusive_group()
    msls.add_argument(
        "--msls_val_keys",
        type=parser.path,
        default=None,
        help=f"MSLS-val queries: keep those whose key is listed in this file instead of the built-in "
        f"{MSLS_KEYS} (the paper's 740; a row with another list is marked non-paper)",
    )
    msls.add_argument(
        "--msls_all_queries",
        action="store_true",
        help="MSLS-val: evaluate every query of the val folder (~11k) instead of the paper's 740; the row "
        "is marked non-paper",
    )
    own.add_argument(
        "--output",
        type=parser.path,
        default="results",
        help="folder of results.md (the table), results.json (finished evaluations) and logs/",
    )
    own.add_argument(
        "--dataset_folders",
        type=str,
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=FOLDER",
        help=f"folders named differently from the data set names ({', '.join(ENTRY_NAMES)}), "
        "relative to --datasets_folder or absolute",
    )
    own.add_argument(
        "--only",
        type=str,
        nargs="+",
        default=None,
        choices=ENTRY_NAMES,
        metavar="NAME",
        help=f"evaluate only these data sets ({', '.join(ENTRY_NAMES)}); the others are listed as skipped",
    )
    own.add_argument(
        "--rerank_num",
        type=str,
        default=str(PAPER_RERANK_NUM),
        help="candidates re-ranked per query: an integer (the paper: 100; the README: 20 is close "
        "at a fifth of the time) or 'both' (100 and 20, one row each)",
    )
    return p


def _finish_arguments(p, values: dict) -> None:
    """--rerank_num -> a list of integers, --dataset_folders -> {name: folder}; the key file must exist."""
    try:
        values["rerank_num"] = parse_rerank_nums(values["rerank_num"])
        values["dataset_folders"] = parse_dataset_folders(values["dataset_folders"])
    except ValueError as e:
        p.error(str(e))
    if values["msls_val_keys"] is not None and not os.path.isfile(values["msls_val_keys"]):
        p.error(
            f"--msls_val_keys {values['msls_val_keys']}: no such file; give a list of MSLS-val query keys (the "
            f"paper's {MSLS_OFFICIAL_QUERIES} are built in: drop the flag to use them)"
        )


def _given_model_flags(p, argv: Sequence[str]) -> dict:
    """The model flags (checkpoints.MODEL_FLAGS) present on the command line, with their values: these win
    over the settings a checkpoint records; the others come from each checkpoint (or the defaults)."""
    unset = object()
    seen = vars(p.parse_args(list(argv), namespace=argparse.Namespace(**{f: unset for f in checkpoints.MODEL_FLAGS})))
    return {flag: seen[flag] for flag in checkpoints.MODEL_FLAGS if seen[flag] is not unset}


def parse_arguments(argv: Optional[Sequence[str]] = None):
    argv = sys.argv[1:] if argv is None else list(argv)

    def finish(p, values: dict) -> None:
        _finish_arguments(p, values)
        values["given_model_flags"] = _given_model_flags(p, argv)

    return build_parser().parse(argv, finish=finish)


# ---------------------------------------------------------------------------------------------------
# Keys and the results cache
# ---------------------------------------------------------------------------------------------------


def file_fingerprint(path: str) -> dict:
    """SHA-256 of a checkpoint's contents (and its size): another checkpoint gets another key, the same
    one copied, moved or touched keeps its key."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            h.update(block)
    return {"sha256": h.hexdigest(), "size": os.path.getsize(path)}


def images_fingerprint(split_folder: str) -> dict:
    """The image list of a data set split: a SHA-256 over every .jpg's path relative to `split_folder`,
    size and modification time (what BaseDataset reads: the pictures and, in their names, the UTM
    coordinates), and the number of images per sub-folder (database, queries) for the log."""
    h = hashlib.sha256()
    counts: Dict[str, int] = {}
    for path in datasets_ws.collect_jpgs(split_folder):
        relative = os.path.relpath(path, split_folder)
        st = os.stat(path)
        h.update(f"{relative}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        top = relative.split(os.sep)[0] if os.sep in relative else "."
        counts[top] = counts.get(top, 0) + 1
    return {"sha256": h.hexdigest(), "counts": counts}


def content_fingerprint(path: str) -> str:
    """SHA-256 of a small file's contents (the MSLS key list)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def model_settings(args) -> dict:
    """Every flag that can change an evaluation's numbers (timings included: device, precision)."""
    return {
        "backbone": args.backbone,
        "backbone_depth": args.backbone_depth,
        "registers": bool(args.registers),
        "resize": [int(v) for v in args.resize],
        "test_method": args.test_method,
        "majority_weight": float(args.majority_weight),
        "val_positive_dist_threshold": int(args.val_positive_dist_threshold),
        # R@1/5/10 are always computed: they are the paper's columns.
        "recall_values": sorted(set(int(v) for v in args.recall_values) | set(TABLE_RECALLS)),
        "precision": args.precision,
        "device": args.device,
    }


def result_key(
    *, entry: PaperEntry, images: dict, checkpoint: dict, keys_file: Optional[str], rerank_num: int, settings: dict
) -> Tuple[str, dict]:
    """(short hash, the dict it hashes) identifying one evaluation: images (images_fingerprint),
    checkpoint (file_fingerprint), the MSLS key file, rerank_num and the settings. The folder's path is
    not part of it: the same images elsewhere give the same numbers."""
    key = {
        "dataset": entry.name,
        "split": entry.split,
        "images": images,
        "checkpoint": checkpoint,
        "query_keys_sha256": keys_file and content_fingerprint(keys_file),
        "rerank_num": int(rerank_num),
        "settings": settings,
    }
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20], key


def rerun_reason(key: dict, earlier: Sequence[dict]) -> str:
    """Why the evaluation `key` is not in the cache, from the keys of the earlier evaluations of the same
    data set, split and rerank_num (`earlier`, newest last): what differs from the newest one."""
    if not earlier:
        return "not evaluated before"
    old = earlier[-1]
    reasons = []
    if old.get("images") != key["images"]:
        before, now = (old.get("images") or {}).get("counts"), key["images"]["counts"]
        if before is None:
            reasons.append("the earlier result was stored without its image list (an older results file)")
        elif before != now:
            changed = ", ".join(
                f"{name}: {before.get(name, 0)} -> {now.get(name, 0)} images"
                for name in sorted(set(before) | set(now))
                if before.get(name) != now.get(name)
            )
            reasons.append(f"the images changed ({changed})")
        else:
            reasons.append("the images changed (same numbers; names, sizes or modification times differ)")
    if old.get("checkpoint") != key["checkpoint"]:
        reasons.append("the checkpoint changed (other contents)")
    if old.get("query_keys_sha256") != key["query_keys_sha256"]:
        reasons.append("the MSLS query key file changed")
    old_settings = old.get("settings") or {}
    changed = [
        f"{name} {old_settings.get(name)!r} -> {value!r}"
        for name, value in key["settings"].items()
        if old_settings.get(name) != value
    ]
    if changed:
        reasons.append("settings changed: " + ", ".join(changed))
    return "; ".join(reasons) or "the results file's key format changed"


class ResultCache:
    """Finished evaluations, {key: record}, in one JSON file rewritten atomically after each one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.results: Dict[str, dict] = {}
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                if data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
                    raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}")
                self.results = dict(data["results"])
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(
                    f"{path} is not a results file of this reproduce.py ({e}): delete it (its "
                    "evaluations will be redone) or choose another --output"
                ) from None

    def get(self, key: str) -> Optional[dict]:
        return self.results.get(key)

    def earlier_keys(self, *, dataset: str, split: str, rerank_num: int) -> List[dict]:
        """The key dicts of the stored evaluations of this data set, split and rerank_num, oldest first."""
        records = [
            r
            for r in self.results.values()
            if isinstance(r.get("key"), dict)
            and (r["key"].get("dataset"), r["key"].get("split"), r["key"].get("rerank_num"))
            == (dataset, split, rerank_num)
        ]
        return [r["key"] for r in sorted(records, key=lambda r: str(r.get("evaluated_at", "")))]

    def put(self, key: str, record: dict) -> None:
        self.results[key] = record
        text = json.dumps(
            {"format": CACHE_FORMAT, "version": CACHE_VERSION, "results": self.results}, indent=1, sort_keys=True
        )
        atomic_files.atomic_write_text(self.path, text + "\n")


# ---------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------


def peak_rss_bytes() -> Optional[int]:
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# ---------------------------------------------------------------------------------------------------
# One evaluation
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataProtocol:
    """How a data set's queries and positives compare with the paper's: `note` says what was evaluated
    (the Protocol cell; "" when there is nothing to add), `deviation` how it differs from the paper's
    ("" when it is the paper's). Different data give numbers that are not comparable with the paper's:
    the table then shows no difference (delta) to them."""

    note: str = ""
    deviation: str = ""
    own_radius: bool = False  # the positives' radius is the data set's own (Nordland's frames), in `note`

    @property
    def comparable(self) -> bool:
        return not self.deviation


def msls_protocol(query_keys: Optional[datasets_ws.QueryKeys], *, queries_num: int) -> DataProtocol:
    """MSLS-val: the paper's protocol is every key of the built-in list found (datasets_ws.QueryKeys)."""
    paper = f"the paper: the {MSLS_OFFICIAL_QUERIES} queries of {MSLS_KEYS}"
    if query_keys is None:
        return DataProtocol(deviation=f"all {queries_num} val queries (--msls_all_queries); {paper}")
    if query_keys.official:
        return DataProtocol(note=f"official MSLS-val: all {query_keys.keys_num} keys of {MSLS_KEYS} found")
    if query_keys.builtin == MSLS_KEYS:
        return DataProtocol(
            deviation=f"PARTIAL MSLS-val: only {query_keys.found_num} of the {query_keys.keys_num} keys of "
            f"{MSLS_KEYS} have a query image here"
        )
    return DataProtocol(
        deviation=f"{query_keys.kept_num} queries listed in {os.path.basename(query_keys.source)} "
        f"({query_keys.found_num} of its {query_keys.keys_num} keys found); {paper}"
    )


def frame_spacing(utms: np.ndarray) -> Optional[float]:
    """Metres between consecutive frames when the images stand one per frame along a straight line, as
    the Nordland formatters name them (frame i at UTM north i * d, east 0; d = 25 / 10.5 m in the VG
    benchmark downloader, which rounds to 0.1 m), else None. d is the median step between the sorted
    positions; every step must be d (up to the 0.1 m rounding), bar a few gaps of whole frames."""
    if len(utms) < 3 or np.ptp(utms[:, 0]) > 0.5:
        return None
    steps = np.diff(np.sort(utms[:, 1]))
    d = float(np.median(steps))
    if d <= 0.5:
        return None
    whole = np.abs(steps / d - np.round(steps / d)) * d <= 0.11
    return d if whole.mean() >= 0.99 and np.mean(np.round(steps / d) == 1) >= 0.9 else None


def nordland_protocol(counts: dict, utms: Optional[np.ndarray], *, threshold: float) -> Tuple[DataProtocol, float]:
    """(protocol, positives radius in metres) of a Nordland folder, told by its (database, queries) counts.

    The paper's Nordland-test: positives within +-2 frames, i.e. a radius of 2.5 frame steps (frame_spacing
    of the database's positions `utms`, which the caller reads only for that variant), half a step clear
    of both the 2nd and the 3rd neighbour; `threshold` (--val_positive_dist_threshold) when not the
    default 25 m (the user's choice wins, and the row is non-paper). The downloader's: 25 m as its
    formatter intends (about +-10 frames). Another variant: 25 m, named as unrecognised."""
    found = (counts.get("database", 0), counts.get("queries", 0))
    shown = f"{found[0]} + {found[1]} images"
    if found == NORDLAND_PAPER_COUNTS:
        spacing = frame_spacing(utms) if utms is not None else None
        if threshold != 25:
            return DataProtocol(
                deviation=f"Nordland-test ({shown}) with positives within {threshold:g} m; {NORDLAND_PAPER}"
            ), threshold
        if spacing is None:
            return DataProtocol(
                deviation=f"Nordland-test ({shown}), but the file names do not place one image per frame along "
                "a line (UTM north = frame x step, east 0), so positives within +-2 frames cannot be derived: "
                f"positives within 25 m; {NORDLAND_PAPER}"
            ), threshold
        radius = round((NORDLAND_PAPER_FRAMES + 0.5) * spacing, 3)
        return DataProtocol(
            note=f"Nordland-test, {shown}, positives within +-{NORDLAND_PAPER_FRAMES} frames "
            f"({radius:g} m at {spacing:.2f} m per frame)",
            own_radius=True,
        ), radius
    if found == NORDLAND_DOWNLOADER_COUNTS:
        return DataProtocol(
            deviation=f"the benchmark downloader's Nordland ({shown}, positives within {threshold:g} m, about "
            f"+-10 frames); {NORDLAND_PAPER}"
        ), threshold
    return DataProtocol(
        deviation=f"an unrecognised Nordland variant ({shown}, positives within {threshold:g} m); {NORDLAND_PAPER}"
    ), threshold


def protocol_text(*, rerank_num: int, settings: dict, data: DataProtocol = DataProtocol()) -> str:
    """ "paper protocol" or "non-paper protocol (what differs)", with the data set's own protocol (`data`:
    MSLS-val's queries, Nordland's variant and positives) spelled out."""
    notes = [data.note] if data.note else []
    deviations = [data.deviation] if data.deviation else []
    if rerank_num != PAPER_RERANK_NUM:
        deviations.append(f"rerank_num {rerank_num} (paper: {PAPER_RERANK_NUM})")
    if settings["test_method"] != "hard_resize":
        deviations.append(f"test_method {settings['test_method']} (paper: hard_resize)")
    if list(settings["resize"]) != [224, 224]:
        deviations.append(f"resize {settings['resize'][0]}x{settings['resize'][1]} (paper: 224x224)")
    if settings["backbone"] != "vit_large" or settings["backbone_depth"] not in (None, 24) or settings["registers"]:
        deviations.append(
            f"model {settings['backbone']}"
            + (f" depth {settings['backbone_depth']}" if settings["backbone_depth"] else "")
            + (" with registers" if settings["registers"] else "")
            + " (paper: vit_large)"
        )
    if settings["precision"] != "fp32":
        deviations.append(f"{settings['precision']} extraction (paper: fp32)")
    if settings["val_positive_dist_threshold"] != 25 and not data.own_radius:
        deviations.append(f"positives within {settings['val_positive_dist_threshold']} m (paper: 25 m)")
    if deviations:
        return "non-paper protocol (" + "; ".join(notes + deviations) + ")"
    return "paper protocol" + (f" ({'; '.join(notes)})" if notes else "")


def evaluate_dataset(
    model: torch.nn.Module,
    dataset: datasets_ws.BaseDataset,
    *,
    rerank_num: int,
    settings: dict,
    batch_size: int,
    num_workers: int,
    store_folder: Optional[str],
) -> dict:
    """Run test.evaluate on `dataset` and return a JSON-able record: recalls (first stage and re-ranked,
    at settings["recall_values"]), counts, per-stage timings (the retrieval engine's) and peak memory.
    store_folder: None keeps the dense features in RAM, a folder on disk (--efficient_ram_testing)."""
    device = settings["device"]
    on_gpu = str(device).startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = test.evaluate(
        model,
        dataset,
        test_method=settings["test_method"],
        rerank_num=rerank_num,
        recall_values=settings["recall_values"],
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        store_folder=store_folder,
        majority_weight=settings["majority_weight"],
        precision=settings["precision"],
    )
    total_s = time.perf_counter() - start
    q_num, db_num = dataset.queries_num, dataset.database_num
    times = result.times
    return {
        "queries_num": q_num,
        "database_num": db_num,
        "recall_values": list(settings["recall_values"]),
        "recalls": [round(float(r), 4) for r in result.recalls],
        "recalls_first": [round(float(r), 4) for r in result.recalls_first],
        "timing": {
            "total_s": total_s,
            "database_extraction_s": times.database_extraction_s,
            "query_extraction_s": times.query_extraction_s,
            "search_s": times.search_s,
            "rerank_s": times.rerank_s,
            "database_extraction_s_per_image": times.database_extraction_s / max(db_num, 1),
            "query_extraction_s_per_query": times.query_extraction_s / max(q_num, 1),
            "rerank_s_per_query": times.rerank_s / max(q_num, 1),
        },
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": int(torch.cuda.max_memory_allocated()) if on_gpu else None,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "evaluated_at": datetime.now().isoformat(timespec="seconds"),
    }


def checkpoint_settings(args, path: str, *, flag: str) -> Tuple[dict, Optional[str]]:
    """(model_settings(args) for the checkpoint `path`, a note for the log or None): the model flags given
    on the command line, else those the file records (a checkpoint written by train.py), else the
    defaults, as eval.py resolves them (checkpoints.resolve_model_settings). Only the file's small
    entries are read (memory-mapped where torch can)."""
    checkpoint = checkpoints.load_weights_file(path, what=flag, mmap=True, check=False)
    saved = checkpoints.saved_model_settings(checkpoint, path=path, what=flag)
    del checkpoint
    defaults = {name: build_parser().get_default(name) for name in checkpoints.MODEL_FLAGS}
    resolved, note = checkpoints.resolve_model_settings(
        args.given_model_flags, saved, defaults, source=f"{flag} {path}"
    )
    settings = dict(model_settings(args))
    settings.update(
        backbone=resolved["backbone"],
        backbone_depth=resolved["backbone_depth"],
        registers=bool(resolved["registers"]),
        resize=[int(v) for v in resolved["resize"]],
    )
    return settings, note


def load_checkpoint_model(path: str, *, flag: str, settings: dict) -> network.GeoLocalizationNet:
    """A GeoLocalizationNet of settings' size with all weights from the SelaVPR checkpoint `path`."""
    return network.load_model(
        backbone=settings["backbone"],
        registers=settings["registers"],
        backbone_depth=settings["backbone_depth"],
        checkpoint=path,
        checkpoint_flag=flag,
        device=settings["device"],
    ).eval()


def database_utms(split_folder: str) -> Optional[np.ndarray]:
    """The UTM positions of a split's database images from their file names, or None when a name has none."""
    try:
        paths = datasets_ws.collect_jpgs(os.path.join(split_folder, "database"))
        return np.array([datasets_ws.read_utm(p) for p in paths], dtype=np.float64).reshape(-1, 2)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------

TABLE_HEADER = (
    "Data set",
    "Checkpoint",
    "Protocol",
    "Queries",
    "Ours R@1/5/10",
    "Paper R@1/5/10",
    "Δ R@1/5/10",
    "Global only R@1/5/10",
    "Query extraction (ms/query)",
    "Re-rank (ms/query)",
    "Total (s)",
    "Peak RAM (GiB)",
    "Peak GPU (GiB)",
    "Status",
)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table_recalls(record: dict, field: str) -> Optional[List[float]]:
    values = record.get(field)
    if values is None:
        return None
    by_n = dict(zip(record["recall_values"], values))
    return [by_n[n] for n in TABLE_RECALLS]


def _triple(values, signed: bool = False) -> str:
    if values is None:
        return "–"
    return " / ".join(f"{v:+.1f}" if signed else f"{v:.1f}" for v in values)


def _ms(seconds) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.1f}"


def _gib(n) -> str:
    return "–" if n is None else f"{n / 2**30:.2f}"


def format_row(row: dict) -> str:
    """One Markdown table row from a row dict (see main): numbers only for evaluated/reused rows."""
    entry = row["entry"]
    record = row.get("record") or {}
    ours = _table_recalls(record, "recalls")
    # Differences of the printed (1-decimal) values, so that the row adds up; + 0.0 turns -0.0 into 0.0.
    # No difference to the paper's numbers when the data are not the paper's (another Nordland, other
    # MSLS-val queries): those numbers measure something else.
    comparable = row.get("comparable", record.get("comparable", True))
    delta = (
        None
        if ours is None or not comparable
        else [round(round(o, 1) - p, 1) + 0.0 for o, p in zip(ours, entry.recalls)]
    )
    timing = record.get("timing", {})
    if row["status"] == "reused":
        status = f"reused (evaluated {record.get('evaluated_at', '?')})"
    elif row["status"] in ("skipped", "failed"):
        status = f"{row['status']}: {row['reason']}"
    else:
        status = row["status"]
    cells = [
        entry.title,
        row.get("checkpoint_name") or "–",
        row.get("protocol") or "–",
        record.get("queries_num", "–"),
        _triple(ours),
        _triple(entry.recalls),
        _triple(delta, signed=True),
        _triple(_table_recalls(record, "recalls_first")),
        _ms(timing.get("query_extraction_s_per_query")),
        _ms(timing.get("rerank_s_per_query")),
        "–" if "total_s" not in timing else f"{timing['total_s']:.1f}",
        _gib(record.get("peak_rss_bytes")),
        _gib(record.get("peak_gpu_bytes")),
        status,
    ]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def format_table(rows: Sequence[dict], *, generated_at: str = "") -> str:
    """The whole results.md: title, table, legend."""
    lines = [
        "# SelaVPR: our results next to the paper's",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += [format_row(r) for r in rows]
    devices = sorted({r["record"]["device"] for r in rows if r.get("record")})
    lines += [
        "",
        "Paper: the published R@1/5/10 (seed README, rerank_num 100). Δ = ours − paper, shown only when the "
        "data are the paper's (a row on other data, e.g. another Nordland or other MSLS-val queries, says "
        "so in its protocol and has no Δ). Global only = "
        "first-stage (faiss) recalls before re-ranking. Query extraction = time to extract one query's "
        "features (database images cost about the same each); re-rank = mutual-NN scoring of one "
        "query's candidates; total = the whole evaluation, database extraction included. Peak RAM = the "
        "process's peak resident memory so far (ru_maxrss), peak GPU = torch.cuda.max_memory_allocated "
        "during that data set. Reused rows come from results.json, measured when they were evaluated.",
    ]
    if devices:
        lines.append(f"Device: {', '.join(devices)}.")
    if generated_at:
        lines.append(f"Written by reproduce.py at {generated_at}.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def _new_log_folder(output: str) -> str:
    base = os.path.join(output, "logs", datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    folder, n = base, 1
    while os.path.exists(folder):  # two runs within a second
        folder, n = f"{base}_{n}", n + 1
    return folder


class _Models:
    """The model of one checkpoint at a time (loaded when first needed: a fully reused run loads none)."""

    def __init__(self) -> None:
        self.name, self.model = None, None

    def get(self, name: str, path: str, settings: dict) -> torch.nn.Module:
        if self.name != name:
            self.model = None  # free the other checkpoint's model first
            if str(settings["device"]).startswith("cuda"):
                torch.cuda.empty_cache()
            self.model = load_checkpoint_model(path, flag=CHECKPOINT_FLAGS[name], settings=settings)
            self.name = name
        return self.model


def main(args) -> None:
    precision = numerics.set_precision(args.precision, device=args.device)  # before any folder: may refuse
    moved_by = "Give --output a folder you can write to."
    commons.make_output_folder(args.output, moved_by=moved_by, exist_ok=True)
    log_folder = _new_log_folder(args.output)
    commons.setup_logging(log_folder, moved_by=moved_by)
    commons.make_deterministic(args.seed)
    commons.log_run_header(args)
    precision.log()
    removed = atomic_files.remove_stale_temp_files(args.output, (CACHE_NAME, TABLE_NAME))
    if removed:
        logging.info(f"Removed {len(removed)} temporary file(s) that a killed earlier run left in {args.output}")
    commons.report_dead_stores(log_folder)  # --efficient_ram_testing stores of killed runs in <output>/logs/
    cache = ResultCache(os.path.join(args.output, CACHE_NAME))
    table_path = os.path.join(args.output, TABLE_NAME)
    checkpoint_paths = {"msls": args.msls_checkpoint, "pitts30k": args.pitts30k_checkpoint}
    msls_keys = None if args.msls_all_queries else (args.msls_val_keys or MSLS_KEYS)

    rows = [
        {
            "entry": e,
            "rerank_num": r,
            "status": "pending",
            "reason": "",
            "record": None,
            "checkpoint_name": checkpoint_paths[e.model] and os.path.basename(checkpoint_paths[e.model]),
        }
        for e in PAPER_ENTRIES
        for r in args.rerank_num
    ]

    def write_table():
        atomic_files.atomic_write_text(
            table_path, format_table(rows, generated_at=datetime.now().isoformat(timespec="seconds"))
        )

    models = _Models()
    bad_checkpoints: Dict[str, str] = {}
    fingerprints: Dict[str, dict] = {}
    settings_of: Dict[str, dict] = {}
    for row in rows:
        entry, rerank_num = row["entry"], row["rerank_num"]
        label = f"{entry.title} (rerank_num {rerank_num})"
        # An absolute FOLDER of --dataset_folders replaces --datasets_folder (os.path.join semantics).
        folder = os.path.normpath(os.path.join(args.datasets_folder, args.dataset_folders.get(entry.name, entry.name)))
        split_folder = os.path.join(folder, "images", entry.split)
        ckpt_flag, ckpt_path = CHECKPOINT_FLAGS[entry.model], checkpoint_paths[entry.model]
        keys = msls_keys if entry.name == "msls" else None
        reasons = []
        if args.only is not None and entry.name not in args.only:
            reasons.append("not selected by --only")
        else:
            if not os.path.isdir(split_folder):
                reasons.append(f"data set not found ({split_folder} does not exist)")
            if ckpt_path is None:
                reasons.append(f"no {ckpt_flag} given")
            elif not os.path.isfile(ckpt_path):
                reasons.append(f"checkpoint not found ({ckpt_flag} {ckpt_path})")
        if reasons:
            row.update(status="skipped", reason="; ".join(reasons))
            logging.info(f"Skipping {label}: {row['reason']}")
            write_table()
            continue
        if entry.model in bad_checkpoints:
            row.update(status="failed", reason=bad_checkpoints[entry.model])
            write_table()
            continue

        if ckpt_path not in fingerprints:  # a checkpoint is read once per run, however many rows use it
            fingerprints[ckpt_path] = file_fingerprint(ckpt_path)
            try:
                settings_of[ckpt_path], note = checkpoint_settings(args, ckpt_path, flag=ckpt_flag)
            except (ValueError, OSError) as e:
                bad_checkpoints[entry.model] = str(e)
                row.update(status="failed", reason=str(e))
                logging.error(f"Cannot load {ckpt_flag} {ckpt_path}: {e}")
                write_table()
                continue
            if note:
                logging.info(note)
        settings = settings_of[ckpt_path]
        images = images_fingerprint(split_folder)
        data = DataProtocol()
        if entry.name == "nordland":
            # The paper's variant has its own positives (+-2 frames): a radius from the frame step.
            paper_counts = (images["counts"].get("database"), images["counts"].get("queries"))
            utms = database_utms(split_folder) if paper_counts == NORDLAND_PAPER_COUNTS else None
            data, radius = nordland_protocol(images["counts"], utms, threshold=settings["val_positive_dist_threshold"])
            settings = dict(settings, val_positive_dist_threshold=radius)
        key, key_dict = result_key(
            entry=entry,
            images=images,
            checkpoint=fingerprints[ckpt_path],
            keys_file=keys and datasets_ws.query_keys_path(keys),
            rerank_num=rerank_num,
            settings=settings,
        )
        cached = cache.get(key)
        if cached is not None and entry.name in ("msls", "nordland") and "comparable" not in cached:
            # Stored before the query list and the Nordland variant were checked: its label may be wrong.
            logging.info(f"Evaluating {label} again: its stored result predates the check of its protocol")
            cached = None
        if cached is not None:
            row.update(
                status="reused",
                record=cached,
                protocol=cached.get("protocol"),
                comparable=cached.get("comparable", True),
            )
            logging.info(
                f"Reusing the result of {label} evaluated at {cached.get('evaluated_at')} "
                f"({CACHE_NAME} key {key}): {test.recalls_to_str(cached['recalls'], cached['recall_values'])}"
            )
            write_table()
            continue

        try:
            model = models.get(entry.model, ckpt_path, settings)
        except (ValueError, OSError) as e:
            bad_checkpoints[entry.model] = str(e)
            row.update(status="failed", reason=str(e))
            logging.error(f"Cannot load {ckpt_flag} {ckpt_path}: {e}")
            write_table()
            continue
        try:
            dataset = datasets_ws.BaseDataset(
                os.path.dirname(folder),
                os.path.basename(folder),
                entry.split,
                resize=settings["resize"],
                test_method=settings["test_method"],
                positive_dist_threshold=settings["val_positive_dist_threshold"],
                query_keys_file=keys,
            )
            if entry.name == "msls":
                data = msls_protocol(dataset.query_keys, queries_num=dataset.queries_num)
            commons.check_free_space(
                test.planned_writes(
                    dataset,
                    output_folder=log_folder,
                    efficient_ram_testing=args.efficient_ram_testing,
                    dense_shape=parser.expected_dense_size(settings["resize"]),
                    rerank_num=rerank_num,
                    predictions=False,
                ),
                moved_by="give --output a folder on a disk with room.",
            )
            protocol = protocol_text(rerank_num=rerank_num, settings=settings, data=data)
            why = rerun_reason(
                key_dict, cache.earlier_keys(dataset=entry.name, split=entry.split, rerank_num=rerank_num)
            )
            logging.info(f"Evaluating {label} with {ckpt_flag} {ckpt_path}: {dataset}; {protocol}; why: {why}")
            record = evaluate_dataset(
                model,
                dataset,
                rerank_num=rerank_num,
                settings=settings,
                batch_size=args.infer_batch_size,
                num_workers=args.num_workers,
                store_folder=os.path.join(log_folder, "dense_features") if args.efficient_ram_testing else None,
            )
        except (ValueError, OSError) as e:  # bad images, key file of another data set, full disk ...
            reason = str(e)
            if entry.name == "msls" and keys is not None and "has a key listed" in reason:
                reason += " (--msls_all_queries evaluates every query of the folder instead)"
            row.update(status="failed", reason=reason)
            logging.error(f"Evaluation of {label} failed: {reason}")
            write_table()
            continue
        record.update(
            protocol=protocol,
            comparable=data.comparable,
            dataset=entry.name,
            rerank_num=rerank_num,
            key=key_dict,
            folder=os.path.abspath(folder),
            checkpoint_path=os.path.abspath(ckpt_path),
        )
        cache.put(key, record)
        row.update(status="evaluated", record=record, protocol=protocol, comparable=data.comparable)
        timing = record["timing"]
        logging.info(
            f"Recalls on {dataset}: {test.recalls_to_str(record['recalls'], record['recall_values'])} "
            f"(first stage: {test.recalls_to_str(record['recalls_first'], record['recall_values'])}); "
            f"{timing['total_s']:.1f} s in all"
        )
        write_table()

    write_table()
    with open(table_path, encoding="utf-8") as f:
        logging.info(f"Results table {table_path}:\n{f.read()}")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise commons.UserError(
            f"{len(failed)} evaluation(s) failed ("
            + ", ".join(r["entry"].title for r in failed)
            + f"): see {table_path} and the log"
        )


if __name__ == "__main__":
    commons.run_main(
        main,
        parse_arguments(),
        disk_full_note="Every finished row is kept in results.json: run reproduce.py again to continue with the "
        "others.",
    )
