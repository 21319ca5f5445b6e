"""Evaluate a SelaVPR model on the test split of a data set: global retrieval, then re-ranking."""

import logging
import os
from datetime import datetime

import commons
import datasets_ws
import network
import parser
import predictions_io
import test

# Where the outputs go (test/<save_dir>/<time>/ in the working folder) and how to put them elsewhere: an
# absolute --save_dir replaces test/<save_dir> (os.path.join keeps the last absolute part).
MOVED_BY = (
    "Run eval.py from a folder you can write to (its outputs go to test/<save_dir>/<time>/ there), or give "
    "--save_dir an absolute path on a disk with room (the run folder is then made inside it)."
)
# After a full disk: eval.py has no checkpoint; its files are whole or absent, and its dense store is gone.
DISK_FULL_NOTE = (
    "eval.py writes every file to a temp name and renames it, and removes its dense feature store, so "
    "nothing half-written is left; run it again (--save_dir with an absolute path puts the outputs on "
    "another disk)."
)


def main(args):
    start_time = datetime.now()
    output_folder = os.path.join("test", args.save_dir, start_time.strftime("%Y-%m-%d_%H-%M-%S"))
    # One process unless launched by torchrun; then every rank extracts a share, rank 0 does the rest.
    ctx = commons.start_run(args, output_folder, note=args.model_settings_note, moved_by=MOVED_BY)

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
        commons.check_free_space(
            test.planned_writes(
                test_ds,
                output_folder=output_folder,
                efficient_ram_testing=args.efficient_ram_testing,
                dense_shape=args.dense_feature_map_size,
                rerank_num=args.rerank_num,
            ),
            moved_by="give --save_dir an absolute path on a disk with room.",
        )

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
        test_method=args.test_method,
        rerank_num=args.rerank_num,
        recall_values=args.recall_values,
        batch_size=args.infer_batch_size,
        num_workers=args.num_workers,
        device=ctx.device,
        store_folder=ctx.store_folder() if args.efficient_ram_testing else None,
        pca=pca,
        majority_weight=args.majority_weight,
        precision=args.precision,
        dist_ctx=ctx,
    )
    if result is None:  # a rank other than 0: its share is with rank 0
        commons.finish(ctx)
        return
    logging.info(f"Recalls on {test_ds}: {result.summary(args.recall_values)}")

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
    logging.info(f"Finished in {str(datetime.now() - start_time)[:-7]}")
    commons.finish(ctx)


if __name__ == "__main__":
    commons.run_main(main, parser.parse_arguments(), torchrun=True, disk_full_note=DISK_FULL_NOTE)
