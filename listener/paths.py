"""Mapping Immich's file paths (as its server sees them) to paths readable here."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import PermanentJobError


def map_path(immich_path: str, path_map: list[tuple[str, Path]]) -> Path:
    """With no map, paths are used as they are (cnai runs beside Immich's files, or standalone).

    With a map (CNAI_PATH_MAP=/usr/src/app/upload=/mnt/immich), a path must lie under one of the Immich-side
    prefixes, and the mapped path must stay inside the local root once symbolic links are resolved (a link inside
    the library pointing elsewhere is refused, not followed): anything else is refused. The resolved path is
    returned, so the file read is the one checked.
    """
    if not path_map:
        return Path(immich_path)
    norm = os.path.normpath(immich_path)
    for remote, local in path_map:
        if norm == remote or norm.startswith(remote.rstrip("/") + "/"):
            rel = os.path.relpath(norm, remote)
            candidate = Path(os.path.normpath(local / rel))
            root = Path(os.path.normpath(local))
            if candidate != root and root not in candidate.parents:
                break
            real, real_root = Path(os.path.realpath(candidate)), Path(os.path.realpath(root))
            if real != real_root and real_root not in real.parents:
                raise PermanentJobError(f"path {immich_path!r} maps to {str(candidate)!r}, which a symbolic link "
                                        f"leads to {str(real)!r}, outside the mapped root {str(real_root)!r}")
            return real
    roots = ", ".join(r for r, _ in path_map)
    raise PermanentJobError(f"path {immich_path!r} is outside the mapped roots ({roots}); check CNAI_PATH_MAP")
