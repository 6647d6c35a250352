"""Immich's model names that cnai answers, one definition each (reference: Immich server's system-config defaults
and Immich ML's model sets)."""
from __future__ import annotations

# The CLIP model Immich uses when its system-config names none (machineLearning.clip.modelName).
IMMICH_DEFAULT_CLIP = "ViT-B-32__openai"

# Immich CLIP names answered with our cn-clip model unless CNAI_CLIP_SERVE_AS says otherwise.
DEFAULT_CLIP_SERVE_AS = ("ViT-B-32__openai", "ViT-B-16__openai")

# The face pack Immich uses when its system-config names none (machineLearning.facialRecognition.modelName).
IMMICH_DEFAULT_FACE = "buffalo_l"

# InsightFace packs Immich ML offers; each may be asked for by name.
IMMICH_FACE_MODELS = ("antelopev2", "buffalo_l", "buffalo_m", "buffalo_s")
