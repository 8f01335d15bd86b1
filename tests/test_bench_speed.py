"""experiments/bench_speed.py on a tiny size: the plain-PyTorch reference is the project's objective.

The benchmark's ratios only mean something if the compiled, eager and reference sides
compute the same loss and gradients; ``Sides.check`` verifies that (in float64) before any
timing.  No timing is asserted.
"""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_speed")


@pytest.fixture(autouse=True)
def _module_local_params():
    with pyro.settings.context(module_local_params=True):  # as in training.train and the benchmark
        yield


def tiny(network="fc", mc_samples=1, K=3):
    return dict(network=network, hidden_dim=16, K=K, mc_samples=mc_samples, batch_size=8, x_dim=4, w_dim=3)


@pytest.mark.parametrize(
    "case",
    [tiny(), tiny(mc_samples=3), tiny(K=5, mc_samples=2), tiny(network="conv")],
    ids=["M1", "M3", "K5M2", "conv"],
)
def test_reference_gives_the_project_loss_and_gradients(bench, case):
    check = bench.Sides(case, torch.device("cpu")).check()
    for side in ("eager", "compiled"):
        assert check[side]["loss_rel_diff"] < 1e-10  # float64: equal up to summation order
        assert check[side]["grad_rel_diff"] < 1e-8
    assert check["batch"] == case["batch_size"]


def test_check_catches_a_reference_that_differs(bench, monkeypatch):
    sides = bench.Sides(tiny(), torch.device("cpu"))
    original = bench.reference_loss
    monkeypatch.setattr(bench, "reference_loss", lambda *a: original(*a) * (1 + 1e-4))
    with pytest.raises(AssertionError, match="differ"):
        sides.check()


def test_interleaved_timing_and_memory_report_every_side(bench):
    case = tiny()
    sides = bench.Sides(case, torch.device("cpu"), steps=2)  # each call: an epoch of 2 steps
    assert sides.data.shape[0] == 2 * case["batch_size"] and torch.equal(sides.y, sides.data[: case["batch_size"]])
    steps = sides.steps()
    assert list(steps) == ["compiled", "eager", "reference_loop", "reference"]
    row = bench.time_interleaved(steps, torch.device("cpu"), case["batch_size"], 1, 3, 3, 0.0, per_call=2)
    assert row["steps_per_side"] == 6 and row["steps_per_call"] == 2
    for side, optimizer in sides.optimizers.items():  # 1 warm-up call and 3 timed calls of 2 steps each
        assert {float(state["step"]) for state in optimizer.state.values()} == {8.0}, side
    for name in steps:
        assert row[name]["median_step_s"] > 0
        assert row[name]["examples_per_s"] == pytest.approx(8 / row[name]["median_step_s"])
    ref = row["reference"]["median_step_s"]
    for name in ("compiled", "eager", "reference_loop"):
        assert row[name]["ratio"] == pytest.approx(row[name]["median_step_s"] / ref)
        assert row[name]["added_ms"] == pytest.approx((row[name]["median_step_s"] - ref) * 1e3)
    assert sides.loss_modules["compiled"]._graphs  # warm-up plus 3 steps: the compiled side replays
    if Path("/proc/self/clear_refs").exists():
        assert bench.step_peak_memory(sides.project, torch.device("cpu")) >= 0
    for p in sides.loss_fn.parameters():  # the timed steps trained the shared modules
        assert torch.isfinite(p).all()


def test_acceptance_reads_the_overhead_at_batch_8_and_the_ratio_at_256(bench):
    def row(batch, added, ratio):
        side = {"added_ms": added, "ratio": ratio, "median_step_s": 0.01 + added / 1e3}
        loop = {"added_ms": 0.2, "ratio": 1.01, "median_step_s": 0.0102}
        sides = {"compiled": side, "eager": side, "reference_loop": loop}
        return {"case": {"batch_size": batch}, "autocast": None, "steps_per_side": 5, **sides}

    rows = bench.acceptance([row(8, 0.5, 1.3), row(64, 9.0, 1.2), row(256, 3.0, 1.06)])
    assert [(r["batch"], r["compiled"], r["pass"]) for r in rows] == [(8, 0.5, True), (256, 1.06, False)]
    assert rows[0]["compiled_against_reference_loop"] == pytest.approx(0.3)


def test_a_call_is_about_1024_examples_and_the_epoch_guard_is_timed_alone(bench):
    assert [bench.steps_per_call(b, None) for b in (8, 64, 256, 1024)] == [128, 16, 16, 4]
    assert bench.steps_per_call(8, 1000) == 512 and bench.steps_per_call(8, 2) == 2  # at most 4,096 examples
    layer = torch.nn.Linear(3, 2)
    guard = bench.epoch_guard_ms(torch.optim.Adam(layer.parameters()), repeats=3)
    assert guard["snapshot"] > 0 and guard["end_check"] > 0
    fused = torch.optim.Adam(layer.parameters(), fused=True)  # the device guard: no once-an-epoch work
    assert bench.epoch_guard_ms(fused) == {"snapshot": None, "end_check": None}
