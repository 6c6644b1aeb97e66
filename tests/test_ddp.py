"""DistributedDataParallel: 2 ranks on the CPU (gloo), lanes sharded, give the loss curve of 1 rank."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hiertcn_fast.data import SessionCache
from hiertcn_fast.train import TrainConfig, Trainer, build_model
from model_helpers import synthetic_cache, one_thread  # noqa: F401 (autouse fixture)

SIZES = dict(embedding_dim=12, state_hidden=8, tcn_channels=(12, 12), kernel_size=3)
CONFIG = dict(epochs=2, lanes=8, sessions_per_batch=4, learning_rate=1e-2, seed=3, num_producers=0)


def _run(cache_path):
    """Train as this process is set up (one rank, or a rank of a process group) and report what the
    Trainer did: its curve and parameters, how it ran, and the sessions of every batch the model saw."""
    torch.set_num_threads(1)
    cache = SessionCache.open(cache_path)
    model = build_model("hiertcn", cache.num_items, seed=5, **SIZES)
    sessions = []
    model.register_forward_pre_hook(lambda module, args: sessions.append(args[0].session.clone()))
    trainer = Trainer(model, cache, TrainConfig(**CONFIG), out=None).train()
    return {"curve": trainer.curve, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "ddp": isinstance(trainer.loss_step, torch.nn.parallel.DistributedDataParallel),
            "rank": trainer.rank, "world_size": trainer.world_size, "sessions": sessions}


def _worker(rank, world_size, init_file, cache_path, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(_run(cache_path), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_match_one_rank(tmp_path):
    cache = synthetic_cache(tmp_path / "cache", num_events=3000)
    single = _run(cache.path)
    assert not single["ddp"] and single["world_size"] == 1
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(cache.path), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Each rank really ran distributed: DDP around the model, two ranks, and half of every batch's
    # lanes, the two halves disjoint and together the single rank's batch, lane for lane.
    for rank, result in enumerate(results):
        assert result["ddp"] and result["rank"] == rank and result["world_size"] == 2
        assert len(result["sessions"]) == len(single["sessions"])
    for step, (whole, first, second) in enumerate(zip(single["sessions"], results[0]["sessions"],
                                                      results[1]["sessions"])):
        assert first.shape[1] == second.shape[1] == CONFIG["lanes"] // 2, step
        assert torch.equal(torch.cat([first, second], dim=1), whole), step
        assert not set(first[first >= 0].tolist()) & set(second[second >= 0].tolist()), step
    for result in results:
        steps = [s for s, _ in result["curve"]]
        assert steps == [s for s, _ in single["curve"]]
        torch.testing.assert_close(torch.tensor([l for _, l in result["curve"]]),
                                   torch.tensor([l for _, l in single["curve"]]), rtol=1e-5, atol=1e-5)
    # Both ranks hold the same parameters, and they are the single rank's within rounding.
    for key, value in single["state"].items():
        torch.testing.assert_close(results[0]["state"][key], results[1]["state"][key], rtol=0, atol=0)
        torch.testing.assert_close(results[0]["state"][key], value, rtol=1e-4, atol=1e-5)
