"""Untrusted weights: a pickle is refused unless --allow-pickle, and then read with weights_only=True."""
import os

import pytest
import torch
from conftest import TINY_VAE

from carrara.cli import main
from carrara.errors import CarraraError
from carrara.models.autoencoder import AutoencoderKL
from carrara.models.config import AutoencoderConfig
from carrara.safeload import load_state_dict, weights_file
from carrara.train.diffusion import load_autoencoder


class Payload:
    """What a hostile checkpoint carries: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_is_refused_without_the_flag_and_loads_with_it(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    torch.save(state, tmp_path / "weights.ckpt")
    with pytest.raises(CarraraError, match=r"weights.ckpt is a pickle file.* --allow-pickle"):
        load_state_dict(tmp_path / "weights.ckpt")
    loaded = load_state_dict(tmp_path / "weights.ckpt", allow_pickle=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"state_dict": state}, tmp_path / "lightning.pt")  # the original SD .ckpt layout
    assert torch.equal(load_state_dict(tmp_path / "lightning.pt", allow_pickle=True)["w"], state["w"])


def test_even_allowed_pickles_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(1), "evil": Payload(marker)}, tmp_path / "evil.bin")
    with pytest.raises(CarraraError, match="weights_only=True"):
        load_state_dict(tmp_path / "evil.bin", allow_pickle=True)
    assert not marker.exists()


@pytest.fixture
def pickled_vae(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig.from_diffusers_config(dict(TINY_VAE)))
    vae.save_pretrained(tmp_path / "ae" / "vae")
    folder = tmp_path / "ae" / "vae"
    torch.save(vae.state_dict(), folder / "diffusion_pytorch_model.bin")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    return vae, folder


def test_autoencoder_folder_holding_a_pickle(pickled_vae, tmp_path, capsys):
    vae, folder = pickled_vae
    with pytest.raises(CarraraError, match="is a pickle file"):
        weights_file(folder, "diffusion_pytorch_model")
    code = main(["train", "diffusion", "--data", str(tmp_path), "--autoencoder", str(folder.parent),
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "diffusion_pytorch_model.bin is a pickle file" in err
    loaded = load_autoencoder(folder, allow_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))
