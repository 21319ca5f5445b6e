"""What finding the local loss's mutual nearest neighbours costs in a training step: the plain definition
(one float32 product of the whole pair, arg-max both ways: local_matching/reference.py) against the re-rank
engine (screen, tiles, self-check), measured side by side in one run, as a share of the whole step.

    python3 benchmarks/train_step_local.py                    # the demo's model: vit_tiny, 4 blocks, 112x112
    python3 benchmarks/train_step_local.py --backbone vit_large --resize 224 224 --batch_size 1

A step is the public recipe's: per query one positive and --negs negatives (forward of all images, the
global triplet loss and the local mutual-NN loss, backward, Adam step), the backbone frozen except its
adapters. Both ways must find the same pairs (checked); only the time differs.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import local_matching
import loss
import network
from local_matching.reference import mutual_rows, nearest_neighbours


def plain_pairs(query: torch.Tensor, candidate: torch.Tensor):
    """(nn12, mutual) of one pair by the plain definition: query (h, w, C), candidate (h', w', C)."""
    q = query.detach().float().reshape(-1, query.shape[-1])
    x = candidate.detach().float().reshape(-1, candidate.shape[-1])
    nn12, nn21 = nearest_neighbours(x.unsqueeze(0), q)
    return nn12[0], mutual_rows(nn12, nn21)[0]


def engine_pairs(query: torch.Tensor, candidate: torch.Tensor):
    """The same pairs through the engine, as the training loss finds them today."""
    q = query.detach().float().reshape(-1, query.shape[-1]).contiguous()
    x = candidate.detach().float().reshape(-1, candidate.shape[-1]).contiguous()
    ((nn12, mutual),) = list(
        local_matching.engine.matches(q, [x], chunk_size=1, row_tile=512, fast_path=None, workers=False)
    )
    return nn12, mutual


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and the engine's one-off self-check for this shape)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_tiny")
    p.add_argument("--backbone_depth", type=int, default=4)
    p.add_argument("--resize", type=int, nargs=2, default=[112, 112])
    p.add_argument("--batch_size", type=int, default=4, help="queries per step (train_batch_size)")
    p.add_argument("--negs", type=int, default=2, help="negatives per query (negs_num_per_query)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    torch.manual_seed(0)
    depth = None if args.backbone == "vit_large" and args.backbone_depth == 4 else args.backbone_depth
    model = network.GeoLocalizationNet(backbone=args.backbone, backbone_depth=depth)
    model.freeze()
    optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    per_query = 2 + args.negs
    images = torch.randn(args.batch_size * per_query, 3, *args.resize)
    triplets = torch.tensor(
        [
            [b * per_query, b * per_query + 1, b * per_query + 2 + n]
            for b in range(args.batch_size)
            for n in range(args.negs)
        ]
    )

    def step() -> None:
        local, glob = loss.forward_features(model, images)
        g, l = loss.triplet_losses(local, glob, triplets, margin=0.1, normaliser=len(triplets))
        optimizer.zero_grad(set_to_none=True)
        (g + l).backward()
        optimizer.step()

    model.train()
    step_s = timed(step, args.repeats)
    with torch.no_grad():
        local, _ = model(images)
    pairs = [(local[q], local[c]) for q, p_, n in triplets.tolist() for c in (p_, n)]

    def find(fn):
        return lambda: [fn(q, c) for q, c in pairs]

    same = all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(find(plain_pairs)(), find(engine_pairs)())
    )
    plain_s, engine_s = timed(find(plain_pairs), args.repeats), timed(find(engine_pairs), args.repeats)
    h, w = local.shape[1:3]
    print(
        f"model {args.backbone} ({len(model.backbone.blocks)} blocks) at {args.resize[0]}x{args.resize[1]}, "
        f"dense {h}x{w}x{local.shape[-1]}, {len(pairs)} pairs per step, torch threads {torch.get_num_threads()}"
    )
    print(f"training step (engine, as today): {step_s * 1000:.1f} ms")
    print(
        f"pair finding per step: plain {plain_s * 1000:.1f} ms ({100 * plain_s / step_s:.1f}% of the step), "
        f"engine {engine_s * 1000:.1f} ms ({100 * engine_s / step_s:.1f}%); plain / engine = {plain_s / engine_s:.2f}"
    )
    print(f"same pairs both ways: {same}")


if __name__ == "__main__":
    main()
