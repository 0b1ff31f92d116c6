"""Data-parallel training with synchronized batch norm, on CPUs (gloo) or GPUs (NCCL).

One machine, two processes:

    torchrun --nproc_per_node=2 examples/ddp_train.py

Two machines, four GPUs each (run on both, with --node_rank=0 and 1):

    torchrun --nnodes=2 --nproc_per_node=4 --node_rank=0 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 examples/ddp_train.py

Each process trains on its own shard of a synthetic image-classification set; the batch norm
layers normalize with statistics over the global batch (every process's shard together).
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from batchnorm.torch import SyncBatchNorm, convert_model


def small_convnet(classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, classes),
    )


def synthetic_images(n: int, classes: int, seed: int = 0) -> TensorDataset:
    """Random 3x16x16 images labelled by a fixed random linear teacher: learnable, not trivial."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=gen)
    teacher = torch.randn(3 * 16 * 16, classes, generator=gen)
    y = (x.flatten(1) @ teacher).argmax(1)
    return TensorDataset(x, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl when CUDA is available, else gloo")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a collective waits for the other processes before failing "
                        "(torch's default is 10 to 30 minutes)")
    args = p.parse_args()

    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
    use_cuda = torch.cuda.is_available() and args.backend != "gloo"
    backend = args.backend or ("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # If one process raises while the others wait in a collective, they wait until this
    # timeout: keep it short enough to notice (a step here takes well under a second).
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    classes = 4
    model = convert_model(small_convnet(classes), sync=True).to(device)
    model = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    data = synthetic_images(args.samples, classes)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    if rank == 0:
        print(f"{world} processes, backend {backend}, device {device.type}, "
              f"global batch {args.batch_size * world}")
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a different shuffle every epoch, the same on all ranks
        model.train()
        total = torch.zeros(2, device=device)  # (sum of losses, batches)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages gradients over the processes
            opt.step()
            total += torch.stack([loss.detach(), torch.ones((), device=device)])
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch}: mean training loss {(total[0] / total[1]).item():.4f}")

    # Every process saw different data, yet the running statistics agree: they were computed
    # from the global batch each step.
    bn = next(m for m in model.module.modules() if isinstance(m, SyncBatchNorm))
    mine = bn.running_mean.clone()
    rank0 = mine.clone()
    dist.broadcast(rank0, src=0)
    differs = (mine - rank0).abs().max()
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"largest running-mean difference between processes: {differs.item():.2e}")
    dist.barrier()  # nobody tears down the group while another process still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
