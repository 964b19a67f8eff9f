"""Worker for tests/test_rwp.py: parallel RWP under torchrun on CPU (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_rwp_worker.py \
        --out DIR --seed 7

Runs a few parallel-RWP steps of a tiny conv net wrapped in DistributedDataParallel on fixed
batches (rank group 0 = clean ranks read batch 0 of a step, group 1 = perturbed ranks batch 1) and
writes DIR/<scenario>_rank<r>.pt with the parameters, BN buffers and losses after every step.
The model and the batches are defined here and imported by the test for its reference run.
"""
import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

SCENARIOS = {  # name -> RWP keyword arguments (besides the shared ones below)
    "mix": dict(alpha=0.5, gamma=0.05),
    "clean": dict(alpha=0.0, gamma=0.05),
}
SHARED = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
STEPS = 3


class Net(nn.Module):
    """Tiny conv net with BatchNorm, a conv bias, a 0-dim scale and one unused parameter."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, classes)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3))) * self.scale


def make_model():
    torch.manual_seed(0)
    return Net()


def make_batches(step, size=8):
    """[(x0, y0), (x1, y1)]: the clean and the perturbed batch of optimizer step ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(2)]


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from rwp import RWP

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name, kwargs in SCENARIOS.items():
        model = make_model()
        ddp = DDP(model, find_unused_parameters=True)  # Net.unused never gets a gradient
        opt = RWP(ddp.parameters(), parallel=True, model=model, seed=args.seed, **SHARED, **kwargs)
        group = opt.rank_group[0]
        record = dict(rank=rank, rank_group=opt.rank_group, batches_per_step=opt.batches_per_step,
                      loss_weight=opt.loss_weight, returns_clean=opt.returns_clean,
                      losses=[], params=[], buffers=[])
        for t in range(STEPS):
            x, y = make_batches(t)[group]

            def closure(batch=0, loss_weight=1.0):
                opt.zero_grad(set_to_none=True)
                out = ddp(x)
                loss = F.cross_entropy(out, y)
                (loss * loss_weight).backward()
                return out, loss.detach()

            _, loss = opt.step(closure)
            record["losses"].append(loss)
            record["params"].append({k: p.detach().clone() for k, p in model.named_parameters()})
            record["buffers"].append(bn_buffers(model))
        torch.save(record, os.path.join(args.out, f"{name}_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
