"""Pictures a request sends to edit (img2img's init image, inpainting's mask): data URLs checked and decoded, or a
gallery image named by its id. Every refusal is a one-line `UploadError` the API answers with a 422.

The page sends the model's own size (it draws the picture on a canvas first), a few kilobytes; other clients may
send any PNG or JPEG up to `MAX_IMAGE_BYTES` and `MAX_SIZE` pixels a side, which the pipeline centre-crops to a
square and resizes to the model's side. A mask must have its init image's size (it is resized the same way).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from carrara.serve.gallery import Gallery
from carrara.serve.schema import MAX_IMAGE_BYTES, MAX_SIZE

DATA_URL = re.compile(r"data:image/(png|jpeg);base64,")
FORMATS = ("PNG", "JPEG")


class UploadError(ValueError):
    """A picture the server will not edit, and why, in one line naming the field."""


@dataclass
class Edit:
    """What an img2img or inpainting job starts from."""

    image: Image.Image  # as sent (any mode: the pipeline puts transparency over white), centre-cropped and resized there
    mask: Image.Image | None  # "L", white = regenerate
    strength: float
    source: str  # "upload", or "gallery:<id>" for "use this image"
    image_sha256: str  # of the picture's file bytes, recorded in the PNGs it makes
    mask_sha256: str | None


def _open(data: bytes, field: str) -> Image.Image:
    """Decode a PNG or JPEG whose header says at most MAX_SIZE pixels a side (checked before the pixels are)."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in FORMATS:
            raise UploadError(f"{field}: a {image.format} image; send a PNG or JPEG")
        if max(image.size) > MAX_SIZE:
            raise UploadError(f"{field}: {image.size[0]}×{image.size[1]} pixels; at most {MAX_SIZE} a side")
        image.load()
    except UploadError:
        raise
    except Image.DecompressionBombError:
        raise UploadError(f"{field}: too many pixels (a decompression bomb?); at most {MAX_SIZE} a side") from None
    except UnidentifiedImageError:
        raise UploadError(f"{field}: not a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UploadError(f"{field}: a damaged image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return image


def decode_data_url(text: str, field: str) -> tuple[Image.Image, str]:
    """(the picture, the SHA-256 of its bytes) from 'data:image/png;base64,…' (or image/jpeg)."""
    head = DATA_URL.match(text)
    if head is None:
        raise UploadError(f'{field}: not a PNG or JPEG data URL ("data:image/png;base64,…")')
    if len(text) - head.end() > (MAX_IMAGE_BYTES + 2) // 3 * 4:
        raise UploadError(f"{field}: larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        data = base64.b64decode(text[head.end():], validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(f"{field}: not valid base64") from None
    return _open(data, field), hashlib.sha256(data).hexdigest()


def from_gallery(gallery: Gallery, image_id: str, field: str) -> tuple[Image.Image, str]:
    """A gallery image ("use this image") and the SHA-256 of its file."""
    path = gallery.path(image_id)
    if path is None:
        raise UploadError(f"{field}: no image {image_id} in the gallery")
    data = path.read_bytes()
    return _open(data, field), hashlib.sha256(data).hexdigest()


def read_edit(body, gallery: Gallery, default_strength: tuple[float, float]) -> Edit | None:
    """The init image (uploaded or from the gallery) and mask of a request, checked; None for txt2img.
    default_strength: (img2img's, inpainting's), for a request that gives none."""
    if body.init_image is None and body.init_image_id is None:
        return None
    if body.init_image is not None:
        image, digest = decode_data_url(body.init_image, "init_image")
        source = "upload"
    else:
        image, digest = from_gallery(gallery, body.init_image_id, "init_image_id")
        source = f"gallery:{body.init_image_id}"
    mask = mask_digest = None
    if body.mask is not None:
        mask, mask_digest = decode_data_url(body.mask, "mask")
        if mask.size != image.size:
            raise UploadError(f"mask: {mask.size[0]}×{mask.size[1]} pixels, the init image {image.size[0]}×"
                              f"{image.size[1]}: paint the mask on the init image, at its size")
        mask = mask.convert("L")
    strength = body.strength if body.strength is not None else default_strength[mask is not None]
    return Edit(image, mask, strength, source, digest, mask_digest)
