"""The tasks cnai runs, named once for the Python side (the SQL side's list is cnai.all_tasks(); a test keeps
the two equal)."""
TASKS = ("clip", "face", "ocr")
