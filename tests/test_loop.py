"""pyro_gmvae.loop.run_epoch: the one optimisation loop of training, pretraining, the fit and the probes."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pyro_gmvae.errors import NonFiniteLossError
from pyro_gmvae.loop import adam, is_invalid_values_error, run_epoch


def _linear(fused: bool = False):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 1)
    return layer, torch.optim.SGD(layer.parameters(), lr=0.1, fused=fused or None)


def test_an_epoch_drops_the_ragged_batch_sets_the_lr_and_sums_the_losses():
    layer, optimizer = _linear()
    x = torch.randn(10, 3)
    seen = []

    def loss_fn(y):
        seen.append(len(y))
        return layer(y).pow(2).mean()

    total = run_epoch(loss_fn, optimizer, x, 4, torch.Generator().manual_seed(0), lr=0.05)
    assert seen == [4, 4]  # 10 // 4 steps; the last 2 examples wait for the next shuffle
    assert optimizer.param_groups[0]["lr"] == 0.05
    assert total.shape == () and total > 0


def test_the_same_generator_state_gives_the_same_order():
    x = torch.arange(12.0).unsqueeze(-1).expand(12, 3)
    orders = []
    for _ in range(2):
        layer, optimizer = _linear()
        batches = []
        run_epoch(lambda y: (batches.append(y[:, 0].tolist()), layer(y).mean())[1], optimizer, x, 3,  # noqa: B023
                  torch.Generator().manual_seed(7))  # fmt: skip
        orders.append(batches)
    assert orders[0] == orders[1] and sorted(sum(orders[0], [])) == list(range(12))


def test_an_extra_term_is_weighted_in_and_reported_apart():
    layer, optimizer = _linear()
    x = torch.randn(8, 3)
    total = run_epoch(
        lambda y: layer(y).mean(), optimizer, x, 4, torch.Generator(), extra_loss=lambda y, idx: idx.float().mean(),
        extra_weight=0.0,
    )  # fmt: skip
    assert total.shape == (2,) and total[1] == pytest.approx(7.0)  # the indices 0..7 in two halves: 2 x 3.5


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "on-device"])
def test_a_non_finite_step_is_named_and_never_reaches_the_weights(fused):
    layer, optimizer = _linear(fused)
    before = [p.detach().clone() for p in layer.parameters()]
    x = torch.randn(6, 3)
    x[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"epoch 4, step 1: bad input"):
        run_epoch(lambda y: layer(y).mean(), optimizer, x, 2, torch.Generator(), epoch=4, explain=lambda y: "bad input")
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))
    assert not hasattr(optimizer, "found_inf")  # the optimiser is left as it was


def test_on_device_the_first_bad_step_is_named_its_batch_explained_and_later_steps_skipped(monkeypatch):
    """A fused optimiser: no host read per step; steps before the bad one update, none after it."""
    layer, optimizer = _linear(fused=True)
    x = torch.randn(8, 3)
    x[5] = float("nan")  # unshuffled below: batch 3 of 4 (steps are named from 1)
    seen, reads = [], []
    real_int = torch.Tensor.__int__

    def counting_int(tensor):
        reads.append(tensor)
        return real_int(tensor)

    monkeypatch.setattr(torch.Tensor, "__int__", counting_int)
    states = []

    def loss_fn(y):
        states.append([p.detach().clone() for p in layer.parameters()])
        return layer(y).mean()

    def explain(y):
        seen.append(y)
        return "batch holds NaN"

    with pytest.raises(NonFiniteLossError, match=r"step 3: batch holds NaN"):
        run_epoch(loss_fn, optimizer, x, 2, torch.Generator(), explain=explain,
                  batch_indices=lambda perm, step, size: torch.arange(step * size, (step + 1) * size))  # fmt: skip
    monkeypatch.undo()
    assert len(states) == 4 and 1 <= len(reads) <= 2  # every step ran; the flag was read at the end only
    assert not torch.equal(states[0][0], states[2][0])  # steps 1 and 2 updated the weights
    assert all(torch.equal(a, b) for a, b in zip(states[2], layer.parameters(), strict=True))  # 3 and 4 did not
    assert torch.isnan(seen[0][1]).all() and torch.equal(seen[0][0], x[4])


def test_adam_is_torchs_default_kernel_on_the_cpu():
    # The committed CPU results and the behaviour pins were made with it (fused rounds differently).
    layer = torch.nn.Linear(3, 1)
    optimizer = adam(layer.parameters(), lr=1e-3)
    assert not any(group["fused"] for group in optimizer.param_groups)


def test_adam_kernel_fused_asks_for_the_fused_kernel_on_the_cpu():
    layer = torch.nn.Linear(3, 1)
    optimizer = adam(layer.parameters(), lr=1e-3, kernel="fused")
    assert all(group["fused"] for group in optimizer.param_groups)
    with pytest.raises(ValueError, match="kernel must be one of"):
        adam(layer.parameters(), lr=1e-3, kernel="foreach")


def test_fused_adam_on_the_cpu_skips_a_non_finite_step_and_the_later_ones():
    """run_epoch's guard with the fused CPU kernel: the weights end as after the good steps alone."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(2, 1)
    good = copy.deepcopy(layer)
    x = torch.randn(8, 2)
    x[4] = math.nan
    in_order = lambda perm, step, b: torch.arange(step * b, (step + 1) * b)  # noqa: E731
    run_epoch(lambda y: good(y).sum(), adam(good.parameters(), 0.1, "fused"), x[:4], 1, torch.Generator(),
              batch_indices=in_order)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="step 5"):
        run_epoch(lambda y: layer(y).sum(), adam(layer.parameters(), 0.1, "fused"), x, 1, torch.Generator(),
                  batch_indices=in_order)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(good.parameters(), layer.parameters(), strict=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adam_is_fused_on_a_gpu():
    layer = torch.nn.Linear(3, 1).cuda()
    optimizer = adam(layer.parameters(), lr=1e-3)
    assert all(group["fused"] for group in optimizer.param_groups)


def test_pyros_invalid_values_error_is_a_non_finite_step():
    import pyro.distributions as dist

    with pytest.raises(ValueError) as info:
        dist.Normal(torch.tensor(float("nan")), 1.0, validate_args=True)
    assert is_invalid_values_error(info.value)
    layer, optimizer = _linear()

    def loss_fn(y):  # NaN parameters: validation raises before a loss exists
        return -dist.Normal(layer(y), 1.0, validate_args=True).log_prob(torch.zeros(len(y), 1)).mean()

    with pytest.raises(NonFiniteLossError, match="step 1"):
        run_epoch(loss_fn, optimizer, torch.full((4, 3), float("nan")), 2, torch.Generator())


@pytest.mark.parametrize("check", ["device", "host"])
def test_the_finiteness_check_reads_every_entry_on_one_or_mixed_dtypes(check):
    from pyro_gmvae.loop import _all_finite, _host_all_finite

    all_finite = (lambda ts: bool(_all_finite(ts))) if check == "device" else _host_all_finite
    grads = [torch.ones(3), torch.ones(2, 2)]
    assert all_finite(grads) and all_finite([]) and all_finite([torch.ones(3), torch.ones(2).double()])
    for bad in (float("nan"), float("inf"), -float("inf")):
        grads[1][1, 0] = bad
        assert not all_finite(grads) and not all_finite([*grads, torch.ones(2).double()])
        assert not all_finite([torch.ones(()), torch.ones(2).double(), *grads])
    # +inf and -inf in one tensor sum to NaN: still caught
    assert not all_finite([torch.tensor([float("inf"), -float("inf")])])
    # a sum that overflows although every entry is finite counts as non-finite (documented)
    assert not all_finite([torch.full((4,), 3e38)]) and all_finite([torch.full((4,), 3e37)])
    # the host check's norm overflows from 1.8e19: its confirmation keeps such a step
    assert all_finite([torch.full((4,), 1e19)]) and all_finite([torch.full((4,), 1e200, dtype=torch.float64)])
