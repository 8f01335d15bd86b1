"""``--download`` without a connection: one line that says what failed, from where and where
the files go, and no folder left behind that the download made.  No test here touches the
network: ``urllib.request.urlopen``, which torchvision downloads through, is made to fail."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from conftest import load_script

from pyro_gmvae.data import load_mnist, load_svhn
from pyro_gmvae.errors import UserInputError


@pytest.fixture
def offline(monkeypatch):
    calls = []

    def refuse(request, *args, **kwargs):
        calls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


def _one_line_error(load, *args) -> str:
    with pytest.raises(UserInputError) as caught:
        load(*args, download=True)
    message = str(caught.value)
    assert "\n" not in message
    assert "Name or service not known" in message and "check the connection" in message
    return message


def test_offline_mnist_download_is_one_line_and_leaves_no_folder(tmp_path, offline):
    root = tmp_path / "data"
    message = _one_line_error(load_mnist, str(root))
    assert offline, "the download never reached urlopen"
    assert message.startswith("cannot download MNIST from ")
    assert f"into {root / 'MNIST' / 'raw'} " in message and "train-images-idx3-ubyte" in message
    assert not root.exists()  # data/, data/MNIST/ and data/MNIST/raw/ were all made by the download


def test_offline_download_keeps_the_folders_it_did_not_make(tmp_path, offline):
    (tmp_path / "MNIST").mkdir()
    (tmp_path / "MNIST" / "notes.txt").write_text("mine")
    _one_line_error(load_mnist, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "MNIST").iterdir()) == ["notes.txt"]


def test_offline_svhn_download_is_one_line_and_leaves_no_folder(tmp_path, offline):
    message = _one_line_error(load_svhn, str(tmp_path))
    assert message.startswith("cannot download SVHN train split from ")
    assert f"train_32x32.mat into {tmp_path / 'svhn'} " in message
    assert sorted(tmp_path.iterdir()) == []


def test_offline_download_through_the_cli_prints_one_line(tmp_path, offline, capsys):
    cli = load_script("run")
    root, out = tmp_path / "data", tmp_path / "run"
    argv = ["--data", "mnist", "--download", "--data-root", str(root), "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download MNIST") and err.count("\n") == 1, err
    assert not root.exists()
