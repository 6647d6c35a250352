"""Getting models onto this machine: the catalogue of official downloads, a resumable verified downloader, and
installation into CNAI_MODELS_DIR through the importers `inference/` already has.

A part of its own because fetching files over HTTP is neither inference (which knows no HTTP) nor wiring (which
holds no logic); `cnai models pull|list` call it. It never touches the database.
"""
