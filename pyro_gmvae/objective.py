"""The GMVAE objective: regularisers, the training loss and the per-example ELBO terms.

Notation of the paper (Dilokthanakul et al. 2016, section 3).  Per example, with (x, w) ~ q:

    ELBO       = recon - cond_prior - w_prior - z_prior
    recon      = E[log p(y|x)]
    cond_prior = E[sum_k r_k (log q(x|y) - log N(x; mu_k(w), sigma_k(w)))]
    w_prior    = KL(q(w|y) || N(0, I))
    z_prior    = E[KL(r || pi)]
    cv         = E[H(p(z|x,w))]          (consistency violation; not part of the ELBO)

with r = p(z|x,w) for the v2 guide and r = q(z|y) for the v1 guide.  Training maximises
``ELBO - (eta - 1) z_prior - alpha cv``; with free bits lambda > 0 the z_prior term only
passes gradient while its minibatch mean exceeds lambda.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.ops.indexing import Vindex
from torch.distributions import constraints

from pyro_gmvae.config import non_negative_number

TERM_NAMES = ("recon", "cond_prior", "w_prior", "z_prior", "cv", "elbo", "loss")


@dataclass(frozen=True)
class Regularization:
    """Weights of the regularisers added to the ELBO: eta on z_prior, alpha on cv, free bits lambda."""

    z_prior_weight: float = 1.0  # eta; 1 leaves the ELBO's own z_prior term as it is
    cv_weight: float = 0.0  # alpha; weight of the consistency-violation entropy
    free_bits: float = 0.0  # lambda; 0 turns free bits off

    def __post_init__(self):
        for name in ("z_prior_weight", "cv_weight", "free_bits"):  # the check of the Config fields
            non_negative_number(name, getattr(self, name))

    @property
    def touches_z_prior(self) -> bool:
        return self.z_prior_weight != 1.0 or self.free_bits > 0


def log_component_densities(loc: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log N(x; loc_k, diag scale_k^2) for every k: (..., K, Dx) x (..., Dx) -> (..., K)."""
    return dist.Normal(loc, scale).log_prob(x.unsqueeze(-2)).sum(-1)


def cluster_log_posterior(log_weights: torch.Tensor, loc, scale, x) -> torch.Tensor:
    """log p(z=k | x, w) by Bayes' rule, shape (..., K)."""
    return posterior_from_densities(log_weights, log_component_densities(loc, scale, x))


def posterior_from_densities(log_weights: torch.Tensor, log_components: torch.Tensor) -> torch.Tensor:
    """log p(z=k | x, w) from log pi (K,) and the table log N(x; mu_k(w), sigma_k(w)) (..., K)."""
    return torch.log_softmax(log_weights + log_components, -1)


class ComponentNormal(dist.TorchDistribution):
    """p(x | z, w) = N(x; loc_z, diag scale_z^2) that scores all K components at once.

    The same distribution as ``Normal(Vindex(loc)[..., z, :], ...).to_event(1)``, but
    ``log_prob(x)`` computes the (..., K) table of :func:`log_component_densities` once and
    picks entry z from it, and :meth:`log_components` hands that same table to the
    regulariser.  With z enumerated this scores (B, K, Dx) once instead of gathering a
    (K, B, Dx) copy and scoring it again for the regulariser.
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, z: torch.Tensor, validate_args=None):
        self.loc, self.scale, self.z = loc, scale, z  # (..., K, Dx), (..., K, Dx), index
        self._cached = (None, None)
        batch_shape = torch.broadcast_shapes(z.shape, loc.shape[:-2])
        super().__init__(batch_shape, loc.shape[-1:], validate_args=validate_args)

    def log_components(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; loc_k, scale_k) for every k, shape (..., K); computed once per x."""
        if self._cached[0] is not x:
            self._cached = (x, log_component_densities(self.loc, self.scale, x))
        return self._cached[1]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return Vindex(self.log_components(x))[..., self.z]

    def _selected(self) -> dist.TorchDistribution:
        return dist.Normal(Vindex(self.loc)[..., self.z, :], Vindex(self.scale)[..., self.z, :]).to_event(1)

    def rsample(self, sample_shape=torch.Size()):
        return self._selected().rsample(sample_shape)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """H(r) over the last dimension."""
    return -(log_probs.exp() * log_probs).sum(-1)


def kl_categorical(log_probs: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """KL(r || pi) over the last dimension."""
    return (log_probs.exp() * (log_probs - log_weights)).sum(-1)


def gated_z_prior(z_prior: torch.Tensor, free_bits: float) -> torch.Tensor:
    """z_prior with its gradient passed only while the minibatch mean exceeds ``free_bits``.

    The value is unchanged either way, so the logged loss does not jump at the gate.  The
    comparison stays a tensor (``torch.where``), so no host synchronisation happens here.
    """
    if free_bits <= 0:
        return z_prior
    return torch.where(z_prior.mean() > free_bits, z_prior, z_prior.detach())


def z_prior_adjustment(z_prior: torch.Tensor, reg: Regularization) -> torch.Tensor:
    """The part of the objective that turns the ELBO's ``-z_prior`` into ``-eta * gated z_prior``.

    Value ``-(eta - 1) z_prior``; when the free-bits gate is shut its gradient cancels the
    gradient of the ELBO's own z_prior term.
    """
    return z_prior - reg.z_prior_weight * gated_z_prior(z_prior, reg.free_bits)


def use_module_local_params() -> None:
    """Keep parameters in the modules, not in Pyro's global parameter store.

    Pyro's recommended setting for PyroModules trained by a plain torch loop: two models in
    one notebook never collide.  Called where models are built and ELBOs made (never at
    import, which would change the user's Pyro behind their back).
    """
    pyro.settings.set(module_local_params=True)


def make_elbo(num_particles: int = 1) -> TraceEnum_ELBO:
    """TraceEnum_ELBO configured for the GMVAE: one data plate, vectorised particles.

    Its loss module ``make_elbo(M)(model, guide)`` owns the parameters of both (see
    :func:`use_module_local_params`, which this calls).
    """
    use_module_local_params()
    return TraceEnum_ELBO(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=1,
        strict_enumeration_warning=True,
    )


def elbo_terms(model, guide, y: torch.Tensor, num_particles: int = 1, closed_form_w: bool = True) -> dict:
    """Per-example ELBO terms, the true ELBO and the training loss for a batch.

    Draws ``num_particles`` samples of (w, x) from the guide (w first, then x, the order the
    guide samples them in) and evaluates every term of the module docstring with the
    cluster variable summed out exactly.

    Parameters
    ----------
    model, guide
        A GMVAE model and a matching guide.
    y : Tensor, shape (B, *data_shape)
    num_particles : int
        Monte Carlo samples M of (w, x).
    closed_form_w : bool
        Report ``w_prior`` as the closed-form KL(q(w|y) || p(w)) (default) where torch
        knows one for the prior's p(w), else the estimate below.  With False it is the same
        single-sample estimate ``log q(w|y) - log p(w)`` that TraceEnum_ELBO uses, so the
        summed ``loss`` equals its loss sample for sample.

    Returns
    -------
    dict of Tensor, each of shape (B,)
        ``recon``, ``cond_prior``, ``w_prior``, ``z_prior``, ``cv``, ``elbo``, ``loss``.
    """
    q = guide.encode(y)
    q_w, q_x = guide.posteriors(q)
    sample_shape = torch.Size([num_particles])
    w = q_w.rsample(sample_shape)  # (M, B, Dw)
    x = q_x.rsample(sample_shape)  # (M, B, Dx)

    log_pi = model.prior.cluster_log_weights()  # (K,)
    loc, scale = model.prior.components(w)  # (M, B, K, Dx)
    log_components = log_component_densities(loc, scale, x)  # (M, B, K)
    log_exact = posterior_from_densities(log_pi, log_components)  # p(z | x, w)
    log_r = guide.cluster_log_probs(model, q, x, w).expand_as(log_exact)  # the guide's r(z)
    r = log_r.exp()

    recon = model.p_y(x).log_prob(y)  # (M, B)
    cond_prior = (r * (q_x.log_prob(x).unsqueeze(-1) - log_components)).sum(-1)
    p_w = model.prior.p_w(y.shape[0])
    w_prior = None
    if closed_form_w:
        try:
            w_prior = torch.distributions.kl_divergence(q_w, p_w).expand_as(recon)
        except NotImplementedError:  # a user's p(w) without a closed-form KL: estimate it
            pass
    if w_prior is None:
        w_prior = q_w.log_prob(w) - p_w.log_prob(w)
    z_prior = kl_categorical(log_r, log_pi)
    cv = entropy(log_exact)
    elbo = recon - cond_prior - w_prior - z_prior
    # The regularisers are the factors model and guide issue (a guide factor enters
    # the loss with the opposite sign to a model factor).
    loss = -elbo - model.regularizer(x, w, log_components) + guide.regularizer(q)
    terms = dict(recon=recon, cond_prior=cond_prior, w_prior=w_prior, z_prior=z_prior, cv=cv, elbo=elbo, loss=loss)
    return {name: value.mean(0) for name, value in terms.items()}
