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
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from sklearn.neighbors import NearestNeighbors
from torch.utils.data import Dataset

import image_files

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def base_transform(image: Image.Image) -> torch.Tensor:
    """PIL image (RGB) -> normalised float tensor (3, H, W): torchvision's ToTensor() then
    Normalize(IMAGENET_MEAN, IMAGENET_STD), step for step (bytes / 255 in float32, then subtract the mean
    and divide by the std, per channel), so the values are bit-identical (tests compare them).

    Written out in torch rather than imported: evaluation needs nothing else of torchvision, whose import
    alone costs about 170 MB of resident memory (the training transforms import it when they are built).
    """
    if image.mode != "RGB":  # open_image always gives RGB; anything else takes torchvision's own path
        import torchvision.transforms as T

        return T.Compose([T.ToTensor(), T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])(image)
    array = np.array(image, dtype=np.uint8, copy=True)
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous().to(dtype=torch.get_default_dtype()).div(255)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


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


# ----------------------------------------------------------------------------------------------
# Query key lists (--query_keys_file): the MSLS-val protocol
# ----------------------------------------------------------------------------------------------

#: Key lists that ship with the project (data/README.md says where each comes from), by the short name
#: --query_keys_file accepts instead of a path. A name wins over a file of the same name in the working
#: folder (give ./NAME for that one).
DATA_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
BUILTIN_QUERY_KEYS = {"msls_val_740": os.path.join(DATA_FOLDER, "msls_val_740_keys.txt")}
#: The built-in list whose complete match is "the official MSLS-val protocol".
OFFICIAL_MSLS_KEYS = "msls_val_740"


def query_keys_path(value: str) -> str:
    """The file of a --query_keys_file value: a built-in list's file for its name, else the value itself."""
    return BUILTIN_QUERY_KEYS.get(value, value)


def read_query_keys(value: str) -> list[str]:
    """The keys of a --query_keys_file (a built-in name or a path), whitespace-separated, as editors save
    them: UTF-8 with or without a byte-order mark (Windows Notepad writes one), UTF-16 with its mark
    ("Unicode" in Notepad), any line ends (CRLF included). Order kept, duplicates dropped."""
    path = query_keys_path(value)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--query_keys_file {value!r} does not exist: give the path of the whitespace-separated list of "
            f"query keys, or a built-in list by name ({', '.join(BUILTIN_QUERY_KEYS)})."
        )
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            text = raw.decode("utf-16")  # the mark tells the byte order and is dropped
        else:
            text = raw.decode("utf-8-sig")  # a UTF-8 mark is dropped, its absence is fine
    except UnicodeDecodeError as e:
        raise ValueError(
            f"--query_keys_file {path!r} is not a text file (UTF-8 or UTF-16) ({e.reason} at byte {e.start}): "
            "give a plain text list of query keys."
        ) from None
    keys = list(dict.fromkeys(text.split()))
    if not keys:
        raise ValueError(f"--query_keys_file {path!r} holds no key: give a list of query keys, one per line.")
    return keys


def builtin_keys_name(keys: Sequence[str]) -> str | None:
    """The name of the built-in list with exactly these keys (given by name or as a copy), else None."""
    for name in BUILTIN_QUERY_KEYS:
        if set(read_query_keys(name)) == set(keys):
            return name
    return None


@dataclass(frozen=True)
class QueryKeys:
    """What a --query_keys_file kept: the list (`source` as given; `builtin`: the name of the built-in list
    it equals, else None), how many of its keys matched a query image of the folder, the queries kept and
    in the folder, and a few unmatched keys for the messages."""

    source: str
    builtin: str | None
    keys_num: int
    found_num: int
    kept_num: int
    folder_num: int
    unmatched: tuple

    @property
    def official(self) -> bool:
        """The official MSLS-val protocol: every key of the official list has its query image here."""
        return self.builtin == OFFICIAL_MSLS_KEYS and self.found_num == self.keys_num

    def describe(self) -> str:
        """One line for logs and tables, e.g. "official MSLS-val protocol (the 740 keys of msls_val_740)"."""
        listed = f"kept {self.kept_num} of {self.folder_num} queries"
        if self.official:
            return f"official MSLS-val protocol (all {self.keys_num} keys of {self.builtin} found; {listed})"
        if self.builtin == OFFICIAL_MSLS_KEYS:
            return (
                f"PARTIAL MSLS-val protocol: only {self.found_num} of the {self.keys_num} keys of "
                f"{self.builtin} have a query image here ({listed})"
            )
        return f"query keys listed in {self.source}: {self.found_num} of its {self.keys_num} keys found ({listed})"


def missing_positives_warning(
    database_utms: np.ndarray,
    queries_utms: np.ndarray,
    positives: Sequence[np.ndarray],
    *,
    threshold: float,
    where: str,
) -> str | None:
    """The warning for a data set where more than half the queries have no database image within the
    positives' radius (their recalls are 0 whatever the model): how many (or "every query"), the distance
    from a few of them to their nearest database image, and the likely causes. None otherwise."""
    missing = [q for q, p in enumerate(positives) if len(p) == 0]
    if not positives or 2 * len(missing) <= len(positives):
        return None
    shown = missing[:3]
    knn = NearestNeighbors(n_neighbors=1).fit(database_utms)
    nearest = knn.kneighbors(queries_utms[shown], return_distance=True)[0][:, 0]
    who = (
        f"Every query ({len(positives)}) of {where} has"
        if len(missing) == len(positives)
        else f"{len(missing)} of the {len(positives)} queries of {where} have"
    )
    distances = ", ".join(f"{d:,.1f} m" for d in nearest)
    return (
        f"{who} no database image within --val_positive_dist_threshold {threshold:g} m "
        f"(nearest database image of the first {len(shown)}: {distances}): their recalls are 0 whatever the "
        "model. Likely causes: UTM easting and northing swapped in the file names, database and queries in "
        "different UTM zones or coordinate systems, or a threshold too small for this data set."
    )


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

    #: Warn when most queries have no positive (missing_positives_warning). The training split checks
    #: its hard positives itself (TripletsDataset).
    WARN_MISSING_POSITIVES = True

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
        self.query_keys: QueryKeys | None = None
        if query_keys_file is not None:
            queries_paths = self._keep_listed_queries(queries_paths, query_keys_file)
        elif dataset_name.lower().startswith("msls") and split != "train":
            logging.info(
                f"Evaluating all {len(queries_paths)} queries of {queries_folder} (no --query_keys_file): "
                f"the official MSLS-val protocol uses only its 740 listed queries (--query_keys_file "
                f"{OFFICIAL_MSLS_KEYS})."
            )
        self.queries_paths = queries_paths

        self.database_utms = np.array([read_utm(p) for p in self.database_paths], dtype=np.float64).reshape(-1, 2)
        self.queries_utms = np.array([read_utm(p) for p in self.queries_paths], dtype=np.float64).reshape(-1, 2)
        self.soft_positives_per_query = radius_positives(self.database_utms, self.queries_utms, positive_dist_threshold)
        if self.WARN_MISSING_POSITIVES:
            warning = missing_positives_warning(
                self.database_utms,
                self.queries_utms,
                self.soft_positives_per_query,
                threshold=positive_dist_threshold,
                where=f"{dataset_name}/{split}",
            )
            if warning:
                logging.warning(warning)

        self.database_num = len(self.database_paths)
        self.queries_num = len(self.queries_paths)
        self.images_paths = list(self.database_paths) + list(self.queries_paths)

    def _keep_listed_queries(self, queries_paths: list[str], query_keys_file: str) -> list[str]:
        """MSLS-val protocol: only the queries whose key (field 7) is in ``query_keys_file`` (a path or a
        built-in list's name); self.query_keys says what was kept, and the log says it too: the official
        protocol only when every key of the official list was found, a warning with the unmatched keys
        otherwise."""
        keys = read_query_keys(query_keys_file)
        listed = set(keys)
        kept = [p for p in queries_paths if _query_key(p) in listed]
        if not kept:
            raise ValueError(
                f"None of the {len(queries_paths)} queries has a key listed in --query_keys_file "
                f"{query_keys_file!r} ({len(keys)} keys): check that the file belongs to this data set."
            )
        found = {_query_key(p) for p in kept}
        unmatched = [k for k in keys if k not in found]
        self.query_keys = QueryKeys(
            source=query_keys_path(query_keys_file),
            builtin=query_keys_file if query_keys_file in BUILTIN_QUERY_KEYS else builtin_keys_name(keys),
            keys_num=len(keys),
            found_num=len(found),
            kept_num=len(kept),
            folder_num=len(queries_paths),
            unmatched=tuple(unmatched[:5]),
        )
        logging.info(f"Query protocol: {self.query_keys.describe()}")
        if unmatched:
            logging.warning(
                f"{len(unmatched)} of the {len(keys)} keys of --query_keys_file {query_keys_file} match no "
                f"query image of {self.split} (e.g. {', '.join(unmatched[:5])}): those queries are missing "
                "from this evaluation, so its recalls are not those of the full list."
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

    WARN_MISSING_POSITIVES = False  # queries without a hard positive are dropped, and none left is an error

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

        import torchvision.transforms as T  # here: the evaluation needs no torchvision (see base_transform)

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
