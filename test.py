"""Evaluation, written once: feature extraction, exact L2 search (faiss), mutual-NN re-ranking, recalls.

The data's way through:
    images -> model -> global descriptors -> faiss top-k ------------------------------.
                    `-> dense features -> DenseStore (RAM | file) -> re-rank engine -> recalls
`--efficient_ram_testing` only changes where DenseStore keeps the dense features (RAM or a disk file).
"""
import logging
import os
import random
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import faiss
import numpy as np
import torch
from sklearn.decomposition import PCA
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import atomic_files
import distributed
import local_matching
from datasets_ws import FIVE_CROP_METHODS, BaseDataset, ImagesSubset, PCADataset

PCA_MAX_IMAGES = 2 ** 14


class DenseStore:
    """Dense local features of a list of images, in RAM or in one raw float32 file on disk.

    append((B, h, w, C) array) in image order; store[i] -> (h, w, C) float32 array. Sizes may differ
    between images (single_query). On disk (`folder` given), features are appended to a fresh temp file
    and read back with positional reads (os.pread): unlike a memory map, whose touched pages stay counted
    in the process's resident memory, RAM then holds only the features in use, whatever the data set size.
    """

    # Persistence (localize.py keeps a database's dense features between runs).
    FEATURES_FILE = "dense_features.f32"
    SHAPES_FILE = "dense_shapes.npy"

    def __init__(self, folder: Optional[str] = None) -> None:
        self.folder = folder
        self.shapes: List[tuple] = []
        self.offsets: List[int] = []  # in float32 elements
        self._arrays: List[np.ndarray] = []
        self._size = 0
        self._writer = None
        self._fd: Optional[int] = None
        self._owns_file = folder is not None
        self.path: Optional[str] = None
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
            # The store belongs to this run alone (a fresh temp file, removed by close()): an interrupted
            # run leaves nothing that a later run could mistake for complete features.
            fd, self.path = atomic_files.create_unique_file(folder, prefix="dense_", suffix=".f32")
            self._writer = os.fdopen(fd, "wb")

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def append(self, features: np.ndarray) -> None:
        features = np.ascontiguousarray(features, dtype=np.float32)
        for f in features:
            self.shapes.append(f.shape)
            self.offsets.append(self._size)
            self._size += f.size
            if self._writer is not None:
                self._writer.write(f.tobytes())
            else:
                self._arrays.append(f)

    def finish(self) -> "DenseStore":
        """Close the writing side; from now on reads come from the file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._fd = os.open(self.path, os.O_RDONLY)
        return self

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not self.on_disk:
            return self._arrays[i]
        if self._fd is None:
            raise RuntimeError("DenseStore: call finish() before reading an on-disk store")
        shape = self.shapes[i]
        nbytes = int(np.prod(shape)) * 4
        data = os.pread(self._fd, nbytes, self.offsets[i] * 4)
        if len(data) != nbytes:
            raise ValueError(f"dense features file {self.path} is shorter than expected (image {i}): it was "
                             "truncated; extract the features again")
        return np.frombuffer(data, dtype=np.float32).reshape(shape)

    def nbytes(self) -> int:
        return self._size * 4

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._arrays = []
        if self._owns_file and self.path and os.path.exists(self.path):
            os.remove(self.path)

    def save(self, folder: str) -> None:
        """Write the features into `folder`: FEATURES_FILE holds every image's (h, w, C) float32 values
        in image order (raw, native byte order), SHAPES_FILE the (N, 3) int64 shapes.

        Each file goes to a temp name and is renamed into place. An on-disk store's file is hard-linked
        when the file system allows it (no copy of what may be many GB), else copied. Publishing the
        folder as a whole atomically is the caller's job (localize.save_database builds it in a temp
        folder). The store must be finish()ed first.
        """
        if self._writer is not None:
            raise ValueError("DenseStore.save: call finish() before saving (the store is still being written)")
        if any(len(s) != 3 for s in self.shapes):
            raise ValueError("DenseStore.save: only (h, w, C) features can be saved")
        os.makedirs(folder, exist_ok=True)

        def write_features(tmp: str) -> None:
            if self.on_disk:
                os.remove(tmp)
                try:
                    os.link(self.path, tmp)
                    # A link shares the store file's inode, whose mode was set when the store was
                    # created: give it the permissions a new file would get now.
                    os.chmod(tmp, 0o666 & ~atomic_files.current_umask())
                except OSError:  # another file system, or links not supported
                    shutil.copyfile(self.path, tmp)
                return
            with open(tmp, "wb") as f:
                for i in range(len(self)):
                    f.write(np.ascontiguousarray(self[i], dtype=np.float32).tobytes())

        def write_shapes(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(self.shapes, dtype=np.int64).reshape(-1, 3))

        for name, write in ((self.FEATURES_FILE, write_features), (self.SHAPES_FILE, write_shapes)):
            atomic_files.atomic_write(os.path.join(folder, name), write)

    @classmethod
    def load(cls, folder: str) -> "DenseStore":
        """A read-only on-disk store over the files that save() wrote in `folder`; close() leaves the
        files alone."""
        features_path = os.path.join(folder, cls.FEATURES_FILE)
        shapes_path = os.path.join(folder, cls.SHAPES_FILE)
        for path in (features_path, shapes_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"dense features file {path} is missing: the saved database is incomplete; "
                                        "save it again")
        shapes = np.load(shapes_path, allow_pickle=False)
        if shapes.ndim != 2 or shapes.shape[1] != 3 or (shapes.size and shapes.min() < 1):
            raise ValueError(f"{shapes_path} does not hold (N, 3) positive shapes: the saved database is damaged; "
                             "save it again")
        sizes = shapes.prod(axis=1).astype(np.int64)
        total = int(sizes.sum())
        if os.path.getsize(features_path) != total * 4:
            raise ValueError(f"{features_path} has {os.path.getsize(features_path)} bytes, the shapes in "
                             f"{shapes_path} need {total * 4}: the saved database is truncated or damaged; "
                             "save it again")
        store = cls(None)
        store.path, store._owns_file = features_path, False
        store.shapes = [tuple(int(v) for v in s) for s in shapes]
        store.offsets = [int(o) for o in np.concatenate([[0], np.cumsum(sizes)[:-1]])] if len(sizes) else []
        store._size = total
        store._fd = os.open(features_path, os.O_RDONLY)
        return store


def extract_features(model: torch.nn.Module, dataset: BaseDataset, indexes: Sequence[int], *, method: str,
                     batch_size: int, num_workers: int, device: str, want_global: bool = True,
                     local_store: Optional[DenseStore] = None, precision: str = "fp32",
                     desc: str = "") -> Optional[np.ndarray]:
    """The one feature-extraction path.

    Images `indexes` (global indexes of `dataset`) preprocessed by `method`. Returns global descriptors
    (n, D) float32 — (n, 5, D) for the five-crop methods — or None when want_global is False; dense
    features (B, h', w', 128) are appended to `local_store` when given (not computed otherwise).
    """
    if method == "single_query":
        batch_size = 1  # every query keeps its own size
    crops = method in FIVE_CROP_METHODS
    loader = DataLoader(ImagesSubset(dataset, indexes, method), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=str(device).startswith("cuda"))
    outputs = []
    # bf16 autocast where the features are computed; matmuls and convolutions run in bf16, so results
    # change slightly (measured in the README); fp32 is the reference.
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if precision == "bf16" \
        else nullcontext()
    model.eval()
    with torch.inference_mode(), autocast:
        for images, _ in tqdm(loader, desc=desc or f"Extracting {method}", ncols=100, leave=False,
                              disable=None):
            if crops:  # (B, 5, 3, s, s) -> (B*5, 3, s, s)
                images = images.flatten(0, 1)
            images = images.to(device, non_blocking=True)
            if local_store is not None:
                local, glob = model(images)
                local_store.append(local.float().cpu().numpy())
            elif want_global:
                glob = model.global_descriptors(images)
            else:
                raise ValueError("extract_features called with nothing to compute")
            if want_global:
                glob = glob.float().cpu().numpy()
                outputs.append(glob.reshape(-1, 5, glob.shape[-1]) if crops else glob)
    if not want_global:
        return None
    return np.concatenate(outputs).astype(np.float32, copy=False)


def compute_pca(model: torch.nn.Module, *, datasets_folder: str, pca_dataset_folder: str, pca_dim: int,
                resize: Sequence[int], batch_size: int, num_workers: int, device: str) -> PCA:
    """Fit PCA(pca_dim) (no whitening) on global descriptors of at most 2^14 shuffled images."""
    pca_ds = PCADataset(datasets_folder, pca_dataset_folder, resize=resize)
    n = min(len(pca_ds), PCA_MAX_IMAGES)
    idxs = random.sample(range(len(pca_ds)), k=n) if n < len(pca_ds) else list(range(len(pca_ds)))
    loader = DataLoader(Subset(pca_ds, idxs), batch_size=batch_size, num_workers=num_workers)
    descriptors = []
    model.eval()
    with torch.inference_mode():
        for images in tqdm(loader, desc="PCA features", ncols=100, leave=False, disable=None):
            descriptors.append(model.global_descriptors(images.to(device)).float().cpu().numpy())
    descriptors = np.concatenate(descriptors)
    if pca_dim > min(descriptors.shape):
        raise ValueError(f"--pca_dim {pca_dim} is larger than min(#images, descriptor size) = "
                         f"{min(descriptors.shape)} of --pca_dataset_folder {pca_dataset_folder}")
    pca = PCA(pca_dim)
    pca.fit(descriptors)
    return pca


# ------------------------------------------------------------------------------------------------
# Search and merging of crop candidate lists (pure functions)
# ------------------------------------------------------------------------------------------------

def l2_search(database: np.ndarray, queries: np.ndarray, k: int):
    """Exact L2 search (faiss IndexFlatL2): (distances (Q, k), predictions (Q, k)), nearest first."""
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


def compute_recalls(predictions: Sequence[np.ndarray], positives_per_query: Sequence[np.ndarray],
                    recall_values: Sequence[int]) -> np.ndarray:
    """Recall@N in percent: share of queries with a positive among their first N predictions.

    Every query counts in the denominator, also one without any positive (always a miss); an N above
    the number of predictions uses them all (capped, as the public release).
    """
    recalls = np.zeros(len(recall_values))
    for preds, positives in zip(predictions, positives_per_query):
        hits = np.isin(np.asarray(preds), positives)
        for i, n in enumerate(recall_values):
            if hits[:n].any():
                recalls[i:] += 1
                break
    return recalls / max(len(predictions), 1) * 100


def recalls_to_str(recalls: Sequence[float], recall_values: Sequence[int]) -> str:
    return ", ".join(f"R@{n}: {r:.1f}" for n, r in zip(recall_values, recalls))


def rerank_predictions(predictions: np.ndarray, query_store, database_store, *, device: str,
                       chunk_size: int = 16):
    """Re-rank each query's candidates by their mutual-NN counts with the query (local_matching).

    predictions (Q, k) database indexes; query_store[q] / database_store[i] -> dense features (h, w, C).
    Returns (re-ranked predictions (Q, k), their float32 scores (Q, k), highest first).
    """
    reranked = np.empty_like(predictions)
    scores = np.empty(predictions.shape, dtype=np.float32)
    for q in tqdm(range(len(predictions)), desc="Re-ranking", ncols=100, leave=False, disable=None):
        query_local = torch.from_numpy(np.array(query_store[q])).to(device, non_blocking=True)
        cand_scores = local_matching.mutual_nn_scores(query_local, database_store, predictions[q],
                                                      chunk_size=chunk_size)
        cand_scores = cand_scores.cpu().numpy().astype(np.float32)
        order = local_matching.rerank(cand_scores)
        reranked[q] = predictions[q][order]
        scores[q] = cand_scores[order]
    return reranked, scores


# ------------------------------------------------------------------------------------------------
# The evaluation
# ------------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    recalls_first: np.ndarray
    recalls: np.ndarray  # after re-ranking
    first_predictions: np.ndarray  # (Q, k) database indexes, first stage
    first_distances: Optional[np.ndarray]  # (Q, k) squared L2 distances, from faiss (None for merged crop lists)
    predictions: np.ndarray  # (Q, k) re-ranked
    scores: np.ndarray  # (Q, k) mutual-NN counts of the re-ranked candidates, in re-ranked order
    positives: List[np.ndarray] = field(default_factory=list)

    def summary(self, recall_values: Sequence[int]) -> str:
        return recalls_to_str(self.recalls, recall_values)


def evaluate(model: torch.nn.Module, eval_ds: BaseDataset, *, test_method: str = "hard_resize",
             rerank_num: int = 100, recall_values: Sequence[int] = (1, 5, 10, 20), batch_size: int = 16,
             num_workers: int = 0, device: str = "cpu", efficient_ram_testing: bool = False,
             store_folder: Optional[str] = None, pca: Optional[PCA] = None, majority_weight: float = 0.01,
             precision: str = "fp32", rerank_chunk_size: int = 16,
             dist_ctx: Optional[distributed.Context] = None) -> Optional[EvalResult]:
    """Two-stage evaluation of `eval_ds`; returns recalls before/after re-ranking and the rankings.

    efficient_ram_testing keeps dense features in raw files under `store_folder` (read with os.pread) (a temp
    folder when None), deleted at the end.
    dist_ctx (torchrun, several processes): every rank extracts its share of the images; rank 0 gathers
    them, searches, re-ranks and returns the result, the other ranks return None (same result as one
    process). Every rank must call evaluate with the same arguments.
    """
    db_num, q_num = eval_ds.database_num, eval_ds.queries_num
    k = rerank_num
    if rerank_num > db_num:
        logging.warning(f"--rerank_num {rerank_num} is larger than the database ({db_num} images): "
                        f"searching and re-ranking the whole database")
        k = db_num
    if max(recall_values) > k:
        logging.warning(f"--recall_values above {k} (the number of re-ranked candidates) are capped at R@{k}")

    own_tmp = None
    if efficient_ram_testing and store_folder is None:
        own_tmp = store_folder = tempfile.mkdtemp(prefix="selavpr_dense_")
    folder = store_folder if efficient_ram_testing else None
    # The store files go at the end, also when the evaluation fails or is interrupted (Ctrl-C, SIGTERM:
    # the `finally` below); so does `store_folder` itself when this call created it and it is left empty.
    created_folder = folder if folder is not None and not os.path.exists(folder) else None
    db_store = q_store = None
    common = dict(batch_size=batch_size, num_workers=num_workers, device=device, precision=precision)
    dist_ctx = dist_ctx or distributed.Context(device=device)

    def extract(indexes, *, local_store=None, want_global=True, **kwargs):
        """extract_features of eval_ds; under torchrun each rank takes a share, rank 0 gathers them."""
        def run(part, part_store):
            return extract_features(model, eval_ds, part, local_store=part_store, want_global=want_global,
                                    **kwargs, **common)
        return distributed.extract_sharded(dist_ctx, run, indexes, want_global=want_global, store=local_store,
                                           new_store=lambda: DenseStore(folder))
    try:
        db_store, q_store = DenseStore(folder), DenseStore(folder)
        db_global = extract(range(db_num), method="hard_resize", local_store=db_store, desc="Database features")
        q_indexes = range(db_num, db_num + q_num)
        crops = test_method in FIVE_CROP_METHODS
        if crops:
            # Crops give the global descriptors; re-ranking uses the dense features of the query's
            # hard_resize version (one 224x224-like grid per query).
            q_global = extract(q_indexes, method=test_method, desc="Query crops")
            extract(q_indexes, method="hard_resize", want_global=False, local_store=q_store,
                    desc="Query dense features")
        else:
            q_global = extract(q_indexes, method=test_method, local_store=q_store, desc="Query features")
        db_store.finish()
        q_store.finish()
        if not dist_ctx.is_main:
            return None  # rank 0 holds every feature now: it searches and re-ranks alone

        dim = db_global.shape[-1]
        if pca is not None:
            db_global = pca.transform(db_global).astype(np.float32)
            q_global = pca.transform(q_global.reshape(-1, dim)).astype(np.float32).reshape(
                *q_global.shape[:-1], -1)
        distances = None
        if test_method == "five_crops":
            q_global = q_global.mean(axis=1)  # the mean of the five, not re-normalised
        if test_method in ("nearest_crop", "maj_voting"):
            d, p = l2_search(db_global, q_global.reshape(-1, q_global.shape[-1]), k)
            d, p = d.reshape(q_num, 5, k), p.reshape(q_num, 5, k)
            if test_method == "maj_voting":
                d = np.stack([majority_voting(d[q], p[q], majority_weight) for q in range(q_num)])
            first = [merge_crop_candidates(d[q], p[q], k) for q in range(q_num)]
            predictions = np.stack(first)  # k unique candidates exist: each crop list alone has k
        else:
            distances, predictions = l2_search(db_global, q_global, k)

        positives = eval_ds.get_positives()
        recalls_first = compute_recalls(predictions, positives, recall_values)
        logging.info(f"First ranking recalls: {recalls_to_str(recalls_first, recall_values)}")

        reranked, scores = rerank_predictions(predictions, q_store, db_store, device=device,
                                              chunk_size=rerank_chunk_size)
        recalls = compute_recalls(reranked, positives, recall_values)
        return EvalResult(recalls_first=recalls_first, recalls=recalls, first_predictions=predictions,
                          first_distances=distances, predictions=reranked, scores=scores, positives=positives)
    finally:
        for store in (db_store, q_store):
            if store is not None:
                store.close()
        if own_tmp is not None:
            shutil.rmtree(own_tmp, ignore_errors=True)
        elif created_folder is not None:
            remove_empty_folder(created_folder)


def remove_empty_folder(folder: str) -> None:
    """Remove `folder` if it exists and is empty (a feature store's folder once its files are gone)."""
    try:
        os.rmdir(folder)
    except OSError:  # not empty (something else lives there), or already gone
        pass
