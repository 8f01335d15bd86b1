"""The GMVAE objective: regularisers, the training loss and the per-example ELBO terms.

Notation of the paper (Dilokthanakul et al. 2016, section 3).  Per example, with (x, w) ~ q:

    ELBO       = recon - cond_prior - w_prior - z_prior
    recon      = E[log p(y|x)]
    cond_prior = E[sum_k r_k (log q(x|y) - log N(x; mu_k(w), sigma_k(w)))]
    w_prior    = KL(q(w|y) || N(0, I))
    z_prior    = E[KL(r || pi)]
    cv         = E[H(p(z|x,w))]          (consistency violation; not part of the ELBO)
    balance    = KL(mean_b p(z|x_b,w_b) || pi)   (one value per minibatch; not part of the ELBO)

with r = p(z|x,w) for the v2 guide and r = q(z|y) for the v1 guide.  Training maximises
``ELBO - (eta - 1) z_prior - alpha cv - gamma balance`` per example; with free bits lambda > 0
the z_prior term only passes gradient while its minibatch mean exceeds lambda.  The balance
term (gamma > 0) compares the minibatch's average cluster posterior with pi: a cluster that
takes more than its share of the batch costs every example, which no per-example term does;
with a tolerance tau > 0 the term is ``gamma max(0, balance - tau)``: only a batch spread
further than tau nats from pi costs.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.infer.elbo import ELBOModule
from pyro.ops.indexing import Vindex
from pyro.poutine.runtime import _PYRO_STACK
from torch.distributions import constraints

from pyro_gmvae.config import ELBO_MODES, non_negative_number
from pyro_gmvae.densities import normal_log_density_table

TERM_NAMES = ("recon", "cond_prior", "w_prior", "z_prior", "cv", "elbo", "loss")


@dataclass(frozen=True)
class Regularization:
    """Weights of the regularisers added to the ELBO: eta on z_prior, alpha on cv, free bits lambda,
    gamma on the minibatch's cluster balance."""

    z_prior_weight: float = 1.0  # eta; 1 leaves the ELBO's own z_prior term as it is
    cv_weight: float = 0.0  # alpha; weight of the consistency-violation entropy
    free_bits: float = 0.0  # lambda; 0 turns free bits off
    balance_weight: float = 0.0  # gamma; weight of KL(minibatch mean of p(z|x,w) || pi) per example
    balance_tolerance: float = 0.0  # tau; the balance term is gamma max(0, KL - tau) (0: the plain KL)

    def __post_init__(self):
        names = ("z_prior_weight", "cv_weight", "free_bits", "balance_weight", "balance_tolerance")
        for name in names:  # the check of the Config fields
            non_negative_number(name, getattr(self, name))

    @property
    def touches_z_prior(self) -> bool:
        return self.z_prior_weight != 1.0 or self.free_bits > 0


def log_component_densities(loc: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log N(x; loc_k, diag scale_k^2) for every k: (..., K, Dx) x (..., Dx) -> (..., K).

    ``Normal(loc, scale).log_prob(x.unsqueeze(-2)).sum(-1)``, values and gradients bit for
    bit, with a shorter backward pass: :func:`pyro_gmvae.densities.normal_log_density_table`.
    """
    return normal_log_density_table(loc, scale, x)


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


def balance_kl(log_r: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """KL(rbar || pi) of the batch's mean cluster posterior rbar = mean_b r_b: (..., B, K) -> (...,).

    Zero when the batch spreads over the clusters as pi says; it grows as one cluster takes
    more than its share.  Batch-level: the value of every example depends on the others.
    """
    log_mean = torch.logsumexp(log_r, -2) - math.log(log_r.shape[-2])
    return kl_categorical(log_mean, log_weights)


def tolerated_balance_kl(log_r: torch.Tensor, log_weights: torch.Tensor, tolerance: float) -> torch.Tensor:
    """:func:`balance_kl` less a tolerance tau, floored at zero: max(0, KL(rbar || pi) - tau).

    A batch whose spread departs from pi by at most tau nats costs nothing and passes no
    gradient; a cluster that swallows the batch still does.  With 2 clusters and uniform pi,
    tau = 0.13 tolerates a 25/75 batch (KL 0.131) and still charges a 5/95 one (KL 0.49).
    ``tolerance`` 0 is :func:`balance_kl` itself (the same value, bit for bit).
    """
    kl = balance_kl(log_r, log_weights)
    return kl if tolerance <= 0 else torch.clamp(kl - tolerance, min=0.0)


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


class _LossStep(torch.nn.Module):
    """What one trace records: the eager loss module's forward at a tensor ``kl_weight``.

    A module (not a function), so :func:`torch.jit.trace_module` reads the parameters and
    buffers of model and guide as module attributes: the replayed graph uses and updates
    the very tensors the optimiser steps (BatchNorm's running statistics included).
    """

    def __init__(self, loss_module: ELBOModule):
        super().__init__()
        self.loss_module = loss_module

    def forward(self, y: torch.Tensor, kl_weight: torch.Tensor) -> torch.Tensor:
        return ELBOModule.forward(self.loss_module, y, kl_weight=kl_weight)


class CompiledELBOModule(ELBOModule):
    """``TraceEnum_ELBO(...)(model, guide)`` whose training step replays a recorded graph.

    The loss is TraceEnum_ELBO's own: the first time a batch of a given shape is seen,
    ``differentiable_loss`` runs once under :func:`torch.jit.trace_module` (Pyro's
    tracing, the enumeration bookkeeping and the einsum contraction plan run then), and
    every later step with that key replays the recorded tensor operations.  Parameters and
    buffers enter as module attributes (shared, not copied), ``kl_weight`` as a tensor input,
    and ``torch.distributions`` draws its reparameterised noise with a random op while
    tracing (``torch.normal``, replayed as ``torch.randn``: :func:`_draw_noise_directly`), so
    the replay draws fresh noise from the global generator in the order the eager step does.
    The replay runs with TorchScript's optimiser off (no autodiff subgraphs, no
    specialisation after profiling runs): the recorded aten ops run as recorded (the
    submodule calls inlined, the traced sizes folded, unused nodes dropped: :func:`_simplify`) and
    autograd differentiates them with its own formulas, so with the same seed the gradients
    and BatchNorm statistics equal the eager step's bit for bit, in float32 too, however many
    times the graph has run (a resumed run is identical to one in one go), and the loss value
    to its last bits (an Intel Xeon summed a float64 loss in another order: 1-2 ulp).
    The trace's own run is undone (random state and buffers restored), so tracing changes
    no result.

    One graph per key ``(y's shape, dtype and device, kl_weight < 1, every submodule's
    train/eval mode, the autocast dtype)``; the two most recent are kept.  Anything else runs eagerly: no
    gradient (evaluation), a Pyro handler around the call, arguments other than
    ``(y, kl_weight=float)``, or a trace already in progress.  Validation of distribution
    arguments does not run inside the replay; a non-finite loss or gradient is caught by
    :func:`pyro_gmvae.loop.run_epoch`.
    """

    max_graphs = 2

    def __init__(self, model: torch.nn.Module, guide: torch.nn.Module, elbo: TraceEnum_ELBO):
        super().__init__(model, guide, elbo)
        self._graphs: OrderedDict = OrderedDict()  # key -> traced _LossStep (not a submodule)
        self._submodules: tuple | None = None  # self.modules(), listed at the first call

    def _key(self, y: torch.Tensor, kl_weight: float) -> tuple:
        if self._submodules is None:  # walking the module tree costs more than the rest of the key
            self._submodules = tuple(self.modules())
        modes = tuple(m.training for m in self._submodules)
        kind = y.device.type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        return (tuple(y.shape), y.dtype, y.device, kl_weight < 1, modes, autocast)

    def _eligible(self, args, kwargs) -> bool:
        return (
            len(args) == 1
            and isinstance(args[0], torch.Tensor)
            and set(kwargs) <= {"kl_weight"}
            and isinstance(kwargs.get("kl_weight", 1.0), (int, float))
            and torch.is_grad_enabled()
            and not torch.is_inference_mode_enabled()
            and not _PYRO_STACK
            and not torch.jit.is_tracing()
        )

    def forward(self, *args, **kwargs):
        if not self._eligible(args, kwargs):
            return super().forward(*args, **kwargs)
        y, kl_weight = args[0], float(kwargs.get("kl_weight", 1.0))
        key = self._key(y, kl_weight)
        graph = self._graphs.get(key)
        if graph is None:
            # Traced at first sight, so every training step of a run, resumed or not, is a
            # replay: an eager first step can round the reported loss differently in the
            # last bit, and a resumed run would then log another train_loss.
            graph = self._trace(y, kl_weight)
            self._graphs[key] = graph
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        # The JIT's optimiser off: the recorded ops run as recorded, with autograd's own derivatives,
        # so loss and gradients equal the eager step's bit for bit however often the graph has run.
        with torch.jit.optimized_execution(False):
            return graph(y, torch.tensor(kl_weight, dtype=torch.float64, device=y.device))

    def _trace(self, y: torch.Tensor, kl_weight: float):
        cuda = y.device.type == "cuda"
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(y.device) if cuda else None
        buffers = [(b, b.detach().clone()) for b in self.buffers()]
        beta = torch.tensor(kl_weight, dtype=torch.float64, device=y.device)
        try:
            with warnings.catch_warnings(), pyro.validation_enabled(False):
                warnings.simplefilter("ignore")  # TracerWarnings: Pyro's Python-side checks are constants now
                traced = torch.jit.trace_module(_LossStep(self), {"forward": (y, beta)}, check_trace=False)
            _simplify(traced.forward.graph)
            return traced
        finally:  # the trace's run leaves no trace: same noise and statistics as eager from here
            torch.set_rng_state(rng[0])
            if cuda:
                torch.cuda.set_rng_state(rng[1], y.device)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)


def _simplify(graph: torch.Graph) -> None:
    """Value-preserving clean-up of a traced graph before its first run.

    Inlines the submodules' calls into one graph (no interpreter frame per module), lets
    the peephole pass resolve what the recorded shapes fix (``aten::size`` of a tensor whose
    shape the trace recorded, an ``expand`` or ``broadcast_tensors`` to the shape a tensor
    already has), folds what depends on constants only (those sizes and their int/tensor
    conversions, constant ``zeros``/``ones``, and ``zeros_like`` of a traced shape with what
    follows from it, computed once here by the same kernels: :func:`_fold_zeros_like`),
    selects with an all-true constant mask by a reshape (:func:`_unmask_full_selections`),
    draws standard noise with ``randn`` (:func:`_draw_noise_directly`), moves the sign of
    ``Normal.log_prob``'s ``-(x - loc)**2 / (2 * var)`` into the constant 2
    (:func:`_fold_negated_quotients`), and drops what nothing uses: about a quarter of the
    nodes of the MNIST network's graph.  No arithmetic on data is reordered or merged, and
    the rewrites give the same bits, so the replay stays bit for bit the eager step
    (``tests/test_compiled_elbo.py``).
    """
    torch._C._jit_pass_inline(graph)
    torch._C._jit_pass_peephole(graph, False)
    torch._C._jit_pass_constant_propagation(graph)
    if _fold_zeros_like(graph):
        torch._C._jit_pass_constant_propagation(graph)
    _unmask_full_selections(graph)
    _draw_noise_directly(graph)
    _fold_negated_quotients(graph)
    torch._C._jit_pass_dce(graph)


def _fold_zeros_like(graph: torch.Graph) -> bool:
    """``zeros_like(x)`` of an ``x`` whose shape, dtype and device the trace fixed becomes a constant.

    A graph is replayed only for the shape, dtype and device it was traced at, so such a
    ``zeros_like`` always holds the same zeros.  Pyro's TraceEnum_ELBO builds the
    probabilities that weigh each expected cost from one (``exp`` of a contraction over no
    enumerated variable: ``exp(0)``), so once these are constants, constant propagation
    computes them, their mask ``prob > 0`` and its selection of them (by the same kernels)
    once, and :func:`_unmask_full_selections` can see that the mask selects everything.
    Returns whether anything was folded.
    """
    folded = False
    for node in list(graph.findAllNodes("aten::zeros_like")):
        source, *options = node.inputs()
        # dtype, layout, device, pin_memory, memory_format: all the source's (None, or pin_memory False);
        # compared with `is`: a dtype or memory format 0 (uint8, contiguous) equals False
        if any(o.node().kind() != "prim::Constant" or o.toIValue() is not None and o.toIValue() is not False
               for o in options):  # fmt: skip
            continue
        if not _only_read(node.output()):  # a constant must never be written to, nor seen through a view
            continue
        kind = node.output().type()
        sizes, strides = kind.sizes(), kind.strides()
        dtype, device = kind.dtype(), kind.device()
        if sizes is None or strides is None or dtype is None or device is None:
            continue
        zeros = torch.zeros(sizes, dtype=dtype, device=device)
        if list(zeros.stride()) != list(strides):
            continue
        with graph.insert_point_guard(node):
            constant = graph.insertConstant(zeros)
        node.output().replaceAllUsesWith(constant)
        node.destroy()
        folded = True
    return folded


def _unmask_full_selections(graph: torch.Graph) -> None:
    """``masked_select(x, mask)`` with a constant all-true mask of x's shape becomes ``x.reshape(-1)``.

    Both are x's elements in order, and so are their gradients; ``masked_select`` must count
    the mask first (on a GPU the host waits for that count), ``reshape`` does not.  A reshape
    may share x's memory, so only where x and the selection are only read is it rewritten.
    """
    for node in list(graph.findAllNodes("aten::masked_select")):
        source, mask = node.inputs()
        everything = _constant_filled(mask, True)
        if everything is None or source.type().sizes() != list(everything.shape):
            continue
        if not (_only_read(node.output()) and _only_read(source)):
            continue
        with graph.insert_point_guard(node):
            flat = graph.insertNode(graph.create("aten::reshape", [source, graph.insertConstant([-1])], 1))
        flat.output().setType(node.output().type())
        node.output().replaceAllUsesWith(flat.output())
        node.destroy()


_ALIAS = re.compile(r"Tensor(\[\])?\([a-z*]")  # an alias annotation in a schema: Tensor(a), Tensor(a!), Tensor(a -> *)


def _only_read(value: torch.Value) -> bool:
    """Whether every use of a graph value is an aten op that neither writes to it nor returns a view of it."""
    return all(use.user.kind().startswith("aten::") and not _ALIAS.search(use.user.schema()) for use in value.uses())


def _constant_filled(value: torch.Value, fill: float | bool) -> torch.Tensor | None:
    """The tensor a graph value always holds if it is a constant equal to ``fill`` everywhere.

    Floating point for a number ``fill``, boolean for ``True`` or ``False``.
    """
    if value.node().kind() != "prim::Constant":
        return None
    tensor = value.toIValue()
    if not isinstance(tensor, torch.Tensor) or tensor.is_floating_point() != (not isinstance(fill, bool)):
        return None
    return tensor if bool((tensor == fill).all()) else None


def _alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)


def _draw_noise_directly(graph: torch.Graph) -> None:
    """``torch.normal(zeros, ones)`` in a traced graph becomes ``torch.randn`` of that shape.

    While tracing, ``torch.distributions`` draws a reparameterised sample's standard noise as
    ``torch.normal(torch.zeros(shape), torch.ones(shape))`` (the tracer once lacked
    ``normal_``).  Replayed as recorded, that is ``randn`` followed by a check that the
    standard deviations are not negative (a reduction over them: a host synchronisation on a
    GPU), a multiplication by one and an addition of zero, every step.  ``randn`` draws the
    same numbers from the same generator (both fill with ``normal_(0, 1)``), and ``x * 1 + 0``
    is ``x``, so the replay's values and random state are unchanged.
    """
    for node in list(graph.findAllNodes("aten::normal")):
        if not node.schema().startswith("aten::normal.Tensor_Tensor("):
            continue
        mean, std, generator = node.inputs()
        zeros, ones = _constant_filled(mean, 0.0), _constant_filled(std, 1.0)
        if zeros is None or ones is None or not _alike(zeros, ones):
            continue
        with graph.insert_point_guard(node):
            size, dtype, device = (graph.insertConstant(v) for v in (list(zeros.shape), zeros.dtype, zeros.device))
            layout, pin_memory = graph.insertConstant(torch.strided), graph.insertConstant(False)
            randn = graph.insertNode(
                graph.create("aten::randn", [size, generator, dtype, layout, device, pin_memory], 1)
            )
        randn.output().setType(node.output().type())
        node.output().replaceAllUsesWith(randn.output())
        node.destroy()


def _fold_negated_quotients(graph: torch.Graph) -> None:
    """``-a / (b * c)`` with a constant ``c`` in a traced graph becomes ``a / (b * -c)``.

    ``torch.distributions.Normal.log_prob`` computes ``-((x - loc) ** 2) / (2 * var)``: a
    negation pass over the (B, K, Dx) table of the component densities, and another in the
    backward step.  Rounding to nearest is symmetric in sign, so ``-a / (b * c)`` and
    ``a / (b * -c)`` are the same floats, and so are their gradients (products and quotients
    of the same magnitudes, the signs moved): the rewrite drops both passes and changes no
    bit.  Only a negation whose one use is the numerator, over a product with a nonzero
    constant whose one use is the denominator, is rewritten.
    """
    for node in list(graph.findAllNodes("aten::div")):
        if not node.schema().startswith("aten::div.Tensor("):
            continue
        numerator, denominator = list(node.inputs())[:2]
        negation, product = numerator.node(), denominator.node()
        if negation.kind() != "aten::neg" or product.kind() != "aten::mul":
            continue
        if len(numerator.uses()) != 1 or len(denominator.uses()) != 1:
            continue
        factor = _nonzero_constant(list(product.inputs())[1])
        if factor is None:
            continue
        with graph.insert_point_guard(product):
            flipped = graph.insertConstant(-factor)
        product.replaceInput(1, flipped)
        node.replaceInput(0, negation.input())
        negation.destroy()


def _nonzero_constant(value: torch.Value) -> torch.Tensor | float | int | None:
    """The nonzero number, or 0-dim tensor, that a graph value always holds; else None."""
    if value.node().kind() != "prim::Constant":
        return None
    constant = value.toIValue()
    if isinstance(constant, torch.Tensor):
        return constant if constant.dim() == 0 and bool(constant != 0) else None
    return constant if isinstance(constant, (int, float)) and not isinstance(constant, bool) and constant != 0 else None


class CompiledTraceEnum_ELBO(TraceEnum_ELBO):
    """TraceEnum_ELBO whose loss module ``elbo(model, guide)`` is a :class:`CompiledELBOModule`."""

    def __call__(self, model: torch.nn.Module, guide: torch.nn.Module) -> CompiledELBOModule:
        return CompiledELBOModule(model, guide, self)


def make_elbo(num_particles: int = 1, mode: str = "compiled") -> TraceEnum_ELBO:
    """TraceEnum_ELBO configured for the GMVAE: one data plate, vectorised particles.

    Its loss module ``make_elbo(M)(model, guide)`` owns the parameters of both (see
    :func:`use_module_local_params`, which this calls).  ``mode`` "compiled" (default)
    makes it a :class:`CompiledELBOModule`, which replays a traced graph of the same loss
    for repeated training steps; "eager" is Pyro's plain ``ELBOModule``.
    """
    if mode not in ELBO_MODES:
        raise ValueError(f"unknown ELBO mode {mode!r}; choose one of {', '.join(ELBO_MODES)}")
    use_module_local_params()
    cls = CompiledTraceEnum_ELBO if mode == "compiled" else TraceEnum_ELBO
    return cls(
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
