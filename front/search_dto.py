"""Immich's search DTOs (`server/src/dtos/search.dto.ts`): request bodies (SmartSearchDto, MetadataSearchDto) read
for what cnai can answer itself — anything else, or anything Immich would refuse, is left to Immich (`None`) — and
the SearchResponseDto cnai answers with."""
from __future__ import annotations

import re
from dataclasses import dataclass

VISIBILITIES = ("archive", "timeline", "hidden", "locked")   # Immich's AssetVisibility
MAX_SIZE = 1000                                              # Immich's page size limit (1-1000)
SMART_DEFAULT_SIZE = 100                                     # Immich's defaults when `size` is left out
METADATA_DEFAULT_SIZE = 250

# `ocr:发票`, any case, also with the full-width colon Chinese input methods type
OCR_PREFIX = re.compile(r"^\s*ocr\s*[:：]", re.IGNORECASE)

# Fields that narrow nothing when they hold these values (Immich skips an empty list, a false flag, a null
# library); with any other value they are filters cnai does not apply, so the request goes to Immich.
NEUTRAL_VALUES = {
    "personIds": ([],), "albumIds": ([],), "tagIds": ([],),
    "withDeleted": (False,), "isNotInAlbum": (False,), "libraryId": (None,),
}
SMART_FIELDS = {"query", "language", "page", "size", "visibility", "withExif"}
METADATA_FIELDS = {"ocr", "page", "size", "visibility", "withExif", "withPeople", "withStacked"}


@dataclass(frozen=True)
class SearchPlan:
    """A search cnai answers: `text` goes to cnai.search as is ('ocr:…' for OCR text only)."""
    text: str
    ocr_only: bool
    page: int
    size: int
    visibility: str | None
    with_exif: bool
    with_people: bool = False

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.size


def ocr_query(query: str) -> str | None:
    """'ocr:发票' / 'OCR：发票' -> '发票'; None when the query has no `ocr:` prefix."""
    match = OCR_PREFIX.match(query)
    return query[match.end():].strip() if match else None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _common(body, allowed: set[str], default_size: int) -> dict | None:
    """page, size, visibility and flags as Immich reads them; None where Immich would refuse the body or a field
    is a filter cnai does not apply."""
    if not isinstance(body, dict):
        return None
    for key, value in body.items():
        if key in allowed:
            continue
        if not any(type(value) is type(v) and value == v for v in NEUTRAL_VALUES.get(key, ())):
            return None
    page, size = body.get("page", 1), body.get("size", default_size)
    if not (_is_int(page) and page >= 1 and _is_int(size) and 1 <= size <= MAX_SIZE):
        return None
    visibility = body.get("visibility")
    if "visibility" in body and visibility not in VISIBILITIES:
        return None
    flags = {name: body.get(name, False) for name in ("withExif", "withPeople")}
    if not all(isinstance(v, bool) for v in flags.values()) or body.get("withStacked", True) is not True:
        return None  # withStacked: false is a filter (no stacked assets)
    return {"page": page, "size": size, "visibility": visibility, "with_exif": flags["withExif"],
            "with_people": flags["withPeople"]}


def plan_smart(body) -> SearchPlan | None:
    """POST /api/search/smart: an `ocr:` query is OCR text only, another text query hybrid (OCR + CLIP);
    `queryAssetId` searches and filtered ones are Immich's."""
    common = _common(body, SMART_FIELDS, SMART_DEFAULT_SIZE)
    if common is None or not isinstance(body.get("query"), str) or not body["query"].strip():
        return None
    if "language" in body and not isinstance(body["language"], str):
        return None
    common["with_people"] = False  # smart search results carry no people
    text = body["query"].strip()
    ocr = ocr_query(text)
    if ocr is not None:
        return SearchPlan(text="ocr:" + ocr, ocr_only=True, **common)
    return SearchPlan(text=text, ocr_only=False, **common)


def plan_metadata(body) -> SearchPlan | None:
    """POST /api/search/metadata with `ocr` (the search bar's OCR mode) and no other filter: OCR text only."""
    common = _common(body, METADATA_FIELDS, METADATA_DEFAULT_SIZE)
    if common is None or not isinstance(body.get("ocr"), str) or not body["ocr"].strip():
        return None
    return SearchPlan(text="ocr:" + body["ocr"].strip(), ocr_only=True, **common)


# GET /api/assets/{id} maps the asset with its owner, stack and tags; a search maps it without those relations
SEARCH_ITEM_OMITS = ("owner", "stack", "tags")


def search_item(asset: dict, plan: SearchPlan) -> dict:
    """A search result exactly as Immich's search would give it, from the asset's `GET /api/assets/{id}` body."""
    item = {k: v for k, v in asset.items() if k not in SEARCH_ITEM_OMITS}
    if not plan.with_exif:
        item.pop("exifInfo", None)
    if not plan.with_people:
        item["people"] = []
    return item


def search_response(items: list[dict], page: int, has_next: bool) -> dict:
    """SearchResponseDto: `total` and `count` are this page's items (as in Immich), `nextPage` the next page's
    number as a string, or null; albums are never searched here."""
    return {"albums": {"total": 0, "count": 0, "items": [], "facets": []},
            "assets": {"total": len(items), "count": len(items), "items": items, "facets": [],
                       "nextPage": str(page + 1) if has_next else None}}
