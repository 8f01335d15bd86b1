"""The GMVAE generative process as a Pyro model."""

from __future__ import annotations

import pyro
import torch
from pyro.nn import PyroModule

from pyro_gmvae.likelihoods import Likelihood
from pyro_gmvae.objective import (
    ComponentNormal,
    Regularization,
    cluster_log_posterior,
    entropy,
    kl_categorical,
    log_component_densities,
    posterior_from_densities,
    tolerated_balance_kl,
    z_prior_adjustment,
)
from pyro_gmvae.priors import MixturePrior


class GMVAE(PyroModule):
    """Gaussian mixture VAE (Dilokthanakul et al. 2016), the generative side.

    Process, one sample site per line, per example in the ``"data"`` plate::

        w ~ N(0, I)                                          "w"  (Dw,)
        z ~ Categorical(pi)                                  "z"  enumerated in parallel
        x | z, w ~ N(mu_z(w), diag sigma_z(w)^2)             "x"  (Dx,)
        y | x ~ likelihood(decoder(x))                       "y"  data shape

    plus one ``pyro.factor("regularizer", ...)`` carrying ``-(eta - 1) z_prior - alpha cv -
    gamma balance`` of the exact cluster posterior p(z | x, w) (balance: KL of the batch's mean
    p(z | x, w) to pi, the same for every example of the batch), and during KL warm-up
    (``kl_weight`` < 1) one ``pyro.factor("kl_warmup", ...)``.

    The model never asks which guide it is paired with.  Its regulariser is the one of
    ``regularization``, applied to p(z | x, w); a guide whose cluster posterior r is its
    own (the v1 cluster head) issues the z-prior part for its r itself and pairs with a
    model that keeps only alpha (see ``model_regularization`` of the guides).

    Parameters
    ----------
    prior : MixturePrior
        p(w), p(z) and the component generator.
    likelihood : Likelihood
        Maps decoder output to p(y | x).
    decoder : nn.Module
        x (..., Dx) -> (..., likelihood.num_params, *data_shape).
    data_shape : tuple of int
    regularization : Regularization
        eta, alpha, the free-bits threshold and gamma applied to p(z | x, w).
    """

    def __init__(
        self,
        prior: MixturePrior,
        likelihood: Likelihood,
        decoder: torch.nn.Module,
        data_shape: tuple[int, ...],
        regularization: Regularization = Regularization(),
    ):
        super().__init__()
        self.prior = prior
        self.likelihood = likelihood
        self.decoder = decoder
        self.data_shape = tuple(data_shape)
        self.regularization = regularization

    # --- factors, each callable from a notebook -------------------------------------
    def p_w(self, batch_size: int):
        """p(w) = N(0, I), batch shape (B,)."""
        return self.prior.p_w(batch_size)

    def p_z(self, batch_size: int):
        """p(z) = Categorical(pi), batch shape (B,)."""
        return self.prior.p_z(batch_size)

    def p_x(self, w: torch.Tensor, z: torch.Tensor) -> ComponentNormal:
        """p(x | z, w): the z-th component at w; z broadcasts against w's batch shape.

        A :class:`~pyro_gmvae.objective.ComponentNormal`: it scores all K components once
        and hands that (..., K) table to the regulariser too (no second pass).
        """
        return ComponentNormal(*self.prior.components(w), z)  # (..., K, Dx) each

    def p_y(self, x: torch.Tensor):
        """p(y | x), event shape ``data_shape``."""
        return self.likelihood(self.decoder(x), len(self.data_shape))

    def cluster_log_posterior(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """log p(z | x, w), shape x.shape[:-1] + (K,)."""
        loc, scale = self.prior.components(w)
        return cluster_log_posterior(self.prior.cluster_log_weights(), loc, scale, x)

    @property
    def has_regularizer(self) -> bool:
        """Whether the model issues the ``"regularizer"`` factor at all (eta, alpha, lambda, gamma)."""
        reg = self.regularization
        return reg.cv_weight > 0 or reg.touches_z_prior or reg.balance_weight > 0

    def regularizer(self, x: torch.Tensor, w: torch.Tensor, log_components: torch.Tensor | None = None) -> torch.Tensor:
        """Value of the ``"regularizer"`` factor at (x, w), shape x.shape[:-1].

        With gamma > 0 (``balance_weight``) the batch dimension is x's second to last one:
        every example carries ``-gamma KL(rbar || pi)`` of the batch's mean posterior rbar, so
        the batch's sum is ``-gamma B KL(rbar || pi)``.

        ``log_components`` (..., K), log N(x; mu_k(w), sigma_k(w)), saves recomputing them.
        """
        reg = self.regularization
        log_pi = self.prior.cluster_log_weights()
        if log_components is None:
            log_components = log_component_densities(*self.prior.components(w), x)
        log_r = posterior_from_densities(log_pi, log_components)
        value = -reg.cv_weight * entropy(log_r)
        if reg.touches_z_prior:
            value = value + z_prior_adjustment(kl_categorical(log_r, log_pi), reg)
        if reg.balance_weight > 0:
            balance = tolerated_balance_kl(log_r, log_pi, reg.balance_tolerance)
            value = value - reg.balance_weight * balance.unsqueeze(-1)
        return value

    # --- the model ------------------------------------------------------------------
    def forward(self, y: torch.Tensor, kl_weight: float = 1.0, labels: torch.Tensor | None = None) -> None:
        """Issue the sites for a batch ``y``; ``kl_weight`` beta in (0, 1] is KL warm-up's weight.

        With beta < 1 the loss becomes ``-(recon - beta KL) / beta``: the warm-up
        objective's gradient direction, its value scaled by 1 / beta.

        ``labels`` (B,) int64 (semi-supervised training, :mod:`pyro_gmvae.semisupervised`):
        the batch's classes, observed as z (``obs=labels``, no enumeration).  The ELBO is then
        the supervised one, log p(y, z=label) bounded; the regulariser of the cluster
        posterior is not issued (the label replaces that posterior).
        """
        # Python ints, also while CompiledELBOModule traces the step: a plate whose size is a
        # traced tensor makes Pyro multiply every log-density by a scale tensor (1.0), one more
        # op and autograd node per site and step.  The graph is recorded per batch shape anyway.
        batch_size = int(y.shape[0])
        with pyro.plate("data", batch_size, subsample_size=batch_size):
            w = pyro.sample("w", self.p_w(batch_size))
            if labels is not None:
                z = pyro.sample("z", self.p_z(batch_size), obs=labels)
            else:
                z = pyro.sample("z", self.p_z(batch_size), infer={"enumerate": "parallel"})
            p_x = self.p_x(w, z)
            x = pyro.sample("x", p_x)
            p_y = self.p_y(x)
            pyro.sample("y", p_y, obs=y)
            recon_boost = (1 - kl_weight) / kl_weight
            if recon_boost > 0:
                # ELBO + c log p(y|x) with c = (1 - beta) / beta is (recon - beta * KL) / beta.
                pyro.factor("kl_warmup", recon_boost * p_y.log_prob(y))
            if self.has_regularizer and labels is None:
                pyro.factor("regularizer", self.regularizer(x, w, p_x.log_components(x)))
