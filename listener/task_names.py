"""The tasks cnai runs, named once for the Python side (the SQL side's list is cnai.all_tasks(); a test keeps
the two equal)."""
TASKS = ("clip", "face", "ocr")
# A listener's tasks when CNAI_TASKS is not set. Not face: cnai.face is read by nothing (Immich's own faces come
# from the gateway's /predict answers), so indexing it would only spend the machine.
DEFAULT_TASKS = ("clip", "ocr")
