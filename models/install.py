"""`cnai models pull`: download a catalogue model, verify it, and install it with the importer its format needs.

Downloads wait in `<models>/.downloads/<name>/` (so a cut download resumes on the next run) and are deleted once
the model is installed. Installing writes into a hidden folder beside the target and renames it into place only
after the model has been checked, so a failed pull never leaves a half-installed model.
"""
from __future__ import annotations

import importlib
import logging
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from inference.clip.export import publish_folder
from inference.face.pack import find_face_pack
from inference.runtime import ModelMissingError

from .catalogue import (CHECKPOINT, DEFAULT_MIRROR, IMMICH_PAIR, INSIGHTFACE_ZIP, MIRRORS, CatalogueEntry,
                        RemoteFile, Source)
from .download import DownloadError, Downloaded, client_session, download

log = logging.getLogger(__name__)

CONVERT_MODULES = ("torch", "cn_clip", "onnx")
CONVERT_HINT = "pip install 'cnai[convert]'"


class PullError(RuntimeError):
    """A pull that failed; the message is one line a person can act on."""


@dataclass(frozen=True)
class Plan:
    entry: CatalogueEntry
    mirror: str
    source: Source
    urls: tuple[str, ...]
    note: str | None = None  # said before the download, e.g. a mirror this model is not on


@dataclass(frozen=True)
class Pulled:
    path: Path
    files: tuple[Downloaded, ...]


def plan(entry: CatalogueEntry, mirror: str | None = None, base_url: str | None = None) -> Plan:
    """Which files to fetch from where. `base_url` (CNAI_MODEL_BASE_URL) replaces the publishers' hosts: each file
    is fetched from `<base_url>/<model name>/<file>`, the layout of an in-house mirror."""
    mirror = (mirror or DEFAULT_MIRROR).strip().lower()
    if mirror not in MIRRORS:
        raise PullError(f"unknown mirror {mirror!r}: choose one of {', '.join(MIRRORS)}")
    note = None
    if mirror not in entry.sources:
        note = (f"{entry.name} is not on the {mirror} mirror; using {DEFAULT_MIRROR} "
                f"(it is on: {', '.join(entry.sources)})")
        mirror = DEFAULT_MIRROR
    source = entry.sources[mirror]
    if base_url:
        base = base_url.rstrip("/")
        urls = tuple(f"{base}/{entry.name}/{f.path}" for f in source.files)
    else:
        urls = tuple(f.url for f in source.files)
    return Plan(entry, mirror, source, urls, note)


def convert_problem() -> str | None:
    """Why a cn-clip checkpoint cannot be converted here (torch, cn-clip or onnx missing), or None."""
    for module in CONVERT_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as e:
            return (f"converting a Chinese-CLIP checkpoint needs torch, cn-clip and onnx, and {module} cannot be "
                    f"imported ({e}); install them with: {CONVERT_HINT}")
    return None


def install_dir(models_dir: Path, entry: CatalogueEntry) -> Path:
    return models_dir / entry.task / entry.name


def installed_at(models_dir: Path, entry: CatalogueEntry) -> Path | None:
    """Where `entry` is already installed under its own name, or None."""
    folder = install_dir(Path(models_dir), entry)
    if entry.task == "clip":
        return folder if (folder / "config.json").is_file() else None
    try:
        return find_face_pack(models_dir, entry.name).detection.parent
    except (ModelMissingError, ValueError):
        return None


async def pull(the_plan: Plan, models_dir: Path, *, sha256: str | None = None, keep_download: bool = False,
               force: bool = False, progress: bool = True, clip_model_config: dict | None = None, retry_delay_s: float = 1.0,
               user_agent: str = "cnai") -> Pulled:
    """Download, verify and install. `sha256` pins the expected hash of a one-file source. `clip_model_config`
    replaces cn-clip's config for the arch (a fine-tune of another shape; the tests' tiny models)."""
    entry, source = the_plan.entry, the_plan.source
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise PullError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")
    if sha256 is not None and len(source.files) != 1:
        raise PullError(f"--sha256 pins one file, and {entry.name} from {the_plan.mirror} is "
                        f"{len(source.files)} files")
    models_dir = Path(models_dir)
    if not force and (where := installed_at(models_dir, entry)):
        raise PullError(f"{entry.name} is already installed in {where}; pass --force to download and replace it")
    if source.layout == CHECKPOINT and (problem := convert_problem()):
        raise PullError(problem)  # before a download of hundreds of MB that could not be used
    downloads = models_dir / ".downloads" / entry.name
    got = []
    try:
        async with client_session(user_agent) as session:
            for remote, url in zip(source.files, the_plan.urls):
                got.append(await download(session, url, downloads / PurePosixPath(remote.path),
                                          size=remote.size, sha256=sha256 or remote.sha256,
                                          retry_delay_s=retry_delay_s, progress=progress))
    except DownloadError as e:
        raise PullError(str(e)) from None
    try:
        path = _install(entry, source, downloads, models_dir, clip_model_config)
    except PullError:
        # the content is what failed (not a checkpoint, not a pack): a rerun must download it again, not reuse it
        if not keep_download:
            shutil.rmtree(downloads, ignore_errors=True)
        raise
    if not keep_download:
        shutil.rmtree(downloads, ignore_errors=True)
    return Pulled(path, tuple(got))


def _install(entry: CatalogueEntry, source: Source, downloads: Path, models_dir: Path,
             clip_model_config: dict | None) -> Path:
    if source.layout == CHECKPOINT:
        from inference.clip.export import ExportError, import_checkpoint

        checkpoint = downloads / source.files[0].path
        try:
            return import_checkpoint(checkpoint, entry.name, models_dir, name=entry.name,
                                     model_config=clip_model_config)
        except ExportError as e:
            raise PullError(f"{checkpoint.name} downloaded but could not be converted: {e}") from None
    if source.layout == INSIGHTFACE_ZIP:
        return _install_face(entry, models_dir, lambda folder: _unzip(downloads / source.files[0].path, folder))
    if source.layout == IMMICH_PAIR:
        return _install_face(entry, models_dir, lambda folder: _copy_files(downloads, source.files, folder))
    raise PullError(f"{entry.name}: unknown layout {source.layout!r}")


def _install_face(entry: CatalogueEntry, models_dir: Path, fill) -> Path:
    """Fill a staging folder, check it is a complete pack with the face finder the service uses, then swap it
    into `<models>/face/<name>`."""
    root = models_dir / "face"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.installing-", dir=root))
    try:
        # the finder looks for <models>/face/<name>/, so the staging folder plays <models> for it
        folder = staging / "face" / entry.name
        folder.mkdir(parents=True)
        fill(folder)
        try:
            find_face_pack(staging, entry.name)
        except ModelMissingError as e:
            raise PullError(f"the downloaded {entry.name} is not a usable face pack: {e}") from None
        final = install_dir(models_dir, entry)
        publish_folder(folder, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unzip(archive: Path, folder: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = PurePosixPath(info.filename)
                if name.is_absolute() or ".." in name.parts:  # a zip must not write outside its folder
                    raise PullError(f"{archive.name} holds an unsafe path {info.filename!r}; not installed")
            zf.extractall(folder)
    except zipfile.BadZipFile as e:
        raise PullError(f"{archive.name} is not a readable zip ({e}); not installed") from None


def _copy_files(downloads: Path, files: tuple[RemoteFile, ...], folder: Path) -> None:
    for remote in files:
        dest = folder / PurePosixPath(remote.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(downloads / PurePosixPath(remote.path), dest)
