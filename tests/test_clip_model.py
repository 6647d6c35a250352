"""Import → ONNX export → loading → batching for tiny cn-clip models saved as official checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from inference.base import BatchModel
from inference.clip import ClipTextual, ClipVisual, find_clip_model, list_clip_models
from inference.clip import export as clip_export
from inference.clip.export import ExportError, import_checkpoint
from inference.runtime import ModelMissingError
from tests.clip_fixtures import (TINY_RN, TINY_VIT, build_clip, mixed_texts, reference_model, sample_images,
                                 save_official, torch_image_embeddings, torch_text_embeddings)

pytest.importorskip("cn_clip")
REPO = Path(__file__).resolve().parent.parent
TEXTS = ["一只可爱的小猫", "a photo of a dog", "发票：金额 ¥1,280.00", "", "长城" * 40,
         "  多个   空格\t和\n换行 "]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """One tiny ViT model, exported once for the whole module."""
    work = tmp_path_factory.mktemp("clip")
    model = build_clip(TINY_VIT, seed=0)
    # Older releases still carry BERT's pooler; the importer must drop it as cn-clip does.
    ckpt = work / "clip_cn_tiny.pt"
    save_official(model, ckpt)
    import torch

    raw = torch.load(ckpt)
    raw["state_dict"]["module.bert.pooler.dense.weight"] = torch.zeros(64, 64, dtype=torch.half)
    torch.save(raw, ckpt)
    models = work / "models"
    model_dir = import_checkpoint(ckpt, "tiny-vit", models, model_config=TINY_VIT)
    return SimpleNamespace(models=models, dir=model_dir, ckpt=ckpt, ref=reference_model(ckpt, TINY_VIT),
                           visual=ClipVisual(model_dir, max_batch=4), textual=ClipTextual(model_dir, max_batch=4))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# -- what the import writes -------------------------------------------------------------------------------------

def test_layout_and_config(tiny):
    import cn_clip.clip

    assert tiny.dir == tiny.models / "clip" / "tiny-vit"
    for rel in ("config.json", "visual/model.onnx", "textual/model.onnx", "textual/vocab.txt"):
        assert (tiny.dir / rel).is_file(), rel
    assert [p.name for p in (tiny.models / "clip").iterdir()] == ["tiny-vit"]  # no temp folders left
    vocab = Path(cn_clip.clip.__file__).parent / "vocab.txt"
    assert (tiny.dir / "textual" / "vocab.txt").read_bytes() == vocab.read_bytes()
    cfg = json.loads((tiny.dir / "config.json").read_text(encoding="utf-8"))
    norm = cn_clip.clip.image_transform(64).transforms[-1]
    assert cfg["arch"] == "tiny-vit" and cfg["name"] == "tiny-vit"
    assert cfg["embed_dim"] == 32 and cfg["image_size"] == 64 and cfg["context_length"] == 52
    assert cfg["mean"] == list(norm.mean) and cfg["std"] == list(norm.std)
    assert cfg["interpolation"] == "bicubic" and cfg["vocab"] == "vocab.txt"
    assert cfg["verified"]["image_min_cosine"] >= 0.999 and cfg["verified"]["text_min_cosine"] >= 0.999
    assert cfg["source"]["checkpoint"] == "clip_cn_tiny.pt"
    assert str(tiny.ckpt.parent) not in json.dumps(cfg)  # no machine paths in the config


def test_onnx_graphs_have_the_agreed_interface(tiny):
    import onnx

    for part, name, elem, fixed in (("visual", "image", onnx.TensorProto.FLOAT, [3, 64, 64]),
                                    ("textual", "text", onnx.TensorProto.INT64, [])):
        model = onnx.load(str(tiny.dir / part / "model.onnx"))
        opset = {o.domain: o.version for o in model.opset_import}
        assert opset.get("", opset.get("ai.onnx")) >= 17
        (inp,) = model.graph.input
        assert inp.name == name and inp.type.tensor_type.elem_type == elem
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param  # dynamic batch
        if part == "textual":
            assert len(dims) == 2 and dims[1].dim_param  # dynamic sequence length
        else:
            assert [d.dim_value for d in dims[1:]] == fixed
        (out,) = model.graph.output
        assert out.name == "embedding" and out.type.tensor_type.shape.dim[0].dim_param


# -- BatchModel behaviour ---------------------------------------------------------------------------------------

def test_models_follow_the_batch_protocol(tiny):
    v, t = tiny.visual, tiny.textual
    for m in (v, t):  # BatchModel is a static Protocol; check its members by hand
        for member in BatchModel.__annotations__:
            assert hasattr(m, member), member
        for method in ("load", "unload", "run_batch"):
            assert callable(getattr(m, method)), method
    assert v.key == "clip-visual:tiny-vit" and t.key == "clip-textual:tiny-vit"
    assert v.max_batch == 4 and v.embed_dim == 32 and t.embed_dim == 32
    fresh = ClipVisual(tiny.dir)
    assert not fresh.loaded and fresh.max_batch == 32
    fresh.load()
    assert fresh.loaded
    fresh.unload()
    assert not fresh.loaded
    assert len(fresh.run_batch([Image.new("RGB", (8, 8))])) == 1  # loads on demand


def test_visual_matches_torch(tiny):
    images = sample_images()
    out = tiny.visual.run_batch(images)
    ref = torch_image_embeddings(tiny.ref, images, 64)
    assert all(o.dtype == np.float32 and o.shape == (32,) for o in out)
    got = np.stack(out)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert _cos(got, ref).min() >= 0.999
    assert np.abs(got - ref).max() < 1e-4


def test_textual_matches_torch(tiny):
    out = np.stack(tiny.textual.run_batch(TEXTS))
    ref = torch_text_embeddings(tiny.ref, TEXTS)
    assert out.shape == (len(TEXTS), 32) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert _cos(out, ref).min() >= 0.999
    assert np.abs(out - ref).max() < 1e-4


def test_batch_of_one_equals_batch_of_many(tiny):
    images = sample_images()  # 6 images with max_batch 4: also crosses a chunk boundary
    many = tiny.visual.run_batch(images)
    for img, emb in zip(images, many):
        assert np.allclose(tiny.visual.run_batch([img])[0], emb, atol=1e-5)
    texts = mixed_texts(12, seed=9)  # lengths differ, so each chunk is padded differently
    many = tiny.textual.run_batch(texts)
    for text, emb in zip(texts, many):
        assert np.allclose(tiny.textual.run_batch([text])[0], emb, atol=1e-5)


def test_dynamic_and_fixed_text_lengths_agree(tiny):
    from inference.clip.tokenizer import ClipTokenizer
    from inference.runtime import create_session

    tok = ClipTokenizer(tiny.dir / "textual" / "vocab.txt")
    sess = create_session(tiny.dir / "textual" / "model.onnx")
    fixed = sess.run(None, {"text": tok(TEXTS)})[0]
    dyn = sess.run(None, {"text": tok(TEXTS, dynamic=True)})[0]
    assert tok(TEXTS, dynamic=True).shape[1] < 52 or len(TEXTS[4]) > 50
    assert np.allclose(fixed, dyn, atol=1e-5)


def test_numpy_images_and_whitespace(tiny):
    arr = np.asarray(sample_images()[0])
    a, b = tiny.visual.run_batch([arr, Image.fromarray(arr)])
    assert np.array_equal(a, b)
    x, y = tiny.textual.run_batch(["  一只\t猫 \n", "一只 猫"])
    assert np.allclose(x, y, atol=1e-6)


def test_a_bad_item_fails_alone(tiny):
    good = sample_images()[:2]
    out = tiny.visual.run_batch([good[0], "not an image", np.zeros((4, 4, 3), dtype=np.float32), good[1]])
    assert isinstance(out[1], TypeError) and isinstance(out[2], TypeError)
    assert np.allclose(out[0], tiny.visual.run_batch([good[0]])[0], atol=1e-5)
    texts = tiny.textual.run_batch(["猫", None, "狗"])
    assert isinstance(texts[1], TypeError) and texts[0].shape == (32,) and texts[2].shape == (32,)
    assert tiny.visual.run_batch([]) == [] and tiny.textual.run_batch([]) == []


def test_runtime_path_does_not_import_torch(tiny):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from PIL import Image\n"
        "from inference.clip import ClipVisual, ClipTextual\n"
        f"d = Path({str(tiny.dir)!r})\n"
        "v = ClipVisual(d).run_batch([Image.new('RGB', (30, 40), (1, 2, 3))])[0]\n"
        "t = ClipTextual(d).run_batch(['一只猫'])[0]\n"
        "assert v.shape == t.shape == (32,)\n"
        "bad = [m for m in ('torch', 'cn_clip', 'torchvision', 'onnx') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# -- finding models, missing models -----------------------------------------------------------------------------

def test_find_clip_model(tiny):
    assert find_clip_model(tiny.models, "tiny-vit") == tiny.dir
    assert find_clip_model(tiny.models, "TINY-VIT") == tiny.dir
    assert list_clip_models(tiny.models) == ["tiny-vit"]
    with pytest.raises(ModelMissingError) as err:
        find_clip_model(tiny.models, "ViT-B-16")
    msg = str(err.value)
    assert str(tiny.models / "clip" / "ViT-B-16" / "config.json") in msg
    assert "cnai models import-clip CHECKPOINT --arch ViT-B-16" in msg and "CNAI_MODELS_DIR" in msg


def test_missing_model_errors_name_the_file(tmp_path, tiny):
    absent = tmp_path / "models" / "clip" / "ViT-B-16"
    for cls in (ClipVisual, ClipTextual):
        model = cls(absent)
        with pytest.raises(ModelMissingError) as err:
            model.load()
        assert err.value.path == absent / "config.json"
        msg = str(err.value)
        assert "cnai models import-clip CHECKPOINT --arch ViT-B-16" in msg
        assert f"CNAI_MODELS_DIR={tmp_path / 'models'}" in msg
        with pytest.raises(ModelMissingError):
            _ = model.embed_dim
    # config present, graph missing: the error names the graph
    partial = tmp_path / "models" / "clip" / "half"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text((tiny.dir / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ModelMissingError) as err:
        ClipVisual(partial).load()
    assert err.value.path == partial / "visual" / "model.onnx"
    assert "import-clip" in str(err.value)
    with pytest.raises(ModelMissingError) as err:
        ClipTextual(partial).load()
    assert err.value.path == partial / "textual" / "vocab.txt"


# -- other checkpoint shapes ------------------------------------------------------------------------------------

def test_resnet_with_external_data(tmp_path, monkeypatch):
    # Force the >2 GB code path (weights in model.onnx.data) on a tiny RN50-style model.
    monkeypatch.setattr(clip_export, "EXTERNAL_DATA_THRESHOLD", 0)
    ckpt = save_official(build_clip(TINY_RN, seed=3), tmp_path / "rn.pt")
    model_dir = import_checkpoint(ckpt, "tiny-rn", tmp_path / "models", model_config=TINY_RN)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain.txt").write_text("x")
    for part in ("visual", "textual"):
        graph, data = model_dir / part / "model.onnx", model_dir / part / "model.onnx.data"
        assert data.is_file() and data.stat().st_size > 10 * graph.stat().st_size
        assert not (model_dir / part / "_scratch").exists()
        # Readable by others exactly as far as ordinary files are (mkdtemp and ONNX would make them private).
        assert data.stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert model_dir.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    ref = reference_model(ckpt, TINY_RN)
    images = sample_images()
    got = np.stack(ClipVisual(model_dir).run_batch(images))
    assert _cos(got, torch_image_embeddings(ref, images, 64)).min() >= 0.999
    got = np.stack(ClipTextual(model_dir).run_batch(TEXTS))
    assert _cos(got, torch_text_embeddings(ref, TEXTS)).min() >= 0.999


def test_bare_flash_attention_state_dict(tmp_path, tiny):
    # A bare state dict (no wrapper, no module. prefix) in cn-clip's flash-attention layout: same weights as
    # the module's tiny model, so it must give the same embeddings.
    import torch
    from cn_clip.clip.model import convert_state_dict

    sd = {k[len("module."):]: v for k, v in torch.load(tiny.ckpt)["state_dict"].items() if "pooler" not in k}
    sd = convert_state_dict(sd)
    assert any("Wqkv" in k for k in sd)
    torch.save(sd, tmp_path / "flash.pt")
    model_dir = import_checkpoint(tmp_path / "flash.pt", "tiny-vit", tmp_path / "models", name="flash",
                                  model_config={**TINY_VIT["vision"], **TINY_VIT["text"]})
    assert model_dir.name == "flash"
    images = sample_images()[:3]
    assert np.allclose(np.stack(ClipVisual(model_dir).run_batch(images)),
                       np.stack(tiny.visual.run_batch(images)), atol=1e-5)
    assert np.allclose(np.stack(ClipTextual(model_dir).run_batch(TEXTS)),
                       np.stack(tiny.textual.run_batch(TEXTS)), atol=1e-5)


# -- failures leave nothing behind ------------------------------------------------------------------------------

def test_broken_export_is_caught_and_the_old_model_kept(tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    models = tmp_path / "models"
    first = save_official(build_clip(TINY_VIT, seed=1), tmp_path / "a.pt")
    second = save_official(build_clip(TINY_VIT, seed=2), tmp_path / "b.pt")
    model_dir = import_checkpoint(first, "tiny-vit", models, model_config=TINY_VIT)
    before = ClipTextual(model_dir).run_batch(["一只猫"])[0]

    real_export = clip_export.export_encoder

    def corrupting_export(module, sample, path, *args, **kwargs):
        real_export(module, sample, path, *args, **kwargs)
        if path.parent.name == "textual":  # scale one big weight: a silently wrong graph
            graph = onnx.load(str(path))
            init = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3 + 0.5, init.name))
            onnx.save(graph, str(path))

    monkeypatch.setattr(clip_export, "export_encoder", corrupting_export)
    with pytest.raises(ExportError, match="text encoder: ONNX and torch disagree"):
        import_checkpoint(second, "tiny-vit", models, model_config=TINY_VIT)
    assert [p.name for p in (models / "clip").iterdir()] == ["tiny-vit"]  # no half-written folder
    assert np.array_equal(ClipTextual(model_dir).run_batch(["一只猫"])[0], before)

    monkeypatch.setattr(clip_export, "export_encoder", real_export)
    # What a killed import leaves behind: removed by the next import once old, kept while it may be running.
    stale, fresh = models / "clip" / ".tiny-vit.importing-dead", models / "clip" / ".tiny-vit.importing-live"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 7 * 3600,) * 2)
    import_checkpoint(second, "tiny-vit", models, model_config=TINY_VIT)  # a good re-import replaces it
    assert not stale.exists() and fresh.exists()
    fresh.rmdir()
    after = ClipTextual(model_dir).run_batch(["一只猫"])[0]
    assert not np.allclose(before, after)
    assert [p.name for p in (models / "clip").iterdir()] == ["tiny-vit"]


def test_wrong_arch_and_bad_arguments(tmp_path, tiny):
    models = tmp_path / "models"
    with pytest.raises(ExportError, match="does not look like a ViT-B-16 checkpoint"):
        import_checkpoint(tiny.ckpt, "ViT-B-16", models)
    with pytest.raises(ValueError, match="unknown Chinese-CLIP arch"):
        import_checkpoint(tiny.ckpt, "ViT-X", models)
    with pytest.raises(ValueError, match="invalid model name"):
        import_checkpoint(tiny.ckpt, "ViT-B-16", models, name="../evil")
    with pytest.raises(FileNotFoundError):
        import_checkpoint(tmp_path / "nope.pt", "ViT-B-16", models)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="cannot read"):
        import_checkpoint(junk, "ViT-B-16", models)
    assert not (models / "clip").exists() or not any((models / "clip").iterdir())


def test_export_module_does_not_import_torch_at_import_time():
    code = "import sys, inference.clip.export; assert 'torch' not in sys.modules and 'cn_clip' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
