"""Failure classes the listener distinguishes: permanent ones fail a job at once, the rest retry with backoff."""


class PermanentJobError(Exception):
    """Retrying cannot help (missing or unreadable image, path outside the mapped roots, missing model)."""
