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
    loaded = AutoencoderKL.from_pretrained(folder, allow_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))


def test_generate_refuses_a_pickled_model_folder_unless_allowed(tiny_diffusion_run, tmp_path, capsys):
    import shutil

    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_diffusion_run, folder, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))  # a diffusers folder saved the pickle way
    weights.unlink()
    args = ["generate", "a red circle", "--model", str(folder), "--steps", "2", "--seed", "3"]
    code = main([*args, "-o", str(tmp_path / "refused.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "diffusion_pytorch_model.bin is a pickle file" in err
    assert not (tmp_path / "refused.png").exists()
    assert main([*args, "--allow-pickle", "-o", str(tmp_path / "pickle.png")]) == 0
    assert main([*args[:3], str(tiny_diffusion_run), *args[4:], "-o", str(tmp_path / "safe.png")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pickle.png")),
                                  np.asarray(Image.open(tmp_path / "safe.png")))


def test_text_encoder_folder_holding_only_a_pickle_is_refused(tmp_path):
    from carrara.text.encoder import TextEncoder

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    torch.save({"w": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CarraraError, match=r"pytorch_model.bin is a pickle file.*--allow-pickle"):
        TextEncoder.load(str(tmp_path))
