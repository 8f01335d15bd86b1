"""normal_log_density_table equals Normal.log_prob(...).sum(-1), values and gradients, bit for bit."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_gmvae import densities
from pyro_gmvae.densities import _NormalTable, normal_log_density_table


@pytest.fixture(autouse=True)
def every_table_by_hand(monkeypatch):
    """The hand-written backward for tables of every size (by default from MIN_TABLE_ELEMENTS)."""
    monkeypatch.setattr(densities, "MIN_TABLE_ELEMENTS", 0)


def normal_table(loc, scale, x):
    return dist.Normal(loc, scale).log_prob(x.unsqueeze(-2)).sum(-1)


def inputs(shape, dtype, spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    *batch, K, Dx = shape
    loc = (3 * torch.randn(shape, generator=g, dtype=dtype)).requires_grad_()
    scale = (spread * torch.rand(shape, generator=g, dtype=dtype) + 1e-3).requires_grad_()
    x = torch.randn(*batch, Dx, generator=g, dtype=dtype).requires_grad_()
    # upstream gradients over many orders of magnitude, as responsibilities are
    weight = torch.randn(*batch, K, generator=g, dtype=dtype) * torch.rand(*batch, K, generator=g, dtype=dtype) ** 30
    return loc, scale, x, weight


def value_and_grads(table, loc, scale, x, weight, wrt=(0, 1, 2)):
    out = table(loc, scale, x)
    args = (loc, scale, x)
    return (out, *torch.autograd.grad((out * weight).sum(), [args[i] for i in wrt]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(256, 10, 200), (3, 16, 10, 20), (7, 3, 5), (1, 1, 1)])
@pytest.mark.parametrize("spread", [1e-3, 1.0, 30.0])
def test_table_equals_normal_log_prob_bit_for_bit(dtype, shape, spread):
    loc, scale, x, weight = inputs(shape, dtype, spread)
    fast = value_and_grads(normal_log_density_table, loc, scale, x, weight)
    plain = value_and_grads(normal_table, loc, scale, x, weight)
    for name, a, b in zip(("value", "grad loc", "grad scale", "grad x"), fast, plain, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("wrt", [(0,), (1,), (2,), (0, 2), (1, 2)])
def test_only_the_gradients_asked_for(wrt):
    loc, scale, x, weight = inputs((4, 3, 5), torch.float64, 1.0)
    fast = value_and_grads(normal_log_density_table, loc, scale, x, weight, wrt)
    plain = value_and_grads(normal_table, loc, scale, x, weight, wrt)
    assert all(torch.equal(a, b) for a, b in zip(fast, plain, strict=True))


def test_the_hand_written_backward_runs_on_the_usual_shapes(monkeypatch):
    calls = []
    backward = _NormalTable.backward

    def counting(ctx, grad):
        calls.append(grad.shape)
        return backward(ctx, grad)

    monkeypatch.setattr(_NormalTable, "backward", staticmethod(counting))
    loc, scale, x, weight = inputs((2, 8, 10, 6), torch.float32, 1.0)
    value_and_grads(normal_log_density_table, loc, scale, x, weight)
    assert calls == [torch.Size([2, 8, 10])]
    monkeypatch.setattr(densities, "MIN_TABLE_ELEMENTS", loc.numel() + 1)  # smaller tables: Normal.log_prob
    value_and_grads(normal_log_density_table, loc, scale, x, weight)
    assert len(calls) == 1
    monkeypatch.setattr(densities, "MIN_TABLE_ELEMENTS", loc.numel())
    value_and_grads(normal_log_density_table, loc, scale, x, weight)
    assert len(calls) == 2


@pytest.mark.parametrize(
    "loc_shape, x_shape",
    [((10, 6), (8, 6)), ((1, 10, 6), (8, 6)), ((8, 10, 6), (3, 8, 6))],
    ids=["global-components", "broadcast-batch", "x-with-particles"],
)
def test_other_shapes_broadcast_as_normal_does(loc_shape, x_shape):
    g = torch.Generator().manual_seed(1)
    loc = torch.randn(loc_shape, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(loc_shape, generator=g, dtype=torch.float64).add(0.1).requires_grad_()
    x = torch.randn(x_shape, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(torch.broadcast_shapes(loc_shape[:-1], x_shape[:-1] + (1,)), dtype=torch.float64)
    fast = value_and_grads(normal_log_density_table, loc, scale, x, weight)
    plain = value_and_grads(normal_table, loc, scale, x, weight)
    assert all(torch.equal(a, b) for a, b in zip(fast, plain, strict=True))


def test_invalid_scale_raises_normals_error():
    loc, scale, x, _ = inputs((2, 3, 4), torch.float32, 1.0)
    bad = scale.detach().clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="found invalid values") as fast:
        normal_log_density_table(loc, bad, x)
    with pytest.raises(ValueError, match="found invalid values") as plain:
        normal_table(loc, bad, x)
    assert str(fast.value) == str(plain.value)


def test_autocast_goes_through_normal_log_prob():
    loc, scale, x, weight = inputs((4, 3, 5), torch.float32, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = value_and_grads(normal_log_density_table, loc, scale, x, weight)
        plain = value_and_grads(normal_table, loc, scale, x, weight)
    assert all(torch.equal(a, b) for a, b in zip(fast, plain, strict=True))


def test_no_second_derivatives():
    loc, scale, x, weight = inputs((2, 3, 4), torch.float64, 1.0)
    (grad,) = torch.autograd.grad((normal_log_density_table(loc, scale, x) * weight).sum(), loc, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()


def _passes_over(shape, fn) -> int:
    """Top-level aten operations that read a tensor of ``shape``, as torch.profiler records them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::")
        and any(list(s) == list(shape) for s in e.input_shapes if s)
        and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))
    )


def test_pass_counts_of_the_readme():
    """8 passes and the sum forward, 10 backward, against Normal.log_prob's 9 and the sum, and 18."""
    shape = (16, 10, 20)
    loc, scale, x, weight = inputs(shape, torch.float32, 1.0)
    counts = {}
    with pyro.validation_enabled(False):
        for name, table in (("by_hand", normal_log_density_table), ("normal", normal_table)):
            forward = _passes_over(shape, lambda table=table: table(loc, scale, x))
            loss = (table(loc, scale, x) * weight).sum()
            backward = _passes_over(shape, lambda loss=loss: torch.autograd.grad(loss, (loc, scale, x)))
            counts[name] = (forward, backward)
    assert counts == {"by_hand": (9, 10), "normal": (10, 18)}
