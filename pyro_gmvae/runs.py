"""A trained run: :class:`Run`, what ``train`` returns and ``load_run`` loads from a run folder.

``load_run(path)`` rebuilds model and guide from the folder alone: ``checkpoint.pt`` holds
the resolved config, the data shape and both state dicts.  The returned :class:`Run`
answers the questions a notebook asks, each a thin wrapper over :mod:`pyro_gmvae.posterior`
(eval mode and inference mode for the call, the modules' modes restored after, batched)::

    run = pyro_gmvae.load_run("runs/spiral-v2-K8-seed0-1")
    data = run.load_data()
    probs = run.cluster_probs(data.x_test)          # (N, K)

Shapes: N examples, K clusters, Dx / Dw latent sizes, S samples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyro_gmvae import checkpoint as ckpt
from pyro_gmvae import posterior
from pyro_gmvae.build import build_model_and_guide
from pyro_gmvae.config import Config
from pyro_gmvae.data import Dataset, prepare_data
from pyro_gmvae.distributed import resolve_device
from pyro_gmvae.errors import UserInputError
from pyro_gmvae.runfolder import final_metrics

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("config", "data_shape", "model", "guide")


def _as_tensor(y) -> torch.Tensor:
    """Tensors pass through; numpy arrays and nested lists become float32 tensors."""
    if isinstance(y, torch.Tensor):
        return y
    return torch.as_tensor(y, dtype=torch.float32)


@dataclass
class Run:
    """A trained GMVAE with its run folder, ready to query.

    :func:`~pyro_gmvae.training.train` returns one (modules as training left them) and
    :func:`load_run` loads one (modules in eval mode); the queries switch to eval mode for
    the call either way.

    Attributes
    ----------
    path : Path
        The run folder (``out`` is the same).
    config : Config
        The resolved options the run was trained with.
    model, guide : PyroModule
        The generative model and the recognition network, in eval mode, on ``device``.
    data_shape : tuple of int
        Shape of one observation y.
    history : list of dict
        One row per finished epoch (the lines of ``metrics.jsonl``).
    final : dict
        ``metrics.json`` (computed from the last history row if the run was interrupted).
    device : torch.device
    """

    path: Path
    config: Config
    model: torch.nn.Module
    guide: torch.nn.Module
    data_shape: tuple[int, ...]
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __repr__(self) -> str:
        epochs = self.history[-1]["epoch"] if self.history else 0
        return (
            f"Run({str(self.path)!r}, data={self.config.data!r}, guide={self.config.guide!r}, "
            f"K={self.num_clusters}, epochs={epochs}, device={str(self.device)!r})"
        )

    @property
    def out(self) -> Path:
        """The run folder (the name ``train`` results used)."""
        return self.path

    @property
    def num_clusters(self) -> int:
        """K."""
        return self.model.prior.num_clusters

    # --- data ---------------------------------------------------------------------------
    def load_data(self, subsets: bool = True) -> Dataset:
        """The run's data set, loaded with the saved config.

        With ``subsets=True`` (default) the run's ``train_subset`` / ``test_subset`` apply,
        so the arrays are exactly the ones it trained and was evaluated on.
        """
        config = self.config
        if not subsets:
            config = Config.from_dict({**config.to_dict(), "train_subset": None, "test_subset": None})
        return prepare_data(config)

    # --- queries ------------------------------------------------------------------------
    def cluster_probs(
        self, y, num_samples: int = 0, batch_size: int = 1000, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Cluster probabilities, shape (N, K), rows summing to one.

        Parameters
        ----------
        y : Tensor or array, shape (N, *data_shape)
        num_samples : int
            v2 guide: 0 evaluates p(z | x, w) at the posterior means of x and w; S > 0
            averages it over S draws of q(x|y) q(w|y).  v1 guide: q(z | y) either way.
        batch_size : int
            Examples per forward pass.
        generator : torch.Generator, optional
            Source of the draws when ``num_samples > 0`` (on ``device``).
        """
        return posterior.cluster_probs(self.model, self.guide, _as_tensor(y), num_samples, batch_size, generator)

    def assign(self, y, num_samples: int = 0, batch_size: int = 1000) -> torch.Tensor:
        """Hard cluster assignments, shape (N,) int64: argmax of :meth:`cluster_probs`."""
        return posterior.assign(self.model, self.guide, _as_tensor(y), num_samples=num_samples, batch_size=batch_size)

    def encode(self, y, batch_size: int = 1000) -> dict[str, torch.Tensor]:
        """Posterior locations and scales of the latents.

        Returns
        -------
        dict of Tensor
            ``x_loc``, ``x_scale`` (N, Dx); ``w_loc``, ``w_scale`` (N, Dw); and ``z_logits``
            (N, K) for the v1 guide.
        """
        return posterior.encode(self.guide, _as_tensor(y), batch_size)

    def reconstruct(self, y, batch_size: int = 1000) -> torch.Tensor:
        """Mean of p(y | x) at the posterior mean of x, shape (N, *data_shape)."""
        return posterior.reconstruct(self.model, self.guide, _as_tensor(y), batch_size)

    def sample(
        self,
        cluster: int,
        num_samples: int = 10,
        w: torch.Tensor | str | None = None,
        mean: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draws from one cluster: x ~ p(x | z=cluster, w), decoded; shape (num_samples, *data_shape).

        Parameters
        ----------
        cluster : int
            In 0..K-1.
        num_samples : int
        w : None, "prior" or Tensor of shape (Dw,) or (num_samples, Dw)
            None fixes w = 0 (the paper's figures); "prior" draws w ~ N(0, I) per sample.
        mean : bool
            Return the mean of p(y | x) (default) rather than a draw from it.
        generator : torch.Generator, optional
            Source of randomness (on ``device``); default the global RNG.
        """
        return posterior.sample(self.model, cluster, num_samples, w=w, mean=mean, generator=generator)

    def components(self, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Locations and scales of the K components of p(x | z, w), each (..., K, Dx).

        ``w`` of shape (..., Dw); default the prior mean 0, giving (K, Dx).
        """
        return posterior.components(self.model, w)

    def elbo_terms(self, y, num_particles: int = 1, batch_size: int = 1000) -> dict[str, torch.Tensor]:
        """Per-example ELBO terms, each of shape (N,).

        ``recon``, ``cond_prior``, ``w_prior``, ``z_prior``, ``cv``, ``elbo`` (the true
        bound) and ``loss`` (the training objective with its regularisers); see
        :func:`pyro_gmvae.objective.elbo_terms`.  Monte Carlo over ``num_particles`` draws.
        """
        return posterior.elbo_terms_dataset(self.model, self.guide, _as_tensor(y), num_particles, batch_size)

    def posterior_draws(self, y, num_samples: int = 100, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """S joint draws of (w, x, z) per example; see :func:`pyro_gmvae.posterior.posterior_draws`.

        ``w`` (S, N, Dw), ``x`` (S, N, Dx), ``z`` (S, N), ``cluster_probs`` (S, N, K),
        ``log_likelihood`` (S, N).
        """
        return posterior.posterior_draws(self.model, self.guide, _as_tensor(y), num_samples, batch_size)

    def to_inference_data(self, y, num_samples: int = 100, batch_size: int = 256, example_ids=None):
        """ArviZ ``InferenceData`` of posterior draws; see :func:`pyro_gmvae.to_inference_data`."""
        from pyro_gmvae.arviz_export import to_inference_data

        return to_inference_data(self, y, num_samples=num_samples, batch_size=batch_size, example_ids=example_ids)


def _state_dict_problem(err: RuntimeError) -> str:
    """The first lines of torch's load_state_dict message, which name the keys and sizes."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:4])[:600]


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild model and guide from a run folder and return a :class:`Run` in eval mode.

    Parameters
    ----------
    path : str or Path
        The run folder (``--out`` of ``experiments/run.py``) or its ``checkpoint.pt``.
    device : str or torch.device
        Where to put the modules: ``cpu``, ``cuda`` or ``cuda:N``.  Tensors are mapped
        there on load, so a run trained on a GPU loads on a CPU-only machine.

    Raises
    ------
    UserInputError
        No or unreadable checkpoint, a checkpoint of another format version, a config this
        version does not know, or weights that do not fit the saved architecture.
    """
    path = Path(path)
    folder, file = (path.parent, path) if path.suffix == ".pt" else (path, path / ckpt.CHECKPOINT_NAME)
    device = resolve_device(str(device))
    state = ckpt.load_checkpoint(file, map_location=device)
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise UserInputError(
            f"checkpoint {file} lacks {', '.join(missing)}; it was not written by pyro_gmvae.train and cannot "
            "rebuild a model"
        )
    try:
        config = Config.from_dict(dict(state["config"]))
        config.validate()
        model, guide = build_model_and_guide(config, tuple(state["data_shape"]))
    except (TypeError, ValueError) as err:
        saved = state.get("versions", {}).get("pyro_gmvae", "unknown")
        raise UserInputError(
            f"checkpoint {file} holds a config this pyro_gmvae cannot build ({err}); it was written by "
            f"pyro_gmvae {saved}, install that version to load it"
        ) from None
    model.to(device)
    guide.to(device)
    for name, module in (("model", model), ("guide", guide)):
        try:
            module.load_state_dict(state[name])
        except RuntimeError as err:
            raise UserInputError(
                f"checkpoint {file}: the saved {name} weights do not fit the architecture its config describes "
                f"({_state_dict_problem(err)})"
            ) from None
    model.eval()
    guide.eval()
    history = list(state.get("history", []))
    metrics_file = folder / "metrics.json"
    if metrics_file.is_file():
        final = json.loads(metrics_file.read_text())
    else:
        final = final_metrics(history) if history else {}
    saved_version = state.get("versions", {}).get("pyro_gmvae")
    from pyro_gmvae import __version__

    if saved_version is not None and saved_version != __version__:
        logger.warning("run %s was trained with pyro_gmvae %s, this is %s", folder, saved_version, __version__)
    return Run(folder, config, model, guide, tuple(state["data_shape"]), history, final, device)
