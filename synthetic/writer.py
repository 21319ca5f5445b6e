"""Writing the synthetic data set: generation, the manifest, and atomic publishing.

For each split, ``_write_split`` plans the shots, checks that every query lies within
``HARD_POSITIVE_RADIUS_M`` of a database image, plans the buildings, draws each route's scene once
and saves every shot of that route as a JPEG. The whole set is built in a hidden temporary folder
beside the target and renamed into place only when complete, so an interrupted run never leaves a
half data set behind. ``ensure_dataset`` reuses an existing set only when its manifest records the
same options, and is safe when several processes call it at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .buildings import plan_buildings
from .camera import make_geometry
from .geometry import min_distances
from .options import DEFAULT_OPTIONS, OptionError, SyntheticOptions, resolve_options
from .plan import HARD_POSITIVE_RADIUS_M, SPLITS, plan_split, split_rng
from .scene import render_route_scene
from .views import make_noise_bank, render_shot

MANIFEST_NAME = "synthetic_dataset.json"


def _check_name(datasets_folder: str, dataset_name: str) -> Path:
    """The target ``<datasets_folder>/<dataset_name>``, once both are known to be usable names."""
    if (
        not isinstance(dataset_name, str)
        or not dataset_name
        or dataset_name.startswith(".")
        or "/" in dataset_name
        or os.sep in dataset_name
        or dataset_name in ("..",)
    ):
        raise OptionError(
            f"--dataset_name must be a plain folder name (no '/', not starting with '.'), got {dataset_name!r}"
        )
    if not datasets_folder:
        raise OptionError("--datasets_folder is empty: give the folder that holds the data sets")
    folder = Path(datasets_folder)
    if folder.exists() and not folder.is_dir():
        raise OptionError(f"--datasets_folder {datasets_folder!r} exists and is not a folder")
    return folder / dataset_name


def _write_split(root: Path, params: dict, split: str) -> dict:
    """Render one split into ``root``; returns its manifest entry."""
    seed = params["seed"]
    g = make_geometry(tuple(params["image_size"]))
    plan = plan_split(
        seed=seed,
        split=split,
        database_num=params[f"{split}_database_num"],
        queries_num=params[f"{split}_queries_num"],
        routes_num=params["routes_per_split"][split],
        db_spacing_m=params["db_spacing_m"],
        night_fraction=params["night_fraction"],
        sideways_fraction=params["sideways_fraction"],
    )
    # The generator guarantees what the training code relies on; fail loudly if it ever does not.
    q = np.array([[s.east, s.north] for s in plan.queries])
    d = np.array([[s.east, s.north] for s in plan.database])
    nearest = min_distances(q, d)
    if nearest.max() > HARD_POSITIVE_RADIUS_M:
        raise RuntimeError(f"internal error: a {split} query is {nearest.max():.1f} m from the database")
    buildings, lookalikes = plan_buildings(
        seed=seed, split=split, routes=plan.routes, margin_m=g.margin_m, lookalikes_per_km=params["lookalikes_per_km"]
    )
    for kind in ("database", "queries"):
        (root / "images" / split / kind).mkdir(parents=True, exist_ok=True)
    noise_bank = make_noise_bank(split_rng(seed, split, 7), (g.height, g.width))
    for r, route in enumerate(plan.routes):
        scene = render_route_scene(seed=seed, split=split, route_index=r, route=route, buildings=buildings[r], g=g)
        for shot in [s for s in plan.database + plan.queries if s.route == r]:
            rng = split_rng(seed, split, 6, 0 if shot.kind == "database" else 1, shot.index)
            image = render_shot(scene, g, shot, rng, noise_bank)
            image.save(root / "images" / split / shot.kind / shot.name, format="JPEG", quality=params["jpeg_quality"])
    return dict(
        database_num=len(plan.database),
        queries_num=len(plan.queries),
        night_queries=sum(s.night for s in plan.queries),
        sideways_queries=sum(s.sideways for s in plan.queries),
        max_query_to_database_m=round(float(nearest.max()), 2),
        routes=[
            dict(length_m=round(r.length, 2), start_utm=[round(float(v), 2) for v in r.vertices[0]])
            for r in plan.routes
        ],
        lookalikes=lookalikes,
    )


def _build_into(temp_root: Path, params: dict) -> None:
    manifest = dict(params=params, splits={})
    for split in SPLITS:
        manifest["splits"][split] = _write_split(temp_root, params, split)
    with open(temp_root / MANIFEST_NAME, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")


def _publish(temp_root: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished ``temp_root`` to ``target`` (atomic on one file system)."""
    if target.exists() and overwrite:
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, trash / "old")
        os.rename(temp_root, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(temp_root, target)  # fails if another process published first


def generate(
    datasets_folder: str,
    dataset_name: str = "synthetic",
    options: SyntheticOptions = DEFAULT_OPTIONS,
    *,
    overwrite: bool = False,
) -> Path:
    """Generate the data set and return its root ``<datasets_folder>/<dataset_name>``.

    Written into a hidden temporary folder beside the target and renamed into place when complete. An
    existing target is an error unless ``overwrite`` (then it is replaced only once the new set is
    complete).
    """
    params = resolve_options(options)
    target = _check_name(datasets_folder, dataset_name)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists: pass --overwrite (overwrite=True) to replace it, "
            f"choose another --dataset_name, or use --if_missing (ensure_dataset) to reuse it"
        )
    return _generate_params(target, params, overwrite=overwrite)


def _generate_params(target: Path, params: dict, *, overwrite: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp_root = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(temp_root, 0o755)  # mkdtemp makes it private; the published data set should not be
    try:
        _build_into(temp_root, params)
        _publish(temp_root, target, overwrite)
    except BaseException:
        shutil.rmtree(temp_root, ignore_errors=True)
        raise
    return target


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest (``params``, ``splits``) of a generated data set root."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {root} was not made by synthetic_dataset.py "
            f"(or is incomplete); delete it or choose another --dataset_name"
        )
    with open(path) as f:
        return json.load(f)


def ensure_dataset(
    datasets_folder: str, dataset_name: str = "synthetic", options: SyntheticOptions = DEFAULT_OPTIONS
) -> Path:
    """Return the data set root, generating it first (as :func:`generate`) when it does not exist yet.

    An existing folder is reused only when its manifest records the same options; otherwise an
    OptionError (a ValueError) says what differs. Safe when several processes call it at once: each
    builds privately and the first rename wins. A folder is only ever published complete, so an
    interrupted run leaves nothing that this function would trust (at most a hidden ``.NAME.tmp-*``
    folder when the process was killed outright, which can be deleted).
    """
    params = resolve_options(options)
    target = _check_name(datasets_folder, dataset_name)
    if not target.exists():
        try:
            return _generate_params(target, params, overwrite=False)
        except OSError:
            if not target.exists():  # not a lost race: a real error
                raise
    existing = read_manifest(target)["params"]
    if existing != params:
        diff = sorted(k for k in set(existing) | set(params) if existing.get(k) != params.get(k))
        raise OptionError(
            f"{target} was generated with other options ({', '.join(diff)} differ: "
            f"{ {k: existing.get(k) for k in diff} } vs requested { {k: params.get(k) for k in diff} }); "
            "delete it, pass the same options, or choose another --dataset_name"
        )
    return target
