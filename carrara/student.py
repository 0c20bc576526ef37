"""A model folder's few-step student: `carrara export student` puts a distilled student beside its teacher, and
`Pipeline.load(…, fast=True)` (`carrara generate --fast`, the page's live preview) samples with it.

`carrara distill` (train/distill.py) makes a student run folder: the teacher's U-Net plus a guidance embedding,
sampled in 1–4 consistency steps with classifier-free guidance built in. Shipping that folder whole would double the
model's size, so the teacher's folder holds only what differs:

    MODEL/student/model_index.json      the student record (method, teacher, teacher_hash, guidance range, skip), the
                                        delta's bits and hash, and the export's measured image difference
    MODEL/student/unet/config.json      the student U-Net's config (the teacher's, with time_cond_proj_dim)
    MODEL/student/unet/delta.safetensors  student − teacher, 4 bits per weight with a scale per row (models/delta.py)
    MODEL/student/scheduler/            the student run's scheduler config (its LCM sampler's)
    MODEL/student/training/             the distillation run's config, log, metrics and loss curve

Loading rebuilds the student's weights from the teacher's (checked by weights hash) and the delta; a cascade keeps
its upsampler, so `--fast` at 128 px is the student's base image and the usual upsampler. The export samples the
rebuilt student against the run's own on a few prompts and refuses it when their images differ by more than 2/255
on average (carrara/export.py `export_student`): the student's measured quality (docs/distill.md) is the shipped one's.
"""
from __future__ import annotations

from pathlib import Path

from carrara.errors import CarraraError
from carrara.modelfolder import read_json_object
from carrara.models.delta import DELTA_NAME, apply_delta
from carrara.models.unet import UNet2DConditionModel as UNet
from carrara.models.unet import UNetConfig
from carrara.models.weights import load_into

FOLDER = "student"


def has_student(root: str | Path) -> bool:
    return (Path(root) / FOLDER / "model_index.json").is_file()


def student_record(root: str | Path) -> dict | None:
    """The student record of a student run folder (model_index.json "carrara"."student"), or None."""
    record = read_json_object(Path(root) / "model_index.json").get("carrara", {}).get("student")
    return record if isinstance(record, dict) else None


def load_student(root: str | Path, teacher: UNet, teacher_hash: str) -> tuple[UNet, dict, dict, str]:
    """(student U-Net in float32, its record, its scheduler config, its hash) from `root`/student/ and the teacher's
    U-Net; one CarraraError if the folder is incomplete or was made from other teacher weights."""
    folder = Path(root) / FOLDER
    index = read_json_object(folder / "model_index.json")
    record = index.get("student")
    if not isinstance(record, dict):
        raise CarraraError(f"{folder / 'model_index.json'} holds no student record: export the student again")
    scheduler = read_json_object(folder / "scheduler" / "scheduler_config.json")
    return rebuild_unet(folder, teacher, teacher_hash), record, scheduler, str(index.get("weights_hash", ""))


def rebuild_unet(folder: Path, teacher: UNet, teacher_hash: str) -> UNet:
    """The student U-Net (float32) of a student folder: its config, the teacher's weights plus the stored delta."""
    unet = UNet(UNetConfig.from_diffusers_config(folder / "unet"))
    state = apply_delta(teacher.state_dict(), folder / "unet" / DELTA_NAME, teacher_hash=teacher_hash)
    load_into(unet, state, str(folder / "unet" / DELTA_NAME))
    return unet.eval()
