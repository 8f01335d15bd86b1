"""``--init-anchor-epochs``: the start's partition term kept, with a falling weight, in the
first GMVAE epochs; and ``run_epoch`` with several terms beside the loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_resume_is_bit_for_bit, image_dataset

from pyro_gmvae.config import Config
from pyro_gmvae.data import Dataset
from pyro_gmvae.initialization import PartitionTerm
from pyro_gmvae.loop import run_epoch
from pyro_gmvae.training import anchor_weight, train


def test_anchor_weight_falls_linearly_to_zero_after_n_epochs():
    config = Config(init_anchor_epochs=3, init_fit_weight=10.0)
    assert [anchor_weight(config, e) for e in range(1, 6)] == [7.5, 5.0, 2.5, 0.0, 0.0]
    assert anchor_weight(Config().resolved(), 1) == 0.0  # off by default


class _Fixed:
    """A guide whose cluster posterior is a fixed table: row i of ``log_r`` for example i."""

    def __init__(self, log_r):
        self.log_r = log_r

    def encode(self, y):
        return y

    def cluster_log_probs(self, model, idx):
        return self.log_r[idx.long().squeeze(-1)]


def test_partition_term_is_the_cross_entropy_over_the_partitioned_examples():
    log_r = torch.randn(6, 3).log_softmax(-1)
    labels = torch.tensor([2, 0, 1, 1])  # examples 0-3 are partitioned, 4 and 5 are not
    term = PartitionTerm(None, _Fixed(log_r), labels, size=6)
    idx = torch.tensor([5, 1, 3, 4])
    expected = -(log_r[1, 0] + log_r[3, 1]) / 2
    assert torch.allclose(term(idx[:, None].float(), idx), expected)
    assert torch.allclose(term(None, idx, log_r=log_r[idx]), expected)  # a shared log r gives the same
    assert term(None, torch.tensor([4, 5]), log_r=log_r[[4, 5]]) == 0  # no partitioned example in the batch
    everywhere = PartitionTerm(None, _Fixed(log_r), labels)  # the fit's case: every example partitioned
    assert torch.allclose(everywhere(None, torch.tensor([0, 2]), log_r=log_r[[0, 2]]), -(log_r[0, 2] + log_r[2, 1]) / 2)


def test_run_epoch_adds_each_term_with_its_weight():
    p = torch.nn.Parameter(torch.tensor(2.0))
    seen = []

    class Record(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(float(p.grad))

    x = torch.zeros(4, 1)
    terms = lambda y, idx: torch.stack([p, 2 * p])  # noqa: E731
    total = run_epoch(lambda y: p**2, Record([p], lr=0.1), x, 2, torch.Generator(), extra_loss=terms,
                      extra_weight=[3.0, 5.0])  # fmt: skip
    assert seen == [2 * 2.0 + 3.0 + 5.0 * 2] * 2  # d/dp (p^2 + 3 p + 5 x 2p)
    assert total.tolist() == [8.0, 4.0, 8.0]  # per step: loss 4, terms 2 and 4; summed over 2 steps


def _images() -> Dataset:
    return image_dataset(160)


FLAGS = dict(
    data="images.npz", network="fc", likelihood="bernoulli", K=3, x_dim=4, w_dim=3, hidden_dim=16, batch_size=16,
    lr=1e-3, seed=1, progress=False, init="vae-kmeans", pretrain_epochs=1, init_fit_epochs=1, init_anchor_epochs=3,
)  # fmt: skip


@pytest.mark.parametrize("augment_weight", [0.0, 5.0])
def test_run_with_the_anchor_logs_it_while_on_and_resumes_bit_for_bit(tmp_path, augment_weight):
    flags = dict(FLAGS, augment_weight=augment_weight)
    one, a, b = assert_resume_is_bit_for_bit(tmp_path, flags, _images, epochs=5, stop=2)
    assert [("anchor" in row) for row in one.history] == [True, True, True, False, False]
    assert all(0 < row["anchor"] < 20 for row in one.history[:3])
    assert all(("augment" in row) == bool(augment_weight) for row in one.history)
    assert torch.equal(a["partition"], b["partition"]) and len(a["partition"]) == 128


def test_the_anchor_changes_the_first_epoch_not_the_start(tmp_path):
    """The same start with and without the anchor; epoch 1's objective differs."""
    with_anchor = train(Config(epochs=1, out=str(tmp_path / "a"), **FLAGS), data=_images(), make_figures=False)
    without = train(
        Config(epochs=1, out=str(tmp_path / "b"), **dict(FLAGS, init_anchor_epochs=0)), data=_images(),
        make_figures=False,
    )  # fmt: skip
    starts = [json.loads((tmp_path / name / "init.json").read_text())["test_at_init"] for name in ("a", "b")]
    assert starts[0] == starts[1]
    assert "anchor" not in without.history[0]
    assert not math.isclose(with_anchor.history[0]["train_loss"], without.history[0]["train_loss"], rel_tol=1e-7)
