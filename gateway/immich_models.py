"""Immich's model names that cnai answers or checks, one definition each (reference: Immich server's
`CLIP_MODEL_INFO` in `server/src/constants.ts`, its system-config defaults, and Immich ML's model sets)."""
from __future__ import annotations

from .protocol import clean_name

# Immich CLIP names answered with our cn-clip model unless CNAI_CLIP_SERVE_AS says otherwise.
DEFAULT_CLIP_SERVE_AS = ("ViT-B-32__openai", "ViT-B-16__openai")

# The face pack Immich uses when its system-config names none (machineLearning.facialRecognition.modelName).
IMMICH_DEFAULT_FACE = "buffalo_l"

# InsightFace packs Immich ML offers; each may be asked for by name.
IMMICH_FACE_MODELS = ("antelopev2", "buffalo_l", "buffalo_m", "buffalo_s")

# Immich sizes its smart_search column by the CLIP model's name: every name it knows, with that size.
IMMICH_CLIP_DIMENSIONS: dict[str, int] = {name: dim for dim, names in {
    512: ("RN101__openai", "RN101__yfcc15m", "ViT-B-16__laion400m_e31", "ViT-B-16__laion400m_e32",
          "ViT-B-16__openai", "ViT-B-32__laion2b-s34b-b79k", "ViT-B-32__laion2b_e16", "ViT-B-32__laion400m_e31",
          "ViT-B-32__laion400m_e32", "ViT-B-32__openai", "XLM-Roberta-Base-ViT-B-32__laion5b_s13b_b90k",
          "XLM-Roberta-Large-Vit-B-32"),
    640: ("RN50x4__openai", "ViT-B-16-plus-240__laion400m_e31", "ViT-B-16-plus-240__laion400m_e32",
          "XLM-Roberta-Large-Vit-B-16Plus"),
    768: ("LABSE-Vit-L-14", "RN50x16__openai", "ViT-B-16-SigLIP__webli", "ViT-B-16-SigLIP-256__webli",
          "ViT-B-16-SigLIP-384__webli", "ViT-B-16-SigLIP-512__webli", "ViT-B-16-SigLIP-i18n-256__webli",
          "ViT-L-14-336__openai", "ViT-L-14-quickgelu__dfn2b", "ViT-L-14__laion2b-s32b-b82k",
          "ViT-L-14__laion400m_e31", "ViT-L-14__laion400m_e32", "ViT-L-14__openai", "XLM-Roberta-Large-Vit-L-14",
          "nllb-clip-base-siglip__mrl", "nllb-clip-base-siglip__v1", "ViT-B-16-SigLIP2__webli",
          "ViT-B-32-SigLIP2-256__webli"),
    1024: ("RN50__cc12m", "RN50__openai", "RN50__yfcc15m", "RN50x64__openai", "ViT-H-14-quickgelu__dfn5b",
           "ViT-H-14-378-quickgelu__dfn5b", "ViT-H-14__laion2b-s32b-b79k", "ViT-L-16-SigLIP-256__webli",
           "ViT-L-16-SigLIP-384__webli", "ViT-g-14__laion2b-s12b-b42k",
           "XLM-Roberta-Large-ViT-H-14__frozen_laion5b_s13b_b90k", "ViT-L-16-SigLIP2-256__webli",
           "ViT-L-16-SigLIP2-384__webli", "ViT-L-16-SigLIP2-512__webli"),
    1152: ("ViT-SO400M-14-SigLIP-384__webli", "nllb-clip-large-siglip__mrl", "nllb-clip-large-siglip__v1",
           "ViT-SO400M-14-SigLIP2__webli", "ViT-SO400M-14-SigLIP2-378__webli", "ViT-SO400M-16-SigLIP2-256__webli",
           "ViT-SO400M-16-SigLIP2-384__webli", "ViT-SO400M-16-SigLIP2-512__webli"),
    1536: ("ViT-gopt-16-SigLIP2-256__webli", "ViT-gopt-16-SigLIP2-384__webli"),
}.items() for name in names}


def serve_as_problem(names: list[str], embed_dim: int) -> str | None:
    """Why the CLIP names in `names` cannot all be answered with `embed_dim`-d embeddings, or None if they can:
    Immich would otherwise store our vectors in a column sized for another model."""
    for name in names:
        dim = IMMICH_CLIP_DIMENSIONS.get(clean_name(name))
        if dim is None:
            return f"{name!r} is not a CLIP model Immich knows, so Immich would never ask for it"
        if dim != embed_dim:
            return f"Immich sizes {name} at {dim}-d, but cnai's CLIP embeddings are {embed_dim}-d"
    return None


# OCR names Immich ML 3.x knows (its `_PADDLE_MODELS` in machine-learning/immich_ml/models/constants.py); an unprefixed
# or CH__ name is the Chinese/Japanese/English model, a prefix picks another script's recognition model.
IMMICH_OCR_MODELS = ("PP-OCRv5_server", "PP-OCRv5_mobile", "CH__PP-OCRv5_server", "CH__PP-OCRv5_mobile",
                     "EL__PP-OCRv5_mobile", "EN__PP-OCRv5_mobile", "ESLAV__PP-OCRv5_mobile",
                     "KOREAN__PP-OCRv5_mobile", "LATIN__PP-OCRv5_mobile", "TH__PP-OCRv5_mobile")

# The OCR names cnai's model really is: RapidOCR's bundled Chinese/English mobile-size detector and recogniser.
# PP-OCRv5_mobile (Immich's default) and CH__PP-OCRv5_mobile are one model in Immich ML, that same Chinese/English
# mobile family; the server-size model and the other scripts' recognisers are other models, never answered here.
SERVED_OCR_MODELS = ("PP-OCRv5_mobile", "CH__PP-OCRv5_mobile")
