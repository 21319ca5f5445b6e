"""Reproduce the paper's result tables with one command.

    python3 reproduce.py --datasets_folder DIR --msls_checkpoint SelaVPR_msls.pth \
        --pitts30k_checkpoint SelaVPR_pitts30k.pth [--msls_val_keys FILE] [--rerank_num 100|20|both] \
        [--output results] [--dataset_folders NAME=FOLDER ...] [--only NAME ...] <model/runtime flags>

Every data set of the paper found under --datasets_folder is evaluated with the checkpoint the paper
used for it (the MSLS model: msls val, nordland test, st_lucia test; the Pitts30k model: tokyo247,
pitts30k and pitts250k test), through the same test.evaluate as eval.py. The result is
<output>/results.md: one Markdown row per (data set, rerank_num) with our R@1/5/10 next to the
published ones, the protocol, timings and peak memory. Data sets or checkpoints that are missing get
a "skipped" row saying what is missing.

Resumable: each finished evaluation is stored in <output>/results.json under a key made of what
determines it: the data set split's image list (every image's relative name, size and modification
time), the MSLS key file's contents, the checkpoint's SHA-256 and every flag that changes results. A
later run with the same key reuses it instead of evaluating again, so an interrupted run continues
with the next data set; a row evaluated again is logged with the reason (e.g. the images changed).
Each run logs to <output>/logs/<date>/.
"""

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import atomic_files
import commons
import datasets_ws
import network
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
# (--msls_val_keys), and its own --rerank_num.
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
    own.add_argument(
        "--msls_val_keys",
        type=parser.path,
        default=None,
        help="official MSLS-val protocol: file of the 740 query keys (else all ~11k val queries "
        "are evaluated and the row is marked non-paper)",
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
        p.error(f"--msls_val_keys {values['msls_val_keys']}: no such file; give the official MSLS-val query key list")


def parse_arguments(argv: Optional[Sequence[str]] = None):
    return build_parser().parse(argv, finish=_finish_arguments)


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


def protocol_text(
    *, entry: PaperEntry, rerank_num: int, settings: dict, queries_num: Optional[int], keys_file: Optional[str]
) -> str:
    """ "paper protocol" or "non-paper protocol (what differs)", with the MSLS query protocol spelled out."""
    notes, deviations = [], []
    if entry.name == "msls":
        if keys_file:
            notes.append(f"official MSLS-val: {queries_num} queries listed in {os.path.basename(keys_file)}")
            if queries_num is not None and queries_num != MSLS_OFFICIAL_QUERIES:
                deviations.append(f"{queries_num} queries kept, the official list has {MSLS_OFFICIAL_QUERIES}")
        else:
            deviations.append(
                f"all {queries_num} val queries; the paper uses the official "
                f"{MSLS_OFFICIAL_QUERIES}: give --msls_val_keys"
            )
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
    if settings["val_positive_dist_threshold"] != 25:
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
    delta = None if ours is None else [round(round(o, 1) - p, 1) + 0.0 for o, p in zip(ours, entry.recalls)]
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
        "Paper: the published R@1/5/10 (seed README, rerank_num 100). Δ = ours − paper. Global only = "
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

    def __init__(self, settings: dict) -> None:
        self.settings = settings
        self.name, self.model = None, None

    def get(self, name: str, path: str) -> torch.nn.Module:
        if self.name != name:
            self.model = None  # free the other checkpoint's model first
            if str(self.settings["device"]).startswith("cuda"):
                torch.cuda.empty_cache()
            self.model = load_checkpoint_model(path, flag=CHECKPOINT_FLAGS[name], settings=self.settings)
            self.name = name
        return self.model


def main(args) -> None:
    os.makedirs(args.output, exist_ok=True)
    log_folder = _new_log_folder(args.output)
    commons.setup_logging(log_folder)
    commons.make_deterministic(args.seed)
    commons.log_run_header(args)
    commons.report_dead_stores(log_folder)  # --efficient_ram_testing stores of killed runs in <output>/logs/
    cache = ResultCache(os.path.join(args.output, CACHE_NAME))
    table_path = os.path.join(args.output, TABLE_NAME)
    settings = model_settings(args)
    checkpoints = {"msls": args.msls_checkpoint, "pitts30k": args.pitts30k_checkpoint}

    rows = [
        {
            "entry": e,
            "rerank_num": r,
            "status": "pending",
            "reason": "",
            "record": None,
            "checkpoint_name": checkpoints[e.model] and os.path.basename(checkpoints[e.model]),
        }
        for e in PAPER_ENTRIES
        for r in args.rerank_num
    ]

    def write_table():
        atomic_files.atomic_write_text(
            table_path, format_table(rows, generated_at=datetime.now().isoformat(timespec="seconds"))
        )

    models = _Models(settings)
    bad_checkpoints: Dict[str, str] = {}
    fingerprints: Dict[str, dict] = {}
    for row in rows:
        entry, rerank_num = row["entry"], row["rerank_num"]
        label = f"{entry.title} (rerank_num {rerank_num})"
        # An absolute FOLDER of --dataset_folders replaces --datasets_folder (os.path.join semantics).
        folder = os.path.normpath(os.path.join(args.datasets_folder, args.dataset_folders.get(entry.name, entry.name)))
        split_folder = os.path.join(folder, "images", entry.split)
        ckpt_flag, ckpt_path = CHECKPOINT_FLAGS[entry.model], checkpoints[entry.model]
        keys_file = args.msls_val_keys if entry.name == "msls" else None
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

        if ckpt_path not in fingerprints:  # a checkpoint is read once per run, however many rows use it
            fingerprints[ckpt_path] = file_fingerprint(ckpt_path)
        key, key_dict = result_key(
            entry=entry,
            images=images_fingerprint(split_folder),
            checkpoint=fingerprints[ckpt_path],
            keys_file=keys_file,
            rerank_num=rerank_num,
            settings=settings,
        )
        cached = cache.get(key)
        if cached is not None:
            row.update(status="reused", record=cached, protocol=cached.get("protocol"))
            logging.info(
                f"Reusing the result of {label} evaluated at {cached.get('evaluated_at')} "
                f"({CACHE_NAME} key {key}): {test.recalls_to_str(cached['recalls'], cached['recall_values'])}"
            )
            write_table()
            continue

        if entry.model in bad_checkpoints:
            row.update(status="failed", reason=bad_checkpoints[entry.model])
            write_table()
            continue
        try:
            model = models.get(entry.model, ckpt_path)
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
                query_keys_file=keys_file,
            )
            protocol = protocol_text(
                entry=entry,
                rerank_num=rerank_num,
                settings=settings,
                queries_num=dataset.queries_num,
                keys_file=keys_file,
            )
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
            row.update(status="failed", reason=str(e))
            logging.error(f"Evaluation of {label} failed: {e}")
            write_table()
            continue
        record.update(
            protocol=protocol,
            dataset=entry.name,
            rerank_num=rerank_num,
            key=key_dict,
            folder=os.path.abspath(folder),
            checkpoint_path=os.path.abspath(ckpt_path),
        )
        cache.put(key, record)
        row.update(status="evaluated", record=record, protocol=protocol)
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
    commons.run_main(main, parse_arguments())
