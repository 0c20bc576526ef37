"""Test session settings: one intra-op thread per process, and the tiny trained models the tests share.

The suite runs on small tensors, where thread start-up costs more than it saves, and on shared 2-core
machines, where two busy processes each asking for 2 threads run 10× slower (measured 2026-11-23).
"""
import signal

import pytest
import torch

torch.set_num_threads(1)  # at import, so module-level tensors built during collection use one thread too
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    # A suite started in the background of a non-interactive shell (`make test &`, nohup) inherits SIGINT ignored,
    # and so would the CLI processes the Ctrl-C tests start: give this process (and, through exec, its children)
    # Python's own KeyboardInterrupt back, so those tests test carrara, not how the suite was launched.
    signal.signal(signal.SIGINT, signal.default_int_handler)

TINY_VAE = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "latent_channels": 4, "sample_size": 16}
TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": [2, 4],
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one intra-op thread, even after a test that changed the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """48 `shapes` images at 16×16."""
    from carrara.data.shapes import build_shapes

    out = tmp_path_factory.mktemp("shapes")
    build_shapes(out, n=48, size=16, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_ae_run(tiny_shapes, tmp_path_factory):
    """A 60-step autoencoder run on tiny_shapes."""
    from carrara.train.autoencoder import AutoencoderRecipe, train_autoencoder
    from carrara.train.core import TrainConfig

    run = tmp_path_factory.mktemp("ae")
    recipe = AutoencoderRecipe(data=str(tiny_shapes), size=16, model=dict(TINY_VAE),
                               train=TrainConfig(steps=60, batch_size=16, lr=2e-3, warmup_steps=5, log_every=5,
                                                 checkpoint_every=30, sample_every=60, bf16=False))
    train_autoencoder(recipe, run, progress=False)
    return run


def tiny_diffusion_recipe(data, ae_run, steps=30):
    from carrara.train.core import TrainConfig
    from carrara.train.diffusion import DiffusionRecipe

    return DiffusionRecipe(data=str(data), autoencoder=str(ae_run), size=16, model=dict(TINY_UNET),
                           sample_prompts=["a red circle", "a blue square"],
                           train=TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=3, log_every=3,
                                             checkpoint_every=10, sample_every=1000, bf16=False))


@pytest.fixture(scope="session")
def tiny_diffusion_run(tiny_shapes, tiny_ae_run, tmp_path_factory):
    """A 45-step diffusion run (a model folder) on tiny_shapes."""
    from carrara.train.diffusion import train_diffusion

    run = tmp_path_factory.mktemp("dm")
    train_diffusion(tiny_diffusion_recipe(tiny_shapes, tiny_ae_run, steps=45), run, progress=False)
    return run


@pytest.fixture(scope="session")
def tiny_clip_run(tiny_shapes, tmp_path_factory):
    """A 40-step CLIP run on tiny_shapes; returns (run folder, train_clip's result)."""
    from carrara.train.clip import ClipRecipe, train_clip
    from carrara.train.core import TrainConfig

    run = tmp_path_factory.mktemp("clip")
    recipe = ClipRecipe(data=str(tiny_shapes), size=16, holdout=20, shift=1,
                        model={"channels": [8, 16], "embed_dim": 32, "groups": 4},
                        train=TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup_steps=4, log_every=4,
                                          checkpoint_every=20, sample_every=40, bf16=False))
    return run, train_clip(recipe, run, progress=False)
