"""Plain, ordered, idempotent SQL migrations: `sql/<part>/NNN_name.sql`, applied in NNN order."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parent
# Immich's own tables: created only where no Immich schema exists (embedded default, tests).
STANDALONE_PART = "immich"


@dataclass(frozen=True)
class Migration:
    id: str  # "<part>/<file name>"
    path: Path

    @property
    def order(self) -> tuple[int, str]:
        return int(self.path.name.split("_", 1)[0]), self.id

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def migrations(include_standalone: bool = False) -> list[Migration]:
    found = []
    for path in ROOT.glob("*/*.sql"):
        part = path.parent.name
        if part == STANDALONE_PART and not include_standalone:
            continue
        found.append(Migration(f"{part}/{path.name}", path))
    return sorted(found, key=lambda m: m.order)
