"""The exact shortcuts of pyro_gmvae.densities and the Bernoulli image: the numbers of the plain formulas, bit for bit.

normal_log_density_table is Normal.log_prob(...).sum(-1), StandardNormal.log_prob is Normal(0, 1).log_prob,
GreyBernoulliImage.log_prob is GreyBernoulli(...).to_event(n).log_prob: values and gradients.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_gmvae import densities
from pyro_gmvae.densities import StandardNormal, _NormalTable, normal_log_density_table
from pyro_gmvae.likelihoods import BernoulliLikelihood, GreyBernoulli


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


# --- p(w): StandardNormal ------------------------------------------------------------
def _awkward_values(dtype):
    """Normal draws with the values where rounding could differ: signed zeros, subnormal squares, huge ones."""
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.tiny**0.5, 1e-30, 1.0, -1.0, 3.0, 1e18, -1e18, 2.5],
                           dtype=dtype)  # fmt: skip
    draws = torch.randn(4, 50, generator=torch.Generator().manual_seed(2), dtype=dtype) * 4
    return torch.cat([draws.flatten(), special]).reshape(2, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standard_normal_equals_normal_0_1_bit_for_bit(dtype):
    x = _awkward_values(dtype).requires_grad_()
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=dtype) * 1e3
    fast_dist = StandardNormal(x.shape, dtype)
    plain_dist = dist.Normal(torch.zeros(x.shape, dtype=dtype), 1.0)
    fast, plain = fast_dist.log_prob(x), plain_dist.log_prob(x)
    assert torch.equal(fast, plain)
    grads = [torch.autograd.grad((lp * weight).sum(), x)[0] for lp in (fast, plain)]
    assert torch.equal(*grads)
    # summed over the event, as p(w) is issued
    fast, plain = StandardNormal(x.shape, dtype).to_event(1), dist.Normal(plain_dist.loc, 1.0).to_event(1)
    assert torch.equal(fast.log_prob(x), plain.log_prob(x))


def test_standard_normal_is_normal_0_1_elsewhere():
    d = StandardNormal((5, 3))
    assert torch.equal(d.loc, torch.zeros(5, 3)) and torch.equal(d.scale, torch.ones(5, 3))
    wide = d.expand((2, 5, 3))
    assert type(wide) is StandardNormal and wide.batch_shape == (2, 5, 3)
    q = dist.Normal(torch.randn(5, 3), torch.rand(5, 3) + 0.5)
    plain = dist.Normal(torch.zeros(5, 3), 1.0)
    assert torch.equal(torch.distributions.kl_divergence(q, d), torch.distributions.kl_divergence(q, plain))
    pyro.set_rng_seed(0)
    drawn = d.rsample()
    pyro.set_rng_seed(0)
    assert torch.equal(drawn, plain.rsample())


@pytest.mark.parametrize("x_shape, dtype", [((3,), torch.float32), ((5, 3), torch.float64), ((2, 1, 3), torch.float32)])
def test_standard_normal_falls_back_where_normal_would_broadcast_or_promote(x_shape, dtype):
    x = torch.randn(x_shape, dtype=dtype)
    fast = StandardNormal((5, 3)).log_prob(x)
    plain = dist.Normal(torch.zeros(5, 3), 1.0).log_prob(x)
    assert fast.shape == plain.shape and fast.dtype == plain.dtype and torch.equal(fast, plain)


@pytest.mark.parametrize("value", [torch.tensor([[0.0, float("nan"), 1.0]] * 2), torch.zeros(4)], ids=["nan", "shape"])
def test_standard_normal_validates_as_normal_does(value):
    with pytest.raises(ValueError) as fast:
        StandardNormal((2, 3)).log_prob(value)
    with pytest.raises(ValueError) as plain:
        dist.Normal(torch.zeros(2, 3), 1.0).log_prob(value)
    assert str(fast.value) == str(plain.value).replace("Normal(", "StandardNormal(")  # the message names the class


# --- p(y | x): the Bernoulli image ---------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("data_shape", [(1, 28, 28), (784,), (3, 4, 5)])
def test_bernoulli_image_equals_to_event_bit_for_bit(dtype, data_shape):
    g = torch.Generator().manual_seed(5)
    decoder_out = (torch.randn((7, 1, *data_shape), generator=g, dtype=dtype) * 20).requires_grad_()
    y = torch.rand((7, *data_shape), generator=g, dtype=dtype)
    y.view(-1)[:10] = torch.tensor([0.0, 1.0] * 5, dtype=dtype)
    weight = torch.randn(7, generator=g, dtype=dtype)
    image = BernoulliLikelihood()(decoder_out, len(data_shape))
    plain = GreyBernoulli(logits=decoder_out.select(1, 0)).to_event(len(data_shape))
    fast, slow = image.log_prob(y), plain.log_prob(y)
    assert torch.equal(fast, slow)
    grads = [torch.autograd.grad((lp * weight).sum(), decoder_out)[0] for lp in (fast, slow)]
    assert torch.equal(*grads)
    wide = image.expand((2, 7))
    assert type(wide) is type(image) and torch.equal(wide.log_prob(y), plain.expand((2, 7)).log_prob(y))


def test_bernoulli_image_validates_grey_levels():
    image = BernoulliLikelihood()(torch.zeros(2, 1, 4), 1)
    with pytest.raises(ValueError, match="found invalid values"):
        image.log_prob(torch.tensor([[0.5, 1.5, 0.0, 1.0]] * 2))


def test_p_w_and_p_y_passes():
    """p(w): 3 passes over (B, Dw) forward where Normal(0, 1) makes 9; p(y): no negation of the image."""
    with pyro.validation_enabled(False):
        w = torch.randn(64, 6)
        counts = [
            _passes_over(w.shape, lambda d=d: d.log_prob(w))
            for d in (StandardNormal(w.shape), dist.Normal(torch.zeros(64, 6), 1.0))
        ]
        assert counts == [3, 9]
        logits, y = torch.randn(64, 1, 5, 5), torch.rand(64, 5, 5)
        image = BernoulliLikelihood()(logits, 2)
        plain = GreyBernoulli(logits=logits.select(1, 0)).to_event(2)
        counts = [_passes_over((64, 5, 5), lambda d=d: d.log_prob(y)) for d in (image, plain)]
        assert counts == [2, 3]  # broadcast_tensors (views) and the cross-entropy; the plain one negates too
