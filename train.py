"""Train SelaVPR's adapters and heads with mined triplets (global triplet loss + local mutual-NN loss).

main is the recipe: start the run, build the data, the model and its optimiser, resume, then per epoch
train (mine triplets, then batches) and validate + checkpoint; finally test the best model. Each step
below takes explicit keyword settings: main alone reads the command line's flags.
"""

import dataclasses
import logging
import math
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

import atomic_files
import checkpoints
import commons
import datasets_ws
import dense_store
import distributed
import loss
import mining
import network
import numerics
import parser
import retrieval
import test

# Where the outputs go (logs/<save_dir>/<time>/ in the working folder) and how to put them elsewhere: an
# absolute --save_dir replaces logs/<save_dir> (os.path.join keeps the last absolute part).
MOVED_BY = (
    "Run train.py from a folder you can write to (its outputs go to logs/<save_dir>/<time>/ there), or give "
    "--save_dir an absolute path on a disk with room (the run folder is then made inside it)."
)
DISK_FULL_NOTE = (
    "Checkpoints are written to a temp name and renamed, so the last complete one (last_model.pth, to "
    "--resume from) is intact."
)


def main(args):
    start_time = datetime.now()
    # As the public train.py: cuDNN autotuning on; seeding (any --seed but -1) turns it off again so that
    # cuDNN picks the same kernels every run (a GPU training step repeats bit for bit only with
    # --deterministic: numerics.deterministic_training).
    torch.backends.cudnn.benchmark = True
    # --deterministic on a GPU sets cuBLAS's workspace variable, which must come before CUDA starts.
    deterministic_note = numerics.prepare_deterministic(device=args.device) if args.deterministic else None
    # One process unless launched by torchrun; then rank 0 alone logs to files, validates and saves.
    ctx = commons.start_run(
        args,
        os.path.join("logs", args.save_dir, start_time.strftime("%Y-%m-%d_%H-%M-%S")),
        note=args.model_settings_note,
        moved_by=MOVED_BY,
    )
    if deterministic_note:
        logging.info(deterministic_note)
    distributed.check_train_batch_size(args.train_batch_size, ctx.world_size)

    triplets_ds, val_ds, test_ds = build_datasets(
        datasets_folder=args.datasets_folder,
        dataset_name=args.dataset_name,
        resize=args.resize,
        test_method=args.test_method,
        positive_dist_threshold=args.val_positive_dist_threshold,
        query_keys_file=args.query_keys_file,
        negs_num_per_query=args.negs_num_per_query,
        train_positives_dist_threshold=args.train_positives_dist_threshold,
        augmentation=datasets_ws.QueryAugmentation(
            brightness=args.brightness,
            contrast=args.contrast,
            saturation=args.saturation,
            hue=args.hue,
            rand_perspective=args.rand_perspective,
            random_resized_crop=args.random_resized_crop,
            random_rotation=args.random_rotation,
        ),
    )
    model = network.build_model(args, device=ctx.device, train_backbone=args.train_backbone, keep_random_stream=True)
    optimizer = build_optimizer(model, optim=args.optim, lr=args.lr)
    if ctx.is_main:  # the checkpoints (and a dense store) must fit on the disk, checked before any epoch
        commons.check_free_space(
            planned_writes(
                model,
                optimizer,
                output_folder=ctx.output_folder,
                eval_sets=(val_ds, test_ds) if args.efficient_ram_testing else (),
                dense_shape=args.dense_feature_map_size,
            ),
            moved_by="give --save_dir an absolute path on a disk with room.",
        )
    miner_state = mining.MiningState(triplets_ds.queries_num)
    last_path = os.path.join(ctx.output_folder, "last_model.pth")
    best_path = os.path.join(ctx.output_folder, "best_model.pth")
    start_epoch, best = resume_training(
        args.resume,
        model=model,
        optimizer=optimizer,
        miner_state=miner_state,
        best_path=best_path,
        is_main=ctx.is_main,
        device=ctx.device,
        flags=training_flags(args, world_size=ctx.world_size),
    )
    # DDP syncs the trainable parameters' gradients; with --train_backbone the backbone's mask token is
    # trainable but never used, which DDP must be told about.
    train_model = ctx.wrap_model(model, find_unused_parameters=args.train_backbone)
    # Validation runs with the evaluation's defaults for the query preprocessing (hard_resize) and
    # majority_weight; the final test with the flags.
    val_settings = test.EvalSettings(
        rerank_num=args.rerank_num,
        recall_values=args.recall_values,
        batch_size=args.infer_batch_size,
        num_workers=args.num_workers,
        device=ctx.device,
        store_folder=ctx.store_folder() if args.efficient_ram_testing else None,
        store_dtype=args.dense_store_dtype,
        precision=args.precision,
    )
    test_settings = dataclasses.replace(
        val_settings, test_method=args.test_method, majority_weight=args.majority_weight
    )

    trainee = Trainee(model=model, train_model=train_model, optimizer=optimizer, last_path=last_path)
    mining_settings = mining.MiningSettings(
        mode=args.mining,
        queries_per_epoch=args.queries_per_epoch,
        cache_refresh_rate=args.cache_refresh_rate,
        neg_samples_num=args.neg_samples_num,
        negs_num_per_query=args.negs_num_per_query,
    )
    step = StepSettings(
        batch_size=args.train_batch_size,
        compute=numerics.Compute(precision=args.precision, deterministic=args.deterministic),
        horizontal_flip=args.horizontal_flip,
        loss_settings=loss.LossSettings(margin=args.margin, local_weight=args.local_loss_weight),
        seed=args.seed,
    )

    epochs_trained = 0
    for epoch_num in range(start_epoch, args.epochs_num):
        train_epoch(
            ctx=ctx,
            trainee=trainee,
            triplets_ds=triplets_ds,
            miner_state=miner_state,
            epoch_num=epoch_num,
            mining_settings=mining_settings,
            step=step,
            infer_batch_size=args.infer_batch_size,
            num_workers=args.num_workers,
        )
        epochs_trained += 1
        # --rerank_features patch: the validation and the test re-rank with the backbone's patch tokens.
        ranking = network.ranking_model(model, rerank_features=args.rerank_features)
        recalls = validate(ranking, val_ds, ctx=ctx, settings=val_settings)
        is_best = best.record(recalls, patience=args.patience)
        # Saved after updating the best R@5 and the patience counter, so a resume continues exactly from here.
        save_epoch(
            ctx=ctx,
            model=model,
            optimizer=optimizer,
            state=TrainingState(
                miner_state=miner_state,
                epoch_num=epoch_num,
                recalls=recalls,
                best=best,
                flags=training_flags(args, world_size=ctx.world_size),
            ),
            is_best=is_best,
            resize=args.resize,
            last_path=last_path,
            best_path=best_path,
        )
        if best.not_improved_num >= args.patience:
            logging.info(f"Performance did not improve for {best.not_improved_num} epochs. Stop training.")
            break

    logging.info(f"Best R@5: {best.best_r5:.1f}")
    logging.info(f"Trained for {epochs_trained} epochs, in total in {str(datetime.now() - start_time)[:-7]}")
    final_test(
        model,
        test_ds,
        ctx=ctx,
        best_path=best_path,
        settings=test_settings,
        rerank_features=args.rerank_features,
    )
    commons.finish(ctx)


# ------------------------------------------------------------------------------------------------
# The steps
# ------------------------------------------------------------------------------------------------


def build_datasets(
    *,
    datasets_folder: str,
    dataset_name: str,
    resize: Sequence[int],
    test_method: str,
    positive_dist_threshold: float,
    query_keys_file: str | None,
    negs_num_per_query: int,
    train_positives_dist_threshold: float,
    augmentation: datasets_ws.QueryAugmentation,
):
    """(training triplets, validation set, test set) of a data set; `augmentation`: the training queries'."""
    triplets_ds = datasets_ws.TripletsDataset(
        datasets_folder,
        dataset_name,
        "train",
        resize=resize,
        negs_num_per_query=negs_num_per_query,
        train_positives_dist_threshold=train_positives_dist_threshold,
        augmentation=augmentation,
    )
    logging.info(f"Train query set: {triplets_ds}")
    val_ds = datasets_ws.BaseDataset(
        datasets_folder,
        dataset_name,
        "val",
        resize=resize,
        positive_dist_threshold=positive_dist_threshold,
        query_keys_file=query_keys_file,
    )
    logging.info(f"Val set: {val_ds}")
    # The query protocol (--query_keys_file) applies to the final test too: on MSLS the test split is
    # the val folder, and the official protocol keeps 740 of its ~11k queries.
    test_ds = datasets_ws.BaseDataset(
        datasets_folder,
        dataset_name,
        "test",
        resize=resize,
        test_method=test_method,
        positive_dist_threshold=positive_dist_threshold,
        query_keys_file=query_keys_file,
    )
    logging.info(f"Test set: {test_ds}")
    return triplets_ds, val_ds, test_ds


def build_optimizer(model: torch.nn.Module, *, optim: str, lr: float) -> torch.optim.Optimizer:
    """Adam, or SGD (momentum 0.9, weight decay 0.001), over the trainable parameters only: adapters,
    LocalAdapt and GeM p (every weight with --train_backbone)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    logging.info(f"Trainable parameters: {sum(p.numel() for p in trainable):,}")
    if optim == "adam":
        return torch.optim.Adam(trainable, lr=lr)
    return torch.optim.SGD(trainable, lr=lr, momentum=0.9, weight_decay=0.001)


def planned_writes(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    output_folder: str,
    eval_sets: Sequence[datasets_ws.BaseDataset],
    dense_shape: Sequence[int],
) -> List[commons.PlannedWrite]:
    """What training writes below output_folder at most at one time: last_model.pth, best_model.pth and
    the temporary copy while one of them is replaced (3 checkpoints), and, with --efficient_ram_testing
    (eval_sets: the validation and test sets), the larger of their dense stores."""
    size = checkpoints.estimated_checkpoint_bytes(model, optimizer)
    writes = [
        commons.PlannedWrite(
            output_folder, 3 * size, f"checkpoints (last, best and a temporary copy, {commons.format_bytes(size)} each)"
        )
    ]
    if eval_sets:
        largest = max(eval_sets, key=lambda ds: ds.database_num + ds.queries_num)
        images = largest.database_num + largest.queries_num
        writes.append(
            commons.PlannedWrite(
                output_folder,
                dense_store.estimated_bytes(images, dense_shape),
                f"dense features of {images} images (--efficient_ram_testing)",
            )
        )
    return writes


class BestRecall:
    """The best validation R@5 so far and the number of epochs since it last improved (patience)."""

    def __init__(self, best_r5: float = 0.0, not_improved_num: int = 0) -> None:
        self.best_r5, self.not_improved_num = best_r5, not_improved_num

    def record(self, recalls: Sequence[float], *, patience: int) -> bool:
        """Take an epoch's validation recalls (R@5 is the second, or the only one); log whether it
        improved. Returns whether it is the best so far."""
        r5 = recalls[min(1, len(recalls) - 1)]
        if r5 > self.best_r5:
            logging.info(f"Improved: previous best R@5 = {self.best_r5:.1f}, current R@5 = {r5:.1f}")
            self.best_r5, self.not_improved_num = float(r5), 0
            return True
        self.not_improved_num += 1
        logging.info(
            f"Not improved: {self.not_improved_num} / {patience}: best R@5 = {self.best_r5:.1f}, current R@5 = {r5:.1f}"
        )
        return False


# The flags that decide what a training epoch does, beyond the model and the data set: a resume with
# other values trains on, but is no longer an exact continuation of the run it resumes.
CONTINUATION_FLAGS = (
    "mining",
    "cache_refresh_rate",
    "queries_per_epoch",
    "neg_samples_num",
    "negs_num_per_query",
    "train_batch_size",
    "infer_batch_size",
    "train_positives_dist_threshold",
    "optim",
    "lr",
    "margin",
    "local_loss_weight",
    "train_backbone",
    "precision",
    "deterministic",
    "seed",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "rand_perspective",
    "random_resized_crop",
    "random_rotation",
    "horizontal_flip",
)
FLAGS_KEY = "training_flags"  # the checkpoint entry that records them (plain types: weights_only loads it)


def training_flags(args, *, world_size: int) -> dict:
    """The CONTINUATION_FLAGS of this run, and its number of processes (torchrun splits each batch)."""
    flags = {name: getattr(args, name) for name in CONTINUATION_FLAGS}
    flags["processes"] = int(world_size)
    return flags


def continuation_changes(saved, current: dict) -> List[str]:
    """How this run's training flags differ from those a checkpoint recorded ("--lr 1e-05 -> 0.0001"),
    [] when equal; None when the file records none (released or older files)."""
    if not isinstance(saved, dict):
        return None
    changes = []
    for name, value in current.items():
        if name in saved and saved[name] != value:
            shown = "processes (torchrun)" if name == "processes" else f"--{name}"
            changes.append(f"{shown} {saved[name]} -> {value}")
    return changes


def resume_training(
    resume: str | None,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    miner_state: mining.MiningState,
    best_path: str,
    is_main: bool,
    device: str,
    flags: dict,
) -> Tuple[int, BestRecall]:
    """(first epoch to train, best R@5 so far): a fresh start without `resume`; else resume_from's
    (the weights were loaded by build_model), and, as the public code, a resumed run's last_model.pth
    carries that run's best model along (rank 0 copies it to best_path), so that a run that never
    improves on it tests it at the end. `device`: this process's (the CUDA random state restored is
    that GPU's).

    Rank 0 first removes the temp files that a kill while saving left beside the resume file, and logs
    whether this run, with its `flags` (training_flags), continues that run exactly."""
    if not resume:
        return 0, BestRecall()
    if is_main:
        folder = os.path.dirname(os.path.abspath(resume))
        removed = atomic_files.remove_stale_temp_files(folder, ("last_model.pth", "best_model.pth"))
        if removed:
            logging.info(
                f"Removed {len(removed)} temporary file(s) left in {folder} by a run killed while saving: "
                + ", ".join(os.path.basename(p) for p in removed)
            )
    start_epoch, best_r5, not_improved_num = resume_from(
        resume, model=model, optimizer=optimizer, miner_state=miner_state, device=device, flags=flags
    )
    resumed_best = resumed_best_model(resume)
    if resumed_best is not None and is_main:
        atomic_files.atomic_write(best_path, lambda tmp: shutil.copyfile(resumed_best, tmp))
        logging.info(f"Copied the resumed run's best model {resumed_best} to {best_path}")
    return start_epoch, BestRecall(best_r5, not_improved_num)


def mining_descriptors(
    ctx: distributed.Context,
    model: torch.nn.Module,
    triplets_ds: datasets_ws.TripletsDataset,
    *,
    batch_size: int,
    num_workers: int,
    precision: str,
) -> Callable[[np.ndarray], np.ndarray]:
    """mine_triplets' descriptors_fn: global indexes (n,) -> the model's global descriptors (n, D) of
    those images of triplets_ds (resized to the training size); each rank extracts a share."""

    def extract(indexes, _store):
        return retrieval.extract_features(
            model,
            triplets_ds,
            indexes,
            method="hard_resize",
            extraction=retrieval.Extraction(
                batch_size=batch_size, num_workers=num_workers, device=ctx.device, precision=precision
            ),
            desc="Mining features",
        )

    # torchrun: each rank's share starts on a batch boundary, so its batches are a one-process run's.
    return lambda global_indexes: distributed.extract_sharded(ctx, extract, global_indexes, batch_size=batch_size)


@dataclass(frozen=True)
class Trainee:
    """The model being trained: bare (mining, checkpoints), as trained (DDP's wrapper under torchrun, the
    same module otherwise), its optimizer, and the path of its last checkpoint (named when a loss fails)."""

    model: torch.nn.Module
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    last_path: str


@dataclass(frozen=True)
class StepSettings:
    """How each training step runs: global batches of batch_size triplets, `compute` (--precision, and
    --deterministic for the steps), a flip of the whole batch or none (--horizontal_flip), the loss (its
    triplet margin and the local loss's weight), and the run's seed (each mining loop's augmentations are
    drawn from it)."""

    batch_size: int
    compute: numerics.Compute
    horizontal_flip: bool
    loss_settings: loss.LossSettings
    seed: int


def train_epoch(
    *,
    ctx: distributed.Context,
    trainee: Trainee,
    triplets_ds: datasets_ws.TripletsDataset,
    miner_state: mining.MiningState,
    epoch_num: int,
    mining_settings: mining.MiningSettings,
    step: StepSettings,
    infer_batch_size: int,
    num_workers: int,
) -> None:
    """One epoch: mining_settings.loops_num loops, each mining cache_refresh_rate triplets with the current
    model (its descriptors extracted in batches of infer_batch_size), then training on them (train_batches,
    loaded by num_workers processes); logs the average losses."""
    logging.info(f"Start training epoch: {epoch_num:02d}")
    epoch_start = datetime.now()
    m = mining_settings
    descriptors_fn = mining_descriptors(
        ctx,
        trainee.model,
        triplets_ds,
        batch_size=infer_batch_size,
        num_workers=num_workers,
        precision=step.compute.precision,
    )
    loops_num = m.loops_num
    epoch_losses = []
    for loop_num in range(loops_num):
        logging.debug(f"Cache: {loop_num} / {loops_num}")
        ctx.sync_numpy_rng()  # torchrun: rank 0's NumPy generator decides every rank's mining draws
        mining.mine_triplets(
            triplets_ds,
            mode=m.mode,
            descriptors_fn=descriptors_fn,
            cache_refresh_rate=m.cache_refresh_rate,
            neg_samples_num=m.neg_samples_num,
            negs_num_per_query=m.negs_num_per_query,
            state=miner_state,
        )
        # torchrun: all ranks mined alike, rank 0's triplets are the reference; each rank draws its own
        # augmentations and loads its share of every global batch.
        triplets_ds.triplets_global_indexes = ctx.broadcast_array(triplets_ds.triplets_global_indexes)
        ctx.reseed_augmentations(seed=step.seed, epoch_num=epoch_num, loop_num=loop_num)
        loader = ctx.training_loader(
            triplets_ds,
            batch_size=step.batch_size,
            num_workers=num_workers,
            collate_fn=datasets_ws.collate_fn,
            pin_memory=ctx.device.startswith("cuda"),
        )
        loop_losses = train_batches(
            loader,
            ctx=ctx,
            trainee=trainee,
            step=step,
            normaliser=step.batch_size * m.negs_num_per_query,
            where=f"epoch {epoch_num}, loop {loop_num}",
            desc=f"Epoch {epoch_num:02d} loop {loop_num}",
        )
        epoch_losses += loop_losses
        g, l = np.mean(loop_losses, axis=0) if loop_losses else (float("nan"), float("nan"))
        logging.debug(f"Epoch {epoch_num:02d} loop {loop_num}: triplet loss = {g:.4f}, local loss = {l:.4f}")
    g, l = np.mean(epoch_losses, axis=0) if epoch_losses else (float("nan"), float("nan"))
    logging.info(
        f"Finished epoch {epoch_num:02d} in {str(datetime.now() - epoch_start)[:-7]}, "
        f"average epoch triplet loss = {g:.4f}, local loss = {l:.4f}"
    )


def train_batches(
    loader: torch.utils.data.DataLoader,
    *,
    ctx: distributed.Context,
    trainee: Trainee,
    step: StepSettings,
    normaliser: int,
    where: str,
    desc: str,
) -> List[Tuple[float, float]]:
    """One optimiser step per batch of `loader`; returns each global batch's (triplet loss, local loss).

    normaliser: train_batch_size * negs_num_per_query of the global batch. A non-finite loss stops
    training with a message naming `where` (e.g. "epoch 0, loop 1") and the last good checkpoint.
    step.compute.deterministic: each step runs in numerics.deterministic_training (on a GPU).
    """
    train_model, optimizer, compute, last_path = trainee.train_model, trainee.optimizer, step.compute, trainee.last_path
    train_model.train()
    losses = []
    for batch_num, (images, triplets_local_indexes, _) in enumerate(
        tqdm(loader, desc=desc, ncols=100, leave=False, disable=None)
    ):
        if step.horizontal_flip:  # the whole batch or none
            images = ctx.flip_together(images)
        with numerics.deterministic_training(enabled=compute.deterministic, device_type=torch.device(ctx.device).type):
            local_features, global_features = loss.forward_features(  # bf16 autocast with --precision bf16
                train_model, images.to(ctx.device, non_blocking=True), precision=compute.precision
            )
            global_loss, local_loss = loss.triplet_losses(
                local_features,
                global_features,
                triplets_local_indexes,
                margin=step.loss_settings.margin,
                normaliser=normaliser,
            )
            total = step.loss_settings.total(global_loss, local_loss)
            # The global batch's losses on every rank: all stop together on a bad one.
            global_value, local_value, total_value = ctx.sum_over_ranks(
                [global_loss.item(), local_loss.item(), total.item()]
            )
            if not math.isfinite(total_value):
                raise ValueError(
                    f"the training loss became {total_value} at {where}, batch {batch_num} (global {global_value}, "
                    f"local {local_value}); stopping. The last good checkpoint is "
                    f"{last_path if os.path.exists(last_path) else 'none yet'}; try a lower --lr."
                )
            optimizer.zero_grad(set_to_none=True)
            # A rank's loss is its share of the global batch's sum / (train_batch_size * negs); DDP averages
            # the ranks' gradients, so x world_size makes the update the single-process one (x 1 for one
            # process: bit-identical).
            (total * ctx.world_size).backward()
            optimizer.step()
        losses.append((global_value, local_value))
    return losses


def validate(
    model: torch.nn.Module,
    val_ds: datasets_ws.BaseDataset,
    *,
    ctx: distributed.Context,
    settings: test.EvalSettings,
) -> List[float]:
    """Re-ranking recalls on the validation set (test.evaluate with `settings`), on every rank."""
    recall_values = settings.recall_values
    result = test.evaluate(model, val_ds, settings, dist_ctx=ctx)
    # torchrun: rank 0 alone searched and re-ranked; every rank takes its recalls, so all decide alike.
    recalls = ctx.broadcast_object(result.recalls if ctx.is_main else None, long_wait=True)
    logging.info(f"Reranking recalls on val set {val_ds}: {test.recalls_to_str(recalls, recall_values)}")
    return recalls


@dataclass(frozen=True)
class TrainingState:
    """What an epoch's checkpoint records beside the weights and the optimizer: the mining cache, the
    epoch just finished, its validation recalls, the best R@5 and patience counter, and the training
    flags (training_flags) that a resume compares with its own."""

    miner_state: mining.MiningState
    epoch_num: int
    recalls: Sequence[float]
    best: BestRecall
    flags: dict


def save_epoch(
    *,
    ctx: distributed.Context,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    is_best: bool,
    resize: Sequence[int] | None,
    last_path: str,
    best_path: str,
) -> None:
    """Rank 0 writes last_path (weights, optimizer, random and mining states: a resume continues exactly
    from here) and copies it to best_path when is_best; the other ranks wait for it."""
    if ctx.is_main:
        checkpoints.save_checkpoint(
            last_path,
            model=model,
            optimizer=optimizer,
            epoch_num=state.epoch_num,
            recalls=state.recalls,
            best_r5=state.best.best_r5,
            not_improved_num=state.best.not_improved_num,
            resize=resize,
            extra={
                "rng_states": commons.get_rng_states(device=ctx.device),
                "mining_state": state.miner_state.state_dict(),
                FLAGS_KEY: dict(state.flags),
            },
        )
        if is_best:
            atomic_files.atomic_write(best_path, lambda tmp: shutil.copyfile(last_path, tmp))
    ctx.wait_for_main()


def final_test(
    model: torch.nn.Module,
    test_ds: datasets_ws.BaseDataset,
    *,
    ctx: distributed.Context,
    best_path: str,
    settings: test.EvalSettings,
    rerank_features: str = "local",
) -> None:
    """Test the best model (this run's, or the resumed run's copied at the start); without one (no epoch
    improved on the best R@5 taken from the --resume file), the weights as they are. rerank_features:
    network.ranking_model's."""
    if ctx.broadcast_object(os.path.exists(best_path) if ctx.is_main else None):
        logging.info(f"Testing the weights of {best_path}")
        if ctx.is_main:
            checkpoints.load_model_weights(model, best_path, what="best model")
    else:
        logging.info("Testing the current weights: no best_model.pth (no epoch improved on the best R@5 so far)")
    ctx.broadcast_module(model)  # the other ranks may run on machines that do not see rank 0's files
    ranking = network.ranking_model(model, rerank_features=rerank_features)
    result = test.evaluate(ranking, test_ds, settings, dist_ctx=ctx)
    if result is not None:  # rank 0
        logging.info(f"Recalls on {test_ds}: {result.summary(settings.recall_values)}")


# ------------------------------------------------------------------------------------------------
# Resuming
# ------------------------------------------------------------------------------------------------


def resumed_best_model(resume: str | None) -> str | None:
    """The best model of the run a --resume file comes from: the `best_model.pth` beside it, but only when
    the file is that run's `last_model.pth` (a released file such as SelaVPR_msls.pth is its own best, and
    an unrelated best_model.pth in the same folder must not be tested instead)."""
    if not resume or os.path.basename(resume) != "last_model.pth":
        return None
    best = os.path.join(os.path.dirname(os.path.abspath(resume)), "best_model.pth")
    return best if os.path.isfile(best) else None


def optimizer_state_layout(saved: dict, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Which run wrote a checkpoint's optimizer state: "ours" (one entry per trainable tensor, as this
    run's optimizer), "public" (the public train.py's Adam over every parameter of the model, frozen ones
    included, in one group) or "other" (fits neither)."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        return "other"
    saved_sizes = [len(g["params"]) for g in groups]
    if saved_sizes == [len(g["params"]) for g in optimizer.param_groups]:
        return "ours"
    if saved_sizes == [len(list(model.parameters()))]:
        return "public"
    return "other"


def resume_from(
    path: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    miner_state: mining.MiningState,
    device: str = "cpu",
    flags: dict | None = None,
):
    """Training state of a checkpoint (its weights were loaded by build_model): returns (start epoch,
    best R@5, patience counter) and restores optimizer, random and mining states when the file has them
    (the CUDA random state of `device`'s GPU only: see commons.set_rng_states).
    A file written by a run of another number of processes is resumed, and the log says so (the
    continuation then equals the uninterrupted run within float rounding only).

    A file written by the public train.py holds the state of an Adam built over all the model's
    parameters; the public resume never loads it, so neither do we: the optimizer starts fresh, as there.
    """
    # Mapped, not read again whole: build_model has loaded (and checked) its weights; the rest is checked here.
    checkpoint = checkpoints.load_weights_file(path, what="--resume", mmap=True, check=False)
    if "model_state_dict" in checkpoint:
        checkpoints.check_finite(
            {k: v for k, v in checkpoint.items() if k != "model_state_dict"}, path=path, what="--resume"
        )
    epoch_num = int(checkpoint.get("epoch_num", -1))
    best_r5 = float(checkpoint.get("best_r5", 0.0))
    not_improved_num = int(checkpoint.get("not_improved_num", 0))
    taken = [f"epoch_num={epoch_num}", f"best_r5={best_r5:.1f}", f"not_improved_num={not_improved_num}"]
    saved_optimizer = checkpoint.get("optimizer_state_dict")
    layout = optimizer_state_layout(saved_optimizer, model=model, optimizer=optimizer) if saved_optimizer else None
    if layout == "ours":
        try:
            optimizer.load_state_dict(saved_optimizer)
            taken.append("optimizer state")
        except ValueError as e:
            raise ValueError(
                f"--resume {path}: its optimizer state does not fit this run's trainable parameters "
                f"(--optim / --train_backbone differ?): {e}. Use --load_weights for weights only."
            ) from None
    elif layout == "public":
        logging.info(
            f"--resume {path} holds the optimizer state of the public train.py (Adam over all "
            f"{len(list(model.parameters()))} parameters, the frozen backbone included), which the "
            "public code never loads on resume: the optimizer starts fresh, as it does there"
        )
    elif layout == "other":
        sizes = (
            [len(g.get("params", [])) for g in saved_optimizer.get("param_groups", []) if isinstance(g, dict)]
            if isinstance(saved_optimizer, dict)
            else "?"
        )
        raise ValueError(
            f"--resume {path}: its optimizer state (parameter groups of {sizes} tensors) fits neither "
            f"this run's optimizer ({[len(g['params']) for g in optimizer.param_groups]} trainable "
            f"tensors) nor the public train.py's (all {len(list(model.parameters()))} parameters): "
            "check --optim / --train_backbone / --backbone, or use --load_weights for weights only."
        )
    else:
        logging.info(f"--resume {path} has no optimizer state (a released model): the optimizer starts fresh")
    if "rng_states" in checkpoint:
        taken.append(commons.set_rng_states(checkpoint["rng_states"], device=device))
    if "mining_state" in checkpoint:
        saved = mining.MiningState.from_state_dict(checkpoint["mining_state"])
        if saved.queries_num == miner_state.queries_num:
            miner_state.load_state_dict(checkpoint["mining_state"])
            taken.append("mining cache")
    logging.info(f"Resuming from {path}: took {', '.join(taken)}; training starts at epoch {epoch_num + 1}")
    changes = continuation_changes(checkpoint.get(FLAGS_KEY), flags or {})
    if changes:
        logging.warning(
            f"This run is not an exact continuation of the run that wrote --resume {path}: its training "
            f"flags changed ({'; '.join(changes)}). It trains on from that state with the new flags; give "
            "the old values to continue it exactly."
            + (
                " (Another number of processes keeps the global batches (--train_batch_size): training "
                "continues as the first run would have within float rounding, not bit for bit; with random "
                "augmentations the processes other than rank 0 draw other ones.)"
                if any(change.startswith("processes") for change in changes)
                else ""
            )
        )
    elif changes is None and flags:
        logging.info(f"--resume {path} records no training flags (a released or older file): not compared")
    return epoch_num + 1, best_r5, not_improved_num


if __name__ == "__main__":
    commons.run_main(main, parser.parse_arguments(), torchrun=True, disk_full_note=DISK_FULL_NOTE)
