"""Shared helpers for the Chinese-CLIP tests: tiny cn-clip models saved as official checkpoints, cn-clip's own
loading path as the torch reference, and deterministic inputs (mixed-script texts, varied images).

No weights can be downloaded here, so the tests build models from cn-clip's own classes. The text towers keep
cn-clip's real vocabulary size so that the real tokenizer and vocab apply.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

_TEXT_TINY = dict(
    vocab_size=21128,  # cn-clip's real vocabulary
    text_attention_probs_dropout_prob=0.1, text_hidden_act="gelu", text_hidden_dropout_prob=0.1,
    text_hidden_size=64, text_initializer_range=0.02, text_intermediate_size=128,
    text_max_position_embeddings=512, text_num_attention_heads=2, text_num_hidden_layers=2,
    text_type_vocab_size=2,
)

# Same shape as cn-clip's two JSON files (vision + text), just small.
TINY_VIT = {
    "vision": dict(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16,
                   vision_head_width=32),
    "text": dict(_TEXT_TINY),
}


def tiny_vit(embed_dim: int) -> dict:
    """TINY_VIT with another embedding size (cn-clip's real ones: 512 for ViT-B-16, 768 for ViT-L-14, ...)."""
    return {"vision": {**TINY_VIT["vision"], "embed_dim": embed_dim}, "text": dict(_TEXT_TINY)}


TINY_RN = {
    # The string form is how cn-clip's RN50.json writes its layers.
    "vision": dict(embed_dim=32, image_resolution=64, vision_layers="[1,1,1,1]", vision_width=16,
                   vision_patch_size=None),
    "text": dict(_TEXT_TINY),
}


def model_info(config: dict) -> dict:
    info = {**config["vision"], **config["text"]}
    if isinstance(info["vision_layers"], str):
        info["vision_layers"] = [int(x) for x in info["vision_layers"].strip("[]").split(",")]
    return info


def build_clip(config: dict, seed: int = 0):
    """A random cn-clip `CLIP`, converted to fp16 the way cn-clip's released checkpoints are."""
    import torch
    from cn_clip.clip.model import CLIP, convert_weights

    torch.manual_seed(seed)
    model = CLIP(**model_info(config))
    convert_weights(model)
    return model


def save_official(model, path: Path, name: str = "tiny") -> Path:
    """What cn-clip's training writes (its model is DataParallel-wrapped, hence `module.`); released
    checkpoints are the same minus the optimizer."""
    import torch

    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "step": 100, "name": name, "state_dict": sd}, path)
    return path


def reference_model(checkpoint: Path, config: dict):
    """Load `checkpoint` the way cn-clip's `create_model` + `load_from_name(device="cpu")` do."""
    import torch
    from cn_clip.clip.model import CLIP, convert_weights

    model = CLIP(**model_info(config))
    convert_weights(model)
    sd = torch.load(checkpoint, map_location="cpu")["state_dict"]
    if next(iter(sd)).startswith("module"):
        sd = {k[len("module."):]: v for k, v in sd.items() if "bert.pooler" not in k}
    model.load_state_dict(sd)
    return model.float().eval()


def torch_image_embeddings(model, images, size: int) -> np.ndarray:
    import torch
    from cn_clip.clip import image_transform

    tf = image_transform(size)
    with torch.no_grad():
        f = model.encode_image(torch.stack([tf(im) for im in images]))
        return (f / f.norm(dim=-1, keepdim=True)).numpy()


def torch_text_embeddings(model, texts) -> np.ndarray:
    import torch
    from cn_clip.clip import tokenize

    with torch.no_grad():
        f = model.encode_text(tokenize(texts))
        return (f / f.norm(dim=-1, keepdim=True)).numpy()


def sample_images(seed: int = 7) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:240, 0:320]
    grad = np.stack([xx * 255 // 319, yy * 255 // 239, 255 - xx * 255 // 319], -1).astype(np.uint8)
    return [
        Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)),
        Image.fromarray(grad),
        Image.new("RGB", (50, 80), (10, 200, 40)),
        Image.fromarray(rng.integers(0, 256, (33, 500), dtype=np.uint8), mode="L"),
        Image.fromarray(rng.integers(0, 256, (90, 90, 4), dtype=np.uint8), mode="RGBA"),
        Image.fromarray(rng.integers(0, 256, (700, 20, 3), dtype=np.uint8)),
    ]


# -- text generation --------------------------------------------------------------------------------------------

_CJK = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种"
    "面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本"
    "去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比"
    "或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总"
    "次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做"
    "必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权"
    "收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信"
    "马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连"
    "断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存"
    "候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严龙飞"
    "猫狗鸟鱼"
)
# Extension B and later, compatibility ideographs, block edges, and look-alikes outside the CJK ranges.
_CJK_RARE = "𠀀𠀁𪚥\U0002b740\U0002b820\U0002f800\uf900\ufa0e\u3400\u4dbf\u9fff\u2e80\u3007\u31c0"
_EN = ("a photo of the cat dog beach sunset mountain city night Beijing Shanghai invoice receipt total "
       "unaffable running jumped supercalifragilisticexpialidocious iPhone WiFi COVID-19 e-mail don't "
       "x y z ABC Hello World 2024 3.14 1,280.00 #hashtag @user http://example.com/a?b=c").split()
_PUNCT = list("，。！？、；：「」『』（）《》〈〉【】…—～·,.!?;:'\"()[]{}<>/\\|-_=+*&^%$#@`~")
_EMOJI = ["😀", "👍🏽", "👨‍👩‍👧", "🇨🇳", "❤️", "🐱", "🎉", "☕", "🀄", "✈\ufe0f"]
_ACCENTED = ["café", "naïve", "résumé", "Ångström", "São Paulo", "Zürich", "ǅemal", "İstanbul", "straße",
             "Ǆ", "ﬁne", "Ωmega", "Pokémon", "ñandú", "crème brûlée"]
_OTHER = ["こんにちは", "カタカナ", "한국어", "Привет", "مرحبا", "สวัสดี", "नमस्ते", "Ελληνικά", "ｆｕｌｌｗｉｄｔｈ",
          "１２３", "①②③", "㊗", "™", "½"]
_SPACE = [" ", "  ", "\t", "\n", "\r\n", "\u3000", "\u00a0", "\u2028", "\u2029", "\u200b", "\u200d", "\x00",
          "\x07", "\ufffd", "\u0301", "\x85", "\x1f"]


def mixed_texts(n: int = 400, seed: int = 1234) -> list[str]:
    """`n` deterministic strings mixing scripts, punctuation, emoji, accents, odd whitespace and controls, with
    empty strings, words over 200 characters and texts far longer than 52 tokens among them."""
    rng = random.Random(seed)
    pools = [list(_CJK), list(_CJK_RARE), _EN, _PUNCT, _EMOJI, _ACCENTED, _OTHER, _SPACE]
    weights = [30, 2, 20, 10, 4, 5, 4, 10]
    out = ["", " ", "\t\n", "一只猫", "Hello, 世界!", "a" * 201, "中" * 300, "word " * 80,
           "北京天安门广场的夜景，灯火辉煌。" * 6, "unaffable"]
    while len(out) < n:
        parts = []
        for _ in range(rng.choice([1, 2, 3, 5, 8, 13, 30, 70])):
            pool = rng.choices(pools, weights)[0]
            parts.append(rng.choice(pool))
            if rng.random() < 0.4:
                parts.append(" ")
        out.append("".join(parts))
    return out
