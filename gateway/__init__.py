"""aiohttp app speaking Immich's machine-learning protocol (MACHINE_LEARNING_URL). Writes no database."""
