"""The objective against hand-written mathematics, in float64 on a tiny model (K = 3).

The reference ELBO here is written from the paper's formulas with ``torch.distributions``
only, on the very samples that ``TraceEnum_ELBO`` draws (same seed, same sampling order:
w, then x; the cluster variable never touches the random stream because it is enumerated).
"""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.distributions as td
from torch.nn import functional as F

from pyro_gmvae.build import build_model_and_guide
from pyro_gmvae.config import Config
from pyro_gmvae.networks import SCALE_FLOOR
from pyro_gmvae.objective import elbo_terms, make_elbo

K, HIDDEN, X_DIM, W_DIM, DATA_DIM, BATCH = 3, 8, 2, 2, 4, 8
GUIDES = ("v2", "v1")
PLAIN = dict(z_prior_weight=1.0, cv_weight=0.0, free_bits=0.0)
WEIGHTED = dict(z_prior_weight=1.7, cv_weight=0.3, free_bits=0.0)
BALANCED = dict(WEIGHTED, balance_weight=0.8)  # plus gamma KL(batch mean of p(z|x,w) || pi)
TOLERATED = dict(BALANCED, balance_tolerance=0.01)  # gamma max(0, KL - tau); M = 3 puts KLs on both sides


def build(guide: str, prior: str = "uniform", **reg):
    config = Config(
        data="spiral", K=K, hidden_dim=HIDDEN, x_dim=X_DIM, w_dim=W_DIM, guide=guide, prior=prior, **reg
    ).resolved()
    model, guide_module = build_model_and_guide(config, (DATA_DIM,))
    model.double()
    guide_module.double()
    if prior == "learned":
        with torch.no_grad():  # non-uniform pi, so log pi enters every formula
            model.prior.logits.copy_(torch.tensor([0.8, -0.5, 0.1], dtype=torch.float64))
    return model, guide_module


@pytest.fixture
def y(tiny_mixture):
    return tiny_mixture[0][:BATCH].double()


def params(model, guide):
    return list(model.parameters()) + list(guide.parameters())


def grads(loss, parameters, retain_graph=False):
    out = torch.autograd.grad(loss, parameters, allow_unused=True, retain_graph=retain_graph)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, out, strict=True)]


def guide_samples(guide, y, num_particles: int, seed: int):
    """The (w, x) that TraceEnum_ELBO draws with this seed: the guide run under the same
    particle plate (dim -2, as ``vectorize_particles`` places it) and enumeration handler."""

    def vectorized(y):
        if num_particles == 1:
            return guide(y)
        with pyro.plate("num_particles_vectorized", num_particles, dim=-2):
            return guide(y)

    pyro.set_rng_seed(seed)
    trace = poutine.trace(poutine.enum(vectorized, first_available_dim=-3)).get_trace(y)
    return trace.nodes["w"]["value"].detach(), trace.nodes["x"]["value"].detach()


def hand_terms(model, guide, y, w_sample, x_sample):
    """Per-sample ELBO pieces from the paper's formulas, torch.distributions only.

    The samples are rebuilt as loc + scale * eps from this call's encoder output, so
    gradients flow through the reparameterisation exactly as in Pyro.
    Returns (elbo, z_prior, cv), each of shape (M, B) (M = 1 for an unbatched sample), and
    balance, KL(mean_b p(z | x_b, w_b) || pi) of the batch, shape (M,).
    """
    q = guide.encode(y)
    eps_w = (w_sample - q["w_loc"].detach()) / q["w_scale"].detach()
    eps_x = (x_sample - q["x_loc"].detach()) / q["x_scale"].detach()
    w = q["w_loc"] + q["w_scale"] * eps_w  # (M, B, Dw) or (B, Dw)
    x = q["x_loc"] + q["x_scale"] * eps_x
    if w.dim() == 2:
        w, x = w.unsqueeze(0), x.unsqueeze(0)

    log_q_w = td.Normal(q["w_loc"], q["w_scale"]).log_prob(w).sum(-1)  # (M, B)
    log_q_x = td.Normal(q["x_loc"], q["x_scale"]).log_prob(x).sum(-1)
    log_p_w = td.Normal(torch.zeros_like(w), torch.ones_like(w)).log_prob(w).sum(-1)
    out = model.decoder(x)  # (M, B, 2, D): Gaussian location and raw scale
    y_scale = F.softplus(out[..., 1, :]) + SCALE_FLOOR
    log_p_y = td.Normal(out[..., 0, :], y_scale).log_prob(y).sum(-1)

    pi = torch.softmax(model.prior.cluster_logits, -1)  # (K,)
    loc, scale = model.prior.components(w)  # (M, B, K, Dx)
    log_n = torch.stack(
        [td.Normal(loc[..., k, :], scale[..., k, :]).log_prob(x).sum(-1) for k in range(K)], -1
    )  # (M, B, K): log N(x; mu_k(w), sigma_k(w))
    joint = pi.log() + log_n
    posterior = joint.exp() / joint.exp().sum(-1, keepdim=True)  # Bayes' rule, p(z | x, w)
    cv = td.Categorical(probs=posterior).entropy()
    base = log_p_y + log_p_w - log_q_w - log_q_x
    if "z_logits" not in q:  # the v2 guide: r = p(z | x, w)
        # log sum_k pi_k N(x; mu_k, sigma_k): z summed out in the model
        elbo = base + torch.logsumexp(joint, -1)
        z_prior = td.kl_divergence(td.Categorical(probs=posterior), td.Categorical(probs=pi))
    else:
        q_z = torch.softmax(q["z_logits"], -1)  # (B, K): z summed out under q(z|y)
        z_prior = td.kl_divergence(td.Categorical(probs=q_z), td.Categorical(probs=pi)).expand_as(base)
        elbo = base + sum(q_z[:, k] * log_n[..., k] for k in range(K)) - z_prior
    batch_mean = posterior.mean(-2)  # (M, K)
    balance = (batch_mean * (batch_mean.log() - pi.log())).sum(-1)
    return elbo, z_prior, cv, balance


def hand_loss(model, guide, y, w, x, eta, alpha, gate_shut=False, gamma=0.0, tau=0.0):
    """-ELBO + (eta - 1) z_prior + alpha cv, averaged over particles, summed over the batch,
    plus B gamma max(0, balance - tau) (the batch's term, once per example).
    With the free-bits gate shut, the eta * z_prior part passes no gradient."""
    elbo, z_prior, cv, balance = hand_terms(model, guide, y, w, x)
    if gate_shut:
        per_sample = -(elbo + z_prior) + eta * z_prior.detach() + alpha * cv
    else:
        per_sample = -elbo + (eta - 1) * z_prior + alpha * cv
    if tau > 0:
        balance = torch.where(balance > tau, balance - tau, torch.zeros_like(balance))
    return per_sample.mean(0).sum() + y.shape[0] * gamma * balance.mean(0)


@pytest.mark.parametrize(
    "reg", [PLAIN, WEIGHTED, BALANCED, TOLERATED], ids=["plain", "weighted", "balanced", "tolerated"]
)
@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("prior", ["uniform", "learned"])
@pytest.mark.parametrize("guide_name", GUIDES)
def test_traceenum_loss_and_gradients_equal_hand_written_sum(y, guide_name, prior, num_particles, reg):
    model, guide = build(guide_name, prior, **reg)
    loss_fn = make_elbo(num_particles)(model, guide)
    pyro.set_rng_seed(7)
    loss = loss_fn(y)
    w, x = guide_samples(guide, y, num_particles, seed=7)
    gamma, tau = reg.get("balance_weight", 0), reg.get("balance_tolerance", 0)
    expected = hand_loss(model, guide, y, w, x, reg["z_prior_weight"], reg["cv_weight"], gamma=gamma, tau=tau)

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    parameters = params(model, guide)
    for got, want in zip(grads(loss, parameters), grads(expected, parameters), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_samples_are_the_ones_traceenum_used(y):
    """Guard the reference: a different seed gives a different loss, so the equality above
    is not an accident of sample-independent terms."""
    model, guide = build("v2")
    loss_fn = make_elbo(1)(model, guide)
    pyro.set_rng_seed(7)
    loss = loss_fn(y)
    w, x = guide_samples(guide, y, 1, seed=8)
    assert not torch.isclose(loss, hand_loss(model, guide, y, w, x, 1.0, 0.0))


# --- parallel vs sequential enumeration ----------------------------------------------
def _fixed_guide(guide, y, seed):
    """The guide with w and x replayed from one draw (values keep their graph, so the
    reparameterised gradients survive) and z left free to be enumerated."""
    pyro.set_rng_seed(seed)
    trace = poutine.trace(poutine.enum(guide, first_available_dim=-2)).get_trace(y)
    for name in list(trace.nodes):
        if name not in ("w", "x"):
            trace.remove_node(name)
    return poutine.replay(guide, trace=trace), trace


@pytest.mark.parametrize("reg", [PLAIN, WEIGHTED], ids=["plain", "weighted"])
def test_v1_parallel_and_sequential_enumeration_agree(y, reg):
    """z in the v1 guide: parallel (one batched trace) vs sequential (K traces, one per value)."""
    model, guide = build("v1", "learned", **reg)
    fixed, _ = _fixed_guide(guide, y, seed=3)
    sequential = poutine.infer_config(fixed, lambda msg: {"enumerate": "sequential"} if msg["name"] == "z" else {})
    parallel_loss = make_elbo(1).differentiable_loss(model, fixed, y)
    sequential_loss = make_elbo(1).differentiable_loss(model, sequential, y)
    torch.testing.assert_close(parallel_loss, sequential_loss, rtol=1e-10, atol=1e-10)
    parameters = params(model, guide)
    g_par = grads(parallel_loss, parameters, retain_graph=True)
    g_seq = grads(sequential_loss, parameters, retain_graph=True)
    for a, b in zip(g_par, g_seq, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("reg", [PLAIN, WEIGHTED], ids=["plain", "weighted"])
def test_v2_parallel_and_sequential_enumeration_agree(y, reg):
    """z in the model: TraceEnum_ELBO only enumerates model sites in parallel, so the
    sequential version runs the model once per cluster value (poutine.condition), sums the
    per-example log joint over the K runs with logsumexp, and subtracts log q."""
    model, guide = build("v2", "learned", **reg)
    fixed, guide_trace = _fixed_guide(guide, y, seed=3)
    parallel_loss = make_elbo(1).differentiable_loss(model, fixed, y)

    guide_trace = poutine.trace(fixed).get_trace(y)
    guide_trace.compute_log_prob()
    log_q = sum(guide_trace.nodes[name]["log_prob"] for name in ("w", "x"))  # (B,)
    per_cluster = []
    for k in range(K):
        z = torch.full((BATCH,), k, dtype=torch.long)
        conditioned = poutine.replay(poutine.condition(model, data={"z": z}), trace=guide_trace)
        model_trace = poutine.trace(conditioned).get_trace(y)
        model_trace.compute_log_prob()
        sites = [s for s in model_trace.nodes.values() if s["type"] == "sample"]
        assert {s["name"] for s in sites} >= {"w", "z", "x", "y"}
        per_cluster.append(sum(s["log_prob"] for s in sites))  # (B,)
    sequential_loss = -(torch.logsumexp(torch.stack(per_cluster), 0) - log_q).sum()

    torch.testing.assert_close(parallel_loss, sequential_loss, rtol=1e-10, atol=1e-10)
    parameters = params(model, guide)
    g_par = grads(parallel_loss, parameters, retain_graph=True)
    g_seq = grads(sequential_loss, parameters, retain_graph=True)
    for a, b in zip(g_par, g_seq, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# --- elbo_terms: the logged terms -----------------------------------------------------
@pytest.mark.parametrize(
    "reg", [PLAIN, WEIGHTED, dict(WEIGHTED, free_bits=0.05), BALANCED], ids=["plain", "weighted", "fb", "balanced"]
)
@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("guide_name", GUIDES)
def test_elbo_terms_loss_matches_traceenum(y, guide_name, num_particles, reg):
    model, guide = build(guide_name, "learned", **reg)
    pyro.set_rng_seed(11)
    loss = make_elbo(num_particles)(model, guide)(y)
    pyro.set_rng_seed(11)
    terms = elbo_terms(model, guide, y, num_particles, closed_form_w=False)
    torch.testing.assert_close(terms["loss"].sum(), loss, rtol=1e-10, atol=1e-10)
    for value in terms.values():
        assert value.shape == (BATCH,)


@pytest.mark.parametrize("reg", [PLAIN, WEIGHTED], ids=["plain", "weighted"])
@pytest.mark.parametrize("closed_form_w", [True, False])
@pytest.mark.parametrize("guide_name", GUIDES)
def test_elbo_terms_identities_and_closed_forms(y, guide_name, closed_form_w, reg):
    model, guide = build(guide_name, "learned", **reg)
    num_particles = 4
    pyro.set_rng_seed(5)
    terms = elbo_terms(model, guide, y, num_particles, closed_form_w=closed_form_w)

    # ELBO = recon - cond_prior - w_prior - z_prior; loss = -ELBO + (eta - 1) z_prior + alpha cv
    torch.testing.assert_close(
        terms["elbo"], terms["recon"] - terms["cond_prior"] - terms["w_prior"] - terms["z_prior"]
    )
    eta, alpha = reg["z_prior_weight"], reg["cv_weight"]
    expected_loss = -terms["elbo"] + (eta - 1) * terms["z_prior"] + alpha * terms["cv"]
    torch.testing.assert_close(terms["loss"], expected_loss)
    if reg == PLAIN:
        torch.testing.assert_close(terms["loss"], -terms["elbo"])

    # Every term by hand on the same samples (elbo_terms draws w, then x).
    q = guide.encode(y)
    q_w = td.Normal(q["w_loc"], q["w_scale"])
    q_x = td.Normal(q["x_loc"], q["x_scale"])
    pyro.set_rng_seed(5)
    w = q_w.rsample((num_particles,))
    x = q_x.rsample((num_particles,))
    pi = torch.softmax(model.prior.cluster_logits, -1)
    loc, scale = model.prior.components(w)
    log_n = td.Normal(loc, scale).log_prob(x.unsqueeze(-2)).sum(-1)  # (M, B, K)
    exact = pi * log_n.exp()
    exact = exact / exact.sum(-1, keepdim=True)
    r = exact if guide_name == "v2" else torch.softmax(q["z_logits"], -1).expand_as(exact)
    z_prior = (r * (r.log() - pi.log())).sum(-1).mean(0)
    cv = -(exact * exact.log()).sum(-1).mean(0)
    cond_prior = (r * (q_x.log_prob(x).sum(-1, keepdim=True) - log_n)).sum(-1).mean(0)
    out = model.decoder(x)
    recon = td.Normal(out[..., 0, :], F.softplus(out[..., 1, :]) + SCALE_FLOOR).log_prob(y).sum(-1).mean(0)
    if closed_form_w:
        w_prior = td.kl_divergence(q_w, td.Normal(0.0, 1.0)).sum(-1)
    else:
        w_prior = (q_w.log_prob(w) - td.Normal(0.0, 1.0).log_prob(w)).sum(-1).mean(0)
    for name, value in dict(recon=recon, cond_prior=cond_prior, w_prior=w_prior, z_prior=z_prior, cv=cv).items():
        torch.testing.assert_close(terms[name], value, msg=lambda m, name=name: f"{name}: {m}")


def test_closed_form_w_prior_is_the_expectation_of_the_estimate(y):
    """KL(q(w|y) || N(0, I)) against the Monte Carlo mean of log q(w|y) - log p(w) over
    S = 20000 draws per example; tolerance 4 standard errors of that mean."""
    model, guide = build("v2")
    with torch.no_grad():
        closed = elbo_terms(model, guide, y, 1, closed_form_w=True)["w_prior"]
        q = guide.encode(y)
        q_w = td.Normal(q["w_loc"], q["w_scale"])
        w = q_w.sample((20000,))
        estimate = (q_w.log_prob(w) - td.Normal(0.0, 1.0).log_prob(w)).sum(-1)  # (S, B)
    standard_error = estimate.std(0) / math.sqrt(estimate.shape[0])
    assert ((closed - estimate.mean(0)).abs() < 4 * standard_error + 1e-12).all()


@pytest.mark.parametrize("guide_name", GUIDES)
def test_cluster_posterior_is_bayes_rule(y, guide_name):
    model, _ = build(guide_name, "learned")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, BATCH, W_DIM, generator=gen, dtype=torch.float64)
    x = torch.randn(5, BATCH, X_DIM, generator=gen, dtype=torch.float64)
    pi = torch.softmax(model.prior.logits, -1)
    loc, scale = model.prior.components(w)
    joint = torch.stack(
        [pi[k] * td.Normal(loc[..., k, :], scale[..., k, :]).log_prob(x).sum(-1).exp() for k in range(K)], -1
    )
    bayes = joint / joint.sum(-1, keepdim=True)
    log_r = model.cluster_log_posterior(x, w)
    assert log_r.shape == (5, BATCH, K)
    torch.testing.assert_close(log_r.exp(), bayes)


# --- free bits ------------------------------------------------------------------------
@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("guide_name", GUIDES)
def test_free_bits_gate_switches_on_the_batch_mean(y, guide_name, num_particles):
    eta, alpha = 1.7, 0.3
    model0, guide0 = build(guide_name, "learned", z_prior_weight=eta, cv_weight=alpha)
    w, x = guide_samples(guide0, y, num_particles, seed=13)
    _, z_prior, _, _ = hand_terms(model0, guide0, y, w, x)
    batch_mean = float(z_prior.detach().mean())
    assert batch_mean > 0

    results = {}
    for side, lam in (("above", batch_mean * (1 + 1e-6)), ("below", batch_mean * (1 - 1e-6))):
        model, guide = build(guide_name, "learned", z_prior_weight=eta, cv_weight=alpha, free_bits=lam)
        model.load_state_dict(model0.state_dict())
        guide.load_state_dict(guide0.state_dict())
        pyro.set_rng_seed(13)
        loss = make_elbo(num_particles)(model, guide)(y)
        parameters = params(model, guide)
        got = grads(loss, parameters)
        # value never changes at the gate
        torch.testing.assert_close(loss, hand_loss(model, guide, y, w, x, eta, alpha), rtol=1e-10, atol=1e-10)
        reference = hand_loss(model, guide, y, w, x, eta, alpha, gate_shut=side == "above")
        for a, b in zip(got, grads(reference, parameters), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        results[side] = got
    # the gate makes a difference: the two gradients are not the same
    assert any(not torch.allclose(a, b) for a, b in zip(results["above"], results["below"], strict=True))


# --- M = 1 vs M = 5 -------------------------------------------------------------------
@pytest.mark.parametrize("guide_name", GUIDES)
def test_particle_count_keeps_the_expectation(y, guide_name):
    """The loss with M = 5 vectorised particles estimates the same quantity as with M = 1.

    N = 300 independent evaluations each; pass if |mean_1 - mean_5| < 4 combined standard
    errors (a two-sided z-test at about 6e-5 false-alarm rate).  The M = 5 estimator must
    also have a clearly smaller spread (sqrt(5) in theory; required: below 0.7 x)."""
    model, guide = build(guide_name, "learned", **WEIGHTED)
    num_evals = 300
    samples = {}
    for m in (1, 5):
        elbo = make_elbo(m)
        samples[m] = torch.tensor([elbo.loss(model, guide, y) for _ in range(num_evals)], dtype=torch.float64)
    mean1, mean5 = samples[1].mean(), samples[5].mean()
    se = math.sqrt(samples[1].var() / num_evals + samples[5].var() / num_evals)
    assert abs(mean1 - mean5) < 4 * se, (float(mean1), float(mean5), se)
    assert samples[5].std() < 0.7 * samples[1].std()


def test_balance_tolerance_closed_form_and_dead_zone():
    """max(0, KL(rbar || pi) - tau): a 25/75 batch against uniform pi has KL 0.75 log 1.5 + 0.25 log 0.5."""
    from pyro_gmvae.objective import balance_kl, tolerated_balance_kl

    probs = torch.tensor([[0.5, 0.5], [0.0, 1.0]], dtype=torch.float64).clamp_min(1e-300)
    log_r = probs.log().requires_grad_(True)
    log_pi = torch.full((2,), 0.5, dtype=torch.float64).log()
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.1308 nats
    torch.testing.assert_close(balance_kl(log_r, log_pi), torch.tensor(kl, dtype=torch.float64))
    assert torch.equal(tolerated_balance_kl(log_r, log_pi, 0.0), balance_kl(log_r, log_pi))  # tau 0: the plain KL
    crossed = tolerated_balance_kl(log_r, log_pi, 0.1)
    torch.testing.assert_close(crossed, torch.tensor(kl - 0.1, dtype=torch.float64))
    (grad_crossed,) = torch.autograd.grad(crossed, log_r)
    (grad_plain,) = torch.autograd.grad(balance_kl(log_r, log_pi), log_r)
    torch.testing.assert_close(grad_crossed, grad_plain)  # past tau: the KL's own gradient
    tolerated = tolerated_balance_kl(log_r, log_pi, 0.2)
    assert tolerated.item() == 0.0
    (grad_tolerated,) = torch.autograd.grad(tolerated, log_r)
    assert torch.count_nonzero(grad_tolerated) == 0  # within tau: no gradient at all
