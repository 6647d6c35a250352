"""Immich's own search box, answered by cnai: `POST /api/search/smart` and `POST /api/search/metadata` under
Immich's paths, with access control left to Immich (the caller's own credentials, forwarded to Immich's API), and
an optional pass-through front door that streams everything else to Immich unchanged (and, after Immich's 2xx,
queues cnai's work for the "Regenerate thumbnail" and "Generate Thumbnails → All" buttons).

Parts: `search_dto` reads Immich's search bodies, decides what cnai answers and shapes the answer; `immich` calls
Immich's API as the caller; `proxy` forwards requests to Immich; `database` is the one place that touches cnai's
database (`cnai.search`, and reprocess requests for what Immich authorised); `app` ties them into aiohttp handlers.
"""
