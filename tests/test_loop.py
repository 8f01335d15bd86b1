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


def _adam_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 1)
    return layer, adam(layer.parameters(), lr=0.1)


@pytest.mark.parametrize("guard", ["host-check", "on-device", "deferred"])
def test_a_non_finite_step_is_named_and_never_reaches_the_weights(guard):
    layer, optimizer = _adam_linear() if guard == "deferred" else _linear(guard == "on-device")
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


def _in_order(perm, step, size):
    return torch.arange(step * size, (step + 1) * size)


def _noisy_loss(layer, calls: list, bad=lambda y, call: False):
    """A loss with noise from the global generator whose gradient (not its value) is NaN where ``bad(y, call)``."""

    def loss_fn(y):
        calls.append(len(calls))
        noise = torch.randn(len(y), 1)
        loss = (layer(y) + noise).pow(2).mean()
        if bad(y, len(calls) - 1):  # sqrt'(0) is infinite: a finite loss with a NaN gradient
            loss = loss + torch.sqrt(layer.weight.sum() * 0.0)
        return loss

    return loss_fn


MARK = 777.0  # the first feature of the example whose step's gradient is NaN


@pytest.mark.parametrize("bad_step", [2, 5], ids=["mid-epoch", "last-step"])
def test_cpu_adam_checks_at_the_end_of_the_epoch_and_replays_it_to_name_the_bad_step(monkeypatch, bad_step):
    """torch's Adam on the CPU: one read of the weights an epoch; a bad gradient is found, named, undone.

    The bad step's loss is finite (only its gradient is NaN), so only the end-of-epoch check
    or the next step's loss can see it; the replay must draw the same noise (the random
    state restored) to leave the weights, and Adam's state, exactly as a clean run of the
    steps before it.
    """
    import pyro_gmvae.loop as loop

    x = torch.randn(12, 3)
    x[2 * bad_step, 0] = MARK
    earlier = torch.randn(4, 3)  # an epoch before: Adam's state is not empty at the failing epoch's start

    def drawn_term(layer, generator):  # draws from the epoch's generator, as the augmentation term does
        return lambda y, idx: (layer.bias * torch.rand((), generator=generator)).sum()

    reference, ref_optimizer = _adam_linear()
    torch.manual_seed(5)
    run_epoch(_noisy_loss(reference, []), ref_optimizer, earlier, 2, torch.Generator())
    drawn = torch.Generator().manual_seed(9)
    torch.randperm(len(x), generator=drawn)  # where the failing epoch's generator is after its shuffle
    run_epoch(_noisy_loss(reference, []), ref_optimizer, x[: 2 * bad_step], 2, torch.Generator(),
              extra_loss=drawn_term(reference, drawn), batch_indices=_in_order)  # fmt: skip
    reads = []
    real = loop._host_all_finite
    layer, optimizer = _adam_linear()
    torch.manual_seed(5)
    run_epoch(_noisy_loss(layer, []), optimizer, earlier, 2, torch.Generator())
    monkeypatch.setattr(loop, "_host_all_finite", lambda ts: reads.append(ts[1] is layer.weight) or real(ts))
    calls = []
    with pytest.raises(NonFiniteLossError, match=rf"epoch 2, step {bad_step + 1}$"):
        marked = lambda y, call: bool((y[:, 0] == MARK).any())  # noqa: E731
        generator = torch.Generator().manual_seed(9)
        run_epoch(_noisy_loss(layer, calls, marked), optimizer, x, 2, generator, epoch=2,
                  extra_loss=drawn_term(layer, generator), batch_indices=_in_order)  # fmt: skip
    # The first run reads no gradient: it stops at the next step's NaN loss, or reads the
    # weights once at the end; the replay reads each step's gradients up to the bad step.
    assert reads == [True] * (bad_step == 5) + [False] * (bad_step + 1)
    assert len(calls) == min(bad_step + 2, 6) + bad_step + 1
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), layer.parameters(), strict=True))
    for p, q in zip(reference.parameters(), layer.parameters(), strict=True):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_optimizer.state[p][k], optimizer.state[q][k])


def test_a_failed_epoch_whose_replay_is_finite_is_kept_with_a_warning():
    layer, optimizer = _adam_linear()
    calls = []
    with pytest.warns(RuntimeWarning, match="a replay of the epoch checking every step found none"):
        loss_fn = _noisy_loss(layer, calls, lambda y, call: call == 1)  # not again in the replay
        total = run_epoch(loss_fn, optimizer, torch.randn(8, 3), 2, torch.Generator())
    assert len(calls) == 3 + 4 and torch.isfinite(total)  # stopped at step 3's NaN loss, then a clean replay
    assert all(torch.isfinite(p).all() for p in layer.parameters())


def test_the_deferred_guard_changes_no_number():
    """A clean epoch under torch's Adam (checked at the end) ends as under the per-step check, bit for bit."""

    class CheckedAdam(torch.optim.Adam):  # not torch's Adam itself: checked every step
        pass

    results = []
    for kind in (torch.optim.Adam, CheckedAdam):
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 1)
        optimizer = kind(layer.parameters(), lr=0.1)
        torch.manual_seed(3)
        total = run_epoch(_noisy_loss(layer, []), optimizer, torch.randn(10, 3), 2, torch.Generator())
        results.append([total, *layer.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_the_guard_is_chosen_by_optimiser_device_and_process_group(monkeypatch):
    from pyro_gmvae.loop import guard_kind

    layer = torch.nn.Linear(3, 1)
    assert guard_kind(adam(layer.parameters(), 1e-3), torch.device("cpu")) == "deferred"
    assert guard_kind(adam(layer.parameters(), 1e-3, "fused"), torch.device("cpu")) == "device"
    assert guard_kind(torch.optim.SGD(layer.parameters(), 0.1), torch.device("cpu")) == "host"
    # under torchrun the ranks see different losses: every step is checked, so all raise together
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert guard_kind(adam(layer.parameters(), 1e-3), torch.device("cpu")) == "host"
