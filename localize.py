"""Localise your own photos: for every image of a queries folder, rank the images of a database folder.

No data set layout and no UTM coordinates are needed: any .jpg / .jpeg / .png below the two folders
(recursive). The pipeline is the evaluation's (SPEC 5), with the same functions as test.py:

    database images -hard_resize-> model -> global descriptors (N, D) + dense features (DenseStore)
    query images -test_method-> model -> global descriptors (Q, D) -> faiss exact L2 top-k
                                        -> dense features -> mutual-NN re-ranking (local_matching)

The database's descriptors can be saved once (--save_database DIR) and reused by later query batches
(--load_database DIR), which then skip the database extraction. A saved database carries a manifest
(image list, shapes, model settings, a fingerprint of the weights) and is refused when it does not
match the current model and flags.

Outputs (in --output_folder, default localize/<save_dir>/<time>/): predictions.jsonl (one line per
query: its first-stage candidates with L2 distances, the re-ranked list with mutual-NN scores and
L2 distances), picture rows in preds/ (--num_preds_to_save), info.log and debug.log. When every file
name of both folders carries UTM coordinates (``@east@north@...``), the recalls are logged too.
"""
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

import commons
import datasets_ws
import image_files
import network
import parser
import predictions_io
import test
import visualizations

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: The database is always preprocessed as in the evaluation (SPEC 5).
DATABASE_METHOD = "hard_resize"
#: Query preprocessing accepted here: the methods that give one descriptor per query. The five-crop
#: methods need test.evaluate's crop merging, which is only reachable through a BaseDataset.
QUERY_METHODS = ("hard_resize", "single_query", "central_crop")

DATABASE_FORMAT = "selavpr-database"
DATABASE_VERSION = 1
MANIFEST_FILE = "manifest.json"
GLOBAL_FILE = "global_descriptors.npy"
DENSE_FOLDER = "dense"
#: Manifest entries that must be equal for a saved database to be used with the current model.
CHECKED_SETTINGS = ("backbone", "registers", "depth", "embed_dim", "resize", "precision", "database_method",
                    "weights_sha256")


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------

def collect_images(folder: str, *, flag: str = "--database_folder", protect: Sequence[str] = ()) -> List[str]:
    """Every .jpg / .jpeg / .png (any letter case) below `folder`, recursive, ordered by sorted() on the
    full paths as datasets_ws.collect_jpgs; hidden files and folders are skipped, links to folders are
    followed unless they would read a real folder twice, loop, or reach into `folder` or a `protect`
    folder (image_files.list_images). What was skipped, and why, is logged with the counts. `flag`
    names the folder's flag in the error messages."""
    if not os.path.isdir(folder):
        broken = image_files.broken_link_hint(folder)
        raise FileNotFoundError(f"{flag} {broken}" if broken else
                                f"{flag} {folder}: no such folder. Give the folder that holds your images.")
    listing = image_files.list_images(folder, accept=lambda name: name.lower().endswith(IMAGE_SUFFIXES),
                                      protect=protect)
    image_files.log_listing(listing, rule=f"{flag} reads only {', '.join(IMAGE_SUFFIXES)} (any letter case)")
    if not listing.paths:
        raise ValueError(f"{flag} {folder} contains no image ({', '.join(IMAGE_SUFFIXES)}, searched recursively, "
                         "hidden files skipped): put your images there or fix the flag.")
    return listing.paths


class FolderImages(Dataset):
    """A plain list of image files, for test.extract_features (which asks `load(index, method)`).

    `dataset[i] -> (image (3, *resize), i)`; `load(i, method)` applies any test method of
    datasets_ws.apply_test_method after the ImageNet normalisation.
    """

    def __init__(self, paths: Sequence[str], *, resize: Sequence[int]) -> None:
        self.images_paths = list(paths)
        self.resize = (int(resize[0]), int(resize[1]))
        self.min_side = datasets_ws.draft_min_side(self.resize)  # for photos above Pillow's pixel limit

    def load(self, index: int, method: str) -> torch.Tensor:
        image = datasets_ws.base_transform(datasets_ws.open_image(self.images_paths[index], min_side=self.min_side))
        return datasets_ws.apply_test_method(image, method, self.resize)

    def __getitem__(self, index: int):
        return self.load(index, DATABASE_METHOD), index

    def __len__(self) -> int:
        return len(self.images_paths)


def utm_positives(database_paths: Sequence[str], queries_paths: Sequence[str],
                  radius: float) -> Optional[List[np.ndarray]]:
    """Per query the database indexes within `radius` metres, from the UTMs in the file names, or None
    when a name of either list does not carry them (then there is no ground truth)."""
    try:
        db_utms = np.array([datasets_ws.read_utm(p) for p in database_paths], dtype=np.float64).reshape(-1, 2)
        q_utms = np.array([datasets_ws.read_utm(p) for p in queries_paths], dtype=np.float64).reshape(-1, 2)
    except ValueError:
        return None
    return datasets_ws.radius_positives(db_utms, q_utms, radius)


# ------------------------------------------------------------------------------------------------
# The database: extraction, saving, loading
# ------------------------------------------------------------------------------------------------

def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict (every key, dtype, shape and the raw bytes, in key order).

    Equal fingerprints mean bit-identical weights, whatever file they came from or device they are on.
    """
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype (bf16 included)
    return h.hexdigest()


def model_settings(model: network.GeoLocalizationNet, *, backbone: str, registers: bool,
                   resize: Sequence[int], precision: str) -> Dict:
    """What the database's descriptors depend on (all in CHECKED_SETTINGS): compared on loading."""
    return {"backbone": backbone, "registers": bool(registers), "depth": len(model.backbone.blocks),
            "embed_dim": int(model.backbone.embed_dim), "resize": [int(resize[0]), int(resize[1])],
            "precision": precision, "database_method": DATABASE_METHOD,
            "weights_sha256": weights_fingerprint(model)}


def settings_mismatches(saved: Dict, current: Dict) -> List[str]:
    """Human-readable differences between a saved manifest's settings and the current ones ([] if none)."""
    out = []
    for key in CHECKED_SETTINGS:
        if saved.get(key) != current.get(key):
            if key == "weights_sha256":
                out.append("the model weights differ (fingerprint "
                           f"{str(saved.get(key))[:12]}… saved, {str(current.get(key))[:12]}… now)")
            else:
                out.append(f"{key}: {saved.get(key)!r} saved, {current.get(key)!r} now")
    return out


@dataclass
class Database:
    """Database images with their features.

    paths: N image paths; global_descriptors: (N, D) float32; dense: DenseStore, dense[i] -> (h', w', 128).
    """
    root: str
    paths: List[str]
    global_descriptors: np.ndarray
    dense: test.DenseStore
    settings: Dict

    def close(self) -> None:
        self.dense.close()


def build_database(model: torch.nn.Module, database_folder: str, *, settings: Dict, resize: Sequence[int],
                   batch_size: int, num_workers: int, device: str, precision: str = "fp32",
                   store_folder: Optional[str] = None, paths: Optional[Sequence[str]] = None) -> Database:
    """Extract the features of every image below `database_folder` (hard_resize, test.extract_features).

    paths: the images, when already collected (collect_images(database_folder) otherwise).
    store_folder: keep the dense features in a memory-mapped file there (None: in RAM).
    """
    root = os.path.abspath(database_folder)
    paths = list(paths) if paths is not None else collect_images(root, flag="--database_folder")
    store = test.DenseStore(store_folder)
    try:
        descriptors = test.extract_features(model, FolderImages(paths, resize=resize), range(len(paths)),
                                            method=DATABASE_METHOD, batch_size=batch_size, num_workers=num_workers,
                                            device=device, local_store=store, precision=precision,
                                            desc="Database features")
        store.finish()
    except BaseException:
        store.close()
        raise
    return Database(root=root, paths=paths, global_descriptors=descriptors, dense=store, settings=dict(settings))


def save_database(database: Database, folder: str, *, extra: Optional[Dict] = None) -> None:
    """Write `database` to `folder` (which must not exist): GLOBAL_FILE, DENSE_FOLDER/ (DenseStore.save)
    and MANIFEST_FILE, the manifest last.

    Everything is written into a hidden temp folder beside `folder`, which is renamed to `folder` only
    when complete: an interrupted save leaves no folder that load_database would trust (a temp folder
    without its final name, which load_database is never pointed at by this script, is removed on errors).
    `extra` entries (e.g. the weight files' paths) are stored in the manifest for information only.
    """
    folder = os.path.abspath(folder)
    if os.path.exists(folder):
        raise FileExistsError(f"--save_database {folder} already exists: choose a new folder, or reuse that "
                              "database with --load_database.")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(folder) + ".tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, GLOBAL_FILE), "wb") as f:
            np.save(f, np.ascontiguousarray(database.global_descriptors, dtype=np.float32))
        database.dense.save(os.path.join(tmp, DENSE_FOLDER))
        files = {name: os.path.getsize(os.path.join(tmp, name))
                 for name in (GLOBAL_FILE, os.path.join(DENSE_FOLDER, test.DenseStore.FEATURES_FILE),
                              os.path.join(DENSE_FOLDER, test.DenseStore.SHAPES_FILE))}
        manifest = {
            "format": DATABASE_FORMAT, "version": DATABASE_VERSION,
            "created": datetime.now().isoformat(timespec="seconds"),
            "database_folder": database.root,
            "images": [os.path.relpath(p, database.root) for p in database.paths],
            "image_sizes": [os.path.getsize(p) for p in database.paths],
            "global_shape": list(database.global_descriptors.shape),
            "dense_shape_first": list(database.dense.shapes[0]) if len(database.dense) else None,
            "files": files,
            "settings": database.settings,
            "info": dict(extra or {}),
        }
        with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a saved database is an ordinary folder
        os.rename(tmp, folder)  # atomic; fails if someone created `folder` meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_manifest(folder: str) -> Dict:
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--load_database {folder}: no such folder. Give a folder written by "
                                "--save_database.")
    if not os.path.isfile(path):
        raise ValueError(f"--load_database {folder} has no {MANIFEST_FILE}: it was not written by "
                         "localize.py --save_database (or its save did not finish). Save the database again.")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--load_database {path} cannot be read ({e}): save the database again.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != DATABASE_FORMAT:
        raise ValueError(f"--load_database {path} is not a SelaVPR database manifest: save the database again.")
    if manifest.get("version") != DATABASE_VERSION:
        raise ValueError(f"--load_database {folder} has format version {manifest.get('version')}, this code "
                         f"reads version {DATABASE_VERSION}: save the database again with this version.")
    return manifest


def load_database(folder: str, *, settings: Dict, database_folder: Optional[str] = None) -> Database:
    """Open a database written by save_database, after checking it against the current `settings`
    (model_settings) and, when `database_folder` is given, against the images found there.

    The images are looked up under `database_folder` when given (the folder may have moved), else under
    the folder recorded at saving. Raises ValueError with the differences on any mismatch.
    """
    folder = os.path.abspath(folder)
    manifest = _read_manifest(folder)
    problems = settings_mismatches(manifest.get("settings", {}), settings)
    if problems:
        raise ValueError(f"--load_database {folder} was extracted with another model or other flags: "
                         f"{'; '.join(problems)}. Its descriptors cannot be compared with this model's: run with "
                         "the weights and --backbone / --registers / --backbone_depth / --resize / --precision it "
                         "was saved with, or extract a new one with --save_database.")
    for name, size in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            raise ValueError(f"--load_database {folder}: {name} is missing or has changed size since it was "
                             "saved: the database is damaged. Save it again.")
    relative = manifest["images"]
    if database_folder is not None:
        root = os.path.abspath(database_folder)
        found = collect_images(root, flag="--database_folder")
        found_rel = [os.path.relpath(p, root) for p in found]
        if found_rel != relative or [os.path.getsize(p) for p in found] != manifest["image_sizes"]:
            diff = next((f"{a!r} vs {b!r}" for a, b in zip(found_rel, relative) if a != b), None)
            detail = diff or f"{len(found_rel)} images now, {len(relative)} saved, or a file changed size"
            raise ValueError(f"--database_folder {root} does not hold the images that --load_database {folder} "
                             f"was extracted from (first difference: {detail}): the folder changed since. Save "
                             "the database again, or drop --database_folder to use the saved list.")
    else:
        root = manifest["database_folder"]
    paths = [os.path.join(root, p) for p in relative]
    descriptors = np.load(os.path.join(folder, GLOBAL_FILE), mmap_mode="r", allow_pickle=False)
    dense = test.DenseStore.load(os.path.join(folder, DENSE_FOLDER))
    if descriptors.shape != (len(paths), settings["embed_dim"]) or len(dense) != len(paths):
        dense.close()
        raise ValueError(f"--load_database {folder}: {len(paths)} images but descriptors {descriptors.shape} and "
                         f"{len(dense)} dense maps: the database is damaged. Save it again.")
    return Database(root=root, paths=paths, global_descriptors=np.asarray(descriptors, dtype=np.float32),
                    dense=dense, settings=manifest["settings"])


# ------------------------------------------------------------------------------------------------
# Queries: search and re-ranking
# ------------------------------------------------------------------------------------------------

@dataclass
class Localization:
    """Every query's ranked database candidates. All (Q, k): first_predictions (faiss order, database
    indexes), first_distances (squared L2, as faiss returns), predictions (re-ranked), scores (mutual-NN
    counts of `predictions`, in that order)."""
    first_predictions: np.ndarray
    first_distances: np.ndarray
    predictions: np.ndarray
    scores: np.ndarray


def localize_queries(model: torch.nn.Module, database: Database, queries_paths: Sequence[str], *,
                     resize: Sequence[int], test_method: str = "hard_resize", rerank_num: int = 100,
                     batch_size: int = 16, num_workers: int = 0, device: str = "cpu", precision: str = "fp32",
                     store_folder: Optional[str] = None, rerank_chunk_size: int = 16) -> Localization:
    """Rank `database` for every query: exact L2 search of the global descriptors for min(rerank_num, N)
    candidates (test.l2_search), then mutual-NN re-ranking of their dense features.

    store_folder: keep the queries' dense features in a memory-mapped file there (None: in RAM).
    """
    if test_method not in QUERY_METHODS:
        raise ValueError(f"--test_method {test_method} is not available in localize.py: use one of "
                         f"{', '.join(QUERY_METHODS)} (the five-crop methods run in eval.py only).")
    db_num = len(database.paths)
    k = rerank_num
    if rerank_num > db_num:
        logging.warning(f"--rerank_num {rerank_num} is larger than the database ({db_num} images): "
                        "searching and re-ranking the whole database")
        k = db_num
    q_store = test.DenseStore(store_folder)
    try:
        q_global = test.extract_features(model, FolderImages(queries_paths, resize=resize),
                                         range(len(queries_paths)), method=test_method, batch_size=batch_size,
                                         num_workers=num_workers, device=device, local_store=q_store,
                                         precision=precision, desc="Query features")
        q_store.finish()
        distances, candidates = test.l2_search(database.global_descriptors, q_global, k)
        predictions, scores = test.rerank_predictions(candidates, q_store, database.dense, device=device,
                                                      chunk_size=rerank_chunk_size)
    finally:
        q_store.close()
    return Localization(first_predictions=candidates, first_distances=distances, predictions=predictions,
                        scores=scores)


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------

def localization_records(*, queries_paths: Sequence[str], database_paths: Sequence[str], result: Localization,
                         positives: Optional[Sequence[np.ndarray]] = None) -> List[Dict]:
    """predictions_io.prediction_records' format, one dict per query; each re-ranked entry also carries
    its first-stage `l2_distance`. Without ground truth (positives None) the `positives` and `correct`
    entries are left out rather than filled with guesses."""
    known = positives is not None
    truth = positives if known else [np.empty(0, dtype=np.int64)] * len(queries_paths)
    view = test.EvalResult(recalls_first=np.empty(0), recalls=np.empty(0),
                           first_predictions=result.first_predictions, first_distances=result.first_distances,
                           predictions=result.predictions, scores=result.scores, positives=list(truth))
    records = predictions_io.prediction_records(queries_paths=queries_paths, database_paths=database_paths,
                                                result=view)
    for record in records:
        distance = {c["index"]: c["l2_distance"] for c in record["first_stage"]}
        for c in record["reranked"]:
            c["l2_distance"] = distance[c["index"]]
        if not known:
            del record["positives"]
            for c in record["first_stage"] + record["reranked"]:
                del c["correct"]
    return records


def save_pictures(folder: str, records: List[Dict], *, num_preds: int, only_wrong: bool = False) -> int:
    """Picture rows (query, then its top `num_preds` re-ranked matches with their scores); returns how many.

    With ground truth: predictions_io's rows, framed green/red. Without: no frames (nothing is known to
    be right or wrong), files named <query index>.jpg.
    """
    if records and "positives" in records[0]:
        return predictions_io.save_prediction_pictures(folder, records, num_preds=num_preds, only_wrong=only_wrong)
    if only_wrong:
        raise ValueError("--save_only_wrong_preds needs ground truth: the file names of both folders must carry "
                         "UTM coordinates (@east@north@...).")
    for r in records:
        top = r["reranked"][:num_preds]
        # border=0 draws no frame, so the correct/wrong flags (unknown here) do not show.
        row = visualizations.prediction_row(r["query"], [t["path"] for t in top], [False] * len(top),
                                            scores=[t["mutual_nn"] for t in top], border=0, spacing=6)
        visualizations.save_image_atomic(row, os.path.join(folder, f"{r['query_index']:06d}.jpg"))
    return len(records)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def build_localize_parser():
    p = parser.build_parser("SelaVPR: localise the images of a queries folder against a database folder")
    g = p.add_argument_group("localize.py")
    g.add_argument("--database_folder", type=str, default=None,
                   help="folder of database images (.jpg/.jpeg/.png, recursive); optional with --load_database")
    g.add_argument("--queries_folder", type=str, required=True, help="folder of query images (recursive)")
    g.add_argument("--output_folder", type=str, default=None,
                   help="where to write predictions and logs (default localize/<save_dir>/<time>/); must not exist")
    io = g.add_mutually_exclusive_group()
    io.add_argument("--save_database", type=str, default=None, metavar="DIR",
                    help="also save the database's descriptors into DIR (a new folder) for later runs")
    io.add_argument("--load_database", type=str, default=None, metavar="DIR",
                    help="reuse the database saved in DIR by --save_database (no database extraction)")
    return p


def parse_localize_arguments(argv: Optional[List[str]] = None):
    p = build_localize_parser()
    args = parser.parse_arguments(argv, p, needs_data=False)
    if args.database_folder is None and args.load_database is None:
        p.error("give --database_folder (images to search) or --load_database (a saved database)")
    if args.test_method not in QUERY_METHODS:
        p.error(f"--test_method {args.test_method} is not available in localize.py: use one of "
                f"{', '.join(QUERY_METHODS)} (the five-crop methods run in eval.py only)")
    if args.pca_dim is not None:
        p.error("--pca_dim is not supported by localize.py (a saved database holds the raw descriptors)")
    if args.output_folder and os.path.exists(args.output_folder):
        p.error(f"--output_folder {args.output_folder} already exists: choose a new folder (the outputs of two runs "
                "are never mixed)")
    if args.save_database and os.path.exists(args.save_database):
        p.error(f"--save_database {args.save_database} already exists: choose a new folder, or reuse that "
                "database with --load_database")
    return args


def main(args) -> None:
    start_time = datetime.now()
    output_folder = args.output_folder or os.path.join("localize", args.save_dir,
                                                       start_time.strftime("%Y-%m-%d_%H-%M-%S"))
    commons.setup_logging(output_folder)
    commons.make_deterministic(args.seed)
    commons.log_run_header(args)
    logging.info(f"The outputs are being saved in {output_folder}")

    # Folders first: a typo should not wait for the model.
    # A folder link in one folder must not pull in the other folder's images.
    queries_paths = collect_images(os.path.abspath(args.queries_folder), flag="--queries_folder",
                                   protect=[os.path.abspath(args.database_folder)] if args.database_folder else [])
    database_paths = None if args.load_database else collect_images(os.path.abspath(args.database_folder),
                                                                     protect=[os.path.abspath(args.queries_folder)])
    model = network.build_model(args)
    settings = model_settings(model, backbone=args.backbone, registers=args.registers, resize=args.resize,
                              precision=args.precision)
    common = dict(batch_size=args.infer_batch_size, num_workers=args.num_workers, device=args.device,
                  precision=args.precision)
    store_folder = os.path.join(output_folder, "dense_features") if args.efficient_ram_testing else None

    if args.load_database:
        database = load_database(args.load_database, settings=settings, database_folder=args.database_folder)
        logging.info(f"Loaded the database saved in {args.load_database} ({len(database.paths)} images of "
                     f"{database.root}): no database extraction")
    else:
        database = build_database(model, args.database_folder, settings=settings, resize=args.resize,
                                  store_folder=store_folder, paths=database_paths, **common)
    try:
        if args.save_database:
            info = {flag: getattr(args, flag) for flag in ("foundation_model_path", "resume", "load_weights")}
            save_database(database, args.save_database, extra=info)
            logging.info(f"Saved the database in {args.save_database}: reuse it with --load_database")
        logging.info(f"< Localize - #database: {len(database.paths)}; #queries: {len(queries_paths)} >")
        result = localize_queries(model, database, queries_paths, resize=args.resize, test_method=args.test_method,
                                  rerank_num=args.rerank_num, store_folder=store_folder, **common)
    finally:
        database.close()

    positives = utm_positives(database.paths, queries_paths, args.val_positive_dist_threshold)
    if positives is None:
        logging.info("The file names do not all carry UTM coordinates: no recalls (no ground truth)")
    else:
        k = result.predictions.shape[1]
        if max(args.recall_values) > k:
            logging.warning(f"--recall_values above {k} (the number of re-ranked candidates) are capped at R@{k}")
        first = test.compute_recalls(result.first_predictions, positives, args.recall_values)
        reranked = test.compute_recalls(result.predictions, positives, args.recall_values)
        logging.info(f"Positives: database images within --val_positive_dist_threshold "
                     f"{args.val_positive_dist_threshold} m (UTM from the file names)")
        logging.info(f"First ranking recalls: {test.recalls_to_str(first, args.recall_values)}")
        logging.info(f"Recalls after re-ranking: {test.recalls_to_str(reranked, args.recall_values)}")

    records = localization_records(queries_paths=queries_paths, database_paths=database.paths, result=result,
                                   positives=positives)
    predictions_path = os.path.join(output_folder, "predictions.jsonl")
    predictions_io.write_predictions(predictions_path, records)
    logging.info(f"Wrote every query's ranked matches to {predictions_path}")
    if args.num_preds_to_save:
        preds_folder = os.path.join(output_folder, "preds")
        n = save_pictures(preds_folder, records, num_preds=args.num_preds_to_save,
                          only_wrong=args.save_only_wrong_preds)
        logging.info(f"Saved {n} prediction pictures in {preds_folder}")
    if store_folder is not None and os.path.isdir(store_folder) and not os.listdir(store_folder):
        os.rmdir(store_folder)
    logging.info(f"Finished in {str(datetime.now() - start_time)[:-7]}")


if __name__ == "__main__":
    commons.run_main(main, parse_localize_arguments())
