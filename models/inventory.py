"""What is installed under CNAI_MODELS_DIR: each CLIP model and face pack with its size on disk and dimension."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from inference.clip import list_clip_models
from inference.face.pack import find_face_pack
from inference.runtime import ModelMissingError

from .catalogue import CATALOGUE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Installed:
    task: str  # clip | face
    name: str
    path: Path
    bytes: int
    embed_dim: int | None  # None where the model cannot be read; `problem` says why
    problem: str | None = None


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def clip_models(models_dir: Path) -> list[Installed]:
    out = []
    for name in list_clip_models(models_dir):
        folder = models_dir / "clip" / name
        try:
            dim, problem = int(json.loads((folder / "config.json").read_text(encoding="utf-8"))["embed_dim"]), None
        except (OSError, ValueError, KeyError, TypeError) as e:
            dim, problem = None, f"unreadable config.json: {e}"
        out.append(Installed("clip", name, folder, folder_bytes(folder), dim, problem))
    return out


def _recogniser_dim(path: Path) -> int | None:
    import onnxruntime as ort

    # reads the graph's declared output; a session is the one reader the service itself needs
    shape = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_outputs()[0].shape
    return shape[-1] if isinstance(shape[-1], int) else None


def face_packs(models_dir: Path, also: tuple[str, ...] = ()) -> list[Installed]:
    """Packs under face/ and facial-recognition/ (Immich ML's cache), plus the catalogue's and `also` names
    wherever the face finder finds them."""
    names = set(also) | {e.name for e in CATALOGUE.values() if e.task == "face"}
    for sub in ("face", "facial-recognition"):
        if (models_dir / sub).is_dir():
            names |= {p.name for p in (models_dir / sub).iterdir() if p.is_dir() and not p.name.startswith(".")}
    out = []
    for name in sorted(names):
        try:
            pack = find_face_pack(models_dir, name)
        except (ModelMissingError, ValueError):
            continue
        # the pack's own folder: Immich's layout keeps each model one level down
        folder = pack.detection.parent
        if folder.name == "detection":
            folder = folder.parent
        try:
            dim, problem = _recogniser_dim(pack.recognition), None
        except Exception as e:  # noqa: BLE001 - reported in the listing, not raised
            dim, problem = None, f"{pack.recognition.name} cannot be read: {e}"
        out.append(Installed("face", name, folder, folder_bytes(folder), dim, problem))
    return out


def installed(models_dir: Path, face_names: tuple[str, ...] = ()) -> list[Installed]:
    models_dir = Path(models_dir)
    return clip_models(models_dir) + face_packs(models_dir, face_names)
