"""`cnai models list`: installed models, the model each task uses with the current settings, and the catalogue."""
from __future__ import annotations

from models.catalogue import CATALOGUE, lookup
from models.inventory import Installed, installed

from .settings import Settings
from .wiring import CLIP_DIM


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _servable(m: Installed) -> str:
    if m.problem:
        return f"PROBLEM: {m.problem}"
    if m.task == "clip" and m.embed_dim != CLIP_DIM:
        return f"not servable: cnai stores and serves {CLIP_DIM}-d CLIP only"
    return "servable"


def _missing(name: str) -> str:
    try:
        return f"not installed: `cnai models pull {lookup(name).name}`"
    except KeyError:
        return "not installed, and not in the catalogue"


def model_listing(settings: Settings) -> list[str]:
    models = installed(settings.models_dir, (settings.face_model,))
    lines = [f"models dir: {settings.models_dir} (CNAI_MODELS_DIR)", "installed:"]
    for m in models:
        dim = f"{m.embed_dim}-d" if m.embed_dim else "?-d"
        lines.append(f"  {m.task:5s} {m.name:14s} {dim:7s} {human_bytes(m.bytes):>10s}  {_servable(m)}  {m.path}")
    if not models:
        lines.append("  none")

    lines.append("used with the current settings:")
    by_key = {(m.task, m.name): m for m in models}
    for task, name, setting in (("clip", settings.clip_model, "CNAI_CLIP_MODEL"),
                                ("face", settings.face_model, "CNAI_FACE_MODEL")):
        m = by_key.get((task, name)) or next((x for x in models if x.task == task and x.name.lower() == name.lower()),
                                             None)
        state = f"installed, {m.embed_dim}-d, {_servable(m)}" if m else _missing(name)
        off = "" if task in settings.tasks else " (task off: not in CNAI_TASKS)"
        lines.append(f"  {task:5s} {name} ({setting}): {state}{off}")
    off = "" if "ocr" in settings.tasks else " (task off: not in CNAI_TASKS)"
    lines.append(f"  ocr   RapidOCR's PP-OCR models, shipped with the rapidocr package{off}")

    lines.append("available to pull (`cnai models pull NAME`):")
    for entry in CATALOGUE.values():
        mark = "" if entry.task != "clip" or entry.embed_dim == CLIP_DIM else f"  (not servable: {entry.embed_dim}-d)"
        lines.append(f"  {entry.task:5s} {entry.name:14s} {entry.description}; mirrors: "
                     f"{', '.join(entry.sources)}{mark}")
    return lines
