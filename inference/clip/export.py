"""Import an official Chinese-CLIP checkpoint and export its two encoders to ONNX, once.

This is the only place that needs torch and cn_clip; both are imported inside the functions so that the serving
path (tokenizer, preprocessing, ONNX Runtime) never loads them.

Layout written under `models_dir`:

    clip/<name>/config.json           arch, embed_dim, image_size, mean/std, context_length, vocab, …
    clip/<name>/visual/model.onnx     input `image` float32 [N,3,S,S] → `embedding` float32 [N,D], L2-normalised
    clip/<name>/textual/model.onnx    input `text` int64 [N,L] (L ≤ context_length) → `embedding` [N,D], normalised
    clip/<name>/textual/vocab.txt     cn-clip's BERT vocabulary

Encoders above ~1.5 GB of fp32 weights (ViT-H-14's image tower) cannot live in one protobuf (2 GB limit); their
weights go to `model.onnx.data` next to `model.onnx`, which ONNX Runtime finds on its own.

Everything is written into a hidden temporary folder beside the target and renamed into place only after the
export has checked itself against torch, so a failed import never leaves a half-written model behind.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# arch → (vision config, text config): the JSON names inside cn_clip/clip/model_configs/, as cn-clip pairs them.
ARCHES: dict[str, tuple[str, str]] = {
    "ViT-B-16": ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese"),
    "ViT-L-14": ("ViT-L-14", "RoBERTa-wwm-ext-base-chinese"),
    "ViT-L-14-336": ("ViT-L-14-336", "RoBERTa-wwm-ext-base-chinese"),
    "ViT-H-14": ("ViT-H-14", "RoBERTa-wwm-ext-large-chinese"),
    "RN50": ("RN50", "RBT3-chinese"),
}

OPSET = 17  # first opset with LayerNormalization, which ONNX Runtime and TensorRT fuse
MIN_COSINE = 0.999
# fp32 bytes above which an encoder's weights go to an external data file. Protobuf's hard limit is 2 GiB for the
# whole graph; staying well below it leaves room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_500_000_000
CONFIG_FORMAT = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

# Sample inputs for the self-check: CJK, Latin, mixed, punctuation, an empty string and one that overflows 52.
VERIFY_TEXTS = [
    "一只可爱的小猫",
    "a photo of a dog on the beach",
    "北京天安门广场的夜景，灯火辉煌！Beijing at night.",
    "",
    "发票 No.2024-001：金额 ¥1,280.00 元",
    "长城" * 40,
]


class ExportError(RuntimeError):
    """The checkpoint could not be exported, or the exported graph does not match torch."""


# -- configuration ---------------------------------------------------------------------------------------------

def _cn_clip_dir() -> Path:
    import cn_clip.clip

    return Path(cn_clip.clip.__file__).parent


def arch_model_info(arch: str) -> dict[str, Any]:
    """cn-clip's constructor arguments for `arch`: its vision JSON merged with its text JSON."""
    if arch not in ARCHES:
        raise ValueError(f"unknown Chinese-CLIP arch {arch!r}; choose one of {', '.join(ARCHES)}")
    vision, text = ARCHES[arch]
    cfg_dir = _cn_clip_dir() / "model_configs"
    info: dict[str, Any] = {}
    for part in (vision, text):
        with open(cfg_dir / f"{part}.json", encoding="utf-8") as f:
            info.update(json.load(f))
    return _normalise_info(info)


def _normalise_info(info: dict[str, Any]) -> dict[str, Any]:
    info = dict(info)
    if isinstance(info.get("vision_layers"), str):
        # The RN50 JSON stores "[3,4,6,3]" as a string; cn-clip eval()s it, a literal parse is enough.
        info["vision_layers"] = ast.literal_eval(info["vision_layers"])
    if isinstance(info.get("vision_layers"), list):
        info["vision_layers"] = tuple(info["vision_layers"])
    return info


def _model_info(arch: str, model_config: dict | None) -> dict[str, Any]:
    if model_config is None:
        return arch_model_info(arch)
    if "vision" in model_config or "text" in model_config:
        merged = {**model_config.get("vision", {}), **model_config.get("text", {})}
    else:
        merged = dict(model_config)
    return _normalise_info(merged)


def _is_resnet(info: dict[str, Any]) -> bool:
    return isinstance(info["vision_layers"], (tuple, list))


def _signature(info: dict[str, Any]) -> dict[str, tuple[int, ...] | None]:
    """A few state-dict entries that pin an architecture down: shape when present, None when it must be absent.
    Checked before building the model, so a wrong --arch fails in milliseconds with a useful message."""
    embed, hidden = info["embed_dim"], info["text_hidden_size"]
    n_text = info["text_num_hidden_layers"]
    sig: dict[str, tuple[int, ...] | None] = {
        "text_projection": (hidden, embed),
        "bert.embeddings.word_embeddings.weight": (info["vocab_size"], hidden),
        f"bert.encoder.layer.{n_text - 1}.output.dense.weight": (hidden, info["text_intermediate_size"]),
        f"bert.encoder.layer.{n_text}.output.dense.weight": None,
    }
    width = info["vision_width"]
    if _is_resnet(info):
        sig["visual.conv1.weight"] = (width // 2, 3, 3, 3)
        sig["visual.attnpool.c_proj.weight"] = (embed, width * 32)
    else:
        patch, layers = info["vision_patch_size"], info["vision_layers"]
        sig["visual.conv1.weight"] = (width, 3, patch, patch)
        sig["visual.proj"] = (width, embed)
        sig[f"visual.transformer.resblocks.{layers - 1}.ln_1.weight"] = (width,)
        sig[f"visual.transformer.resblocks.{layers}.ln_1.weight"] = None
        # The position grid is left out on purpose: cn-clip interpolates it when the resolution differs.
    return sig


def _signature_mismatches(sd: dict, info: dict[str, Any]) -> list[str]:
    problems = []
    for key, shape in _signature(info).items():
        have = tuple(sd[key].shape) if key in sd else None
        if shape is None and have is not None:
            problems.append(f"{key} present (the arch has fewer layers)")
        elif shape is not None and have != shape:
            problems.append(f"{key} is {list(have) if have else 'missing'}, expected {list(shape)}")
    return problems


def _guess_arch(sd: dict) -> str | None:
    for arch in ARCHES:
        try:
            if not _signature_mismatches(sd, arch_model_info(arch)):
                return arch
        except Exception:  # noqa: BLE001 - a guess only; never let it hide the real error
            continue
    return None


# -- checkpoint loading ----------------------------------------------------------------------------------------

def read_state_dict(checkpoint: Path | str) -> dict:
    """The model weights of a cn-clip checkpoint, with the keys cn-clip's `CLIP` expects.

    Accepts the official/training format (`{"epoch", "step", "name", "state_dict": {"module.…": …}}`) and a bare
    state dict. Like cn-clip: strips DataParallel's `module.` prefix and drops `bert.pooler.*` (older releases carry
    a pooler the model no longer has). Flash-attention layouts (`Wqkv`) are converted back to the standard one.
    """
    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only: never run pickled code from a downloaded file; official checkpoints need nothing else.
        # mmap: ViT-H's 2 GB of weights need not be copied into memory twice.
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - rewrapped with the file name and what we expected
        raise ExportError(f"cannot read {path} as a PyTorch checkpoint (only tensors and plain containers are "
                          f"unpickled, for safety): {e}") from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        sd = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and ckpt and all(hasattr(v, "shape") for v in ckpt.values()):
        sd = ckpt
    else:
        raise ExportError(f"{path} is not a Chinese-CLIP checkpoint (expected a dict with a 'state_dict')")
    out = {}
    for k, v in sd.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if k.startswith("bert.pooler"):
            continue
        out[k] = v
    return _from_flash_attention(out)


def _from_flash_attention(sd: dict) -> dict:
    """Checkpoints saved with cn-clip's --use-flash-attention fuse q/k/v; split them back."""
    import torch

    if not any(".Wqkv." in k for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        if k.startswith("visual.") and ".attn.Wqkv." in k:
            out[k.replace("attn.Wqkv.weight", "attn.in_proj_weight").replace("attn.Wqkv.bias", "attn.in_proj_bias")] = v
        elif k.startswith("bert.") and ".attention.self.Wqkv." in k:
            kind = k.rsplit(".", 1)[1]
            base = k[: -len(f"Wqkv.{kind}")]
            for part, chunk in zip(("query", "key", "value"), torch.chunk(v, 3)):
                out[f"{base}{part}.{kind}"] = chunk
        elif k.startswith("bert.") and ".attention.self.out_proj." in k:
            out[k.replace("attention.self.out_proj.", "attention.output.dense.")] = v
        else:
            out[k] = v
    return out


def build_model(sd: dict, info: dict[str, Any]):
    """cn-clip's `CLIP` with `sd` loaded, fp32, eval mode.

    Built in fp32 and loaded directly (copy_ up-casts): for the official fp16 checkpoints this gives exactly the
    values cn-clip's `create_model(...).float()` gives; for fp32 fine-tunes it keeps their full precision instead
    of rounding through fp16 first.
    """
    import torch  # noqa: F401 - the model needs it; imported here to keep module import torch-free
    from cn_clip.clip.model import CLIP, resize_pos_embed

    model = CLIP(**info)
    resize_pos_embed(sd, model)  # no-op unless the checkpoint was trained at another resolution
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ExportError(f"checkpoint weights do not fit the model: {str(e)[:2000]}") from e
    return model.float().eval()


def load_torch_model(checkpoint: Path | str, arch: str, model_config: dict | None = None):
    """(model, info) for a checkpoint — the torch reference the export is checked against."""
    info = _model_info(arch, model_config)
    sd = read_state_dict(checkpoint)
    problems = _signature_mismatches(sd, info)
    if problems:
        guess = _guess_arch(sd) if model_config is None else None
        hint = f" It looks like {guess}: pass --arch {guess}." if guess and guess != arch else ""
        raise ExportError(f"{checkpoint} does not look like a {arch} checkpoint: {'; '.join(problems[:4])}.{hint}")
    return build_model(sd, info), info


# -- ONNX export -----------------------------------------------------------------------------------------------

def _encoders():
    """The two export wrappers; defined lazily because they subclass torch.nn.Module."""
    import torch

    class VisualEncoder(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, image):
            f = self.clip.encode_image(image)
            # Normalised inside the graph so every consumer gets unit vectors (eps guards an all-zero feature).
            return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    class TextEncoder(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, text):
            f = self.clip.encode_text(text)  # masks [PAD] (id 0) itself, so any padded length works
            return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    return VisualEncoder, TextEncoder


def _fp32_bytes(*parts) -> int:
    total = 0
    for part in parts:
        if hasattr(part, "parameters"):
            total += sum(t.numel() for t in part.parameters()) + sum(t.numel() for t in part.buffers())
        else:
            total += part.numel()
    return total * 4


def export_encoder(module, sample, path: Path, input_name: str, dynamic: dict[int, str], opset: int = OPSET,
                   weight_bytes: int = 0) -> None:
    """Trace `module` on `sample` and write `path`, plus `path.data` when the encoder's fp32 weights
    (`weight_bytes`, the tower only: the wrapper also holds the other one) are too big for one protobuf."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    # eval() first: the exporter restores the wrapper's mode afterwards, recursively, and a fresh Module is in
    # training mode, which would switch the CLIP model's dropout on for everything that runs later.
    module.eval()
    big = weight_bytes > EXTERNAL_DATA_THRESHOLD
    # Large graphs: let the exporter spill tensors into a scratch folder, then pack them into one data file.
    target = path.parent / "_scratch" / path.name if big else path
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns about its own deprecation and about shape asserts it freezes; the
        # self-check below is what tells whether the graph is right.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (sample,), str(target),
            dynamo=False,  # the torch.export-based exporter needs onnxscript and trips over cn-clip's BERT
            input_names=[input_name], output_names=["embedding"],
            dynamic_axes={input_name: dynamic, "embedding": {0: "batch"}},
            opset_version=opset, do_constant_folding=True, export_params=True,
        )
    if big:
        model = onnx.load(str(target))  # pulls the spilled tensors back in
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        del model
        shutil.rmtree(target.parent)
    onnx.checker.check_model(str(path))  # by path, so graphs with external data are checked too


# -- self-check ------------------------------------------------------------------------------------------------

def _verify_images() -> list:
    """Deterministic, varied sample images: noise, gradients, a flat colour, odd aspect ratios, grey and RGBA."""
    from PIL import Image

    rng = np.random.default_rng(20240601)
    noise = Image.fromarray(rng.integers(0, 256, (180, 260, 3), dtype=np.uint8))
    yy, xx = np.mgrid[0:300, 0:200]
    grad = np.stack([xx * 255 // 199, yy * 255 // 299, (xx + yy) * 255 // 498], -1).astype(np.uint8)
    flat = Image.new("RGB", (64, 64), (200, 30, 90))
    grey = Image.fromarray(rng.integers(0, 256, (120, 90), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 256, (100, 100, 4), dtype=np.uint8), mode="RGBA")
    return [noise, Image.fromarray(grad), flat, grey, rgba]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)


def verify_export(model_dir: Path, clip_model, info: dict[str, Any], context_length: int) -> dict[str, float]:
    """Run the exported model the way the service will (our preprocessing, our tokenizer, ONNX Runtime) and
    compare with cn-clip run the way cn-clip runs itself (its transform, its tokenizer, torch). Raises ExportError
    below MIN_COSINE, or when the tokenizers disagree."""
    import torch
    from cn_clip.clip import image_transform
    from cn_clip.clip import tokenize as cn_tokenize

    from ..runtime import RuntimeOptions, create_session
    from .preprocess import preprocess_batch
    from .tokenizer import ClipTokenizer

    clip_model.eval()
    size = info["image_resolution"]
    opts = RuntimeOptions(providers=["cpu"])
    result: dict[str, float] = {}

    images = _verify_images()
    transform = image_transform(size)
    with torch.no_grad():
        ref = clip_model.encode_image(torch.stack([transform(im) for im in images])).numpy()
    sess = create_session(model_dir / "visual" / "model.onnx", opts)
    got = sess.run(None, {"image": preprocess_batch(images, size)})[0]
    one = sess.run(None, {"image": preprocess_batch(images[:1], size)})[0]
    _check("image", got, ref, one, info["embed_dim"], result)
    del sess

    tok = ClipTokenizer(model_dir / "textual" / "vocab.txt", context_length)
    fixed = cn_tokenize(VERIFY_TEXTS, context_length=context_length)
    if not np.array_equal(tok(VERIFY_TEXTS), fixed.numpy()):
        raise ExportError("the pure-Python tokenizer disagrees with cn_clip.tokenize on the sample texts")
    with torch.no_grad():
        ref = clip_model.encode_text(fixed).numpy()
    sess = create_session(model_dir / "textual" / "model.onnx", opts)
    got = sess.run(None, {"text": tok(VERIFY_TEXTS, dynamic=True)})[0]  # the long sample fills all 52
    one = sess.run(None, {"text": tok(VERIFY_TEXTS[:1], dynamic=True)})[0]  # 9 positions: dynamic length
    _check("text", got, ref, one, info["embed_dim"], result)
    return result


def _check(kind: str, got: np.ndarray, ref: np.ndarray, one: np.ndarray, dim: int, result: dict) -> None:
    if got.shape != (len(ref), dim):
        raise ExportError(f"{kind} encoder: ONNX output shape {got.shape}, expected {(len(ref), dim)}")
    norms = np.linalg.norm(got, axis=1)
    if not np.all(np.abs(norms - 1) < 1e-3):
        raise ExportError(f"{kind} encoder: ONNX output is not L2-normalised (norms {norms.round(4).tolist()})")
    cos = _cosines(got, ref)
    if not np.all(cos >= MIN_COSINE):  # also catches NaN
        raise ExportError(f"{kind} encoder: ONNX and torch disagree (cosine {np.round(cos, 5).tolist()}, "
                          f"need >= {MIN_COSINE}); the export is broken, nothing was installed")
    if float(_cosines(one, got[:1])[0]) < MIN_COSINE:
        raise ExportError(f"{kind} encoder: a batch of 1 and a batch of {len(got)} give different embeddings")
    result[f"{kind}_min_cosine"] = float(cos.min())


# -- the import ------------------------------------------------------------------------------------------------

def import_checkpoint(checkpoint: Path | str, arch: str, models_dir: Path | str, name: str | None = None,
                      verify: bool = True, *, model_config: dict | None = None,
                      context_length: int = 52, opset: int = OPSET) -> Path:
    """Export `checkpoint` (an official cn-clip `.pt`) to `models_dir/clip/<name>/` and return that folder.

    `arch` is one of ARCHES (it picks cn-clip's model config). `model_config` replaces that config, either as
    `{"vision": {...}, "text": {...}}` (the two cn-clip JSON files) or one merged dict; `arch` is then only a
    label. An existing model of the same name is replaced only once the new one has passed its checks.
    """
    import torch

    t0 = time.monotonic()
    name = name or arch
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid model name {name!r}: letters, digits, '.', '_', '+', '-' only")
    if model_config is None and arch not in ARCHES:
        raise ValueError(f"unknown Chinese-CLIP arch {arch!r}; choose one of {', '.join(ARCHES)}")
    if opset < 17:
        raise ValueError("opset must be >= 17")
    root = Path(models_dir) / "clip"
    final = root / name

    max_pos = _model_info(arch, model_config)["text_max_position_embeddings"]
    if not 2 <= context_length <= max_pos:
        raise ValueError(f"context_length must be between 2 and {max_pos}")

    log.info("loading %s as %s", checkpoint, arch)
    model, info = load_torch_model(checkpoint, arch, model_config)
    size = info["image_resolution"]
    visual_cls, text_cls = _encoders()

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root, name)
    # Same folder as the target, so the final rename is atomic and never crosses file systems.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.importing-", dir=root))
    try:
        log.info("exporting the image encoder")
        image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        export_encoder(visual_cls(model), image, tmp / "visual" / "model.onnx",
                       "image", {0: "batch"}, opset, _fp32_bytes(model.visual))
        vocab_src = _cn_clip_dir() / "vocab.txt"
        (tmp / "textual").mkdir()
        shutil.copyfile(vocab_src, tmp / "textual" / "vocab.txt")

        from .tokenizer import ClipTokenizer

        sample = torch.from_numpy(ClipTokenizer(tmp / "textual" / "vocab.txt", context_length)(VERIFY_TEXTS[:2]))
        log.info("exporting the text encoder")
        export_encoder(text_cls(model), sample, tmp / "textual" / "model.onnx",
                       "text", {0: "batch", 1: "sequence"}, opset, _fp32_bytes(model.bert, model.text_projection))

        checks = None
        if verify:
            log.info("checking ONNX against torch")
            checks = verify_export(tmp, model, info, context_length)

        config = _config(name, arch, info, context_length, opset, Path(checkpoint), checks)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        publish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported %s as %s in %.0f s", checkpoint, final, time.monotonic() - t0)
    return final


def _config(name: str, arch: str, info: dict, context_length: int, opset: int, checkpoint: Path,
            checks: dict | None) -> dict:
    import cn_clip
    import onnx
    import torch

    from .preprocess import MEAN, STD

    return {
        "format": CONFIG_FORMAT,
        "family": "chinese-clip",
        "name": name,
        "arch": arch,
        "embed_dim": int(info["embed_dim"]),
        "image_size": int(info["image_resolution"]),
        "mean": list(MEAN),
        "std": list(STD),
        "interpolation": "bicubic",
        "resize": "squash",  # (size, size) without keeping the aspect ratio or cropping, as cn-clip does
        "context_length": int(context_length),
        "vocab": "vocab.txt",
        "lowercase": True,
        "visual": {"file": "visual/model.onnx", "input": "image", "output": "embedding"},
        "textual": {"file": "textual/model.onnx", "input": "text", "output": "embedding"},
        "normalized": True,
        "opset": opset,
        "model_info": {k: (list(v) if isinstance(v, tuple) else v) for k, v in info.items()},
        "source": {"checkpoint": checkpoint.name, "bytes": checkpoint.stat().st_size},
        "exported_with": {"torch": torch.__version__, "cn_clip": getattr(cn_clip, "__version__", None),
                          "onnx": onnx.__version__},
        "verified": checks,
    }


STALE_AFTER_S = 6 * 3600


def _remove_stale(root: Path, name: str) -> None:
    """Folders left by an import that was killed (no exception handler ran). Only old ones, so an import of the
    same name running right now in another process is left alone."""
    now = time.time()
    for pattern in (f".{name}.importing-*", f".{name}.old-*"):
        for path in root.glob(pattern):
            try:
                if now - path.stat().st_mtime > STALE_AFTER_S:
                    log.info("removing %s, left by an interrupted import", path)
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _open_permissions(tmp: Path) -> None:
    """mkdtemp makes a 0700 folder and ONNX writes its data file 0600; give the tree the modes a plain mkdir
    and open would, so a service running as another user (a container, say) can read the model."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp, *tmp.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def publish_folder(tmp: Path, final: Path) -> None:
    """Swap `tmp` into `final`; an existing model is moved aside first and deleted only after the swap."""
    _open_permissions(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{int(time.time())}")
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
