"""One rank of tests/test_train_ddp.py's gradient check: `python ddp_gradients.py RANK WORLD STORE_FILE OUT`.

Rank r takes rows [r*B, (r+1)*B) of the shared batch through DistributedDataParallel (gloo on loopback); rank 0
writes the synchronized gradients to OUT (safetensors)."""

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_train_ddp import B, policy_and_batch  # noqa: E402

from robopolicy.train import LossModule  # noqa: E402

rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
torch.set_num_threads(1)
dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                        timeout=timedelta(seconds=60))
try:
    policy, batch = policy_and_batch()
    shard = {k: v[rank * B:(rank + 1) * B] for k, v in batch.items()}
    ddp = torch.nn.parallel.DistributedDataParallel(LossModule(policy))  # kept: its hooks sync the gradients
    loss, _ = ddp(shard)
    loss.backward()
    if rank == 0:
        save_file({n: p.grad.contiguous() for n, p in policy.named_parameters()}, out)
    # neither rank tears gloo down while the other may still use its pair: a rank that destroyed its group first
    # once left the other to abort ("terminate called without an active exception")
    dist.barrier()
finally:
    dist.destroy_process_group()
