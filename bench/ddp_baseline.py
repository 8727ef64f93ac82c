"""Plain torchrun DDP of the same model on the same data held in memory (the baseline for
bench/train.py).  Run as: torchrun --nproc-per-node N bench/ddp_baseline.py EPOCHS BATCH HIDDEN..."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from zoo.classifier import mlp


def main() -> None:
    epochs, batch = int(sys.argv[1]), int(sys.argv[2])
    hidden = [int(h) for h in sys.argv[3:]]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    digits = load_digits()
    x = digits.data.astype(np.float32)[rank::world]
    y = digits.target.astype(np.int64)[rank::world]
    keep = np.arange(len(x)) % 10 != 9  # hold out the same share as aimesh does
    x, y = torch.from_numpy(x[keep]), torch.from_numpy(y[keep])
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(mlp(inputs=64, classes=10, hidden=hidden))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    per_rank = batch // world
    steps = len(x) // per_rank
    counts = torch.tensor([steps])
    dist.all_reduce(counts, op=dist.ReduceOp.MIN)  # equal step counts, as aimesh does
    steps = int(counts)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.from_numpy(np.random.default_rng([rank, epoch]).permutation(len(x)))
        for step in range(steps):
            idx = order[step * per_rank : (step + 1) * per_rank]
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            value = loss.detach()
            dist.all_reduce(value)  # aimesh reports the global mean loss every step: same work here
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(f"samples_per_s {epochs * steps * batch / elapsed:.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
