"""The (..., K) table of diagonal-Gaussian log-densities, with a shorter backward pass.

``normal_log_density_table(loc, scale, x)`` is ``Normal(loc, scale).log_prob(x[..., None, :]).sum(-1)``
with the same forward operations as ``torch.distributions.Normal.log_prob`` and a
hand-written backward that returns the same gradients, bit for bit, in fewer passes over
the (..., K, Dx) table.  The table is the largest tensor of a GMVAE step (batch x clusters x
latent size), so these passes are most of the step's arithmetic beyond the networks.

Why the gradients are identical.  Autograd differentiates ``-(d ** 2) / (2 * var) - log s - c``
(``d = x - loc``, ``var = s ** 2``) with its own formulas: ``pow``'s ``grad * (2 * d)``,
``div``'s ``-grad * ((a / b) / b)``, ``log``'s ``grad / s``, the negations of ``sub`` and
the sum over K of the broadcast ``x``.  This backward computes each of those products and
quotients from the same operands, so each is rounded once at the same real value; what it
leaves out are steps that never round: negations, and multiplying by -2 a number that
has already been rounded (a factor 2 or 4 is still applied where autograd applies it to an
operand before rounding: ``2 * d``, ``2 * s``).  With the upstream gradient ``g``
(..., K, 1), and ``q = -d^2 / (2 var)`` and ``D = -2 var`` saved from the forward pass:

    grad_scale = (-g) / s + (g * (q / D)) * (4 s)     6 passes
    grad_loc   = (g / D) * (-2 d)                     3 passes
    grad_x     = -sum_k grad_loc                      a reduction over K, as autograd's

10 passes over the (..., K, Dx) table where autograd makes 18 for ``Normal.log_prob``
(counted with ``torch.profiler``); the forward pass makes 8 and the sum, against 9 and the sum.

``tests/test_densities.py`` checks the equality (values and gradients, float32 and float64,
with and without particle dimensions).  ``experiments/bench_speed.py`` times the step.

The hand-written path runs for tables of at least :data:`MIN_TABLE_ELEMENTS` elements (below
that its Python calls cost more than the passes they save) when it is exact by construction:
``loc`` and ``scale`` of one shape (..., K, Dx), ``x`` of shape (..., Dx) with the same
leading dimensions, one floating dtype, and no autocast (autocast changes the dtypes inside).
Anything else (a small table, a prior whose ``loc`` broadcasts, mixed dtypes) goes through
``Normal.log_prob``: the same numbers.  With Pyro's validation on, the arguments and ``x`` are
checked as ``Normal.log_prob`` checks them, with the same errors.  The backward is
``once_differentiable``: no second derivatives.

:class:`StandardNormal` is p(w) = N(0, I): ``Normal(0, 1)`` whose ``log_prob`` drops the
operations that a location of zero and a scale of one make exact identities (``x - 0``,
``scale ** 2``, ``log(scale)`` and its subtraction), bit for bit the same values and gradients.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.autograd.function import once_differentiable
from torch.distributions import Distribution

LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))  # the constant torch's Normal.log_prob subtracts


class _NormalTable(torch.autograd.Function):
    """``log N(x; loc_k, scale_k)`` summed over the last dimension, for every k."""

    @staticmethod
    def forward(ctx, loc: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Normal.log_prob's operations: -(d ** 2) / (2 * var) - log(scale) - c.  The quotient is
        # taken as d ** 2 / (-2 var), which rounds to the same number (rounding is symmetric in
        # sign), and saves the negation.
        d = x.unsqueeze(-2) - loc
        two_var = scale**2 * -2
        q = d**2 / two_var
        out = (q - scale.log() - LOG_SQRT_2PI).sum(-1)
        ctx.save_for_backward(scale, d, two_var, q)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        scale, d, two_var, q = ctx.saved_tensors
        g = grad.unsqueeze(-1)  # (..., K, 1): every element of the row shares its gradient
        need_loc, need_scale, need_x = ctx.needs_input_grad
        grad_loc = grad_scale = grad_x = None
        if need_loc or need_x:
            grad_loc = g / two_var * (d * -2)
            if need_x:
                grad_x = -grad_loc.sum(-2)
            if not need_loc:
                grad_loc = None
        if need_scale:
            grad_scale = (-g) / scale + g * (q / two_var) * (scale * 4)
        return grad_loc, grad_scale, grad_x


#: Smallest table (elements of (..., K, Dx)) that takes the hand-written backward.  It is a
#: Python function, one call forward and one backward, which a small table does not repay
#: (``experiments/bench_densities.py``: more process CPU time with it at batch 8 of the MNIST
#: network, 16,000 elements; less from batch 32, 64,000, on, so the bound could be lower; it
#: was set before that run).  Smaller tables go through Normal.log_prob: the same numbers.
MIN_TABLE_ELEMENTS = 65536


def _exact_path(loc: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> bool:
    return (
        loc.numel() >= MIN_TABLE_ELEMENTS
        and loc.dim() >= 2
        and loc.shape == scale.shape
        and x.shape == loc.shape[:-2] + loc.shape[-1:]
        and loc.dtype == scale.dtype == x.dtype
        and loc.is_floating_point()
        and not torch.is_autocast_enabled(loc.device.type)
    )


def normal_log_density_table(loc: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log N(x; loc_k, diag scale_k^2) for every k: (..., K, Dx), (..., K, Dx), (..., Dx) -> (..., K).

    Equal, value and gradients, to ``Normal(loc, scale).log_prob(x.unsqueeze(-2)).sum(-1)``;
    faster to differentiate (see the module's docstring).  Shapes that broadcast otherwise
    are accepted and go through ``Normal.log_prob``.
    """
    if not _exact_path(loc, scale, x):
        return dist.Normal(loc, scale).log_prob(x.unsqueeze(-2)).sum(-1)
    if Distribution._validate_args:  # Pyro's validation (on by default): the checks and errors of Normal.log_prob
        dist.Normal(loc, scale)._validate_sample(x.unsqueeze(-2))
    return _NormalTable.apply(loc, scale, x)


class StandardNormal(dist.Normal):
    """N(0, 1) of batch shape ``shape``: p(w) of the GMVAE.

    ``Normal(0, 1)`` (``loc`` and ``scale`` an expanded 0 and 1) in all but ``log_prob``, which
    is Normal's formula ``-((x - loc) ** 2) / (2 * scale ** 2) - log(scale) - log(sqrt(2 pi))``
    at ``loc = 0`` and ``scale = 1`` with the exact identities left out: ``x - 0`` is ``x`` (also at -0),
    subtracting ``log 1 = 0`` changes nothing, and ``-a / 2`` is ``a / -2`` (rounding is
    symmetric in sign).  So ``x ** 2 / -2 - log(sqrt(2 pi))``: 3 passes over the (..., Dw)
    tensor where ``Normal.log_prob`` makes 9 (its ``scale ** 2`` and ``log(scale)`` of an
    expanded 1 included), the same values and gradients bit for bit (``tests/test_densities.py``).
    An ``x`` of another dtype, or one that broadcasts to a larger shape, goes through
    ``Normal.log_prob``.  ``loc`` and ``scale`` are Normal's, so sampling, ``expand``, entropy
    and the KL divergences registered for Normal are unchanged.
    """

    def __init__(self, shape, dtype: torch.dtype | None = None, device=None, validate_args=None):
        zero = torch.zeros((), dtype=dtype, device=device)
        super().__init__(zero.expand(shape), 1.0, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StandardNormal, _instance)
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:  # first, so that a value of the wrong shape gets Normal's error
            self._validate_sample(value)
        if value.dtype != self.loc.dtype or torch.broadcast_shapes(value.shape, self.loc.shape) != value.shape:
            return super().log_prob(value)  # promotes or broadcasts, as Normal does
        return value**2 / -2 - LOG_SQRT_2PI
