"""Every model `cnai models pull` knows: name → files to fetch, per mirror, with size and SHA-256 where the
publisher gives them.

Sources (read from the publishers' own files):
- Chinese-CLIP: the download links of OFA-Sys/Chinese-CLIP's README ("official", Alibaba Cloud OSS in Beijing);
  the Hugging Face repos `OFA-Sys/<repo>` and the ModelScope repos `AI-ModelScope/<repo>` that cn_clip 1.6's own
  `load_from_name` downloads from (`cn_clip/clip/utils.py`: `_MODELS`, `_HUGGINGFACE_ORG`, `_MODELSCOPE_ORG`),
  fetched through ModelScope's file API (`/api/v1/models/<id>/repo?Revision=master&FilePath=<file>`, as its client
  builds it). The README gives parameter counts only: no file size, no hash.
- InsightFace packs: the zips of InsightFace's `model-zoo` GitHub release (its current model-zoo download
  location; older guides use the `v0.7` tag). No size or hash is published.
- Immich's re-exports of the same packs on Hugging Face (`immich-app/<name>`: `detection/model.onnx`,
  `recognition/model.onnx`), which Immich ML downloads. No hash is published in Immich's code.

Where no hash is published, `sha256` is None: the download is checked against the size the server announces and
its SHA-256 is printed, never compared with a made-up value (pass `--sha256` to pin one you trust).
"""
from __future__ import annotations

from dataclasses import dataclass, field

OFFICIAL = "official"
HUGGINGFACE = "huggingface"
MODELSCOPE = "modelscope"
MIRRORS = (OFFICIAL, HUGGINGFACE, MODELSCOPE)
DEFAULT_MIRROR = OFFICIAL

# how a downloaded model becomes an installed one
CHECKPOINT = "cn-clip checkpoint"  # converted to ONNX by inference.clip.export
INSIGHTFACE_ZIP = "insightface zip"  # unpacked into face/<name>/
IMMICH_PAIR = "immich detection + recognition"  # placed as face/<name>/{detection,recognition}/model.onnx


@dataclass(frozen=True)
class RemoteFile:
    path: str  # where the file goes inside the download folder, and its name under CNAI_MODEL_BASE_URL/<model>/
    url: str
    size: int | None = None  # bytes, where the publisher states it
    sha256: str | None = None  # where the publisher states it


@dataclass(frozen=True)
class Source:
    layout: str
    files: tuple[RemoteFile, ...]


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    task: str  # clip | face
    embed_dim: int
    description: str
    sources: dict[str, Source] = field(default_factory=dict)  # mirror → what to fetch there

    def source(self, mirror: str) -> Source:
        return self.sources[mirror]


_OSS = "https://clip-cn-beijing.oss-cn-beijing.aliyuncs.com/checkpoints"
_HF = "https://huggingface.co"
_MS = "https://www.modelscope.cn/api/v1/models"
_INSIGHTFACE = "https://github.com/deepinsight/insightface/releases/download/model-zoo"


def _clip(arch: str, repo: str, file: str, dim: int, params: str) -> CatalogueEntry:
    def one(url: str) -> Source:
        return Source(CHECKPOINT, (RemoteFile(file, url),))

    return CatalogueEntry(
        name=arch, task="clip", embed_dim=dim,
        description=f"Chinese-CLIP {arch} ({params} parameters, {dim}-d)",
        sources={
            OFFICIAL: one(f"{_OSS}/{file}"),
            HUGGINGFACE: one(f"{_HF}/OFA-Sys/{repo}/resolve/main/{file}"),
            MODELSCOPE: one(f"{_MS}/AI-ModelScope/{repo}/repo?Revision=master&FilePath={file}"),
        })


def _face(name: str, detail: str) -> CatalogueEntry:
    return CatalogueEntry(
        name=name, task="face", embed_dim=512,
        description=f"InsightFace {name} ({detail}, 512-d)",
        sources={
            OFFICIAL: Source(INSIGHTFACE_ZIP, (RemoteFile(f"{name}.zip", f"{_INSIGHTFACE}/{name}.zip"),)),
            HUGGINGFACE: Source(IMMICH_PAIR, tuple(
                RemoteFile(f"{part}/model.onnx", f"{_HF}/immich-app/{name}/resolve/main/{part}/model.onnx")
                for part in ("detection", "recognition"))),
        })


CATALOGUE: dict[str, CatalogueEntry] = {e.name: e for e in (
    _clip("ViT-B-16", "chinese-clip-vit-base-patch16", "clip_cn_vit-b-16.pt", 512, "188M"),
    _clip("ViT-L-14", "chinese-clip-vit-large-patch14", "clip_cn_vit-l-14.pt", 768, "406M"),
    _clip("ViT-L-14-336", "chinese-clip-vit-large-patch14-336px", "clip_cn_vit-l-14-336.pt", 768, "407M"),
    _clip("ViT-H-14", "chinese-clip-vit-huge-patch14", "clip_cn_vit-h-14.pt", 1024, "958M"),
    _clip("RN50", "chinese-clip-rn50", "clip_cn_rn50.pt", 1024, "77M"),
    _face("buffalo_l", "SCRFD-10GF + ArcFace R50"),
    _face("buffalo_m", "SCRFD-2.5GF + ArcFace R50"),
    _face("buffalo_s", "SCRFD-500MF + MobileFaceNet"),
    _face("antelopev2", "SCRFD-10GF + ArcFace R100 Glint360K"),
)}


def lookup(name: str) -> CatalogueEntry:
    """The entry called `name` (case-insensitive: people type vit-b-16); KeyError lists what there is."""
    if name in CATALOGUE:
        return CATALOGUE[name]
    for entry in CATALOGUE.values():
        if entry.name.lower() == name.lower():
            return entry
    raise KeyError(f"no model called {name!r} in the catalogue; choose one of {', '.join(CATALOGUE)}")
