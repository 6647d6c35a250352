"""The numbers models run with when nobody says otherwise, one definition each (reference: Immich ML 3.x and
Immich server's system-config defaults). Kept free of heavy imports so settings can read them cheaply."""
from __future__ import annotations

# OCR detection: boxes scoring at least this are kept; Immich ML's default and the server's minDetectionScore alike.
OCR_DET_MIN_SCORE = 0.5
# OCR recognition: lines scoring above this are kept. The two Immich values really differ: Immich ML falls back to
# 0.9 when a request carries no minScore, while the server's config (minRecognitionScore) sends 0.8 by default.
OCR_REC_MIN_SCORE_WHEN_OMITTED = 0.9
OCR_REC_MIN_SCORE_CONFIGURED = 0.8
# OCR: the shorter side is scaled down (never up) to this; Immich ML's and the server's default maxResolution.
OCR_MAX_RESOLUTION = 736

# Faces: detections scoring at least this are kept; Immich ML's and the server's default minScore alike.
FACE_MIN_SCORE = 0.7

# The Chinese-CLIP architecture imported and served unless told otherwise: the one with 512-d embeddings.
CLIP_MODEL = "ViT-B-16"

# The pool's shared results (one computation per model, options and input content): memory and age limits.
RESULT_CACHE_MB = 256
RESULT_CACHE_TTL_S = 3600
# The longest a background batch waits for a person's request, in any model, to finish before it starts.
BACKGROUND_YIELD_S = 0.2
