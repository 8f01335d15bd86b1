"""Multi-process training (pyro_gmvae.distributed): 2 gloo processes on CPU against 1 process.

The comparison runs in float64.  Adam's first step is lr * sign(g), so in float32 an entry
whose gradient is at rounding level (the biases in front of BatchNorm have gradient 0 up to
rounding) can move by a whole lr depending on summation order; in float64 those entries
stay below Adam's eps and the two runs agree to ``ATOL``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pyro
import pytest
import torch
import torch.multiprocessing as mp

from pyro_gmvae import distributed
from pyro_gmvae.build import build_model_and_guide
from pyro_gmvae.config import Config
from pyro_gmvae.data import Dataset
from pyro_gmvae.objective import make_elbo

WORLD_SIZE = 2
NUM_TRAIN = 96
GLOBAL_BATCH = 16  # 8 per rank, 6 steps
ATOL, RTOL = 1e-8, 1e-6  # float64; see the module docstring


def _config(out: Path) -> Config:
    return Config(
        data="tiny.npz",
        likelihood="gaussian",
        K=3,
        x_dim=2,
        w_dim=2,
        hidden_dim=16,
        batch_size=GLOBAL_BATCH,
        epochs=1,
        lr=1e-2,
        cv_weight=0.5,
        init="random",  # the static preset's start, not the .npz file's automatic one
        balance_weight=0.0,  # nor its batch-balance term: the reference below resolves without the file
        standardize="none",  # the single-process reference below trains on the raw features
        seed=3,
        out=str(out),
        progress=False,
    )


def _dataset() -> Dataset:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(NUM_TRAIN + 32) % 3
    centres = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]], dtype=torch.float64)
    x = centres[labels] + 0.3 * torch.randn(len(labels), 4, generator=gen, dtype=torch.float64)
    return Dataset("tiny", x[:NUM_TRAIN], labels[:NUM_TRAIN], x[NUM_TRAIN:], labels[NUM_TRAIN:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, log_dir: str) -> None:
    """One rank: float64 training through ``train``, counting every file write it makes."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_WAIT_POLICY="PASSIVE",
    )
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    from pyro_gmvae import checkpoint, training
    from pyro_gmvae.runfolder import RunFolder

    writes = []
    write_bytes, append_line = checkpoint.atomic_write_bytes, RunFolder._append_line

    def counted_write(path, payload):
        writes.append(str(path))
        write_bytes(path, payload)

    def counted_append(folder, name, line):
        writes.append(str(folder.path / name))
        append_line(folder, name, line)

    checkpoint.atomic_write_bytes = counted_write
    RunFolder._append_line = counted_append
    result = training.train(_config(Path(out)), data=_dataset(), make_figures=False)
    record = {"writes": writes, "final": result.final, "history": len(result.history)}
    Path(log_dir, f"rank{rank}.json").write_text(json.dumps(record))


def _single_process_reference(config: Config) -> tuple[dict, float]:
    """One process, the same global batches: each step sums the two slices' gradients / 2.

    Each slice uses the Monte Carlo stream that its rank uses (``distributed.rank_seed``),
    and BatchNorm normalises per slice, as it does per rank under DDP.
    """
    config = config.resolved()
    data = _dataset()
    pyro.set_rng_seed(config.seed)
    model, guide = build_model_and_guide(config, data.data_shape)
    loss_fn = make_elbo(config.mc_samples)(model, guide)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=config.lr)
    streams = []
    for rank in range(WORLD_SIZE):
        pyro.set_rng_seed(distributed.rank_seed(config.seed, rank))
        streams.append(torch.get_rng_state())
    perm = torch.randperm(NUM_TRAIN, generator=torch.Generator().manual_seed(config.seed))
    width = GLOBAL_BATCH // WORLD_SIZE
    num_steps = NUM_TRAIN // GLOBAL_BATCH
    total = 0.0
    for step in range(num_steps):
        optimizer.zero_grad()
        for rank in range(WORLD_SIZE):
            torch.set_rng_state(streams[rank])
            idx = perm[step * GLOBAL_BATCH + rank * width : step * GLOBAL_BATCH + (rank + 1) * width]
            loss = loss_fn(data.x[idx]) / width / WORLD_SIZE
            loss.backward()
            total += float(loss.detach())
            streams[rank] = torch.get_rng_state()
        optimizer.step()
    params = {f"model.{k}": v for k, v in model.named_parameters()}
    params.update({f"guide.{k}": v for k, v in guide.named_parameters()})
    return params, total / num_steps


def test_two_gloo_processes_match_one_process(tmp_path):
    out, log_dir = tmp_path / "run", tmp_path / "logs"
    log_dir.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(out), str(log_dir)), nprocs=WORLD_SIZE, join=True)

    records = [json.loads((log_dir / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    # Only rank 0 writes the run folder; the other rank returns no metrics.
    assert records[1]["writes"] == [] and records[1]["final"] == {} and records[1]["history"] == 0
    assert {Path(p).name for p in records[0]["writes"]} >= {
        "config.json",
        "metrics.jsonl",
        "checkpoint.pt",
        "metrics.json",
    }
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # one epoch, written once

    state = torch.load(out / "checkpoint.pt", weights_only=False)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        expected, train_loss = _single_process_reference(_config(out))
    finally:
        torch.set_default_dtype(default_dtype)
    assert len(expected) > 10
    # The logged loss is the global batch mean (per-rank means averaged over ranks).
    assert state["history"][0]["train_loss"] == pytest.approx(train_loss, rel=1e-10)
    for name, value in expected.items():
        side, key = name.split(".", 1)
        got = state[side][key]
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, value.detach(), atol=ATOL, rtol=RTOL, msg=name)
    # And training moved them: the comparison is not between two copies of the initial values.
    pyro.set_rng_seed(3)
    torch.set_default_dtype(torch.float64)
    try:
        initial, _ = build_model_and_guide(_config(out).resolved(), (4,))
    finally:
        torch.set_default_dtype(default_dtype)
    moved = [not torch.allclose(state["model"][k], v, atol=1e-6) for k, v in initial.named_parameters()]
    assert any(moved)


def test_shards_cover_the_global_batch_once():
    perm = torch.randperm(40)
    infos = [distributed.DistInfo(rank, 4, rank) for rank in range(4)]
    for step in range(2):
        parts = [distributed.shard(perm, step, 20, info) for info in infos]
        assert all(len(p) == 5 for p in parts)
        torch.testing.assert_close(torch.cat(parts), perm[step * 20 : (step + 1) * 20])
    assert distributed.per_rank_batch(20, infos[0]) == 5


def test_env_parsing_and_indivisible_batch():
    from pyro_gmvae.errors import UserInputError

    assert distributed.info_from_env({}) == distributed.DistInfo(0, 1, 0)
    info = distributed.info_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.is_main, info.enabled) == (3, 4, 1, False, True)
    with pytest.raises(UserInputError, match="RANK=4"):
        distributed.info_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(UserInputError, match="divisible"):
        distributed.per_rank_batch(10, distributed.DistInfo(0, 4, 0))
