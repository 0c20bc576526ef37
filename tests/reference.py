"""Helpers for the tests that compare a carrara model with its diffusers reference."""
import torch


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter by noise that keeps activations O(1) (no zero-init layer can hide a mistake):
    weights U with std 1/√fan_in, biases std 0.1, norm scales 1 ± 0.1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.1 if p.ndim == 1 else p[0].numel() ** -0.5
            p.uniform_(-std * 3**0.5, std * 3**0.5, generator=g)
            if p.ndim == 1 and name.endswith("weight"):
                p.add_(1.0)
    return module.eval()


def shapes(module: torch.nn.Module) -> dict:
    """State-dict key -> shape: equal for two models iff a strict load works both ways."""
    return {k: v.shape for k, v in module.state_dict().items()}


def reference_pair(theirs_cls, ours_cls, config_cls, config: dict, seed: int = 0):
    """diffusers' model with random weights and ours loaded from its state dict (strict, both directions)."""
    theirs = randomize_(theirs_cls.from_config(config), seed)
    ours = ours_cls(config_cls.from_diffusers_config(dict(theirs.config))).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs, ours
