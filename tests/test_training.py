"""The training loop end to end on the generated spiral set: reproducibility, the run
folder (config, metrics, checkpoint), and clustering quality on a shortened default run."""

from __future__ import annotations

import json

import pyro
import pytest
import torch

from pyro_gmvae import Config, train
from pyro_gmvae.checkpoint import load_checkpoint
from pyro_gmvae.training import FINAL_KEYS

TIMING_KEYS = {"seconds", "elapsed"}
# Seed 0 of the default spiral config, stopped at 20 of its 60 epochs; measured purity
# after 20 epochs: 0.999 / 0.998 / 0.997 for seeds 0 / 1 / 2 (lr 3e-3), so 0.9 leaves margin.
SHORT_EPOCHS = 20
PURITY_BOUND = 0.9
LOSS_TERMS = ("recon", "cond_prior", "w_prior", "z_prior", "cv", "test_elbo", "test_loss", "train_loss")


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def test_same_seed_gives_identical_metrics(tmp_path):
    def run(name):
        config = Config(epochs=2, seed=3, train_subset=1000, test_subset=300, progress=False, out=str(tmp_path / name))
        return train(config, make_figures=False)

    first, second = run("a"), run("b")
    rows_a, rows_b = _rows(first.out), _rows(second.out)
    assert len(rows_a) == 2
    assert _without_timing(rows_a) == _without_timing(rows_b)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key

    other = train(
        Config(epochs=2, seed=4, train_subset=1000, test_subset=300, progress=False, out=str(tmp_path / "c")),
        make_figures=False,
    )
    assert _without_timing(_rows(other.out)) != _without_timing(rows_a)  # the seed matters


@pytest.fixture(scope="module")
def spiral_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spiral") / "run"
    return train(Config(epochs=SHORT_EPOCHS, out=str(out), progress=False))


def test_short_spiral_run_separates_the_arms(spiral_run):
    final = spiral_run.final
    assert final["purity"] >= PURITY_BOUND, final
    assert final["clusters_used"] >= 5  # five arms need at least five clusters
    assert final["epochs"] == SHORT_EPOCHS


def test_run_folder_holds_everything(spiral_run):
    out = spiral_run.out
    for name in ("config.json", "metrics.jsonl", "metrics.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    for name in ("losses", "samples", "latent", "reconstruction"):
        png = out / "figures" / f"{name}.png"
        assert png.is_file(), png
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    final = json.loads((out / "metrics.json").read_text())
    assert set(FINAL_KEYS) <= set(final)
    for key in ("acc_paper", "acc_hungarian", "purity", "nmi", "ari", "elbo", "clusters_used", "epochs", "seconds"):
        assert final[key] is not None, key
    assert final == pytest.approx(spiral_run.final)

    rows = _rows(out)
    assert [row["epoch"] for row in rows] == list(range(1, SHORT_EPOCHS + 1))
    for row in rows:
        for key in LOSS_TERMS + ("clusters_used", "purity", "nmi", "seconds"):
            assert key in row, key
    assert rows[-1]["test_elbo"] == pytest.approx(final["elbo"])

    config = json.loads((out / "config.json").read_text())
    resolved = Config(epochs=SHORT_EPOCHS).resolved()
    for key in ("data", "K", "x_dim", "w_dim", "hidden_dim", "lr", "batch_size", "cv_weight", "likelihood"):
        assert config[key] == getattr(resolved, key), key
    assert {"torch", "pyro"} <= set(config["versions"])

    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == SHORT_EPOCHS
    assert state["config"]["K"] == resolved.K


def test_prior_lr_steps_the_prior_network_at_its_own_rate(tmp_path):
    """--prior-lr: equal to --lr it is the one-group run bit for bit; tiny, the prior network
    stays put while the encoder and decoder train; its ratio to --lr holds under --lr-final."""
    from pyro_gmvae.build import build_model_and_guide

    def run(name, **options):
        config = Config(epochs=2, seed=1, train_subset=600, test_subset=200, progress=False, out=str(tmp_path / name))
        return train(Config(**{**config.to_dict(), **options}), make_figures=False)

    plain, same = run("plain"), run("same", prior_lr=3e-3)  # 3e-3: the spiral preset's --lr
    assert _without_timing(_rows(plain.out)) == _without_timing(_rows(same.out))

    pyro.set_rng_seed(1)
    start, _ = build_model_and_guide(plain.config, (2,))
    frozen = run("frozen", prior_lr=1e-12, lr_final=1e-3)
    moved = {k: float((v - start.state_dict()[k]).abs().max()) for k, v in frozen.model.state_dict().items()}
    assert max(v for k, v in moved.items() if k.startswith("prior.")) < 1e-9
    assert min(v for k, v in moved.items() if k.startswith("decoder.") and "weight" in k) > 1e-4
    groups = load_checkpoint(frozen.out / "checkpoint.pt")["optimizer"]["param_groups"]
    assert groups[1]["lr"] == pytest.approx(1e-12 * 1e-3 / 3e-3) and groups[0]["lr"] == pytest.approx(1e-3)


def test_learning_rate_schedule_is_constant_or_cosine():
    from pyro_gmvae.training import epoch_lr

    constant = Config(lr=1e-3, epochs=10)
    assert [epoch_lr(constant, e) for e in (1, 5, 10)] == [1e-3, 1e-3, 1e-3]
    cosine = Config(lr=1e-3, lr_final=1e-4, epochs=11)
    lrs = [epoch_lr(cosine, e) for e in range(1, 12)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert lrs[5] == pytest.approx(0.5 * (1e-3 + 1e-4))  # half way
    assert all(a > b for a, b in zip(lrs[:-1], lrs[1:], strict=True))


def test_kl_warmup_weights_rise_to_one_and_the_objective_is_recon_minus_beta_kl():
    """With kl_weight beta passed to the model the loss is -(recon - beta KL) / beta."""
    import pyro

    from pyro_gmvae.build import build_model_and_guide
    from pyro_gmvae.objective import elbo_terms, make_elbo
    from pyro_gmvae.training import kl_weight

    config = Config(kl_warmup=3, epochs=6)
    betas = [kl_weight(config, e) for e in range(1, 7)]
    assert betas == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])

    model, guide = build_model_and_guide(Config(K=3, x_dim=2, w_dim=2, hidden_dim=8).resolved(), (2,))
    y = torch.randn(7, 2)
    beta = 0.25
    pyro.set_rng_seed(1)
    loss = make_elbo(1)(model, guide)(y, kl_weight=beta)
    pyro.set_rng_seed(1)
    terms = elbo_terms(model, guide, y, 1, closed_form_w=False)
    kl = terms["recon"] - terms["elbo"]
    torch.testing.assert_close(loss, (-(terms["recon"] - beta * kl) / beta).sum() + 2.0 * terms["cv"].sum())


def _flushes_denormals() -> bool:
    """Does the CPU treat a float32 denormal (1e-39) as zero right now?"""
    return (torch.tensor([1e-39]) * 1.0).item() == 0.0


def test_flush_denormal_holds_for_the_run_only(tmp_path, monkeypatch):
    import pyro_gmvae.training as training

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    seen = []

    def spy(*args, **kwargs):
        seen.append(_flushes_denormals())
        raise RuntimeError("stop after the check")

    monkeypatch.setattr(training, "_train", spy)
    for flush in (True, False):
        config = Config(data="spiral", epochs=1, train_subset=400, test_subset=50, progress=False,
                        flush_denormal=flush, out=str(tmp_path / f"run{flush}"))  # fmt: skip
        with pytest.raises(RuntimeError, match="stop after the check"):
            train(config)
        assert not _flushes_denormals()  # the process keeps its denormals after the run, failed or not
    assert seen == [True, False]
