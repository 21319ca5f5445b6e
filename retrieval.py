"""The retrieval engine every command uses: extraction, a database, exact L2 search, mutual-NN re-ranking.

The data's way through:

    database images -hard_resize-> model -> global descriptors (N, D) ---------.
                                         `-> dense features -> DenseStore      |  (a Database)
    query images -test method-> model -> global descriptors (Q, D) -> faiss exact L2 top-k
                                     `-> dense features -> DenseStore -> mutual-NN re-rank -> Ranking

    with Retrieval(model, batch_size=16, num_workers=8, device="cuda") as engine:
        database = engine.build_database(dataset, range(N))      # or engine.load_database(folder)
        queries = engine.extract_queries(dataset, range(N, N + Q), method="hard_resize")
        ranking = engine.rank(database, queries, rerank_num=100)
    engine.times                                                 # seconds per stage

`store_folder` (--efficient_ram_testing) only chooses where the dense features live: None keeps them
in RAM, a folder keeps them in raw files there (read back with positional reads), removed when the
engine closes. The results are the same either way. An eval.py run also gives the engine its
`progress` (run_progress.py): every stage is recorded as it goes, so that a killed run continues.
Saving and loading a database (Database.save, Retrieval.load_database) checks, with identity.py, that
the model, the flags and the images are those it was saved with.
"""

import ctypes
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import faiss
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import atomic_files
import distributed
import identity
import leftovers
import local_matching
import numerics
import run_progress
from datasets_ws import FIVE_CROP_METHODS, ImagesSubset
from dense_store import DenseStore, remove_empty_folder

#: The preprocessing of database images, in every command (the queries' is the --test_method).
DATABASE_METHOD = "hard_resize"


# ------------------------------------------------------------------------------------------------
# Extraction: the one path from images to features
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extraction:
    """How images become features: batches of batch_size images (--infer_batch_size), loaded by
    num_workers processes, on `device`, at `precision` (--precision)."""

    batch_size: int
    num_workers: int
    device: str
    precision: str = "fp32"


def extract_features(
    model: torch.nn.Module,
    dataset,
    indexes: Sequence[int],
    *,
    method: str,
    extraction: Extraction,
    want_global: bool = True,
    local_store: Optional[DenseStore] = None,
    desc: str = "",
    on_batch: Optional[Callable[[Optional[np.ndarray], int], None]] = None,
) -> Optional[np.ndarray]:
    """The one feature-extraction path.

    Images `indexes` of `dataset` (anything with `load(index, method)`: a datasets_ws.BaseDataset, or
    localize's folder of images) preprocessed by `method`. Returns global descriptors (n, D) float32 —
    (n, 5, D) for the five-crop methods — or None when want_global is False; dense features
    (B, h', w', 128) are appended to `local_store` when given (not computed otherwise).
    on_batch(the batch's global descriptors or None, its number of images) is called after each batch
    (a run that records its progress, run_progress.StageFiles).
    """
    device, precision = extraction.device, extraction.precision
    batch_size = extraction_batch_size(method, extraction.batch_size)
    crops = method in FIVE_CROP_METHODS
    loader = DataLoader(
        ImagesSubset(dataset, indexes, method),
        batch_size=batch_size,
        shuffle=False,
        num_workers=extraction.num_workers,
        pin_memory=str(device).startswith("cuda"),
    )
    outputs = []
    # bf16 autocast where the features are computed; matmuls and convolutions run in bf16, so results
    # change slightly (measured in docs/performance.md); fp32 is the reference. (tf32: the process-wide switch.)
    model.eval()
    with torch.inference_mode(), numerics.autocast(torch.device(device).type, precision):
        for images, image_indexes in tqdm(
            loader, desc=desc or f"Extracting {method}", ncols=100, leave=False, disable=None
        ):
            if crops:  # (B, 5, 3, s, s) -> (B*5, 3, s, s)
                images = images.flatten(0, 1)
            images = images.to(device, non_blocking=True)
            if local_store is not None:
                local, glob = model(images)
                check_finite_features(local, image_indexes, dataset=dataset, what="dense local features")
                local_store.append(local.float().cpu().numpy())
            elif want_global:
                glob = model.global_descriptors(images)
            else:
                raise ValueError("extract_features called with nothing to compute")
            rows = None
            if want_global:
                check_finite_features(glob, image_indexes, dataset=dataset, what="global descriptors")
                glob = glob.float().cpu().numpy()
                rows = glob.reshape(-1, 5, glob.shape[-1]) if crops else glob
                outputs.append(rows)
            if on_batch is not None:
                on_batch(rows, len(image_indexes))
    if not want_global:
        return None
    return np.concatenate(outputs).astype(np.float32, copy=False)


def extraction_batch_size(method: str, batch_size: int) -> int:
    """The batches extract_features forms: --infer_batch_size images, one at a time for single_query
    (every query keeps its own size). Under torchrun each rank's share starts at a batch boundary
    (distributed.extract_sharded), so its batches are the one-process run's."""
    return 1 if method == "single_query" else batch_size


def check_finite_features(features: torch.Tensor, image_indexes, *, dataset, what: str) -> None:
    """A clear error naming the images when a batch's features (B*c, ...) hold NaN or Inf (c = 5 crops per
    image for the five-crop methods, else 1; image_indexes: the batch's B dataset indexes). One reduction
    on the features' device per batch; the images are looked for only after a failure.

    Without this, NaN descriptors reach faiss, which then returns no candidate (-1) for those queries, and
    NaN dense features give every candidate the same score: rankings and recalls without meaning."""
    if bool(torch.isfinite(features).all()):
        return
    indexes = [int(i) for i in image_indexes]
    rows = ~torch.isfinite(features.reshape(features.shape[0], -1)).all(dim=1).cpu()
    per_image = max(features.shape[0] // max(len(indexes), 1), 1)
    bad = sorted({indexes[row // per_image] for row in torch.nonzero(rows).flatten().tolist()})
    paths = getattr(dataset, "images_paths", None)
    names = [paths[i] if paths is not None else f"image {i}" for i in bad]
    raise ValueError(
        f"the model computed non-finite (NaN or Inf) {what} for {len(bad)} image(s): "
        f"{', '.join(names[:3])}{' …' if len(names) > 3 else ''}. The weights were checked when loaded, so "
        "they are finite but too large for these images (a diverged training run, or values beyond "
        "--precision bf16's range): use another checkpoint, or --precision fp32."
    )


# ------------------------------------------------------------------------------------------------
# First stage: exact L2 search, and the merging of crop candidate lists (pure functions)
# ------------------------------------------------------------------------------------------------


def candidates_num(rerank_num: int, database_size: int) -> int:
    """How many candidates each query gets: --rerank_num, or the whole database when it is smaller
    (said in a warning, since the user asked for more)."""
    if rerank_num > database_size:
        logging.warning(
            f"--rerank_num {rerank_num} is larger than the database ({database_size} images): "
            "searching and re-ranking the whole database"
        )
        return database_size
    return rerank_num


def l2_search(database: np.ndarray, queries: np.ndarray, k: int):
    """Exact L2 search (faiss IndexFlatL2): (distances (Q, k), predictions (Q, k)), nearest first.
    The distances are squared, as faiss returns them."""
    index = faiss.IndexFlatL2(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def merge_crop_candidates(distances: np.ndarray, predictions: np.ndarray, k: int) -> np.ndarray:
    """Merge the five crops' lists of one query, (5, k) each, by distance, keeping each database image
    once at its nearest occurrence -> (<= k,) predictions."""
    order = np.argsort(distances.ravel())
    preds = predictions.ravel()[order]
    _, first = np.unique(preds, return_index=True)
    return preds[np.sort(first)][:k]


def majority_voting(distances: np.ndarray, predictions: np.ndarray, weight: float) -> np.ndarray:
    """Lower the distances (5, k) of candidates that recur among the crops' top 1 / 5 / 10 by
    weight * count / n for each window n; returns the new distances."""
    distances = distances.copy()
    for n in (1, 5, 10):
        window_preds, window_dists = predictions[:, :n], distances[:, :n]
        values, counts = np.unique(window_preds, return_counts=True)
        for value, count in zip(values[counts > 1], counts[counts > 1]):
            window_dists[window_preds == value] -= weight * count / n
    return distances


def search(
    database: np.ndarray, queries: np.ndarray, k: int, *, method: str = "hard_resize", majority_weight: float = 0.01
) -> Tuple[Optional[np.ndarray], np.ndarray]:
    """The first stage for queries preprocessed by `method`: (squared L2 distances (Q, k) or None,
    predictions (Q, k)).

    database (N, D); queries (Q, D), or (Q, 5, D) for the five-crop methods: five_crops searches with
    the mean of the five descriptors (not re-normalised); nearest_crop merges the five lists by
    distance; maj_voting first favours candidates that recur among the crops (majority_voting). The
    merged lists have no single distance per candidate, hence None.
    """
    if method == "five_crops":
        queries = queries.mean(axis=1)
    if method not in ("nearest_crop", "maj_voting"):
        return l2_search(database, queries, k)
    q_num = len(queries)
    d, p = l2_search(database, queries.reshape(-1, queries.shape[-1]), k)
    d, p = d.reshape(q_num, 5, k), p.reshape(q_num, 5, k)
    if method == "maj_voting":
        d = np.stack([majority_voting(d[q], p[q], majority_weight) for q in range(q_num)])
    # k unique candidates exist: each crop's list alone has k.
    return None, np.stack([merge_crop_candidates(d[q], p[q], k) for q in range(q_num)])


# ------------------------------------------------------------------------------------------------
# Second stage: re-ranking by mutual nearest neighbours of the dense features
# ------------------------------------------------------------------------------------------------


def rerank_predictions(predictions: np.ndarray, query_store, database_store, *, device: str, chunk_size: int = 16):
    """Re-rank each query's candidates by their mutual-NN counts with the query (local_matching).

    predictions (Q, k) database indexes; query_store[q] / database_store[i] -> dense features (h, w, C).
    Returns (re-ranked predictions (Q, k), their float32 scores (Q, k), highest first).
    """
    reranked = np.empty_like(predictions)
    scores = np.empty(predictions.shape, dtype=np.float32)
    for q in tqdm(range(len(predictions)), desc="Re-ranking", ncols=100, leave=False, disable=None):
        query_local = torch.from_numpy(np.array(query_store[q])).to(device, non_blocking=True)
        cand_scores = local_matching.mutual_nn_scores(
            query_local, database_store, predictions[q], chunk_size=chunk_size
        )
        cand_scores = cand_scores.cpu().numpy().astype(np.float32)
        order = local_matching.rerank(cand_scores)
        reranked[q] = predictions[q][order]
        scores[q] = cand_scores[order]
    return reranked, scores


# ------------------------------------------------------------------------------------------------
# What the engine holds and returns
# ------------------------------------------------------------------------------------------------


@dataclass
class Ranking:
    """Every query's ranked database candidates. All (Q, k): first_predictions (first stage, database
    indexes), first_distances (squared L2 as faiss returns them; None for the merged crop lists),
    predictions (re-ranked), scores (mutual-NN counts of `predictions`, in that order)."""

    first_predictions: np.ndarray
    first_distances: Optional[np.ndarray]
    predictions: np.ndarray
    scores: np.ndarray


@dataclass
class StageTimes:
    """Wall-clock seconds an engine spent in each stage (accumulated over its calls)."""

    database_extraction_s: float = 0.0
    query_extraction_s: float = 0.0
    search_s: float = 0.0
    rerank_s: float = 0.0


@dataclass
class Queries:
    """Extracted queries: global_descriptors (Q, D), or (Q, 5, D) for the five-crop methods; dense[q] ->
    (h', w', 128) (the hard_resize grid for the five-crop methods); `method` the preprocessing."""

    global_descriptors: np.ndarray
    dense: DenseStore
    method: str

    def __len__(self) -> int:
        return len(self.dense)


#: A saved database: a folder with these files, the manifest written last.
DATABASE_FORMAT = "selavpr-database"
DATABASE_VERSION = 1
MANIFEST_FILE = "manifest.json"
GLOBAL_FILE = "global_descriptors.npy"
DENSE_FOLDER = "dense"


def descriptor_identity(
    model: torch.nn.Module,
    *,
    backbone: str,
    registers: bool,
    resize: Sequence[int],
    precision: str,
    store_dtype: str = "float32",
) -> Dict[str, Any]:
    """What a database's features depend on: the model (its size and the fingerprint of its weights),
    the input size, the precision, the database preprocessing and what the dense features are kept as
    (--dense_store_dtype). A saved database records it (its manifest's `settings`) and is refused on
    loading when any of it differs."""
    return {
        "backbone": backbone,
        "registers": bool(registers),
        "depth": len(model.backbone.blocks),
        "embed_dim": int(model.backbone.embed_dim),
        "resize": [int(resize[0]), int(resize[1])],
        "precision": precision,
        "database_method": DATABASE_METHOD,
        "weights_sha256": identity.weights_sha256(model),
        "dense_store_dtype": store_dtype,
    }


@dataclass
class Database:
    """Database images with their features: global_descriptors (N, D) float32; dense[i] -> (h', w', 128);
    paths: the N images' files when known (a saved database records them in its manifest)."""

    global_descriptors: np.ndarray
    dense: DenseStore
    paths: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.global_descriptors)

    def close(self) -> None:
        self.dense.close()

    def save(self, folder: str, *, root: str, settings: Dict[str, Any], info: Optional[Dict[str, Any]] = None) -> None:
        """Write the database to the new folder `folder`, for later runs (Retrieval.load_database).

        Its manifest records what loading checks: the images (identity.ImageList of `paths`, named
        relative to `root`, the folder they were found in) and `settings` (descriptor_identity of the
        model that extracted them); `info` entries (e.g. the weight files' paths) are for the reader only.
        Files: GLOBAL_FILE, DENSE_FOLDER/ (DenseStore.save) and MANIFEST_FILE (with the format, the
        files' sizes and the shapes), the manifest last.

        Everything is written into a hidden temp folder beside `folder`, which is renamed to `folder` only
        when complete: an interrupted save leaves no folder that load() would trust (the temp folder is
        removed on errors, and never has the final name).
        """
        manifest = {
            "created": datetime.now().isoformat(timespec="seconds"),
            "database_folder": root,
            **identity.ImageList.of(self.paths, root).record(),
            "settings": dict(settings),
            "info": dict(info or {}),
        }
        folder = os.path.abspath(folder)
        if os.path.exists(folder):
            raise FileExistsError(
                f"--save_database {folder} already exists: choose a new folder, or reuse that "
                "database with --load_database."
            )
        parent = os.path.dirname(folder)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(folder) + ".tmp-", dir=parent)
        leftovers.register(tmp, kind=leftovers.TREE)  # removed even by a run stopped at once
        try:
            with open(os.path.join(tmp, GLOBAL_FILE), "wb") as f:
                np.save(f, np.ascontiguousarray(self.global_descriptors, dtype=np.float32))
                f.flush()
                os.fsync(f.fileno())
            self.dense.save(os.path.join(tmp, DENSE_FOLDER))
            files = {
                name: os.path.getsize(os.path.join(tmp, name))
                for name in (
                    GLOBAL_FILE,
                    os.path.join(DENSE_FOLDER, self.dense.features_file),
                    os.path.join(DENSE_FOLDER, DenseStore.SHAPES_FILE),
                )
            }
            content = {
                "format": DATABASE_FORMAT,
                "version": DATABASE_VERSION,
                **manifest,
                "files": files,
                "global_shape": list(self.global_descriptors.shape),
                "dense_shape_first": list(self.dense.shapes[0]) if len(self.dense) else None,
                "dense_dtype": self.dense.dtype.name,
            }
            with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
                json.dump(content, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, atomic_files.new_folder_mode())  # mkdtemp makes it private; this is an ordinary folder
            atomic_files.sync_folder(tmp)  # its entries, then the rename, are on disk before it is called done
            os.rename(tmp, folder)  # atomic; fails if someone created `folder` meanwhile
            atomic_files.sync_folder(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            leftovers.forget(tmp)

    @classmethod
    def load(cls, folder: str, *, paths: Sequence[str] = ()) -> "Database":
        """The database saved in `folder` by save(), its files checked against the manifest (not its
        settings or images: Retrieval.load_database checks those); the dense features stay on disk (read
        back with positional reads); close() leaves the files alone."""
        folder = os.path.abspath(folder)
        manifest = read_manifest(folder)
        for name, size in manifest["files"].items():
            path = os.path.join(folder, name)
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                raise ValueError(
                    f"--load_database {folder}: {name} is missing or has changed size since it was "
                    "saved: the database is damaged. Save it again."
                )
        descriptors = np.load(os.path.join(folder, GLOBAL_FILE), mmap_mode="r", allow_pickle=False)
        # Databases saved before --dense_store_dtype existed are float32 (and say nothing).
        dense = DenseStore.load(os.path.join(folder, DENSE_FOLDER), dtype=manifest.get("dense_dtype", "float32"))
        if descriptors.ndim != 2 or len(dense) != len(descriptors) or (paths and len(paths) != len(dense)):
            dense.close()
            raise ValueError(
                f"--load_database {folder}: {len(paths) if paths else '?'} images but descriptors "
                f"{descriptors.shape} and {len(dense)} dense maps: the database is damaged. Save it "
                "again."
            )
        return cls(global_descriptors=np.asarray(descriptors, dtype=np.float32), dense=dense, paths=list(paths))


def read_manifest(folder: str) -> Dict[str, Any]:
    """The manifest of a database saved in `folder`, checked for format and version."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--load_database {folder}: no such folder. Give a folder written by --save_database.")
    if not os.path.isfile(path):
        raise ValueError(
            f"--load_database {folder} has no {MANIFEST_FILE}: it was not written by "
            "localize.py --save_database (or its save did not finish). Save the database again."
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--load_database {path} cannot be read ({e}): save the database again.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != DATABASE_FORMAT:
        raise ValueError(f"--load_database {path} is not a SelaVPR database manifest: save the database again.")
    if manifest.get("version") != DATABASE_VERSION:
        raise ValueError(
            f"--load_database {folder} has format version {manifest.get('version')}, this code "
            f"reads version {DATABASE_VERSION}: save the database again with this version."
        )
    return manifest


def saved_database_paths(
    folder: str,
    *,
    settings: Dict[str, Any],
    list_images: Callable[[str], List[str]],
    database_folder: Optional[str] = None,
) -> List[str]:
    """The image paths of the database saved in `folder`, after checking that it fits: its settings
    against the current `settings` (descriptor_identity), its images against those found now
    (list_images(root): the images below root, found as when the database was saved).

    The images are looked up under `database_folder` when given (the folder may have moved), else under
    the folder recorded at saving. Raises ValueError with the differences on any mismatch, also when the
    image folder changed since saving (new images would never be searched, deleted ones would still be
    returned). When the recorded folder is gone (and no `database_folder` is given), the saved list is
    used as is, with a warning: the results then name files that cannot be opened here.
    """
    folder = os.path.abspath(folder)
    manifest = read_manifest(folder)
    # Databases saved before --dense_store_dtype existed kept float32 features (and say nothing).
    saved_settings = {"dense_store_dtype": "float32", **manifest.get("settings", {})}
    problems = identity.differences(saved_settings, settings)
    if problems:
        raise ValueError(
            f"--load_database {folder} was extracted with another model or other flags: "
            f"{'; '.join(problems)}. Its descriptors cannot be compared with this model's: run with "
            "the weights and --backbone / --registers / --backbone_depth / --resize / --precision it "
            "was saved with, or extract a new one with --save_database."
        )
    root = os.path.abspath(database_folder) if database_folder is not None else manifest["database_folder"]
    if database_folder is None and not os.path.isdir(root):
        logging.warning(
            f"--load_database {folder}: its image folder {root} is gone, so it cannot be checked "
            "for changes; the results name those paths. Give --database_folder if it moved."
        )
    else:
        saved = identity.ImageList.from_record(manifest)
        now = identity.ImageList.of(list_images(root), root)
        # A moved copy (cp without -p) gets new modification times without any change.
        changes = now.changes_since(saved, check_mtimes=database_folder is None)
        if changes:
            flag = "--database_folder" if database_folder is not None else "the image folder"
            raise ValueError(
                f"{flag} {root} changed since --load_database {folder} was saved from it: "
                f"{'; '.join(changes)}. Its descriptors no longer match the images (new ones would "
                "never be searched, deleted ones would still be returned): save the database "
                "again with --save_database."
            )
    return [os.path.join(root, p) for p in manifest["images"]]


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------


class Retrieval:
    """Extraction into databases and query sets, then search -> re-rank, with stage timings.

    store_folder: None keeps dense features in RAM; a folder keeps them in raw files there (created if
    needed); store_dtype is what they are kept as (DenseStore: "float32", or "float16" in half the
    bytes). close() (or leaving the `with` block, also on errors, Ctrl-C and SIGTERM) closes every store
    the engine made or opened, removes their files, and removes `store_folder` when the engine created
    it and it is left empty.
    progress (an eval.py run, run_progress.py): each stage's features (on disk: store_folder) and the
    search and re-ranking (rank 0) are recorded as they go, and an interrupted run's records are taken
    up. Its files stay when the `with` block ends with an exception (Ctrl-C, SIGTERM, an error: the run
    can be continued); a block that ends normally removes them, as without progress.
    dist_ctx (torchrun, several processes): each rank extracts a share of the images and rank 0
    gathers them (distributed.extract_sharded), so rank 0 ends up with what one process would hold;
    only rank 0 then ranks. Every rank must make the same calls.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        batch_size: int,
        num_workers: int,
        device: str,
        precision: str = "fp32",
        store_folder: Optional[str] = None,
        rerank_chunk_size: int = 16,
        dist_ctx: Optional[distributed.Context] = None,
        progress: Optional[run_progress.RunProgress] = None,
        store_dtype: str = "float32",
    ) -> None:
        self.model = model
        self.extraction = Extraction(batch_size=batch_size, num_workers=num_workers, device=device, precision=precision)
        self.device = device
        self.store_folder = store_folder
        self.store_dtype = store_dtype
        self.rerank_chunk_size = rerank_chunk_size
        self.dist_ctx = dist_ctx or distributed.Context(device=device)
        self.times = StageTimes()
        self.progress = progress
        self._stores: List[DenseStore] = []
        self._stages: List[run_progress.StageFiles] = []
        self._created_folder = store_folder is not None and not os.path.exists(store_folder)
        self._ranking_files = None
        if progress is not None and self.dist_ctx.is_main:
            self._ranking_files = run_progress.RankingFiles(
                progress.ranking_folder, chunk_queries=progress.chunks.queries
            )

    def __enter__(self) -> "Retrieval":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(keep_progress=exc_type is not None)

    def close(self, *, keep_progress: bool = False) -> None:
        """Close every store; remove their files, except a run's progress when keep_progress."""
        for store in self._stores:
            store.close()
        for stage in self._stages:
            stage.close()
        self._stores, self._stages = [], []
        if self.progress is not None and not keep_progress:
            run_progress.remove_stage_files(self.store_folder)
        if self.store_folder is not None and (self._created_folder or self.progress is not None):
            remove_empty_folder(self.store_folder)
            leftovers.forget(self.store_folder)

    def new_store(self) -> DenseStore:
        """An empty dense store (RAM or store_folder), closed with the engine."""
        if self._created_folder:
            # The folder goes with its last store, also when the process is stopped at once.
            leftovers.register(self.store_folder, kind=leftovers.EMPTY_FOLDER)
        store = DenseStore(self.store_folder, dtype=self.store_dtype)
        self._stores.append(store)
        return store

    def _extract(
        self,
        dataset,
        indexes: Sequence[int],
        *,
        method: str,
        store: Optional[DenseStore],
        want_global: bool = True,
        desc: str,
    ) -> Optional[np.ndarray]:
        def run(part, part_store):
            return extract_features(
                self.model,
                dataset,
                part,
                method=method,
                local_store=part_store,
                want_global=want_global,
                desc=desc,
                extraction=self.extraction,
            )

        return distributed.extract_sharded(
            self.dist_ctx,
            run,
            indexes,
            batch_size=extraction_batch_size(method, self.extraction.batch_size),
            want_global=want_global,
            store=store,
            new_store=self.new_store,
        )

    def _stage(
        self, name: str, dataset, indexes: Sequence[int], *, method: str, dense: bool, want_global: bool, desc: str
    ) -> Tuple[Optional[np.ndarray], Optional[DenseStore]]:
        """One extraction stage: (global descriptors or None, finished DenseStore of the dense features
        or None). With progress and store_folder, its files record it as it goes (run_progress.StageFiles)
        and an interrupted run's are taken up; a stage rank 0 had finished is not redone (the other
        ranks then get an empty (0, 0) array: only rank 0 uses the features)."""
        if self.progress is None or self.store_folder is None:
            store = self.new_store() if dense else None
            descriptors = self._extract(
                dataset, indexes, method=method, store=store, want_global=want_global, desc=desc
            )
            return descriptors, store.finish() if store is not None else None
        files = run_progress.StageFiles(
            self.store_folder,
            name,
            indexes=indexes,
            chunk_images=self.progress.chunks.images,
            dense=dense,
            dtype=self.store_dtype,
        )
        self._stages.append(files)
        complete = self.dist_ctx.broadcast_object(files.open())  # rank 0's stage decides for every rank
        if complete:
            if self.dist_ctx.is_main:
                logging.info(f"{name} features: all {files.images} were extracted before the interruption")
                descriptors = np.concatenate(files.rows) if files.rows else None
            else:
                descriptors = np.zeros((0, 0), dtype=np.float32) if want_global else None
        else:

            def run(part, part_store):
                def extract(rest, on_batch):
                    return extract_features(
                        self.model,
                        dataset,
                        rest,
                        method=method,
                        local_store=part_store,
                        want_global=want_global,
                        desc=desc,
                        on_batch=on_batch,
                        extraction=self.extraction,
                    )

                return files.run_share(part, extract)

            descriptors = distributed.extract_sharded(
                self.dist_ctx,
                run,
                indexes,
                batch_size=extraction_batch_size(method, self.extraction.batch_size),
                want_global=want_global,
                store=files.store,
                new_store=lambda: files.store,
            )
            if self.dist_ctx.is_main:
                files.complete(descriptors)
        return descriptors, files.store.finish() if files.store is not None else None

    def build_database(self, dataset, indexes: Sequence[int], *, paths: Sequence[str] = ()) -> Database:
        """Global descriptors and dense features of images `indexes` of `dataset`, preprocessed as the
        evaluation's database (hard_resize)."""
        start = time.perf_counter()
        descriptors, store = self._stage(
            "database", dataset, indexes, method=DATABASE_METHOD, dense=True, want_global=True, desc="Database features"
        )
        self.times.database_extraction_s += time.perf_counter() - start
        return Database(global_descriptors=descriptors, dense=store, paths=list(paths))

    def load_database(
        self,
        folder: str,
        *,
        settings: Dict[str, Any],
        list_images: Callable[[str], List[str]],
        database_folder: Optional[str] = None,
    ) -> Database:
        """The database saved in `folder` (Database.save), after the checks of saved_database_paths
        (same model and flags, same images); closed with the engine (its files stay)."""
        folder = os.path.abspath(folder)
        paths = saved_database_paths(
            folder, settings=settings, list_images=list_images, database_folder=database_folder
        )
        database = Database.load(folder, paths=paths)
        self._stores.append(database.dense)
        if database.global_descriptors.shape[1] != settings["embed_dim"]:
            raise ValueError(
                f"--load_database {folder}: descriptors {database.global_descriptors.shape} for a model "
                f"of width {settings['embed_dim']}: the database is damaged. Save it again."
            )
        root = (
            os.path.abspath(database_folder)
            if database_folder is not None
            else read_manifest(folder)["database_folder"]
        )
        logging.info(f"Loaded the database saved in {folder} ({len(paths)} images of {root}): no database extraction")
        return database

    def extract_queries(self, dataset, indexes: Sequence[int], *, method: str) -> Queries:
        """Queries `indexes` of `dataset` preprocessed by `method`. The five-crop methods give five
        global descriptors per query; their re-ranking uses the dense features of the query's
        hard_resize version (one grid per query, as the database's)."""
        start = time.perf_counter()
        if method in FIVE_CROP_METHODS:
            descriptors, _ = self._stage(
                "query_crops", dataset, indexes, method=method, dense=False, want_global=True, desc="Query crops"
            )
            _, store = self._stage(
                "queries",
                dataset,
                indexes,
                method="hard_resize",
                dense=True,
                want_global=False,
                desc="Query dense features",
            )
        else:
            descriptors, store = self._stage(
                "queries", dataset, indexes, method=method, dense=True, want_global=True, desc="Query features"
            )
        self.times.query_extraction_s += time.perf_counter() - start
        return Queries(global_descriptors=descriptors, dense=store, method=method)

    def ranking_finished(self) -> bool:
        """Whether an interrupted run (progress) had finished its re-ranking (then saved_ranking() on rank 0
        gives it, and nothing needs extracting). The same answer on every rank."""
        if self.progress is None:
            return False
        finished = self._ranking_files is not None and self._ranking_files.finished() is not None
        return bool(self.dist_ctx.broadcast_object(finished))

    def saved_ranking(self) -> Ranking:
        """The ranking an interrupted run had finished (rank 0; ranking_finished())."""
        distances, first, predictions, scores = self._ranking_files.finished()
        logging.info("Re-ranking: finished before the interruption; nothing is extracted or re-ranked again")
        return Ranking(first_predictions=first, first_distances=distances, predictions=predictions, scores=scores)

    def rank(
        self, database: Database, queries: Queries, *, rerank_num: int, majority_weight: float = 0.01, pca=None
    ) -> Ranking:
        """Each query's min(rerank_num, N) nearest database images by exact L2 distance of the global
        descriptors (projected by `pca`, a fitted sklearn PCA, when given), then re-ranked by mutual-NN
        counts of the dense features."""
        k = candidates_num(rerank_num, len(database))
        start = time.perf_counter()
        db_global, q_global = database.global_descriptors, queries.global_descriptors
        if pca is not None:
            db_global = pca.transform(db_global).astype(np.float32)
            q_global = (
                pca.transform(q_global.reshape(-1, q_global.shape[-1]))
                .astype(np.float32)
                .reshape(*q_global.shape[:-1], -1)
            )
        distances, first = search(db_global, q_global, k, method=queries.method, majority_weight=majority_weight)
        self.times.search_s += time.perf_counter() - start
        release_freed_memory()  # the extraction's, before the re-ranking's working set comes on top
        start = time.perf_counter()
        with numerics.ieee_float32():  # exact mutual-NN counts also under --precision tf32
            if self._ranking_files is None:
                predictions, scores = rerank_predictions(
                    first, queries.dense, database.dense, device=self.device, chunk_size=self.rerank_chunk_size
                )
            else:  # recorded every few queries; an interrupted run's candidates must be these
                self._ranking_files.check_or_save_search(distances, first)

                def rerank_part(a: int, b: int):
                    return rerank_predictions(
                        first[a:b],
                        _Rows(queries.dense, a),
                        database.dense,
                        device=self.device,
                        chunk_size=self.rerank_chunk_size,
                    )

                predictions, scores = self._ranking_files.rerank(first, rerank_part)
        self.times.rerank_s += time.perf_counter() - start
        return Ranking(first_predictions=first, first_distances=distances, predictions=predictions, scores=scores)


def release_freed_memory() -> None:
    """Give the C allocator's free pages back to the operating system (glibc's malloc_trim). Memory that
    the extraction's activations used and freed stays resident in glibc's heaps, and whatever the next
    stage allocates comes on top of it: trimmed between extraction and re-ranking, eval.py's peak with
    ViT-L/14 is 0.1 GiB lower. Nothing is freed that is in use; elsewhere (macOS, musl) it does nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the process runs on
    except (OSError, AttributeError):
        return
    trim(0)


class _Rows:
    """rows[i] -> store[start + i]: a run of queries of a store, for re-ranking them alone."""

    def __init__(self, store, start: int) -> None:
        self.store, self.start = store, start

    def __getitem__(self, i: int):
        return self.store[self.start + int(i)]
