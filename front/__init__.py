"""Immich's own search box, answered by cnai: `POST /api/search/smart` and `POST /api/search/metadata` under
Immich's paths, with access control left to Immich (the caller's own credentials, forwarded to Immich's API), and
an optional pass-through front door that streams everything else to Immich unchanged.

Parts: `search_dto` reads Immich's search bodies, decides what cnai answers and shapes the answer; `immich` calls
Immich's API as the caller; `proxy` forwards requests to Immich; `search_db` is the one place that calls
`cnai.search`; `app` ties them into aiohttp handlers.
"""
