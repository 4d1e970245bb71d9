"""The distributed train step reads nothing back from the device; ranks exchange metrics once per
log step. Run in a subprocess: a world of one on gloo, DDP and FSDP2 wrappers."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, os, sys
import torch
import torch.distributed as dist
import visionmoe
from visionmoe.distributed import broadcast_parameters, wrap_data_parallel
from visionmoe.distributed.data_parallel import split_sharded_groups
from visionmoe.distributed.groups import build_groups, init_distributed
from visionmoe.distributed.train import _over_ranks, distributed_train_step_device
from visionmoe.recipes import get_recipe
from visionmoe.train.config import apply_set
from visionmoe.train.host_sync import HostSyncCounter
from visionmoe.train.metrics import MetricsWindow
from visionmoe.train.optim import build_optimizer

torch.set_num_threads(1)
device = init_distributed(60, "gloo")
groups = build_groups(None, device)
out = {}
for dense in ("ddp", "fsdp"):
    torch.manual_seed(0)
    model = visionmoe.create_model("vmoe_debug", dispatch="static")
    config = apply_set(get_recipe("digits_vmoe"), ["train.batch_size=8", "train.grad_accum=2"])
    broadcast_parameters(model, groups)
    trained = wrap_data_parallel(model, groups, dense)
    optimizer = split_sharded_groups(build_optimizer(model, config.optim))  # as training does
    window = MetricsWindow(device)
    syncs = []
    for step in range(3):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        with HostSyncCounter() as counter:
            metrics = distributed_train_step_device(trained, optimizer, x, y, config, groups)
            window.add(metrics, 8, 0.0)
        syncs.append(counter.total)
    read = window.read(lambda m: _over_ranks(m, groups))
    out[dense] = {"syncs": syncs, "keys": sorted(read)}
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_distributed_step_makes_no_host_sync():
    env_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    import os

    env = {k: v for k, v in os.environ.items() if k not in env_keys}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for dense in ("ddp", "fsdp"):
        assert out[dense]["syncs"] == [0, 0, 0], (dense, out[dense])
        keys = set(out[dense]["keys"])
        assert {"train/loss", "train/grad_norm", "train/images_per_s"} <= keys, keys
