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

import commons
import datasets_ws
import loss
import mining
import network
import parser
import test


def main(args):
    start_time = datetime.now()
    output_folder = os.path.join("logs", args.save_dir, start_time.strftime("%Y-%m-%d_%H-%M-%S"))
    commons.setup_logging(output_folder)
    commons.make_deterministic(args.seed)
    commons.log_run_header(args)
    logging.info(f"The outputs are being saved in {output_folder}")

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
    test_ds = datasets_ws.BaseDataset(args.datasets_folder, args.dataset_name, "test", resize=args.resize,
                                      test_method=args.test_method,
                                      positive_dist_threshold=args.val_positive_dist_threshold)
    logging.info(f"Test set: {test_ds}")

    # Model and optimiser: only adapters, LocalAdapt and GeM p train (all weights with --train_backbone).
    model = network.build_model(args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    logging.info(f"Trainable parameters: {sum(p.numel() for p in trainable):,}")
    if args.optim == "adam":
        optimizer = torch.optim.Adam(trainable, lr=args.lr)
    else:
        optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=0.9, weight_decay=0.001)
    miner_state = mining.MiningState(triplets_ds.queries_num)

    # Resume: weights were loaded by build_model; continue after the saved epoch.
    start_epoch, best_r5, not_improved_num = 0, 0.0, 0
    if args.resume:
        start_epoch, best_r5, not_improved_num = resume_from(args.resume, optimizer=optimizer,
                                                             miner_state=miner_state)

    eval_kwargs = dict(rerank_num=args.rerank_num, recall_values=args.recall_values,
                       batch_size=args.infer_batch_size, num_workers=args.num_workers, device=args.device,
                       efficient_ram_testing=args.efficient_ram_testing, precision=args.precision)
    r5_index = min(1, len(args.recall_values) - 1)
    loops_num = args.queries_per_epoch // args.cache_refresh_rate
    normaliser = args.train_batch_size * args.negs_num_per_query
    last_path = os.path.join(output_folder, "last_model.pth")
    best_path = os.path.join(output_folder, "best_model.pth")

    def descriptors_fn(global_indexes):
        return test.extract_features(model, triplets_ds, global_indexes, method="hard_resize",
                                     batch_size=args.infer_batch_size, num_workers=args.num_workers,
                                     device=args.device, precision=args.precision, desc="Mining features")

    for epoch_num in range(start_epoch, args.epochs_num):
        logging.info(f"Start training epoch: {epoch_num:02d}")
        epoch_start = datetime.now()
        epoch_losses = []
        for loop_num in range(loops_num):
            logging.debug(f"Cache: {loop_num} / {loops_num}")
            mining.mine_triplets(triplets_ds, mode=args.mining, descriptors_fn=descriptors_fn,
                                 cache_refresh_rate=args.cache_refresh_rate, neg_samples_num=args.neg_samples_num,
                                 negs_num_per_query=args.negs_num_per_query, state=miner_state)
            loader = DataLoader(triplets_ds, batch_size=args.train_batch_size, shuffle=False, drop_last=True,
                                num_workers=args.num_workers, collate_fn=datasets_ws.collate_fn,
                                pin_memory=args.device == "cuda")
            model.train()
            loop_losses = []
            for batch_num, (images, triplets_local_indexes, _) in enumerate(
                    tqdm(loader, desc=f"Epoch {epoch_num:02d} loop {loop_num}", ncols=100, leave=False,
                         disable=None)):
                if args.horizontal_flip:  # the whole batch or none
                    images = T.RandomHorizontalFlip()(images)
                local_features, global_features = model(images.to(args.device))
                global_loss, local_loss = loss.triplet_losses(local_features, global_features,
                                                              triplets_local_indexes, margin=args.margin,
                                                              normaliser=normaliser)
                total = global_loss + local_loss
                if not math.isfinite(total.item()):
                    raise ValueError(
                        f"the training loss became {total.item()} at epoch {epoch_num}, loop {loop_num}, batch "
                        f"{batch_num} (global {global_loss.item()}, local {local_loss.item()}); stopping. "
                        f"The last good checkpoint is {last_path if os.path.exists(last_path) else 'none yet'}; "
                        "try a lower --lr.")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                loop_losses.append((global_loss.item(), local_loss.item()))
            epoch_losses += loop_losses
            g, l = np.mean(loop_losses, axis=0) if loop_losses else (float("nan"), float("nan"))
            logging.debug(f"Epoch {epoch_num:02d} loop {loop_num}: triplet loss = {g:.4f}, local loss = {l:.4f}")

        g, l = np.mean(epoch_losses, axis=0) if epoch_losses else (float("nan"), float("nan"))
        logging.info(f"Finished epoch {epoch_num:02d} in {str(datetime.now() - epoch_start)[:-7]}, "
                     f"average epoch triplet loss = {g:.4f}, local loss = {l:.4f}")

        result = test.evaluate(model, val_ds, **eval_kwargs)
        recalls = result.recalls
        logging.info(f"Reranking recalls on val set {val_ds}: {result.summary(args.recall_values)}")
        is_best = recalls[r5_index] > best_r5
        if is_best:
            logging.info(f"Improved: previous best R@5 = {best_r5:.1f}, current R@5 = {recalls[r5_index]:.1f}")
            best_r5, not_improved_num = float(recalls[r5_index]), 0
        else:
            not_improved_num += 1
            logging.info(f"Not improved: {not_improved_num} / {args.patience}: best R@5 = {best_r5:.1f}, "
                         f"current R@5 = {recalls[r5_index]:.1f}")
        # Saved after updating best_r5 / not_improved_num, so a resume continues exactly from here.
        network.save_checkpoint(last_path, model=model, optimizer=optimizer, epoch_num=epoch_num, recalls=recalls,
                                best_r5=best_r5, not_improved_num=not_improved_num,
                                extra={"rng_states": commons.get_rng_states(),
                                       "mining_state": miner_state.state_dict()})
        if is_best:
            commons.atomic_write(best_path, lambda tmp: shutil.copyfile(last_path, tmp))
        if not_improved_num >= args.patience:
            logging.info(f"Performance did not improve for {not_improved_num} epochs. Stop training.")
            break

    logging.info(f"Best R@5: {best_r5:.1f}")
    logging.info(f"Trained for {epoch_num + 1 - start_epoch if args.epochs_num > start_epoch else 0} epochs, "
                 f"in total in {str(datetime.now() - start_time)[:-7]}")

    # Test the best model (the last one when no epoch improved, e.g. a resume that ran no epoch).
    final_path = best_path if os.path.exists(best_path) else last_path
    if os.path.exists(final_path):
        network.load_model_weights(model, final_path, what="best model")
    result = test.evaluate(model, test_ds, test_method=args.test_method, majority_weight=args.majority_weight,
                           **eval_kwargs)
    logging.info(f"Recalls on {test_ds}: {result.summary(args.recall_values)}")


def resume_from(path: str, *, optimizer: torch.optim.Optimizer, miner_state: mining.MiningState):
    """Training state of a checkpoint (its weights were loaded by build_model): returns (start epoch,
    best R@5, patience counter) and restores optimizer, random and mining states when the file has them."""
    checkpoint = network.load_weights_file(path, what="--resume")
    epoch_num = int(checkpoint.get("epoch_num", -1))
    best_r5 = float(checkpoint.get("best_r5", 0.0))
    not_improved_num = int(checkpoint.get("not_improved_num", 0))
    taken = [f"epoch_num={epoch_num}", f"best_r5={best_r5:.1f}", f"not_improved_num={not_improved_num}"]
    if checkpoint.get("optimizer_state_dict"):
        try:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
            taken.append("optimizer state")
        except ValueError as e:
            raise ValueError(f"--resume {path}: its optimizer state does not fit this run's trainable parameters "
                             f"(--optim / --train_backbone differ?): {e}. Use --load_weights for weights only.")
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
