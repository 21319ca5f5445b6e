"""Localise your own photos: for every image of a queries folder, rank the images of a database folder.

No data set layout and no UTM coordinates are needed: any .jpg / .jpeg / .png below the two folders
(recursive). The pipeline is the evaluation's (global search, then re-ranking): the same retrieval engine
(retrieval.Retrieval) as eval.py:

    database images -hard_resize-> model -> global descriptors (N, D) + dense features (DenseStore)
    query images -test_method-> model -> global descriptors (Q, D) -> faiss exact L2 top-k (any test method)
                                        -> dense features -> mutual-NN re-ranking (local_matching)

The database's descriptors can be saved once (--save_database DIR) and reused by later query batches
(--load_database DIR), which then skip the database extraction. A saved database carries a manifest
(image list, shapes, model settings, a fingerprint of the weights) and is refused when it does not
match the current model and flags.

Outputs (in --output_folder, default localize/<save_dir>/<time>/): predictions.jsonl (one line per
query: its first-stage candidates with L2 distances, the re-ranked list with mutual-NN scores and
L2 distances; the five-crop test methods merge five candidate lists, which have no single distance
per candidate), picture rows in preds/ (--num_preds_to_save), info.log and debug.log. When every file
name of both folders carries UTM coordinates (``@east@north@...``), the recalls are logged too.
"""

import logging
import os
from datetime import datetime
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

import commons
import datasets_ws
import dense_store
import image_files
import network
import parser
import predictions_io
import retrieval
import test
import visualizations

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def not_a_folder(path: str) -> str:
    """Why `path` is no image folder, and what to do: a file (e.g. one photo) is not "no such folder"."""
    if os.path.isfile(path):
        return (
            "this is a file, not a folder: give the folder that holds your images (to localise one photo "
            "alone, put it in a folder of its own and give that folder)"
        )
    return "no such folder; give the folder that holds your images"


def collect_images(folder: str, *, flag: str = "--database_folder", protect: Sequence[str] = ()) -> List[str]:
    """Every .jpg / .jpeg / .png (any letter case) below `folder`, recursive, ordered by sorted() on the
    full paths as datasets_ws.collect_jpgs; hidden files and folders are skipped, links to folders are
    followed unless they would read a real folder twice, loop, or reach into `folder` or a `protect`
    folder (image_files.list_images). What was skipped, and why, is logged with the counts. `flag`
    names the folder's flag in the error messages."""
    if not os.path.isdir(folder):
        broken = image_files.broken_link_hint(folder)
        raise FileNotFoundError(f"{flag} {broken}" if broken else f"{flag} {folder}: {not_a_folder(folder)}")
    listing = image_files.list_images(
        folder, accept=lambda name: name.lower().endswith(IMAGE_SUFFIXES), protect=protect
    )
    image_files.log_listing(listing, rule=f"{flag} reads only {', '.join(IMAGE_SUFFIXES)} (any letter case)")
    if not listing.paths:
        raise ValueError(
            f"{flag} {folder} contains no image ({', '.join(IMAGE_SUFFIXES)}, searched recursively, "
            "hidden files skipped): put your images there or fix the flag."
        )
    return listing.paths


def find_images(folder: str, *, flag: str = "--database_folder", protect: Sequence[str] = ()) -> List[str]:
    """collect_images(folder, protect=...), less the images inside output folders of earlier runs of these
    scripts (commons.is_run_folder: e.g. a localize.py run's preds/*.jpg written under an image folder),
    which must never become queries or database images. The skipped ones are logged."""
    paths = collect_images(folder, flag=flag, protect=protect)
    root = os.path.abspath(folder)
    verdicts: Dict[str, bool] = {}

    def in_run_folder(path: str) -> bool:
        # The folders strictly between `root` and the file: `root` itself is what the user chose.
        parent = os.path.dirname(os.path.abspath(path))
        if parent == root or not parent.startswith(root + os.sep):
            return False
        if parent not in verdicts:
            verdicts[parent] = commons.is_run_folder(parent) or in_run_folder(parent)
        return verdicts[parent]

    kept = [p for p in paths if not in_run_folder(p)]
    skipped = len(paths) - len(kept)
    if skipped:
        folders = sorted(
            {os.path.relpath(d, root) for d, v in verdicts.items() if v and not verdicts.get(os.path.dirname(d), False)}
        )
        logging.info(
            f"{flag} {folder}: skipped {skipped} images inside output folders of earlier runs "
            f"({', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''})"
        )
    if not kept:
        raise ValueError(
            f"{flag} {folder} contains no image outside the output folders of earlier runs: put "
            "your images there or fix the flag."
        )
    return kept


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (symbolic links resolved)."""
    return image_files.is_inside(os.path.realpath(path), os.path.realpath(folder))


def warn_about_overlaps(*, queries_folder: str, database_folder: Optional[str], output_folder: str) -> None:
    """Warn about folder layouts that give surprising results (each is allowed, none is silent)."""
    inputs = [("--queries_folder", queries_folder)]
    if database_folder is not None:
        inputs.append(("--database_folder", database_folder))
    for flag, folder in inputs:
        if _inside(output_folder, folder):
            logging.warning(
                f"the output folder {output_folder} is inside {flag} {folder}: later runs skip it "
                "(a folder with info.log and debug.log is a run's output folder), but keep outputs "
                "apart from your images"
            )
    if database_folder is None:
        return
    if _inside(queries_folder, database_folder):
        logging.warning(
            f"--queries_folder {queries_folder} is inside --database_folder {database_folder}: every "
            "query is also a database image, and will be its own best match"
        )
    elif _inside(database_folder, queries_folder):
        logging.warning(
            f"--database_folder {database_folder} is inside --queries_folder {queries_folder}: every "
            "database image is also a query, and will be its own best match"
        )


class FolderImages(Dataset):
    """A plain list of image files, for retrieval.extract_features (which asks `load(index, method)`).

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
        return self.load(index, retrieval.DATABASE_METHOD), index

    def __len__(self) -> int:
        return len(self.images_paths)


def utm_positives(
    database_paths: Sequence[str], queries_paths: Sequence[str], radius: float
) -> Optional[List[np.ndarray]]:
    """Per query the database indexes within `radius` metres, from the UTMs in the file names, or None
    when a name of either list does not carry them (then there is no ground truth)."""
    try:
        db_utms = np.array([datasets_ws.read_utm(p) for p in database_paths], dtype=np.float64).reshape(-1, 2)
        q_utms = np.array([datasets_ws.read_utm(p) for p in queries_paths], dtype=np.float64).reshape(-1, 2)
    except ValueError:
        return None
    positives = datasets_ws.radius_positives(db_utms, q_utms, radius)
    warning = datasets_ws.missing_positives_warning(
        db_utms, q_utms, positives, threshold=radius, where="--queries_folder (UTM from the file names)"
    )
    if warning:
        logging.warning(warning)
    return positives


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------


def save_pictures(folder: str, records: Sequence[Dict], *, num_preds: int, only_wrong: bool = False) -> int:
    """Picture rows (query, then its top `num_preds` re-ranked matches with their scores); returns how many.

    With ground truth: predictions_io's rows, framed green/red. Without: no frames (nothing is known to
    be right or wrong), files named <query index>.jpg.
    """
    if records and "positives" in records[0]:
        return predictions_io.save_prediction_pictures(folder, records, num_preds=num_preds, only_wrong=only_wrong)
    if only_wrong:
        raise ValueError(
            "--save_only_wrong_preds needs ground truth: the file names of both folders must carry "
            "UTM coordinates (@east@north@...)."
        )
    for r in records:
        top = r["reranked"][:num_preds]
        # border=0 draws no frame, so the correct/wrong flags (unknown here) do not show.
        row = visualizations.prediction_row(
            r["query"],
            [t["path"] for t in top],
            [False] * len(top),
            scores=[t["mutual_nn"] for t in top],
            border=0,
            spacing=6,
        )
        visualizations.save_image_atomic(row, os.path.join(folder, f"{r['query_index']:06d}.jpg"))
    return len(records)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

# No training, data set or PCA flags: the database is a folder of images (a saved database holds the raw
# descriptors, so no --pca_dim either).
LOCALIZE_GROUPS = (
    parser.WEIGHTS,
    parser.MODEL,
    parser.RUNTIME,
    parser.EXTRACTION,
    parser.EVALUATION,
    parser.RERANK,
    parser.OUTPUTS,
)


def build_localize_parser():
    p = parser.CommandParser(
        "SelaVPR: localise the images of a queries folder against a database folder", LOCALIZE_GROUPS
    )
    g = p.add_argument_group("localize.py")
    g.add_argument(
        "--database_folder",
        type=parser.path,
        default=None,
        help="folder of database images (.jpg/.jpeg/.png, recursive); optional with --load_database",
    )
    g.add_argument("--queries_folder", type=parser.path, required=True, help="folder of query images (recursive)")
    g.add_argument(
        "--output_folder",
        type=parser.path,
        default=None,
        help="where to write predictions and logs (default localize/<save_dir>/<time>/); must not exist",
    )
    io = g.add_mutually_exclusive_group()
    io.add_argument(
        "--save_database",
        type=parser.path,
        default=None,
        metavar="DIR",
        help="also save the database's descriptors into DIR (a new folder) for later runs",
    )
    io.add_argument(
        "--load_database",
        type=parser.path,
        default=None,
        metavar="DIR",
        help="reuse the database saved in DIR by --save_database (no database extraction)",
    )
    return p


def parse_localize_arguments(argv: Optional[List[str]] = None):
    p = build_localize_parser()
    args = p.parse(argv)
    if args.database_folder is None and args.load_database is None:
        p.error("give --database_folder (images to search) or --load_database (a saved database)")
    # Inputs and outputs are checked here, before any folder is created or any model is built.
    for flag, folder in (("--queries_folder", args.queries_folder), ("--database_folder", args.database_folder)):
        if folder is not None and not os.path.isdir(folder):
            p.error(f"{flag} {folder}: {not_a_folder(folder)}")
    if args.load_database and not os.path.isdir(args.load_database):
        p.error(f"--load_database {args.load_database}: no such folder; give a folder written by --save_database")
    if args.output_folder and os.path.exists(args.output_folder):
        p.error(
            f"--output_folder {args.output_folder} already exists: choose a new folder (the outputs of two runs "
            "are never mixed)"
        )
    if args.save_database and os.path.exists(args.save_database):
        p.error(
            f"--save_database {args.save_database} already exists: choose a new folder, or reuse that "
            "database with --load_database"
        )
    for flag, target in (
        ("--output_folder", args.output_folder or "localize"),
        ("--save_database", args.save_database),
    ):
        problem = target and creation_problem(target)
        if problem:
            p.error(f"{flag} {target}: {problem}")
    if args.output_folder and args.save_database:
        output, saved = os.path.abspath(args.output_folder), os.path.abspath(args.save_database)
        if output == saved or output.startswith(saved + os.sep):
            p.error(
                f"--output_folder {args.output_folder} is (inside) --save_database {args.save_database}, which "
                "must be a new folder of its own: choose another output folder"
            )
    return args


def creation_problem(path: str) -> Optional[str]:
    """Why the folder `path` (or a file there) could not be created, or None: the nearest existing
    folder on its way must be a writable folder."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.abspath(path) != parent and not os.path.isdir(parent):
        return f"{parent} is a file, not a folder: choose another path"
    if os.path.isdir(parent) and os.path.abspath(path) != parent and not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: no permission to write in {parent}; choose a folder you can write to"
    return None


def planned_writes(
    args, *, output_folder: str, queries_num: int, database_paths: Sequence[str], embed_dim: int
) -> List[commons.PlannedWrite]:
    """What this run writes: the dense store of the extracted images in output_folder with
    --efficient_ram_testing (the queries, and the database unless --load_database), a --save_database
    folder (the database's global descriptors, and its dense features unless they can be hard-linked
    from the store on the same file system) and predictions.jsonl."""
    shape = args.dense_feature_map_size
    db_num = len(database_paths)
    writes = []
    if args.efficient_ram_testing:
        images = queries_num + (0 if args.load_database else db_num)
        writes.append(
            commons.PlannedWrite(
                output_folder,
                dense_store.estimated_bytes(images, shape),
                f"dense features of {images} images (--efficient_ram_testing)",
            )
        )
    if args.save_database:
        linked = args.efficient_ram_testing and same_file_system(output_folder, args.save_database)
        nbytes = db_num * embed_dim * 4 + (0 if linked else dense_store.estimated_bytes(db_num, shape))
        writes.append(commons.PlannedWrite(args.save_database, nbytes, f"--save_database of {db_num} images"))
    k = min(args.rerank_num, db_num)
    path_bytes = sum(len(os.path.abspath(p)) for p in database_paths) / max(db_num, 1)
    nbytes = int(queries_num * (2 * k + 1) * (path_bytes + test.PREDICTION_ENTRY_BYTES))
    writes.append(commons.PlannedWrite(output_folder, nbytes, f"predictions.jsonl of {queries_num} queries"))
    return writes


def same_file_system(a: str, b: str) -> bool:
    """Whether two paths (existing or not yet) lie on one file system (their nearest existing folders)."""

    def device(path: str) -> int:
        path = os.path.abspath(path)
        while not os.path.exists(path):
            path = os.path.dirname(path)
        return os.stat(path).st_dev

    return device(a) == device(b)


def names_carry_utm(paths: Sequence[str]) -> bool:
    """Whether every file name carries UTM coordinates (``@east@north@...``)."""
    try:
        for path in paths:
            datasets_ws.read_utm(path)
    except ValueError:
        return False
    return True


def main(args) -> None:
    start_time = datetime.now()
    output_folder = args.output_folder or os.path.join(
        "localize", args.save_dir, start_time.strftime("%Y-%m-%d_%H-%M-%S")
    )
    # The common start of every command (one process: run_main refuses torchrun for this command). A
    # GPU that cannot run --precision is refused before the output folder exists.
    ctx = commons.start_run(
        args,
        output_folder,
        note=args.model_settings_note,
        moved_by="Give --output_folder a folder you can write to.",
    )
    try:
        # Everything a typo can break is checked before the slow work; a run refused here removes the
        # output folder it has just created, so that the corrected command may use the same one.
        saved_root = None
        if args.load_database:
            manifest = retrieval.read_manifest(os.path.abspath(args.load_database))
            saved_root = args.database_folder or manifest["database_folder"]
        warn_about_overlaps(
            queries_folder=args.queries_folder,
            database_folder=args.database_folder or saved_root,
            output_folder=output_folder,
        )
        # A folder link in one folder must not pull in the other folder's images.
        queries_paths = find_images(
            os.path.abspath(args.queries_folder),
            flag="--queries_folder",
            protect=[os.path.abspath(args.database_folder)] if args.database_folder else [],
        )
        database_paths = (
            None
            if args.load_database
            else find_images(os.path.abspath(args.database_folder), protect=[os.path.abspath(args.queries_folder)])
        )
        if args.save_only_wrong_preds:
            database_names = database_paths if database_paths is not None else manifest["images"]
            if not (names_carry_utm(queries_paths) and names_carry_utm(database_names)):
                raise ValueError(
                    "--save_only_wrong_preds needs ground truth: the file names of both folders must "
                    "carry UTM coordinates (@east@north@...); drop the flag to save every query's "
                    "pictures."
                )
        model = network.build_model(args)
        settings = retrieval.descriptor_identity(
            model,
            backbone=args.backbone,
            registers=args.registers,
            resize=args.resize,
            precision=args.precision,
            store_dtype=args.dense_store_dtype,
        )
        commons.check_free_space(
            planned_writes(
                args,
                output_folder=output_folder,
                queries_num=len(queries_paths),
                database_paths=database_paths if database_paths is not None else manifest["images"],
                embed_dim=settings["embed_dim"],
            ),
            moved_by="choose --output_folder (and --save_database) on a disk with room.",
        )
    except (ValueError, OSError):
        commons.discard_output_folder(output_folder)
        raise
    # --efficient_ram_testing: the dense features go to the run's folder, removed at the end (also on
    # errors, Ctrl-C and SIGTERM: the engine's `with`).
    store_folder = ctx.store_folder() if args.efficient_ram_testing else None
    with retrieval.Retrieval(
        model,
        batch_size=args.infer_batch_size,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        store_folder=store_folder,
        store_dtype=args.dense_store_dtype,
    ) as engine:
        if args.load_database:
            database = engine.load_database(
                args.load_database,
                settings=settings,
                list_images=lambda root: find_images(root, flag="--database_folder"),
                database_folder=args.database_folder,
            )
        else:
            database = engine.build_database(
                FolderImages(database_paths, resize=args.resize), range(len(database_paths)), paths=database_paths
            )
        if args.save_database:
            info = {flag: getattr(args, flag) for flag in ("foundation_model_path", "resume", "load_weights")}
            database.save(args.save_database, root=os.path.abspath(args.database_folder), settings=settings, info=info)
            logging.info(f"Saved the database in {args.save_database}: reuse it with --load_database")
        logging.info(f"< Localize - #database: {len(database)}; #queries: {len(queries_paths)} >")
        queries = engine.extract_queries(
            FolderImages(queries_paths, resize=args.resize), range(len(queries_paths)), method=args.test_method
        )
        ranking = engine.rank(database, queries, rerank_num=args.rerank_num, majority_weight=args.majority_weight)

    positives = utm_positives(database.paths, queries_paths, args.val_positive_dist_threshold)
    if positives is None:
        logging.info("The file names do not all carry UTM coordinates: no recalls (no ground truth)")
    else:
        first, reranked = test.ranking_recalls(ranking, positives, args.recall_values)
        logging.info(
            f"Positives: database images within --val_positive_dist_threshold "
            f"{args.val_positive_dist_threshold} m (UTM from the file names)"
        )
        capped = test.capped_note(args.recall_values, ranking.first_predictions.shape[1])
        logging.info(f"First ranking recalls: {test.recalls_to_str(first, args.recall_values)}{capped}")
        logging.info(f"Recalls after re-ranking: {test.recalls_to_str(reranked, args.recall_values)}")

    records = predictions_io.prediction_records(
        queries_paths=queries_paths,
        database_paths=database.paths,
        ranking=ranking,
        positives=positives,
    )
    predictions_path = os.path.join(output_folder, "predictions.jsonl")
    predictions_io.write_predictions(predictions_path, records)
    logging.info(f"Wrote every query's ranked matches to {predictions_path}")
    if args.num_preds_to_save:
        preds_folder = os.path.join(output_folder, "preds")
        n = save_pictures(
            preds_folder, records, num_preds=args.num_preds_to_save, only_wrong=args.save_only_wrong_preds
        )
        logging.info(f"Saved {n} prediction pictures in {preds_folder}")
    logging.info(f"Finished in {str(datetime.now() - start_time)[:-7]}")
    commons.finish(ctx)


if __name__ == "__main__":
    commons.run_main(
        main,
        parse_localize_arguments(),
        disk_full_note="localize.py writes every file to a temp name and renames it, publishes a --save_database "
        "folder only when complete and removes its dense store, so nothing half-written is left; run it again.",
    )
