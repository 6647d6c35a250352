"""Which `/predict` entries cnai answers itself: one table of (task, type, model name) → the pool model serving it.

An entry in the table is served here; a request with any entry outside it goes, whole, to the upstream Immich ML
(CNAI_UPSTREAM_ML_URL) or, without one, gets a 400 naming the model. cnai never answers a name with a model it
is not: another script's OCR, a face pack it doesn't have, or a CLIP model it was not told to stand in for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .immich_models import SERVED_OCR_MODELS
from .protocol import Entry, clean_name


class Route(str, Enum):
    SERVED = "served"
    FORWARDED = "forwarded"
    REFUSED = "refused"


@dataclass(frozen=True)
class Served:
    pool_key: str
    # When the local model's files are missing, may the upstream answer instead? Yes where the upstream's model of
    # that name is the same model (a face pack, OCR); no for CLIP names cnai stands in for: Immich would get another
    # model's vectors in the same column as ours, and text searches would compare the two.
    forward_when_missing: bool


@dataclass
class Decision:
    route: Route
    served: dict[str, dict[str, Served]] = field(default_factory=dict)  # task → type → model, when SERVED
    refusal: str = ""


class RoutingTable:
    def __init__(self, rows: dict[tuple[str, str, str], Served], upstream: bool):
        self.rows = rows
        self.upstream = upstream

    @classmethod
    def build(cls, *, ocr_key: str, clip_model: str, clip_serve_as: list[str], face_packs: list[str],
              upstream: bool) -> RoutingTable:
        rows: dict[tuple[str, str, str], Served] = {}
        for name in (clip_model, *clip_serve_as):
            for type_ in ("visual", "textual"):
                rows["clip", type_, clean_name(name)] = Served(f"clip-{type_}:{clip_model}", False)
        for name in SERVED_OCR_MODELS:
            for type_ in ("detection", "recognition"):
                rows["ocr", type_, name] = Served(ocr_key, True)
        for pack in face_packs:
            for type_ in ("detection", "recognition"):
                rows["facial-recognition", type_, clean_name(pack)] = Served(f"face:{clean_name(pack)}", True)
        return cls(rows, upstream)

    def lookup(self, entry: Entry) -> Served | None:
        return self.rows.get((entry.task, entry.type, clean_name(entry.model_name)))

    def served_names(self, task: str) -> list[str]:
        return sorted({name for t, _, name in self.rows if t == task})

    def decide(self, entries: dict[str, dict[str, Entry]]) -> Decision:
        served: dict[str, dict[str, Served]] = {}
        outside: list[Entry] = []
        for task, types in entries.items():
            found = {type_: self.lookup(e) for type_, e in types.items()}
            # one task's entries are one model here (a face pack's detector and recogniser go together)
            if None in found.values() or len({s.pool_key for s in found.values()}) > 1:
                outside += [e for e in types.values() if found[e.type] is None] or list(types.values())
            else:
                served[task] = found
        if not outside:
            return Decision(Route.SERVED, served)
        if self.upstream:
            return Decision(Route.FORWARDED)
        return Decision(Route.REFUSED, refusal=self._refusal(outside))

    def _refusal(self, outside: list[Entry]) -> str:
        named = ", ".join(f"{e.task}/{e.type}:{e.model_name}" for e in outside)
        known = "; ".join(f"{task} as {', '.join(names)}" for task in dict.fromkeys(e.task for e in outside)
                          if (names := self.served_names(task)))
        return (f"not served here: {named} (cnai answers " + (known or "no such task") +
                "; set CNAI_UPSTREAM_ML_URL to forward other models to Immich ML)")
