"""Find a face model pack (detector + recogniser ONNX files) by name in the models folder.

Two layouts are understood:

- InsightFace's zip (`buffalo_l.zip`, `antelopev2.zip`, ...): a folder of `.onnx` files such as `det_10g.onnx`,
  `scrfd_10g_bnkps.onnx`, `w600k_r50.onnx`, `glintr100.onnx` next to landmark/attribute models we ignore. Searched in
  `<models>/face/<name>/`, `<models>/<name>/` and `<models>/models/<name>/`, each also with one extra inner `<name>/`
  (some zips unpack with an inner folder, some without).
- Immich ML's cache: `<models>/facial-recognition/<name>/detection/model.onnx` and `.../recognition/model.onnx`
  (a `detection/` + `recognition/` pair is also accepted inside any of the folders above).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..runtime import ModelMissingError

log = logging.getLogger(__name__)

# InsightFace file-name prefixes. Files of a pack that are neither (1k3d68, 2d106det, genderage) are ignored.
_DETECTOR_PREFIXES = ("det_", "scrfd", "retinaface")
_RECOGNISER_PREFIXES = ("w600k", "glint", "arcface", "webface", "ms1m")
_OTHER_PREFIXES = ("1k3d68", "2d106det", "genderage", "inswapper", "landmark")


@dataclass(frozen=True)
class FacePack:
    name: str
    detection: Path
    recognition: Path


def _folder_name(name: str) -> str:
    # the name becomes a folder under the models dir; Immich's spellings (immich-app/buffalo_l) are cleaned by
    # the caller, with the gateway's clean_name
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"invalid face model name: {name!r} (expected a pack name such as buffalo_l)")
    return name


def candidate_dirs(models_dir: Path, name: str) -> list[Path]:
    """Folders that may hold the pack's files, in search order."""
    dirs = []
    for base in (models_dir / "face" / name, models_dir / name, models_dir / "models" / name):
        dirs += [base, base / name]
    return dirs


def _role_from_name(path: Path) -> str | None:
    stem = path.stem.lower()
    if stem.startswith(_DETECTOR_PREFIXES):
        return "detection"
    if stem.startswith(_RECOGNISER_PREFIXES):
        return "recognition"
    if stem.startswith(_OTHER_PREFIXES):
        return "other"
    return None


def _role_from_graph(path: Path) -> str | None:
    """Classify an unknown-named model the way InsightFace's router does: >=5 outputs is a detector, a square
    input of 112 (or a multiple of 16 above it) is a recogniser."""
    try:
        try:
            import onnx  # reads the graph header without building a session

            graph = onnx.load(str(path), load_external_data=False).graph
            init_names = {t.name for t in graph.initializer}
            inputs = [i for i in graph.input if i.name not in init_names]
            n_outputs = len(graph.output)
            dims = [d.dim_value if d.HasField("dim_value") else None
                    for d in inputs[0].type.tensor_type.shape.dim] if inputs else []
        except ImportError:
            import onnxruntime as ort

            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            n_outputs = len(sess.get_outputs())
            dims = [d if isinstance(d, int) else None for d in sess.get_inputs()[0].shape]
    except Exception as e:  # an unreadable file is not ours to judge; the session will report it on load
        log.warning("cannot inspect %s: %s", path, e)
        return None
    if n_outputs >= 5:
        return "detection"
    if len(dims) == 4 and dims[2] and dims[2] == dims[3] and dims[2] >= 112 and dims[2] % 16 == 0:
        return "recognition"
    return None


def _scan_insightface_dir(folder: Path) -> tuple[Path | None, Path | None]:
    files = sorted(p for p in folder.glob("*.onnx") if p.is_file())
    found: dict[str, Path] = {}
    unknown = []
    for path in files:  # sorted order, first of each role wins, as InsightFace's FaceAnalysis does
        role = _role_from_name(path)
        if role in ("detection", "recognition"):
            found.setdefault(role, path)
        elif role is None:
            unknown.append(path)
    if unknown and len(found) < 2:
        for path in unknown:
            role = _role_from_graph(path)
            if role and role not in found:
                found[role] = path
    return found.get("detection"), found.get("recognition")


def _missing_hint(models_dir: Path, name: str, searched: list[Path]) -> str:
    where = ", ".join(str(p) for p in searched)
    return (f"face pack {name!r} not found (looked in {where}). Put it in the models folder "
            f"($CNAI_MODELS_DIR): unzip InsightFace's {name}.zip into {models_dir / 'face' / name}/ so that it "
            f"holds the detector (det_*.onnx or scrfd_*.onnx) and the recogniser (w600k_*.onnx or glintr100.onnx), "
            f"or copy Immich ML's cache folder so that {models_dir / 'facial-recognition' / name}/detection/model.onnx "
            f"and .../recognition/model.onnx exist")


def find_face_pack(models_dir: Path | str, name: str) -> FacePack:
    """Locate pack `name` under `models_dir`; ModelMissingError names the expected places when it is absent."""
    models_dir = Path(models_dir)
    name = _folder_name(name)
    searched = [models_dir / "facial-recognition" / name, *candidate_dirs(models_dir, name)]
    partial: tuple[Path, Path | None, Path | None] | None = None

    for folder in searched:
        if not folder.is_dir():
            continue
        det = folder / "detection" / "model.onnx"
        rec = folder / "recognition" / "model.onnx"
        det_ok, rec_ok = det.is_file(), rec.is_file()
        if det_ok and rec_ok:
            return FacePack(name, det, rec)
        if det_ok or rec_ok:
            partial = partial or (folder, det if det_ok else None, rec if rec_ok else None)
        d, r = _scan_insightface_dir(folder)
        if d and r:
            return FacePack(name, d, r)
        if d or r:
            partial = partial or (folder, d, r)

    if partial:
        folder, d, r = partial
        what = "recogniser (w600k_*.onnx, glintr100.onnx or recognition/model.onnx)" if d else \
            "detector (det_*.onnx, scrfd_*.onnx or detection/model.onnx)"
        raise ModelMissingError(folder, f"face pack {name!r} in {folder} has no {what}; the pack is incomplete — "
                                        f"unzip the whole {name}.zip there")
    raise ModelMissingError(models_dir / "face" / name, _missing_hint(models_dir, name, searched))
