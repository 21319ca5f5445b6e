"""Evaluate a SelaVPR model on the test split of a data set: global retrieval, then re-ranking.

An interrupted run (Ctrl-C, a time limit's SIGTERM, a kill, a full disk) continues with the same command
and `--continue_run RUN_FOLDER`: what it had finished is not done again (run_progress.py).
"""

import logging
import os
from datetime import datetime

import commons
import datasets_ws
import dense_store
import identity
import network
import parser
import predictions_io
import run_progress
import test

# The flags whose values change the results, or the layout of the progress a run keeps: a run is
# continued only with the values it started with (with its weights and images).
RESULT_FLAGS = (
    "backbone",
    "backbone_depth",
    "registers",
    "resize",
    "test_method",
    "majority_weight",
    "rerank_num",
    "recall_values",
    "val_positive_dist_threshold",
    "precision",
    "device",
    "seed",
    "rerank_features",
    "pca_dim",
    "pca_dataset_folder",
    "infer_batch_size",
    "efficient_ram_testing",
    "dense_store_dtype",
)
# Where the outputs go (test/<save_dir>/<time>/ in the working folder) and how to put them elsewhere: an
# absolute --save_dir replaces test/<save_dir> (os.path.join keeps the last absolute part).
MOVED_BY = (
    "Run eval.py from a folder you can write to (its outputs go to test/<save_dir>/<time>/ there), or give "
    "--save_dir an absolute path on a disk with room (the run folder is then made inside it)."
)
# After a full disk: eval.py has no checkpoint; its files are whole or absent. What it had recorded stays
# for --continue_run (the log says so).
DISK_FULL_NOTE = (
    "eval.py writes every file to a temp name and renames it, so nothing half-written is left; free some "
    "space and continue the run with the same command and --continue_run (its last log lines name the "
    "folder), or run it again (--save_dir with an absolute path puts the outputs on another disk)."
)


def main(args):
    start_time = datetime.now()
    continuing = args.continue_run is not None
    output_folder = args.continue_run or os.path.join("test", args.save_dir, start_time.strftime("%Y-%m-%d_%H-%M-%S"))
    # One process unless launched by torchrun; then every rank extracts a share, rank 0 does the rest.
    ctx = commons.start_run(
        args, output_folder, note=args.model_settings_note, moved_by=MOVED_BY, continuing=continuing
    )

    model = network.build_model(args, device=ctx.device)

    test_ds = datasets_ws.BaseDataset(
        args.datasets_folder,
        args.dataset_name,
        "test",
        resize=args.resize,
        test_method=args.test_method,
        positive_dist_threshold=args.val_positive_dist_threshold,
        query_keys_file=args.query_keys_file,
    )
    logging.info(f"Test set: {test_ds}")
    if ctx.is_main:  # what this run will write must fit on its disk, checked before any work
        writes = test.planned_writes(
            test_ds,
            output_folder=output_folder,
            efficient_ram_testing=args.efficient_ram_testing,
            dense_shape=args.dense_feature_map_size,
            rerank_num=args.rerank_num,
            element_size=dense_store.element_size(args.dense_store_dtype),
        )
        if continuing:  # what the stopped run wrote is already on the disk
            writes = run_progress.still_to_write(writes, output_folder)
        commons.check_free_space(writes, moved_by="give --save_dir an absolute path on a disk with room.")

    run_identity = None
    if ctx.is_main:  # every rank has the same weights and images
        run_identity = {
            "weights_sha256": identity.weights_sha256(model),
            "images": identity.ImageList.of(test_ds.images_paths, test_ds.dataset_folder).fingerprint(),
            "settings": {**{flag: getattr(args, flag) for flag in RESULT_FLAGS}, "processes": ctx.world_size},
        }
    progress = run_progress.start(
        ctx.output_folder,
        run_identity=run_identity,
        chunks=run_progress.Chunks.for_batch_size(args.infer_batch_size),
        continuing=continuing,
        ctx=ctx,
    )
    try:
        pca = None
        if args.pca_dim is not None and ctx.is_main:  # only rank 0 searches
            pca = test.compute_pca(
                model,
                datasets_folder=args.datasets_folder,
                pca_dataset_folder=args.pca_dataset_folder,
                pca_dim=args.pca_dim,
                resize=args.resize,
                batch_size=args.infer_batch_size,
                num_workers=args.num_workers,
                device=ctx.device,
            )
        ctx.wait_for_main()

        result = test.evaluate(
            network.ranking_model(model, rerank_features=args.rerank_features),
            test_ds,
            test.EvalSettings(
                test_method=args.test_method,
                rerank_num=args.rerank_num,
                recall_values=args.recall_values,
                batch_size=args.infer_batch_size,
                num_workers=args.num_workers,
                device=ctx.device,
                store_folder=ctx.store_folder() if args.efficient_ram_testing else None,
                majority_weight=args.majority_weight,
                precision=args.precision,
                store_dtype=args.dense_store_dtype,
            ),
            pca=pca,
            dist_ctx=ctx,
            progress=progress,
        )
        if result is None:  # a rank other than 0: its share is with rank 0
            commons.finish(ctx)
            return
        logging.info(f"Recalls on {test_ds}: {result.summary(args.recall_values)}")
        t = result.times
        logging.info(
            f"Time per stage (this process): database extraction {t.database_extraction_s:.1f} s, query "
            f"extraction {t.query_extraction_s:.1f} s, search {t.search_s:.1f} s, re-ranking {t.rerank_s:.1f} s"
        )

        records = predictions_io.prediction_records(
            queries_paths=test_ds.queries_paths,
            database_paths=test_ds.database_paths,
            ranking=result,
            positives=result.positives,
        )
        predictions_io.write_predictions(os.path.join(output_folder, "predictions.jsonl"), records)
        if args.num_preds_to_save:
            n = predictions_io.save_prediction_pictures(
                os.path.join(output_folder, "preds"),
                records,
                num_preds=args.num_preds_to_save,
                only_wrong=args.save_only_wrong_preds,
            )
            logging.info(f"Saved {n} prediction pictures in {os.path.join(output_folder, 'preds')}")
        run_progress.finish(progress)
    except BaseException as e:
        if ctx.is_main and isinstance(e, ValueError):
            # Bad input (an unreadable image, non-finite features, ...): its fix changes the images,
            # weights or flags, which a continuation refuses, so nothing recorded could be used; the
            # folder keeps its logs alone. A continued run's ValueError (e.g. its refusal to go on with
            # other first-stage candidates, whose message says what to do) never removes the stopped
            # run's records.
            if not continuing:
                run_progress.discard(progress)
        elif ctx.is_main:
            logging.info(run_progress.continue_hint(ctx.output_folder))
        raise
    logging.info(f"Finished in {str(datetime.now() - start_time)[:-7]}")
    commons.finish(ctx)


if __name__ == "__main__":
    commons.run_main(main, parser.parse_eval_arguments(), torchrun=True, disk_full_note=DISK_FULL_NOTE)
