"""cnai's SQL, in two kinds of plain files, `sql/<part>/<kind>/NNN_name.sql`, applied in NNN order across parts:

- `schema/`: tables and indexes. Append-only: a released file is never edited; a change is a new numbered file.
  Applied once per database (and written `IF NOT EXISTS`, so a renamed file re-applies harmlessly).
- `code/`: functions, triggers, views, written `CREATE OR REPLACE`. Re-applied whenever the file's content
  changes, so an upgrade ships fixed functions to existing databases.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parent
SCHEMA, CODE = "schema", "code"
# Immich's own tables: created only where no Immich schema exists (embedded default, tests).
STANDALONE_PART = "immich"


@dataclass(frozen=True)
class Migration:
    id: str  # "<part>/<kind>/<file name>"
    path: Path
    kind: str  # SCHEMA or CODE

    @property
    def order(self) -> tuple[int, str]:
        return int(self.path.name.split("_", 1)[0]), self.id

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def migrations(include_standalone: bool = False, root: Path = ROOT) -> list[Migration]:
    found = []
    for path in root.glob("*/*/*.sql"):
        part, kind = path.parent.parent.name, path.parent.name
        if kind not in (SCHEMA, CODE):
            raise ValueError(f"{path}: SQL files live in <part>/schema/ or <part>/code/")
        if part == STANDALONE_PART and not include_standalone:
            continue
        found.append(Migration(f"{part}/{kind}/{path.name}", path, kind))
    return sorted(found, key=lambda m: m.order)
