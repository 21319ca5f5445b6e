"""Train SelaVPR's adapters and heads with mined triplets (global triplet loss + local mutual-NN loss)."""
import logging
import math
import os
import shutil
from datetime import datetime

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader
from tqdm import tqdm

import atomic_files
import commons
import datasets_ws
import distributed
import loss
import mining
import network
import parser
import test


def main(args):
    start_time = datetime.now()
    output_folder = os.path.join("logs", args.save_dir, start_time.strftime("%Y-%m-%d_%H-%M-%S"))
    # As the public train.py: cuDNN autotuning on; seeding (any --seed but -1) turns it off again so that
    # runs are deterministic.
    torch.backends.cudnn.benchmark = True
    # One process unless launched by torchrun; then rank 0 alone logs to files, validates and saves.
    ctx = commons.start_run(args, output_folder)
    device = ctx.device  # --device, or under torchrun this process's own GPU
    if ctx.enabled:
        distributed.check_train_batch_size(args.train_batch_size, ctx.world_size)

    # Data: training triplets, validation and test sets.
    triplets_ds = datasets_ws.TripletsDataset(
        args.datasets_folder, args.dataset_name, "train", resize=args.resize,
        negs_num_per_query=args.negs_num_per_query,
        train_positives_dist_threshold=args.train_positives_dist_threshold,
        brightness=args.brightness, contrast=args.contrast, saturation=args.saturation, hue=args.hue,
        rand_perspective=args.rand_perspective, random_resized_crop=args.random_resized_crop,
        random_rotation=args.random_rotation)
    logging.info(f"Train query set: {triplets_ds}")
    val_ds = datasets_ws.BaseDataset(args.datasets_folder, args.dataset_name, "val", resize=args.resize,
                                     positive_dist_threshold=args.val_positive_dist_threshold,
                                     query_keys_file=args.query_keys_file)
    logging.info(f"Val set: {val_ds}")
    # The query protocol (--query_keys_file) applies to the final test too: on MSLS the test split is
    # the val folder, and the official protocol keeps 740 of its ~11k queries.
    test_ds = datasets_ws.BaseDataset(args.datasets_folder, args.dataset_name, "test", resize=args.resize,
                                      test_method=args.test_method,
                                      positive_dist_threshold=args.val_positive_dist_threshold,
                                      query_keys_file=args.query_keys_file)
    logging.info(f"Test set: {test_ds}")

    # Model and optimiser: only adapters, LocalAdapt and GeM p train (all weights with --train_backbone).
    model = network.build_model(args, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    logging.info(f"Trainable parameters: {sum(p.numel() for p in trainable):,}")
    if args.optim == "adam":
        optimizer = torch.optim.Adam(trainable, lr=args.lr)
    else:
        optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=0.9, weight_decay=0.001)
    miner_state = mining.MiningState(triplets_ds.queries_num)

    last_path = os.path.join(output_folder, "last_model.pth")
    best_path = os.path.join(output_folder, "best_model.pth")

    # Resume: weights were loaded by build_model; continue after the saved epoch.
    start_epoch, best_r5, not_improved_num = 0, 0.0, 0
    if args.resume:
        start_epoch, best_r5, not_improved_num = resume_from(args.resume, model=model, optimizer=optimizer,
                                                             miner_state=miner_state)
        # As the public code: resuming a run's last_model.pth carries that run's best model along, so a
        # run that never improves on it tests it at the end.
        resumed_best = resumed_best_model(args.resume)
        if resumed_best is not None and ctx.is_main:
            atomic_files.atomic_write(best_path, lambda tmp: shutil.copyfile(resumed_best, tmp))
            logging.info(f"Copied the resumed run's best model {resumed_best} to {best_path}")

    # DDP syncs the trainable parameters' gradients; with --train_backbone the backbone's mask token is
    # trainable but never used, which DDP must be told about.
    train_model = ctx.wrap_model(model, find_unused_parameters=args.train_backbone)
    eval_kwargs = dict(rerank_num=args.rerank_num, recall_values=args.recall_values,
                       batch_size=args.infer_batch_size, num_workers=args.num_workers, device=device,
                       efficient_ram_testing=args.efficient_ram_testing, precision=args.precision, dist_ctx=ctx)
    r5_index = min(1, len(args.recall_values) - 1)
    loops_num = args.queries_per_epoch // args.cache_refresh_rate
    normaliser = args.train_batch_size * args.negs_num_per_query

    def descriptors_fn(global_indexes):
        def extract(indexes, _store):
            return test.extract_features(model, triplets_ds, indexes, method="hard_resize",
                                         batch_size=args.infer_batch_size, num_workers=args.num_workers,
                                         device=device, precision=args.precision, desc="Mining features")
        return distributed.extract_sharded(ctx, extract, global_indexes)  # each rank extracts a share

    for epoch_num in range(start_epoch, args.epochs_num):
        logging.info(f"Start training epoch: {epoch_num:02d}")
        epoch_start = datetime.now()
        epoch_losses = []
        for loop_num in range(loops_num):
            logging.debug(f"Cache: {loop_num} / {loops_num}")
            ctx.sync_numpy_rng()  # torchrun: rank 0's NumPy generator decides every rank's mining draws
            mining.mine_triplets(triplets_ds, mode=args.mining, descriptors_fn=descriptors_fn,
                                 cache_refresh_rate=args.cache_refresh_rate, neg_samples_num=args.neg_samples_num,
                                 negs_num_per_query=args.negs_num_per_query, state=miner_state)
            if ctx.enabled:
                # All ranks mined alike; rank 0's triplets are the reference. Each rank loads its share of
                # every global batch of --train_batch_size queries.
                triplets_ds.triplets_global_indexes = ctx.broadcast_array(triplets_ds.triplets_global_indexes)
                ctx.reseed_augmentations(seed=args.seed, epoch_num=epoch_num, loop_num=loop_num)
                loader = DataLoader(triplets_ds, batch_sampler=distributed.BatchShardSampler(
                                        samples_num=len(triplets_ds), batch_size=args.train_batch_size,
                                        rank=ctx.rank, world_size=ctx.world_size),
                                    num_workers=args.num_workers, collate_fn=datasets_ws.collate_fn,
                                    pin_memory=device.startswith("cuda"))
            else:
                loader = DataLoader(triplets_ds, batch_size=args.train_batch_size, shuffle=False, drop_last=True,
                                    num_workers=args.num_workers, collate_fn=datasets_ws.collate_fn,
                                    pin_memory=device.startswith("cuda"))
            train_model.train()
            loop_losses = []
            for batch_num, (images, triplets_local_indexes, _) in enumerate(
                    tqdm(loader, desc=f"Epoch {epoch_num:02d} loop {loop_num}", ncols=100, leave=False,
                         disable=None)):
                if args.horizontal_flip:  # the whole batch or none
                    images = ctx.flip_together(images) if ctx.enabled else T.RandomHorizontalFlip()(images)
                local_features, global_features = loss.forward_features(  # bf16 autocast with --precision bf16
                    train_model, images.to(device, non_blocking=True), precision=args.precision)
                global_loss, local_loss = loss.triplet_losses(local_features, global_features,
                                                              triplets_local_indexes, margin=args.margin,
                                                              normaliser=normaliser)
                total = global_loss + local_loss
                if ctx.enabled:  # the global batch's losses on every rank: all stop together on a bad one
                    global_value, local_value = ctx.sum_over_ranks([global_loss.item(), local_loss.item()])
                    total_value = global_value + local_value
                else:
                    global_value, local_value, total_value = global_loss.item(), local_loss.item(), total.item()
                if not math.isfinite(total_value):
                    raise ValueError(
                        f"the training loss became {total_value} at epoch {epoch_num}, loop {loop_num}, batch "
                        f"{batch_num} (global {global_value}, local {local_value}); stopping. "
                        f"The last good checkpoint is {last_path if os.path.exists(last_path) else 'none yet'}; "
                        "try a lower --lr.")
                optimizer.zero_grad(set_to_none=True)
                # A rank's loss is its share of the global batch's sum / (train_batch_size * negs); DDP
                # averages the ranks' gradients, so x world_size makes the update the single-process one
                # (x 1 for one process: bit-identical).
                (total * ctx.world_size).backward()
                optimizer.step()
                loop_losses.append((global_value, local_value))
            epoch_losses += loop_losses
            g, l = np.mean(loop_losses, axis=0) if loop_losses else (float("nan"), float("nan"))
            logging.debug(f"Epoch {epoch_num:02d} loop {loop_num}: triplet loss = {g:.4f}, local loss = {l:.4f}")

        g, l = np.mean(epoch_losses, axis=0) if epoch_losses else (float("nan"), float("nan"))
        logging.info(f"Finished epoch {epoch_num:02d} in {str(datetime.now() - epoch_start)[:-7]}, "
                     f"average epoch triplet loss = {g:.4f}, local loss = {l:.4f}")

        result = test.evaluate(model, val_ds, **eval_kwargs)
        # torchrun: rank 0 alone searched and re-ranked; every rank takes its recalls, so all decide alike.
        recalls = ctx.broadcast_object(result.recalls if ctx.is_main else None, long_wait=True)
        logging.info(f"Reranking recalls on val set {val_ds}: {test.recalls_to_str(recalls, args.recall_values)}")
        is_best = recalls[r5_index] > best_r5
        if is_best:
            logging.info(f"Improved: previous best R@5 = {best_r5:.1f}, current R@5 = {recalls[r5_index]:.1f}")
            best_r5, not_improved_num = float(recalls[r5_index]), 0
        else:
            not_improved_num += 1
            logging.info(f"Not improved: {not_improved_num} / {args.patience}: best R@5 = {best_r5:.1f}, "
                         f"current R@5 = {recalls[r5_index]:.1f}")
        # Saved after updating best_r5 / not_improved_num, so a resume continues exactly from here.
        if ctx.is_main:
            network.save_checkpoint(last_path, model=model, optimizer=optimizer, epoch_num=epoch_num,
                                    recalls=recalls, best_r5=best_r5, not_improved_num=not_improved_num,
                                    resize=args.resize, extra={"rng_states": commons.get_rng_states(),
                                           "mining_state": miner_state.state_dict()})
            if is_best:
                atomic_files.atomic_write(best_path, lambda tmp: shutil.copyfile(last_path, tmp))
        ctx.wait_for_main()
        if not_improved_num >= args.patience:
            logging.info(f"Performance did not improve for {not_improved_num} epochs. Stop training.")
            break

    logging.info(f"Best R@5: {best_r5:.1f}")
    logging.info(f"Trained for {epoch_num + 1 - start_epoch if args.epochs_num > start_epoch else 0} epochs, "
                 f"in total in {str(datetime.now() - start_time)[:-7]}")

    # Test the best model (this run's, or the resumed run's copied at the start); without one (no epoch
    # improved on the best R@5 taken from the --resume file), the weights as they are.
    if ctx.broadcast_object(os.path.exists(best_path) if ctx.is_main else None):
        logging.info(f"Testing the weights of {best_path}")
        if ctx.is_main:
            network.load_model_weights(model, best_path, what="best model")
    else:
        logging.info("Testing the current weights: no best_model.pth (no epoch improved on the best R@5 so far)")
    ctx.broadcast_module(model)  # the other ranks may run on machines that do not see rank 0's files
    result = test.evaluate(model, test_ds, test_method=args.test_method, majority_weight=args.majority_weight,
                           **eval_kwargs)
    if result is not None:  # rank 0
        logging.info(f"Recalls on {test_ds}: {result.summary(args.recall_values)}")
    commons.finish(ctx)


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
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        return "other"
    saved_sizes = [len(g["params"]) for g in groups]
    if saved_sizes == [len(g["params"]) for g in optimizer.param_groups]:
        return "ours"
    if saved_sizes == [len(list(model.parameters()))]:
        return "public"
    return "other"


def resume_from(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                miner_state: mining.MiningState):
    """Training state of a checkpoint (its weights were loaded by build_model): returns (start epoch,
    best R@5, patience counter) and restores optimizer, random and mining states when the file has them.

    A file written by the public train.py holds the state of an Adam built over all the model's
    parameters; the public resume never loads it, so neither do we: the optimizer starts fresh, as there.
    """
    checkpoint = network.load_weights_file(path, what="--resume")
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
            raise ValueError(f"--resume {path}: its optimizer state does not fit this run's trainable parameters "
                             f"(--optim / --train_backbone differ?): {e}. Use --load_weights for weights only.")
    elif layout == "public":
        logging.info(f"--resume {path} holds the optimizer state of the public train.py (Adam over all "
                     f"{len(list(model.parameters()))} parameters, the frozen backbone included), which the "
                     "public code never loads on resume: the optimizer starts fresh, as it does there")
    elif layout == "other":
        sizes = [len(g.get("params", [])) for g in saved_optimizer.get("param_groups", []) if isinstance(g, dict)] \
            if isinstance(saved_optimizer, dict) else "?"
        raise ValueError(f"--resume {path}: its optimizer state (parameter groups of {sizes} tensors) fits neither "
                         f"this run's optimizer ({[len(g['params']) for g in optimizer.param_groups]} trainable "
                         f"tensors) nor the public train.py's (all {len(list(model.parameters()))} parameters): "
                         "check --optim / --train_backbone / --backbone, or use --load_weights for weights only.")
    else:
        logging.info(f"--resume {path} has no optimizer state (a released model): the optimizer starts fresh")
    if "rng_states" in checkpoint:
        commons.set_rng_states(checkpoint["rng_states"])
        taken.append("random states")
    if "mining_state" in checkpoint:
        saved = mining.MiningState.from_state_dict(checkpoint["mining_state"])
        if saved.queries_num == miner_state.queries_num:
            miner_state.load_state_dict(checkpoint["mining_state"])
            taken.append("mining cache")
    logging.info(f"Resuming from {path}: took {', '.join(taken)}; training starts at epoch {epoch_num + 1}")
    return epoch_num + 1, best_r5, not_improved_num


if __name__ == "__main__":
    commons.run_main(main, parser.parse_arguments())
