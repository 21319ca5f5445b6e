"""Data sets in the Visual Geo-localization Benchmark layout, their positives, and the evaluation
preprocessing of the public release (normalise, then resize the tensor; the query test methods).

Layout::

    <datasets_folder>/<dataset_name>/images/<split>/{database,queries}/**/*.jpg

with file names ``@utm_east@utm_north@...@note@.jpg``. Global image index ``i < database_num`` is a
database image, any other a query (``i - database_num`` is its query index).

This module is data only: it imports no model code and runs no model. Mining (which needs
descriptors) lives in ``mining.py`` and receives the dataset objects defined here.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms as T
from PIL import Image
from sklearn.neighbors import NearestNeighbors
from torch.utils.data import Dataset

import image_files

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: PIL image -> normalised float tensor (3, H, W).
base_transform = T.Compose([T.ToTensor(), T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])

#: Query test methods of the public release (the database always uses ``hard_resize``).
TEST_METHODS = ("hard_resize", "single_query", "central_crop", "five_crops", "nearest_crop", "maj_voting")
#: The methods whose output is the five crops (5, 3, s, s) of the query.
# The ViT/14 patch size: single_query inputs are cropped to multiples of it.
PATCH_SIZE = 14
FIVE_CROP_METHODS = ("five_crops", "nearest_crop", "maj_voting")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def collect_jpgs(folder: str, *, protect: Sequence[str] = ()) -> list[str]:
    """All ``*.jpg`` files below ``folder`` (recursive), sorted with ``sorted()`` on the full paths.

    The suffix is case-sensitive (``.JPG`` is not collected), hidden files and hidden folders
    (name starting with ``.``) are skipped: for a tree without links to folders the same set of files as
    ``glob(join(folder, "**", "*.jpg"), recursive=True)``, without glob's pattern characters in
    ``folder`` being interpreted and without folders called ``x.jpg``. Links to folders are followed
    unless that would read a real folder twice, loop, or reach into ``folder`` or a ``protect`` folder
    (the rule of image_files.list_images). What was skipped, and why, is logged with the counts.
    """
    listing = image_files.list_images(folder, accept=lambda name: name.endswith(".jpg"), protect=protect)
    image_files.log_listing(listing, rule="a data set reads only names ending in lower-case .jpg")
    return listing.paths


def read_utm(path: str) -> tuple[float, float]:
    """(utm_east, utm_north) in metres from the FILE NAME ``@east@north@...`` (fields 1 and 2).

    Only the base name is split, so an ``@`` in a folder name does no harm.
    """
    fields = os.path.basename(path).split("@")
    if len(fields) < 3:
        raise ValueError(
            f"Image file name {path!r} does not carry UTM coordinates: expected a name like "
            "'@utm_east@utm_north@...@.jpg' (Visual Geo-localization Benchmark format). "
            "Rename the image or remove it from the data set folder."
        )
    try:
        east, north = float(fields[1]), float(fields[2])
    except ValueError:
        raise ValueError(
            f"Image file name {path!r} has non-numeric UTM fields {fields[1]!r}, {fields[2]!r}: expected "
            "'@utm_east@utm_north@...@.jpg' with the coordinates in metres. Fix the file name."
        ) from None
    if not (math.isfinite(east) and math.isfinite(north)):
        raise ValueError(
            f"Image file name {path!r} has non-finite UTM coordinates ({east}, {north}): fix the file name."
        )
    return east, north


def read_note(path: str) -> str:
    """The MSLS ``note`` field of the file name (second to last ``@`` field; '' when absent)."""
    fields = os.path.basename(path).split("@")
    return fields[-2] if len(fields) >= 2 else ""


def parse_note(note: str) -> tuple[bool, bool]:
    """(is_night, is_sideways) from an MSLS note such as ``night_sideways`` or ``day_sideways``.

    Night when the first ``_``-separated token is ``night``, sideways when the second is
    ``sideways`` (a note without a second token is not sideways).
    """
    tokens = note.split("_")
    return tokens[0] == "night", len(tokens) > 1 and tokens[1] == "sideways"


def open_image(path: str, *, min_side: int = image_files.DRAFT_MIN_SIDE) -> Image.Image:
    """Read an image file as an RGB PIL image, as a viewer shows it (image_files.read_rgb).

    Grayscale, CMYK, palette or a PNG named .jpg are converted to RGB, 16-bit / 32-bit / float
    grayscale scaled to 8 bits, the EXIF orientation applied; a JPEG above Pillow's pixel limit is read
    at a reduced size keeping both sides >= ``min_side``. The pixels are decoded here (PIL is lazy) so
    that a truncated or corrupt file fails now, with its name, rather than later inside a DataLoader worker.
    """
    return image_files.read_rgb(path, min_side=min_side)


def draft_min_side(resize: Sequence[int]) -> int:
    """The smallest side a photo above Pillow's pixel limit may be draft-decoded to when it is then resized
    to ``resize``: twice the larger target side (a margin for the later resize), at least DRAFT_MIN_SIDE."""
    return max(image_files.DRAFT_MIN_SIDE, 2 * max(int(v) for v in resize))


# ----------------------------------------------------------------------------------------------
# Evaluation preprocessing on normalised tensors, as the public release. All take (3, H, W) or (B, 3, H, W).
# ----------------------------------------------------------------------------------------------


def _check_resize(resize: Sequence[int], name: str = "resize") -> tuple[int, int]:
    try:
        h, w = (int(v) for v in resize)
    except (TypeError, ValueError):
        raise ValueError(f"--{name} must be two positive integers H W, got {resize!r}") from None
    if h <= 0 or w <= 0 or (h, w) != tuple(resize):
        raise ValueError(f"--{name} must be two positive integers H W, got {resize!r}")
    return h, w


def resized_output_size(height: int, width: int, size: int | Sequence[int]) -> tuple[int, int]:
    """The (H, W) that torchvision's ``resize`` produces for an input of ``height`` x ``width``.

    ``size`` (H, W): exactly that. An int (or a 1-sequence): the SHORTER side becomes ``size``, the
    longer ``int(size * long / short)`` (truncated), as torchvision computes it.
    """
    if isinstance(size, numbers.Integral):
        size = [int(size)]
    size = list(size)
    if len(size) == 2:
        return int(size[0]), int(size[1])
    if len(size) != 1:
        raise ValueError(f"size must be an int or a sequence of 1 or 2 ints, got {size!r}")
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(size[0]), int(int(size[0]) * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _bilinear(img: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize without antialiasing (torchvision 0.15's tensor resize), any leading dims."""
    batched = img.dim() == 4
    x = img if batched else img.unsqueeze(0)
    x = nnf.interpolate(x, size=list(out_hw), mode="bilinear", align_corners=False, antialias=False)
    return x if batched else x.squeeze(0)


def hard_resize(img: torch.Tensor, resize: Sequence[int]) -> torch.Tensor:
    """(…, 3, H, W) -> (…, 3, resize[0], resize[1]): bilinear, no antialias, aspect ratio not kept."""
    h, w = _check_resize(resize)
    return _bilinear(img, (h, w))


def resize_shorter_side(img: torch.Tensor, size: int) -> torch.Tensor:
    """``single_query``: (…, 3, H, W) -> shorter side ``size``, longer ``int(size * long / short)``."""
    return _bilinear(img, resized_output_size(img.shape[-2], img.shape[-1], int(size)))


def _center_crop(img: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Centre crop to ``out_hw`` with torchvision's rounding; zero-pads a side shorter than the crop."""
    ch, cw = out_hw
    h, w = img.shape[-2], img.shape[-1]
    if ch > h or cw > w:
        left = (cw - w) // 2 if cw > w else 0
        top = (ch - h) // 2 if ch > h else 0
        right = (cw - w + 1) // 2 if cw > w else 0
        bottom = (ch - h + 1) // 2 if ch > h else 0
        img = nnf.pad(img, (left, right, top, bottom), mode="constant", value=0.0)
        h, w = img.shape[-2], img.shape[-1]
        if (h, w) == (ch, cw):
            return img
    # Python's round() (half to even) is what torchvision uses: keep it for identical crops.
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return img[..., top : top + ch, left : left + cw]


def central_crop(img: torch.Tensor, resize: Sequence[int]) -> torch.Tensor:
    """``central_crop``: (…, 3, H, W) -> (…, 3, resize[0], resize[1]).

    Scale by ``max(Hr/H, Wr/W)`` with ``interpolate`` in its DEFAULT (nearest) mode, as the public
    release does, then take the centre crop of ``resize``.
    """
    rh, rw = _check_resize(resize)
    h, w = img.shape[-2], img.shape[-1]
    scale = max(rh / h, rw / w)
    batched = img.dim() == 4
    x = nnf.interpolate(img if batched else img.unsqueeze(0), scale_factor=scale)
    x = x if batched else x.squeeze(0)
    return _center_crop(x, (rh, rw))


def five_crops(img: torch.Tensor, resize: Sequence[int]) -> torch.Tensor:
    """``five_crops``: (3, H, W) -> (5, 3, s, s) with s = min(resize).

    The shorter side is resized to s (bilinear, no antialias), then the square crops of side s are
    taken in torchvision's ``five_crop`` order: top-left, top-right, bottom-left, bottom-right, centre.
    """
    if img.dim() != 3:
        raise ValueError(f"five_crops expects one image (3, H, W), got shape {tuple(img.shape)}")
    s = min(_check_resize(resize))
    x = resize_shorter_side(img, s)
    h, w = x.shape[-2], x.shape[-1]
    crops = [x[:, :s, :s], x[:, :s, w - s :], x[:, h - s :, :s], x[:, h - s :, w - s :], _center_crop(x, (s, s))]
    return torch.stack(crops)


def crop_to_patch_multiple(img: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Centre crop (…, 3, H, W) to the largest multiples of the ViT patch size (< 14 px dropped).

    single_query keeps each query's aspect ratio, so its longer side is rarely a multiple of 14; the ViT
    (like DINOv2's patch embedding, which refuses such inputs) needs one.
    """
    h, w = img.shape[-2], img.shape[-1]
    return _center_crop(img, (h - h % patch_size, w - w % patch_size))


def check_test_method(method: str) -> str:
    """`method` if it is a test method, else a clear error naming the flag and the choices."""
    if method not in TEST_METHODS:
        raise ValueError(f"--test_method {method!r} is not available: use one of {', '.join(TEST_METHODS)}")
    return method


def apply_test_method(img: torch.Tensor, method: str, resize: Sequence[int]) -> torch.Tensor:
    """Apply test ``method`` to a normalised image (3, H, W).

    Returns (3, resize) for hard_resize / central_crop, (3, h', w') for single_query and
    (5, 3, s, s) for five_crops / nearest_crop / maj_voting.
    """
    if method == "hard_resize":
        return hard_resize(img, resize)
    if method == "single_query":
        return crop_to_patch_multiple(resize_shorter_side(img, min(_check_resize(resize))))
    if method == "central_crop":
        return central_crop(img, resize)
    check_test_method(method)
    return five_crops(img, resize)  # the three five-crop methods


# ----------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------


def _require_folder(folder: str, what: str, hint: str) -> None:
    if not os.path.isdir(folder):
        broken = image_files.broken_link_hint(folder)
        if broken:
            raise FileNotFoundError(f"{what} {broken}")
        raise FileNotFoundError(f"{what} {folder!r} does not exist: {hint}")


def _subfolders(folder: str) -> str:
    try:
        names = sorted(
            d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith(".")
        )
    except OSError:
        return "none"
    return ", ".join(names) if names else "none"


def radius_positives(database_utms: np.ndarray, queries_utms: np.ndarray, radius: float) -> list[np.ndarray]:
    """Per query, the database indexes within ``radius`` metres (boundary included, distance <= r).

    scikit-learn's ``NearestNeighbors.radius_neighbors``, as the public release; the order inside each
    array is scikit-learn's (not sorted), which mining keeps for its tie-breaking.
    database_utms: (N, 2), queries_utms: (M, 2) -> list of M int64 arrays.
    """
    if len(queries_utms) == 0:
        return []
    knn = NearestNeighbors()
    knn.fit(database_utms)
    found = knn.radius_neighbors(queries_utms, radius=radius, return_distance=False)
    return [np.asarray(p, dtype=np.int64) for p in found]


def _query_key(path: str) -> str:
    fields = os.path.basename(path).split("@")
    if len(fields) < 9:
        raise ValueError(
            f"Query file name {path!r} has no Mapillary key "
            "(field 7 of '@east@north@zone@letter@lat@lon@key@...@.jpg'): "
            "--query_keys_file works only with MSLS images in the benchmark format."
        )
    return fields[7]


class BaseDataset(Dataset):
    """Database + queries of one split, with their UTMs and soft (evaluation) positives.

    ``dataset[i] -> (image, i)``: database indexes are always ``hard_resize`` d to (3, *resize);
    query indexes use ``test_method`` (see :func:`apply_test_method` for the shapes).
    """

    def __init__(
        self,
        datasets_folder: str,
        dataset_name: str,
        split: str = "train",
        *,
        resize: Sequence[int] = (224, 224),
        test_method: str = "hard_resize",
        positive_dist_threshold: float = 25,
        query_keys_file: str | None = None,
    ) -> None:
        super().__init__()
        self.resize = _check_resize(resize)
        self.test_method = check_test_method(test_method)
        self.dataset_name = dataset_name
        self.split = split
        self.positive_dist_threshold = positive_dist_threshold

        _require_folder(
            datasets_folder,
            "Datasets folder",
            "set --datasets_folder (or $DATASETS_FOLDER) to the folder that holds the data sets.",
        )
        dataset_root = os.path.join(datasets_folder, dataset_name)
        _require_folder(
            dataset_root,
            "Data set folder",
            f"check --dataset_name (data sets found in {datasets_folder!r}: {_subfolders(datasets_folder)}).",
        )
        images_folder = os.path.join(dataset_root, "images")
        _require_folder(
            images_folder, "Folder", "a data set must be laid out as <dataset_name>/images/<split>/{database,queries}/."
        )
        self.dataset_folder = os.path.join(images_folder, split)
        _require_folder(
            self.dataset_folder,
            f"Split {split!r} folder",
            f"splits found in {images_folder!r}: {_subfolders(images_folder)}.",
        )
        database_folder = os.path.join(self.dataset_folder, "database")
        queries_folder = os.path.join(self.dataset_folder, "queries")
        for folder in (database_folder, queries_folder):
            _require_folder(
                folder, "Folder", f"the split {split!r} must contain both 'database' and 'queries' folders."
            )

        # A folder link inside one part must not pull in the other part (or the split itself).
        self.database_paths = collect_jpgs(database_folder, protect=(self.dataset_folder, queries_folder))
        queries_paths = collect_jpgs(queries_folder, protect=(self.dataset_folder, database_folder))
        for folder, paths in ((database_folder, self.database_paths), (queries_folder, queries_paths)):
            if not paths:
                raise ValueError(
                    f"Folder {folder!r} contains no .jpg image (the suffix is case-sensitive, hidden "
                    "files are skipped): put the images there or fix --datasets_folder / --dataset_name."
                )
        if query_keys_file is not None:
            queries_paths = self._keep_listed_queries(queries_paths, query_keys_file)
        elif dataset_name.lower().startswith("msls") and split != "train":
            logging.info(
                f"Evaluating all {len(queries_paths)} queries of {queries_folder} (no --query_keys_file): "
                "the official MSLS-val protocol uses only its 740 listed queries."
            )
        self.queries_paths = queries_paths

        self.database_utms = np.array([read_utm(p) for p in self.database_paths], dtype=np.float64).reshape(-1, 2)
        self.queries_utms = np.array([read_utm(p) for p in self.queries_paths], dtype=np.float64).reshape(-1, 2)
        self.soft_positives_per_query = radius_positives(self.database_utms, self.queries_utms, positive_dist_threshold)

        self.database_num = len(self.database_paths)
        self.queries_num = len(self.queries_paths)
        self.images_paths = list(self.database_paths) + list(self.queries_paths)

    @staticmethod
    def _keep_listed_queries(queries_paths: list[str], query_keys_file: str) -> list[str]:
        """Official MSLS-val protocol: only the queries whose key (field 7) is in ``query_keys_file``."""
        if not os.path.isfile(query_keys_file):
            raise FileNotFoundError(
                f"--query_keys_file {query_keys_file!r} does not exist: give the path of the "
                "whitespace-separated list of query keys (740 for the official MSLS-val)."
            )
        with open(query_keys_file, encoding="utf-8") as f:
            keys = set(f.read().split())
        kept = [p for p in queries_paths if _query_key(p) in keys]
        if not kept:
            raise ValueError(
                f"None of the {len(queries_paths)} queries has a key listed in --query_keys_file "
                f"{query_keys_file!r} ({len(keys)} keys): check that the file belongs to this data set."
            )
        found = {_query_key(p) for p in kept}
        logging.info(
            f"Query protocol: keys listed in {query_keys_file} (official MSLS-val protocol): kept "
            f"{len(kept)} of {len(queries_paths)} queries; {len(keys - found)} of the {len(keys)} keys "
            "have no image."
        )
        return kept

    def get_positives(self) -> list[np.ndarray]:
        """Soft positives: per query (aligned with ``queries_paths``) the database indexes within the threshold."""
        return self.soft_positives_per_query

    def load(self, index: int, method: str) -> torch.Tensor:
        """Image ``index`` (global) normalised and preprocessed by test ``method`` (see apply_test_method)."""
        check_test_method(method)
        image = open_image(self.images_paths[index], min_side=draft_min_side(self.resize))
        return apply_test_method(base_transform(image), method, self.resize)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        method = "hard_resize" if index < self.database_num else self.test_method
        return self.load(index, method), index

    def __len__(self) -> int:
        return len(self.images_paths)

    def __repr__(self) -> str:
        return (
            f"< {type(self).__name__}, {self.dataset_name} - #database: {self.database_num}; "
            f"#queries: {self.queries_num} >"
        )


class ImagesSubset(Dataset):
    """Images of ``dataset`` at the given GLOBAL indexes, preprocessed by ``method``.

    ``subset[k] -> (image, global_index)``; what a mining ``descriptors_fn`` feeds to the model
    (``hard_resize``: (3, *resize)), also for a TripletsDataset whose own items are triplets.
    """

    def __init__(self, dataset: BaseDataset, global_indexes: Sequence[int], method: str = "hard_resize") -> None:
        check_test_method(method)
        self.dataset = dataset
        self.global_indexes = np.asarray(global_indexes, dtype=np.int64).reshape(-1)
        self.method = method

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        index = int(self.global_indexes[k])
        return self.dataset.load(index, self.method), index

    def __len__(self) -> int:
        return len(self.global_indexes)


class TripletsDataset(BaseDataset):
    """Training split: hard positives, query augmentation, and the mined triplets.

    Queries without a hard positive are dropped; every per-query attribute (``queries_paths``,
    ``queries_utms``, ``hard_positives_per_query``, ``soft_positives_per_query``, ``is_night``,
    ``is_sideways``) stays aligned with the kept queries. ``triplets_global_indexes`` (n, 2 + negs)
    holds GLOBAL indexes [query, best positive, negatives...] and is set by ``mining.py``.
    ``dataset[i] -> (images (2+negs, 3, H, W), triplets_local_indexes (negs, 3), global indexes (2+negs,))``.
    """

    def __init__(
        self,
        datasets_folder: str,
        dataset_name: str,
        split: str = "train",
        *,
        resize: Sequence[int] = (224, 224),
        negs_num_per_query: int = 2,
        train_positives_dist_threshold: float = 10,
        soft_positives_dist_threshold: float = 25,
        brightness: float | None = None,
        contrast: float | None = None,
        saturation: float | None = None,
        hue: float | None = None,
        rand_perspective: float | None = None,
        random_resized_crop: float | None = None,
        random_rotation: float | None = None,
    ) -> None:
        super().__init__(
            datasets_folder,
            dataset_name,
            split,
            resize=resize,
            test_method="hard_resize",
            positive_dist_threshold=soft_positives_dist_threshold,
        )
        if negs_num_per_query < 1:
            raise ValueError(f"--negs_num_per_query must be at least 1, got {negs_num_per_query}")
        self.negs_num_per_query = int(negs_num_per_query)
        self.train_positives_dist_threshold = train_positives_dist_threshold

        hard = radius_positives(self.database_utms, self.queries_utms, train_positives_dist_threshold)
        keep = np.array([len(p) > 0 for p in hard], dtype=bool)
        dropped = int((~keep).sum())
        if dropped:
            logging.info(
                f"There are {dropped} queries without any positive within {train_positives_dist_threshold} m "
                f"in the {split} set: they are dropped, as they are useless for training."
            )
        # Keep every per-query structure aligned (the public release forgets the soft list, so later queries
        # would exclude another query's positives from their negatives).
        kept = np.flatnonzero(keep)
        self.hard_positives_per_query = [hard[q] for q in kept]
        self.soft_positives_per_query = [self.soft_positives_per_query[q] for q in kept]
        self.queries_paths = [self.queries_paths[q] for q in kept]
        self.queries_utms = self.queries_utms[kept]
        self.queries_num = len(self.queries_paths)
        self.images_paths = list(self.database_paths) + list(self.queries_paths)
        if self.queries_num == 0:
            raise ValueError(
                f"No query of {self.dataset_folder!r} has a database image within "
                f"--train_positives_dist_threshold={train_positives_dist_threshold} m: "
                "nothing to train on."
            )

        notes = [parse_note(read_note(p)) for p in self.queries_paths]
        self.is_night = np.array([n for n, _ in notes], dtype=bool)
        self.is_sideways = np.array([s for _, s in notes], dtype=bool)

        # Every training image is resized as a PIL image (bilinear, antialiased by PIL), then normalised.
        self.resized_transform = T.Compose([T.Resize(list(self.resize)), base_transform])
        augmentations = []
        if brightness is not None:
            augmentations.append(T.ColorJitter(brightness=brightness))
        if contrast is not None:
            augmentations.append(T.ColorJitter(contrast=contrast))
        if saturation is not None:
            augmentations.append(T.ColorJitter(saturation=saturation))
        if hue is not None:
            augmentations.append(T.ColorJitter(hue=hue))
        if rand_perspective is not None:
            augmentations.append(T.RandomPerspective(distortion_scale=rand_perspective, p=0.5))
        if random_resized_crop is not None:
            augmentations.append(T.RandomResizedCrop(list(self.resize), scale=(1 - random_resized_crop, 1)))
        if random_rotation is not None:
            augmentations.append(T.RandomRotation(random_rotation))
        self.query_transform = T.Compose(augmentations + [self.resized_transform])

        self.triplets_global_indexes = np.empty((0, 2 + self.negs_num_per_query), dtype=np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        row = np.asarray(self.triplets_global_indexes[index], dtype=np.int64)
        side = draft_min_side(self.resize)
        query = self.query_transform(open_image(self.images_paths[row[0]], min_side=side))
        others = [self.resized_transform(open_image(self.images_paths[i], min_side=side)) for i in row[1:]]
        images = torch.stack([query] + others)
        negs = len(row) - 2
        local = torch.stack(
            [
                torch.zeros(negs, dtype=torch.long),
                torch.ones(negs, dtype=torch.long),
                torch.arange(2, 2 + negs, dtype=torch.long),
            ],
            dim=1,
        )
        return images, local, torch.from_numpy(row.copy())

    def __len__(self) -> int:
        return len(self.triplets_global_indexes)


def collate_fn(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch of TripletsDataset items -> (images (B*(2+negs), 3, H, W),
    triplets_local_indexes (B*negs, 3) indexing the batch's images, triplets_global_indexes (B, 2+negs))."""
    images = torch.cat([item[0] for item in batch])
    locals_ = []
    for i, (imgs, local, _) in enumerate(batch):
        locals_.append(local + i * imgs.shape[0])  # each sample's images follow the previous sample's
    globals_ = torch.stack([torch.as_tensor(item[2]) for item in batch])
    return images, torch.cat(locals_), globals_


class PCADataset(Dataset):
    """All ``.jpg`` below ``<datasets_folder>/<pca_dataset_folder>`` (recursive, sorted), hard-resized.

    ``dataset[i] -> (3, *resize)`` normalised tensor.
    """

    def __init__(self, datasets_folder: str, pca_dataset_folder: str, *, resize: Sequence[int] = (224, 224)) -> None:
        self.resize = _check_resize(resize)
        self.folder = os.path.join(datasets_folder, pca_dataset_folder)
        _require_folder(
            self.folder, "--pca_dataset_folder", "it is relative to --datasets_folder, e.g. 'pitts30k/images/train'."
        )
        self.images_paths = collect_jpgs(self.folder)
        if not self.images_paths:
            raise ValueError(
                f"--pca_dataset_folder {self.folder!r} contains no .jpg image: choose a folder with images."
            )

    def __getitem__(self, index: int) -> torch.Tensor:
        image = open_image(self.images_paths[index], min_side=draft_min_side(self.resize))
        return hard_resize(base_transform(image), self.resize)

    def __len__(self) -> int:
        return len(self.images_paths)
