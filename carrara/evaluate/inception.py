"""Inception-v3 pool3 features (2048-d) for FID and KID, from a local weights file: nothing is downloaded.

The network is TensorFlow's `inception-2015-12-05` graph as ported by pytorch-fid (`fid_inception_v3`): torchvision's
Inception3 (Szegedy et al. 2016) with the FID patches (3×3 average pools that ignore the zero padding, a max pool in
the last block). Module names are torchvision's, so pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (and
torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`, same keys) load one to one. Images are resized as
clean-fid does (Parmar et al. 2022: PIL bicubic per float32 channel) and scaled to [-1, 1] as pytorch-fid does.
"""
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from carrara.errors import CarraraError
from carrara.safeload import is_pickle, refuse_pickle

SIZE = 299  # Inception-v3 input side
WEIGHTS_HELP = ("FID needs the Inception weights file: pass --inception-weights PATH "
                "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth, with --allow-pickle since it is a pickle, "
                "or the same state dict as .safetensors); carrara never substitutes another network")


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3) → ReLU: torchvision's `BasicConv2d`."""

    def __init__(self, c_in: int, c_out: int, **conv: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3×3 stride-1 average pool that ignores the padding, as TensorFlow's (pytorch-fid's FID patch)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35×35 block with 1×1, 5×5, double 3×3 and pool branches: pytorch-fid's `FIDInceptionA`."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35×35 → 17×17: torchvision's `InceptionB`."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17×17 block with factorized 7×7 branches: pytorch-fid's `FIDInceptionC`."""

    def __init__(self, c_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17×17 → 8×8: torchvision's `InceptionD`."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8×8 block with split 1×3/3×1 branches: pytorch-fid's `FIDInceptionE_1` (avg pool) or `_2` (max pool)."""

    def __init__(self, c_in: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's `fid_inception_v3()` up to pool3; `fc` (1008 classes) is unused, kept so the state dict loads."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) in [-1, 1] → pool3 features (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048)


def load_inception(path: str | Path | None, *, allow_pickle: bool = False) -> FIDInceptionV3:
    """The FID Inception from a local state dict (`.safetensors`, or with allow_pickle a `.pth` read weights-only)."""
    if path is None or not Path(path).is_file():
        raise CarraraError(WEIGHTS_HELP if path is None else f"{WEIGHTS_HELP} ({path} is not a file)")
    path = Path(path)
    if is_pickle(path) and not allow_pickle:
        raise refuse_pickle(path)
    try:
        state = (load_file(path) if path.suffix == ".safetensors"
                 else torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, SafetensorError) as e:
        raise CarraraError(f"{WEIGHTS_HELP} ({path} is unreadable: {type(e).__name__})") from None
    if not isinstance(state, dict):
        raise CarraraError(f"{WEIGHTS_HELP} ({path} holds a {type(state).__name__}, not a state dict)")
    model = FIDInceptionV3()
    expected = model.state_dict()
    wrong = [k for k in expected if not k.endswith("num_batches_tracked")  # absent from files saved by old torch
             and not (isinstance(state.get(k), torch.Tensor) and state[k].shape == expected[k].shape)]
    wrong += [k for k in state if k not in expected]
    if wrong:
        raise CarraraError(f"{WEIGHTS_HELP} ({path} is not the FID Inception-v3 state dict: {len(wrong)} keys "
                           f"missing, unexpected or mis-shaped, e.g. {wrong[0]!r})")
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False)


def resize_clean(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → (299, 299, 3) float32 in [0, 255]: clean-fid's `make_resizer("PIL", False, "bicubic", ...)`."""
    channels = [Image.fromarray(image[:, :, c].astype(np.float32)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
                for c in range(3)]  # mode 'F' images
    return np.stack([np.asarray(c) for c in channels], axis=2).clip(0, 255).astype(np.float32)


def _frames(images: np.ndarray | torch.Tensor | Sequence[Image.Image]) -> list[np.ndarray]:
    """uint8 (N, 3, H, W) array/tensor or a list of PIL images → N (H, W, 3) uint8 arrays."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        array = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] != 3:
            raise CarraraError(f"Inception features need uint8 images (N, 3, H, W), got {array.dtype} {array.shape}")
        return list(array.transpose(0, 2, 3, 1))
    return [np.asarray(im.convert("RGB")) for im in images]


class InceptionFeatures:
    """Pool3 features of the FID Inception-v3, the network of FID (Heusel et al. 2017) and KID."""

    name = "inception-v3-pool3"
    dim = 2048

    def __init__(self, weights_path: str | Path | None, *, device: str = "cpu", allow_pickle: bool = False) -> None:
        self.device = torch.device(device)
        self.model = load_inception(weights_path, allow_pickle=allow_pickle).to(self.device)

    @torch.inference_mode()
    def extract(self, images: np.ndarray | torch.Tensor | Sequence[Image.Image], batch_size: int = 50,
                progress: bool = True) -> np.ndarray:
        """uint8 (N, 3, H, W) images or PIL images → float32 features (N, 2048)."""
        frames = _frames(images)
        if not frames:
            raise CarraraError("Inception features need at least one image")
        out = np.empty((len(frames), self.dim), np.float32)
        with tqdm(total=len(frames), desc="inception features", unit="img", disable=not progress) as bar:
            for start in range(0, len(frames), batch_size):
                batch = np.stack([resize_clean(f) for f in frames[start:start + batch_size]])  # (B, 299, 299, 3)
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(self.device)  # (B, 3, 299, 299) in [0, 255]
                x = 2 * (x / 255) - 1  # pytorch-fid's normalize_input: [0, 1] → [-1, 1]
                out[start:start + len(batch)] = self.model(x).cpu().numpy()
                bar.update(len(batch))
        return out
