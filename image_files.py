"""Reading image files and listing the images of a folder: the one place where both happen.

Pillow + numpy only (no torch), so that the picture helpers of ``visualizations.py`` can use it too.

* :func:`read_rgb` opens an image as a viewer shows it, as 8-bit RGB: EXIF orientation applied,
  16-bit / 32-bit / float grayscale scaled to 8 bits by the range their mode means, and photos above
  Pillow's pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``) read at a reduced size by JPEG draft decoding.
  Any other image (the benchmark's plain 8-bit JPEGs among them) gives exactly the pixels of
  ``Image.open(path).convert("RGB")``.
* :func:`list_images` walks a folder recursively, follows symbolic links to folders without ever
  reading a real folder twice or letting a link pull in another part of the data set, and counts
  what it skipped and why; :func:`log_listing` writes those counts to the log.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

#: A photo above Pillow's pixel limit is draft-decoded to at least this many pixels on each side
#: (callers that resize to more ask for more through ``min_side``).
DRAFT_MIN_SIDE = 1024
#: A JPEG that declares more pixels per byte of file than this cannot be a photo: Pillow's own
#: encoder needs at least 1 byte per ~85 pixels (RGB) / ~255 pixels (grayscale) even for a uniform
#: image, real photos 1 byte per 2-20 pixels. Above it the file is refused as a decompression bomb.
MAX_PIXELS_PER_BYTE = 2048
#: Suffixes of image formats, for telling "an image of another format was skipped" (a warning)
#: from "a file that is no image was skipped" (info). Compared in lower case.
IMAGE_LIKE_SUFFIXES = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".webp",
        ".tif",
        ".tiff",
        ".heic",
        ".heif",
        ".avif",
        ".bmp",
        ".gif",
        ".jp2",
        ".j2k",
        ".dng",
        ".cr2",
        ".nef",
        ".arw",
        ".raw",
        ".ppm",
        ".pgm",
    }
)
_EXIF_ORIENTATION = 0x0112


class RefusedImage(ValueError):
    """An image file that is readable in principle but refused (too large, or a decompression bomb);
    the message names the file and says what to do."""


# ----------------------------------------------------------------------------------------------
# Reading one image
# ----------------------------------------------------------------------------------------------


def _check_is_file(path: str) -> None:
    if os.path.isdir(path):
        raise IsADirectoryError(f"Image {path!r} is a folder, not an image file: give the path of an image.")
    if not os.path.isfile(path):
        if os.path.islink(path):
            raise FileNotFoundError(
                f"Image {path!r} is a broken symbolic link (it points to "
                f"{os.readlink(path)!r}, which does not exist): fix or remove the link."
            )
        raise FileNotFoundError(
            f"Image {path!r} does not exist: check the path (for a data set: was its folder "
            "changed after it was loaded?)."
        )


def _open(path: str) -> Image.Image:
    """``Image.open``, except that a JPEG above twice Pillow's pixel limit (which Image.open refuses
    as a possible decompression bomb) is opened too, unloaded, so that it can be draft-decoded.
    Nothing global (``Image.MAX_IMAGE_PIXELS``) is changed."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as bomb:
        try:
            # The JPEG plugin's constructor only parses the header; Image.open's size check is skipped.
            return JpegImagePlugin.JpegImageFile(path)
        except (SyntaxError, OSError):
            raise RefusedImage(
                f"Image {path!r} is too large to read ({bomb}) and is not a JPEG, so it cannot be read at a "
                "reduced size: downscale it (below "
                f"{Image.MAX_IMAGE_PIXELS} pixels) or save it as a JPEG."
            ) from None


def _draft_if_huge(img: Image.Image, path: str, min_side: int) -> None:
    """Above Pillow's pixel limit, ask a JPEG for a reduced decode (1/2, 1/4 or 1/8 in the DCT domain,
    the largest reduction that keeps both sides >= ``min_side``); refuse a file whose declared size is
    absurd for its byte count. Below the limit nothing happens, so the pixels are the full decode."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    pixels = width * height
    if limit is None or pixels <= limit:
        return
    if not isinstance(img, JpegImagePlugin.JpegImageFile):
        if pixels > 2 * limit:  # what Image.open would have refused; not reachable for non-JPEGs
            raise RefusedImage(f"Image {path!r} has {width}x{height} pixels and is not a JPEG: downscale it.")
        return  # between 1x and 2x the limit Pillow reads it in full (with its own warning), as before
    size = os.path.getsize(path)
    if pixels > MAX_PIXELS_PER_BYTE * max(size, 1):
        raise RefusedImage(
            f"Image {path!r} declares {width}x{height} pixels in only {size} bytes: no photo is that "
            "compressible, so this is a corrupt file or a decompression bomb. Delete it or replace it."
        )
    img.draft(None, (min(width, min_side), min(height, min_side)))
    logging.debug(
        f"{path}: {width}x{height} pixels, above Pillow's limit of {limit}: read at "
        f"{img.size[0]}x{img.size[1]} by JPEG draft decoding"
    )


def _orientation(img: Image.Image, path: str) -> int:
    """The EXIF Orientation tag (1..8; 1 when absent or unreadable: the image is then used as stored)."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as error:
        logging.debug(f"{path}: EXIF not readable ({type(error).__name__}: {error}); used as stored")
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _bit_depth(img: Image.Image) -> int | None:
    """Bits per sample the file declares (TIFF tag 258), or None when the format does not say."""
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return None
    bits = tags.get(258)
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if isinstance(bits, int) and bits > 0 else None


def to_8bit(img: Image.Image) -> Image.Image:
    """A single-channel image of more than 8 bits -> mode "L", scaled by the range its mode means.

    * ``I;16*`` (16-bit PNG / TIFF): v / 257 rounded: 0 -> 0, 65535 -> 255, and an 8-bit value widened to
      16 bits the usual way (x 257, what the PNG specification recommends) comes back exactly.
    * ``I`` (32-bit signed integer): the file's declared bit depth when it has one (TIFF), 2**bits - 1
      being white (2**31 - 1 for 32 bits, the largest value the mode holds); otherwise the 16-bit
      convention (Pillow versions before 10 read 16-bit PNGs as ``I``). Negative values are black.
    * ``F`` (32-bit float): 0.0 is black and 1.0 white; outside values are clipped, NaN is black.

    Any other mode is returned as it is (``convert("RGB")`` handles 1, L, P, LA, RGBA, CMYK, YCbCr).
    """
    mode = img.mode
    if mode.startswith("I;16"):
        values, white = np.asarray(img).astype(np.float64), 65535.0
    elif mode == "I":
        bits = _bit_depth(img) or 16
        values, white = np.asarray(img).astype(np.float64), float(2 ** min(bits, 31) - 1)
    elif mode == "F":
        values, white = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0), 1.0
    else:
        return img
    scaled = np.rint(np.clip(values, 0.0, white) * (255.0 / white)).astype(np.uint8)
    return Image.fromarray(scaled)  # uint8 (H, W) -> mode "L"


def read_rgb(path: str, *, min_side: int = DRAFT_MIN_SIDE) -> Image.Image:
    """Read an image file as an RGB PIL image, as a viewer shows it.

    Grayscale, CMYK, palette and alpha images and a PNG named .jpg are converted as
    ``convert("RGB")`` does; more-than-8-bit grayscale is scaled by :func:`to_8bit`; the EXIF
    Orientation (tags 2-8) is applied. A JPEG above Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``,
    read per call, never changed) is draft-decoded, keeping both sides >= ``min_side`` pixels (or the
    full side when smaller); every image below the limit gets its full decode, pixel for pixel.
    The pixels are decoded here (PIL is lazy) so that a truncated or corrupt file fails now, with its
    name, rather than later inside a DataLoader worker. Raises FileNotFoundError / IsADirectoryError /
    ValueError with a message naming the file.
    """
    _check_is_file(path)
    try:
        with _open(path) as img:
            _draft_if_huge(img, path, int(min_side))
            img.load()
            orientation = _orientation(img, path)
            rgb = to_8bit(img).convert("RGB")
    except RefusedImage:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ValueError(
            f"Cannot read image {path!r} ({type(e).__name__}: {e}): the file is empty, truncated or not an image. "
            "Replace it with a valid image or delete it."
        ) from e
    if orientation != 1:
        # exif_transpose reads the tag from the image's EXIF, which convert() keeps in .info: apply the
        # transposition explicitly instead, the same table as ImageOps.exif_transpose.
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    return rgb


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# ----------------------------------------------------------------------------------------------
# Listing the images of a folder
# ----------------------------------------------------------------------------------------------


@dataclass
class Listing:
    """What :func:`list_images` found below ``folder``.

    paths: the accepted files, sorted with ``sorted()`` on the full path strings.
    skipped_suffixes: suffix as written ('' for none) -> number of files not read because of their name.
    hidden: entries (files or folders) skipped because their name starts with '.'.
    folder_links: links to folders that were followed; file_links: accepted files that are links.
    skipped_links: (link path, why) of the links to folders that were NOT followed.
    broken_links: links (not named like an accepted image) whose target does not exist.
    unreadable: folders that could not be listed (permissions), skipped as os.walk does.
    """

    folder: str
    paths: list[str] = field(default_factory=list)
    skipped_suffixes: Counter = field(default_factory=Counter)
    hidden: int = 0
    folder_links: int = 0
    file_links: int = 0
    skipped_links: list[tuple[str, str]] = field(default_factory=list)
    broken_links: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def is_inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it, as strings (resolve links first where they matter)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def broken_link_hint(folder: str) -> str:
    """'' unless ``folder`` is a symbolic link whose target does not exist; then what it points to and how
    to fix it (e.g. the MSLS ``test -> /absolute/.../val`` link left dangling after the data set moved)."""
    if not os.path.islink(folder) or os.path.exists(folder):
        return ""
    target = os.readlink(folder)
    parent, name = os.path.split(os.path.abspath(folder))
    same_name = os.path.join(parent, os.path.basename(target.rstrip(os.sep)))
    hint = (
        f"{folder!r} is a broken symbolic link: it points to {target!r}, which does not exist "
        "(an absolute link breaks when the folders are moved). "
    )
    if os.path.basename(target.rstrip(os.sep)) != name and os.path.isdir(same_name):
        rel = os.path.basename(same_name)
        return hint + (
            f"Its target's name {rel!r} is a folder next to it: replace the link by a relative one, "
            f"`cd {parent} && ln -sfn {rel} {name}`."
        )
    return hint + f"Point it to the folder's new place: `ln -sfn NEW_PLACE {os.path.abspath(folder)}`."


def list_images(folder: str, *, accept: Callable[[str], bool], protect: Iterable[str] = ()) -> Listing:
    """Every file below ``folder`` whose name ``accept`` s, recursively, hidden names skipped.

    Links to files are read like files. A link to a folder is followed unless its real target
      * overlaps ``folder`` or one of the ``protect`` folders (the target is inside one of them, or
        contains one): inside ``folder`` its images are read through their own path anyway, and a link
        into the split's other part (the queries, for the database) or to a folder above would mix in
        images that do not belong here;
      * contains the folder the link sits in (or one it was reached through): a loop;
      * was already read (two links to one folder, or a link to a folder that is read directly).
    So every real folder is read at most once, and a link to a folder elsewhere (data on another
    drive) is followed. For a tree without folder links the result is the same list as
    ``os.walk(folder, followlinks=True)`` gave, sorted. Folders are entered in name order, so which of
    two links to one folder is followed does not depend on the file system.
    Raises FileNotFoundError for an accepted name that is a broken link (it could not be read later).
    """
    listing = Listing(folder=folder)
    root_real = os.path.realpath(folder)
    protected = [root_real] + [os.path.realpath(p) for p in protect]
    visited: set[str] = set()

    def why_not(link: str, target: str, chain: list[str]) -> str | None:
        if is_inside(target, root_real):
            return f"it points to {target}, inside the folder being read (its images are read there)"
        for other in protected:
            if is_inside(other, target):
                return f"it points to {target}, which contains {other} (a loop, or images of other parts)"
            if is_inside(target, other):
                return f"it points to {target}, inside {other}, a folder whose images do not belong here"
        for above in chain:
            if is_inside(above, target):
                return f"it points to {target}, which contains the folder it sits in (a loop)"
        if target in visited:
            return f"it points to {target}, which is already read through another path"
        return None

    def walk(logical: str, chain: list[str]) -> None:
        visited.add(chain[-1])
        try:
            with os.scandir(logical) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            listing.unreadable.append(logical)
            return
        for entry in entries:
            name, path = entry.name, os.path.join(logical, entry.name)
            if name.startswith("."):
                listing.hidden += 1
                continue
            try:
                is_link = entry.is_symlink()
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_link, is_dir = False, False
            if is_link and not os.path.exists(path):
                if accept(name):
                    raise FileNotFoundError(
                        f"Image {path!r} is a broken symbolic link (it points to {os.readlink(path)!r}, which does "
                        "not exist): fix the link or remove it."
                    )
                listing.broken_links.append(path)
                continue
            if is_dir:
                target = os.path.realpath(path)
                reason = (
                    why_not(path, target, chain)
                    if is_link
                    else (f"{target} was already read through a link" if target in visited else None)
                )
                if reason is not None:
                    listing.skipped_links.append((path, reason))
                    continue
                listing.folder_links += is_link
                walk(path, chain + [target])
            elif accept(name):
                listing.paths.append(path)
                listing.file_links += is_link
            else:
                listing.skipped_suffixes[os.path.splitext(name)[1]] += 1

    if os.path.isdir(folder):
        walk(folder, [root_real])
    listing.paths.sort()
    return listing


def log_listing(listing: Listing, *, rule: str) -> None:
    """One info line with the counts; a warning for skipped image files, skipped or broken links.

    rule: which names are read, for the messages (e.g. "only names ending in .jpg are read").
    """
    parts = [f"{len(listing.paths)} images"]
    if listing.folder_links or listing.file_links:
        parts.append(f"through {listing.folder_links} followed folder links and {listing.file_links} file links")
    skipped = sum(listing.skipped_suffixes.values())
    if skipped:
        kinds = ", ".join(f"{n} {s or '(no suffix)'}" for s, n in sorted(listing.skipped_suffixes.items()))
        parts.append(f"skipped {skipped} files by their name ({kinds}; {rule})")
    if listing.hidden:
        parts.append(f"skipped {listing.hidden} hidden entries (name starting with '.')")
    if listing.skipped_links:
        parts.append(f"did not enter {len(listing.skipped_links)} linked folders (each real folder is read once)")
    logging.info(f"Listed {listing.folder}: {'; '.join(parts)}")
    images = {s: n for s, n in listing.skipped_suffixes.items() if s.lower() in IMAGE_LIKE_SUFFIXES}
    if images:
        kinds = ", ".join(f"{n} {s}" for s, n in sorted(images.items()))
        logging.warning(
            f"{listing.folder}: {sum(images.values())} image files were skipped ({kinds}): {rule}. "
            "Convert or rename them to have them read."
        )
    for link, reason in listing.skipped_links[:10]:
        logging.warning(f"Did not enter {link}: {reason}")
    if len(listing.skipped_links) > 10:
        logging.warning(f"... and {len(listing.skipped_links) - 10} more folders not entered")
    if listing.broken_links:
        logging.warning(
            f"{listing.folder}: skipped {len(listing.broken_links)} broken symbolic links, e.g. "
            f"{listing.broken_links[0]}"
        )
    if listing.unreadable:
        logging.warning(
            f"{listing.folder}: could not list {len(listing.unreadable)} folders (permissions?), "
            f"e.g. {listing.unreadable[0]}"
        )
