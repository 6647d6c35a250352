"""Parsing and shaping Immich ML `/predict` requests and responses (reference: Immich 3.x machine-learning)."""
from __future__ import annotations

import json
from dataclasses import dataclass

TASKS = ("clip", "facial-recognition", "ocr")


class RequestError(Exception):
    def __init__(self, status: int, detail):
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


@dataclass
class Entry:
    task: str
    type: str
    model_name: str
    options: dict


def parse_entries(raw: str | None) -> dict[str, dict[str, Entry]]:
    if raw is None:
        # the shape FastAPI gives for a missing form field
        raise RequestError(422, [{"type": "missing", "loc": ["body", "entries"], "msg": "Field required",
                                  "input": None}])
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        raise RequestError(422, "Invalid request format.") from None
    if not isinstance(data, dict) or not data:
        raise RequestError(422, "Invalid request format.")
    out: dict[str, dict[str, Entry]] = {}
    for task, types in data.items():
        if not isinstance(types, dict) or not types:
            raise RequestError(422, "Invalid request format.")
        for type_, entry in types.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("modelName"), str):
                raise RequestError(422, "Invalid request format.")
            options = entry.get("options") or {}
            if not isinstance(options, dict):
                raise RequestError(422, "Invalid request format.")
            out.setdefault(task, {})[type_] = Entry(task, type_, entry["modelName"], options)
    return out


def clean_name(name: str) -> str:
    """Immich's model-name normalisation: text after the last '/', ':' and '\\' to '_', '.' removed."""
    name = name.split("/")[-1]
    return name.replace(":", "_").replace("\\", "_").replace(".", "")


def serialize_embedding(vec) -> str:
    """An embedding as Immich sends it: a JSON array inside a string, float32 precision, no spaces."""
    # 9 significant digits round-trip any float32
    return "[" + ",".join(f"{v:.9g}" for v in (float(x) for x in vec)) + "]"


def number(options: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(422, f"option {key} must be a number")
    if not lo <= value <= hi:
        raise RequestError(422, f"option {key} must be between {lo} and {hi}, got {value}")
    return float(value)
