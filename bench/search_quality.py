"""Chinese OCR search quality on a labelled set of rendered photos: cnai.search beside Immich 3.1's own OCR search.

    python bench/search_quality.py [--seed 10] [--photos 320] [--cache-dir .cache/search_quality] [--show-misses]
                                   [--zhparser-control-path DIR]

Builds, from the seed, a labelled set of photos (shop signs, receipts, menus, tickets, street signs, notices,
screenshots) in several CJK fonts, Simplified and Traditional, under rotation, perspective, blur, JPEG noise, low
contrast, small text in a big scene and vertical text, and runs each through the real OCR (RapidOCR through
inference/ocr.py, with the listener's settings). The OCR results are cached on disk, keyed by the set's seed and
content, so a re-run after a SQL change takes seconds. Every query's relevant photos come from the labels (the text
that was printed), never from the OCR, so the numbers are end to end: what the OCR missed counts as a miss.

Then, in a scratch database on the embedded server, each photo's OCR result is stored the way cnai's listener stores
it (cnai.ocr) and the way Immich 3.1's OCR job stores it (asset_ocr rows and ocr_search = tokenizeForSearch tokens),
and each query runs through:
  cnai     cnai.search('ocr:' || query, NULL, ARRAY[owner], 20): whatever matching rules the database has now,
           bigrams alone (the setting cnai.zh_words = off);
  immich   Immich 3.1's metadata search with `ocr` (server/src/utils/database.ts searchAssetBuilderLegacy and
           search.repository.ts searchMetadata): f_unaccent(ocr_search.text) %>> f_unaccent(tokens of the query),
           newest first (Immich does not rank OCR matches);
  and where zhparser is installed and usable (cnai.zhparser_state(); on the embedded server, a build reached through
  --zhparser-control-path or CNAI_ZHPARSER_CONTROL_PATH, a folder holding extension/zhparser.control, as PostgreSQL
  18's extension_control_path takes it, with its dictionary in the server's share/tsearch_data):
  cnai+zhparser  the same cnai.search with zhparser's ranking signal and word match;
  zhparser       the `cnai.zh` configuration alone: its ts_rank over the OCR text.
Prints recall@5 and recall@20 (relevant photos in the first k, of the k or fewer there are), MRR, precision@5
(relevant share of the results shown in the first five) and the share of queries that found nothing, per query class, side by side; and the share of labelled text lines the OCR
recovered at all, per rendering condition.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import logging
import math
import os
import random
import sys
import time
import unicodedata
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/queue.py is named like the standard library's `queue`, which RapidOCR imports: keep this folder off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont  # noqa: E402

from cnai.db import migrate  # noqa: E402
from cnai.embedded import scratch_server  # noqa: E402

SET_VERSION = 1  # bump when the generator changes what it draws, so old caches are not reused
DEFAULT_CACHE = ROOT / ".cache" / "search_quality"
TOP = 20

# (file, face index, script, name): Debian's fonts-noto-cjk (serif and sans, SC and TC) and fonts-wqy-zenhei
FONTS = [
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 2, "s", "Noto Sans SC"),
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc", 2, "s", "Noto Sans SC Bold"),
    ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc", 2, "s", "Noto Serif SC"),
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 3, "t", "Noto Sans TC"),
    ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc", 3, "t", "Noto Serif TC"),
    ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", 0, "st", "WenQuanYi Zen Hei"),
]

# Simplified -> Traditional for every character the generator prints that differs (labels, not OpenCC: the set
# only needs its own vocabulary, and the bench must not depend on what it measures)
S2T = dict(zip(
    "发票营业时间门车广场书银行药医院电话饭面鸡东长乐欢迎光临优惠价格总计会员号学区机铁楼点汤烧台湾饮料门市"
    "捷运开关闭买卖单张编码务费现钱红烧肉双龙凤汇丰湿热凉饺虾馆卫间厕线两层请勿吸烟紧急饮厅礼盒导览标准选择设备"
    "让应这专实网络码充电宝证检验处罚违规则须领补办扫约预订满减赠积分换适用额条岁儿童儿饼",
    "發票營業時間門車廣場書銀行藥醫院電話飯麵雞東長樂歡迎光臨優惠價格總計會員號學區機鐵樓點湯燒臺灣飲料門市"
    "捷運開關閉買賣單張編碼務費現錢紅燒肉雙龍鳳匯豐濕熱涼餃蝦館衛間廁線兩層請勿吸煙緊急飲廳禮盒導覽標準選擇設備"
    "讓應這專實網絡碼充電寶證檢驗處罰違規則須領補辦掃約預訂滿減贈積分換適用額條歲兒童兒餅"))
S2T = {s: t for s, t in S2T.items() if s != t}
T2S = {t: s for s, t in S2T.items()}

# Filler vocabulary per kind of photo; prices drawn from 31-99 so they never contain a planted number
SHOP_NAMES = ["老王", "张记", "阿姨", "好运来", "福满楼", "金城", "小林", "东方", "四季", "德顺", "华联", "鑫源"]
SHOP_TYPES = ["牛肉面馆", "便利店", "水果店", "理发店", "五金店", "茶餐厅", "烧烤店", "花店", "眼镜店", "超市",
              "面包房", "药房", "书店", "酒家"]
DISHES = ["红烧肉", "宫保鸡丁", "鱼香肉丝", "麻婆豆腐", "酸辣汤", "蛋炒饭", "回锅肉", "水煮鱼", "糖醋排骨",
          "干煸豆角", "炸酱面", "葱油饼", "虾饺", "叉烧包", "凉拌黄瓜", "番茄炒蛋", "清蒸鲈鱼", "蒜蓉西兰花"]
ITEMS = ["矿泉水", "纸巾", "牙膏", "洗发水", "可乐", "薯片", "口香糖", "电池", "雨伞", "面包", "酸奶", "香蕉",
         "苹果", "饼干", "咖啡", "毛巾"]
STREETS = ["中山路", "解放路", "建国路", "淮海路", "长安街", "和平路", "延安路", "复兴路", "青年路", "滨江路"]
CITIES = ["北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "西安", "南京", "重庆", "苏州", "天津"]
NOTICES = ["请勿吸烟", "小心地滑", "请排队等候", "闲人免进", "注意安全", "请保持安静", "节约用水", "请随手关门",
           "禁止拍照", "当心触电", "请勿触摸", "非工作人员禁止入内"]
SCREENS = ["支付成功", "订单详情", "我的钱包", "消息", "通讯录", "发现", "设置", "确认收货", "查看物流",
           "联系客服", "申请退款", "付款方式", "交易记录", "扫一扫"]
LATIN = ["OPEN", "Welcome", "Exit", "Toilet", "Coffee", "Menu", "Sale", "Hotel", "Taxi", "Bus"]
MAX_LINES = 14  # a small set (the smoke test's) would otherwise pile every planted word onto a few photos
KINDS = ["shop_sign", "receipt", "menu", "ticket", "street_sign", "notice", "screenshot"]


@dataclass
class Query:
    cls: str
    text: str
    needles: list[str]          # canonical words that must all be in a photo's printed text
    distractors: list[str] = field(default_factory=list)  # printed strings that hold the needle across words


@dataclass
class Photo:
    id: int
    kind: str
    script: str                 # 's' Simplified, 't' Traditional
    lines: list[str]            # the printed text, one entry per line (per column when vertical)
    font: int = 0
    conditions: list[str] = field(default_factory=list)
    seed: int = 0


# Query classes and what each plants: (query, planted text or None = the query itself, photos, script of the
# photos it goes in). Multi-word queries plant each word on its own line of the same photos.
PLANTS: list[tuple[str, str, str | None, int, str]] = [
    # 1 character
    *[("1 char", q, None, 0, "s") for q in ["药", "茶", "面", "鸡", "书", "酒", "票", "米", "车", "站"]],
    # 2-character words, with false friends printed elsewhere (上海 in 楼上海景厅, 和服 in 产品和服务, ...)
    *[("2-char word", q, None, 5, "s") for q in ["发票", "南京", "奶茶", "出口", "地铁", "银行", "医院", "牛肉",
                                                 "大学", "建设", "上海", "和服", "市长", "长江", "火锅", "停车"]],
    # 3-4 character words
    *[("3-4 char word", q, None, 5, "s") for q in ["牛肉面", "营业时间", "欢迎光临", "停车场", "增值税", "火车站",
                                                   "会员卡", "小笼包", "禁止吸烟", "人民路", "充电宝", "洗手间"]],
    # multi-word: the words apart in the same photo
    *[("multi-word", q, None, 4, "s") for q in ["发票 南京", "牛肉面 二两", "地铁 出口", "增值税 发票",
                                                "小米 充电宝", "奶茶 第二杯半价", "营业时间 周日", "北京 上海",
                                                "会员 折扣", "医院 挂号"]],
    # mixed Chinese / Latin / digits
    *[("mixed script", q, None, 4, "s") for q in ["WiFi密码", "KFC", "iPhone 15", "5G套餐", "B2出口",
                                                  "Line 2", "VIP会员", "ATM", "T恤", "USB充电"]],
    # numbers and prices
    *[("numbers/prices", q, p, 4, "s") for q, p in [
        ("¥28", "合计 ¥28.00"), ("128元", "套餐 128元"), ("13800138000", "电话 13800138000"),
        ("2024年5月1日", "日期 2024年5月1日"), ("15:30", "开车时间 15:30"), ("G1234", "车次 G1234"),
        ("021-62345678", "电话 021-62345678"), ("8折", "全场8折"), ("3号线", "地铁3号线"), ("0571", "区号 0571")]],
    # Traditional query, Simplified text
    *[("trad query→simp text", q, None, 4, "s") for q in ["發票", "營業時間", "銀行", "醫院", "車站", "書店",
                                                          "臺灣", "電話"]],
    # Simplified query, Traditional text (planted in Simplified, printed converted)
    *[("simp query→trad text", q, None, 4, "t") for q in ["台湾", "鸡排", "面包", "饮料", "优惠", "营业中",
                                                          "门市", "捷运"]],
    # full-width vs half-width: planted one way, queried the other
    *[("full/half width", q, p, 4, "s") for q, p in [
        ("wifi", "免费ＷＩＦＩ"), ("VIP", "ＶＩＰ专区"), ("108号", "１０８号"), ("ＡＴＭ", "ATM 自助银行"),
        ("２０２３", "2023年度"), ("Ｂ座", "B座 大堂")]],
    # known OCR confusions: look-alike characters under degradation, and a word printed letter-spaced
    *[("OCR confusion", q, p, 4, "s") for q, p in [
        ("已付款", None), ("末班车", "末班车 22:30"), ("土特产", None), ("停车场", "停 车 场"),
        ("营业时间", "营业 时间"), ("入口", "入口 Entrance")]],
]
# strings printed in some photos that hold a 2-char query across a word boundary: not a match for a person
DISTRACTORS = {"上海": ["楼上海景厅"], "和服": ["产品和服务"], "市长": ["南京市长江大桥"], "长江": [],
               "大学": [], "建设": ["建设银行"]}
DISTRACTOR_LINES = ["楼上海景厅", "产品和服务", "南京市长江大桥", "海上明月", "京东快递"]


def canonical(text: str) -> str:
    """The printed text as a person reads it: compatibility forms and width folded, lower case, one script,
    no spaces (a letter-spaced word is still the word)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(T2S.get(c, c) for c in text if not c.isspace())


def to_traditional(text: str) -> str:
    return "".join(S2T.get(c, c) for c in text)


def filler_lines(kind: str, rng: random.Random) -> list[str]:
    price = lambda: f"¥{rng.randint(31, 99)}.{rng.choice(['00', '50'])}"  # noqa: E731
    city = rng.choice(CITIES)
    if kind == "shop_sign":
        return [rng.choice(SHOP_NAMES) + rng.choice(SHOP_TYPES)] + ([rng.choice(LATIN)] if rng.random() < 0.3 else [])
    if kind == "receipt":
        lines = [rng.choice(SHOP_NAMES) + rng.choice(SHOP_TYPES), f"单号 {rng.randint(100000, 999999)}"]
        lines += [f"{rng.choice(ITEMS)} {price()}" for _ in range(rng.randint(2, 5))]
        return lines + [f"收银员 {rng.randint(10, 99)}", "谢谢惠顾"]
    if kind == "menu":
        return ["菜单"] + [f"{d} {price()}" for d in rng.sample(DISHES, rng.randint(3, 6))]
    if kind == "ticket":
        a, b = rng.sample(CITIES, 2)
        return [f"{a}站 → {b}站", f"{rng.randint(1, 16):02d}车{rng.randint(1, 20):02d}号", "限乘当日当次车"]
    if kind == "street_sign":
        return [rng.choice(STREETS)] + ([f"{city}市"] if rng.random() < 0.5 else [])
    if kind == "notice":
        return ["通知", rng.choice(NOTICES), f"{city}物业管理处"]
    return [rng.choice(SCREENS), rng.choice(SCREENS), f"{rng.randint(10, 23)}:{rng.randint(10, 59)}"]


def build_set(seed: int, n_photos: int) -> tuple[list[Photo], list[Query]]:
    """The labelled set: photos with the text printed on them, and the queries. Same seed, same set."""
    rng = random.Random(seed)
    fonts = [i for i, (path, *_rest) in enumerate(FONTS) if Path(path).exists()]
    photos = []
    for i in range(n_photos):
        kind = KINDS[i % len(KINDS)]
        script = "t" if rng.random() < 0.15 else "s"
        photos.append(Photo(i, kind, script, filler_lines(kind, rng), seed=rng.randrange(1 << 30)))
    by_script = {s: [p for p in photos if p.script == s] for s in "st"}
    queries = []
    for cls, q, planted, count, script in PLANTS:
        words = q.split() if cls == "multi-word" else [q]
        pool = [p for p in (by_script[script] or photos) if len(p.lines) < MAX_LINES]
        for photo in rng.sample(pool, min(len(pool), count or rng.randint(2, 4))):
            if planted:
                photo.lines.append(planted)
            elif cls.startswith("trad query"):  # the Simplified form is printed
                photo.lines.append("".join(T2S.get(c, c) for c in q))
            else:
                photo.lines.extend(words)
            if cls == "OCR confusion" and "degraded" not in photo.conditions:
                photo.conditions.append("degraded")
        # multi-word: some photos hold only one of the words (a match of both beats them)
        if cls == "multi-word":
            for photo in rng.sample(pool, min(len(pool), 2)):
                photo.lines.append(rng.choice(words))
        queries.append(Query(cls, q, [canonical(w) for w in q.split()] if cls == "multi-word" else [canonical(q)],
                             [canonical(d) for d in DISTRACTORS.get(q, [])]))
    for line in DISTRACTOR_LINES:
        for photo in rng.sample(by_script["s"], min(len(by_script["s"]), 3)):
            photo.lines.append(line)
    for photo in photos:
        if photo.script == "t":
            photo.lines = [to_traditional(line) for line in photo.lines]
        usable = [f for f in fonts if photo.script in FONTS[f][2]] or fonts
        photo.font = rng.choice(usable)
        photo.conditions += draw_conditions(rng, photo)
    return photos, queries


def draw_conditions(rng: random.Random, photo: Photo) -> list[str]:
    conditions = []
    if photo.kind in ("shop_sign", "street_sign", "notice") and rng.random() < 0.3 and \
            all(len(line) <= 8 for line in photo.lines):
        conditions.append("vertical")
    for name, p in (("rotated", 0.3), ("perspective", 0.25), ("blur", 0.2), ("jpeg", 0.3), ("low contrast", 0.15),
                    ("small in scene", 0.15)):
        if rng.random() < p:
            conditions.append(name)
    if "degraded" in photo.conditions:
        conditions += [c for c in ("blur", "jpeg") if c not in conditions]
    return conditions or ["clean"]


FONT_SIZES = {"shop_sign": 64, "receipt": 26, "menu": 32, "ticket": 30, "street_sign": 56, "notice": 36,
              "screenshot": 28}


def render(photo: Photo) -> Image.Image:
    """The photo as a phone would have taken it: printed text, then the photo's conditions, in a fixed order."""
    rng = random.Random(photo.seed)
    path, index, *_ = FONTS[photo.font]
    size = FONT_SIZES[photo.kind]
    font = ImageFont.truetype(path, size, index=index)
    low = "low contrast" in photo.conditions
    bg = (rng.randint(225, 255),) * 3 if not low else (170, 170, 170)
    ink = (rng.randint(0, 60),) * 3 if not low else (120, 120, 120)
    gap = int(size * 0.6)
    if "vertical" in photo.conditions:
        cols = photo.lines
        w = 60 + len(cols) * (size + gap)
        h = 60 + max(len(c) for c in cols) * int(size * 1.15)
        img = Image.new("RGB", (max(w, 200), max(h, 200)), bg)
        draw = ImageDraw.Draw(img)
        for ci, col in enumerate(cols):  # columns read right to left
            x = img.width - 30 - (ci + 1) * (size + gap) + gap
            for k, ch in enumerate(col):
                draw.text((x, 30 + k * int(size * 1.15)), ch, font=font, fill=ink)
    else:
        widths = [font.getlength(line) for line in photo.lines]
        w = int(max(widths)) + 80
        h = 60 + len(photo.lines) * int(size * 1.7)
        img = Image.new("RGB", (max(w, 200), max(h, 120)), bg)
        draw = ImageDraw.Draw(img)
        for k, line in enumerate(photo.lines):
            draw.text((40, 30 + k * int(size * 1.7)), line, font=font, fill=ink)
    if "perspective" in photo.conditions:
        img = perspective(img, rng, bg)
    if "rotated" in photo.conditions:
        img = img.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BICUBIC, expand=True, fillcolor=bg)
    if "small in scene" in photo.conditions:
        scene = Image.new("RGB", (1920, 1440), (90, 110, 100))
        sd = ImageDraw.Draw(scene)
        for _ in range(40):  # a busy background: shapes in muted colours
            x, y = rng.randrange(1920), rng.randrange(1440)
            sd.rectangle((x, y, x + rng.randint(40, 400), y + rng.randint(40, 300)),
                         fill=tuple(rng.randint(40, 200) for _ in range(3)))
        scale = min(1.0, 520 / img.width, 380 / img.height)
        small = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.Resampling.LANCZOS)
        scene.paste(small, (rng.randrange(0, 1920 - small.width), rng.randrange(0, 1440 - small.height)))
        img = scene
    if "blur" in photo.conditions:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.2)))
    if low:
        img = ImageEnhance.Contrast(img).enhance(0.8)
    if "jpeg" in photo.conditions:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(8, 25))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def perspective(img: Image.Image, rng: random.Random, bg) -> Image.Image:
    w, h = img.size
    d = 0.12
    src = [(0, 0), (w, 0), (w, h), (0, h)]
    dst = [(x + rng.uniform(-d, d) * w, y + rng.uniform(-d, d) * h) for x, y in src]
    # PIL maps output to input pixels: solve the 8 coefficients taking dst (output) corners to src (input) ones
    a = []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    coeffs = np.linalg.solve(np.array(a), np.array([c for p in src for c in p], dtype=float))
    return img.transform((w, h), Image.Transform.PERSPECTIVE, tuple(coeffs), Image.Resampling.BICUBIC, fillcolor=bg)


def set_key(seed: int, photos: list[Photo]) -> str:
    digest = hashlib.sha256(json.dumps([asdict(p) for p in photos] + [FONTS], ensure_ascii=False).encode())
    return f"seed{seed}-v{SET_VERSION}-{len(photos)}-{digest.hexdigest()[:12]}"


def run_ocr(photos: list[Photo], cache_dir: Path, seed: int, threads: int) -> dict[int, list[dict]]:
    """Each photo's OCR lines, from the cache when this exact set was read before."""
    cache = cache_dir / f"{set_key(seed, photos)}.json"
    done: dict[int, list[dict]] = {}
    if cache.exists():
        done = {int(k): v for k, v in json.loads(cache.read_text()).items()}
    todo = [p for p in photos if p.id not in done]
    if todo:
        from inference.ocr import OcrModel
        from inference.runtime import RuntimeOptions
        from listener.tasks import OcrHandler
        handler = OcrHandler("ocr", "ocr")  # its request() carries the listener's default OCR settings
        model = OcrModel(RuntimeOptions(providers=["cpu"], intra_op_threads=threads), max_batch=1)
        print(f"OCR of {len(todo)} photos (cached in {cache}) ...", flush=True)
        start = time.monotonic()
        for k, photo in enumerate(todo, 1):
            [result] = model.run_batch([handler.request(render(photo))])
            if isinstance(result, Exception):
                raise result
            done[photo.id] = [{"text": ln.text, "box": ln.box, "box_score": ln.box_score,
                               "text_score": ln.text_score} for ln in result.lines]
            if k % 25 == 0 or k == len(todo):
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(done, ensure_ascii=False))
                print(f"  {k}/{len(todo)} ({time.monotonic() - start:.0f} s)", flush=True)
        model.unload()
    return done


# Immich 3.1's tokenizeForSearch (server/src/utils/database.ts), on UTF-16 code units as JavaScript does
def _immich_is_cjk(ch: str) -> bool:
    c = ord(ch)
    return (0x4E00 <= c <= 0x9FFF or 0xAC00 <= c <= 0xD7AF or 0x3040 <= c <= 0x309F or 0x30A0 <= c <= 0x30FF
            or 0x3400 <= c <= 0x4DBF)


def immich_tokenize(text: str) -> list[str]:
    """Code points stand in for JavaScript's UTF-16 units: characters outside the BMP are never CJK to it, so they
    only ever sit inside a whole non-CJK token, where both split alike."""
    tokens, i = [], 0
    while i < len(text):
        if ord(text[i]) <= 32:
            i += 1
            continue
        start = i
        if _immich_is_cjk(text[i]):
            while i < len(text) and _immich_is_cjk(text[i]):
                i += 1
            tokens += [text[start]] if i - start == 1 else [text[k:k + 2] for k in range(start, i - 1)]
        else:
            while i < len(text) and ord(text[i]) > 32 and not _immich_is_cjk(text[i]):
                i += 1
            tokens.append(text[start:i])
    return tokens


IMMICH_OCR_SEARCH = """
SELECT asset.id FROM asset INNER JOIN ocr_search ON asset.id = ocr_search."assetId"
 WHERE asset.visibility != 'locked'
   AND f_unaccent(ocr_search.text) %>> f_unaccent($1)
   AND asset."ownerId" = ANY ($2::uuid[]) AND asset."deletedAt" IS NULL
 ORDER BY asset."fileCreatedAt" DESC, asset.id DESC LIMIT $3"""

CNAI_SEARCH = "SELECT asset_id FROM cnai.search('ocr:' || $1, NULL, ARRAY[$2::uuid], $3) ORDER BY ocr_rank"

ZHPARSER_SEARCH = """
SELECT o.asset_id FROM cnai.ocr o JOIN asset a ON a.id = o.asset_id
 WHERE a."ownerId" = $2 AND to_tsvector('cnai.zh', o.text) @@ plainto_tsquery('cnai.zh', $1)
 ORDER BY ts_rank(to_tsvector('cnai.zh', o.text), plainto_tsquery('cnai.zh', $1)) DESC, o.asset_id LIMIT $3"""


async def load(conn, photos: list[Photo], ocr: dict[int, list[dict]], seed: int) -> tuple[str, dict[str, int]]:
    """One user's library: each photo an asset, its OCR stored as cnai's listener and Immich's OCR job store it."""
    rng = random.Random(seed)
    owner = await conn.fetchval("""INSERT INTO "user" (email) VALUES ('quality@bench') RETURNING id""")
    asset_of: dict[str, int] = {}
    base = datetime(2024, 1, 1, tzinfo=timezone.utc)
    for photo in photos:
        aid = uuid.UUID(int=rng.getrandbits(128))
        asset_of[str(aid)] = photo.id
        taken = base + timedelta(minutes=rng.randrange(600_000))
        await conn.execute("""INSERT INTO asset (id, "ownerId", "originalPath", "originalFileName", checksum,
                                                 "fileCreatedAt")
                              VALUES ($1, $2, $3, $4, $5, $6)""",
                           aid, owner, f"/bench/{photo.id}.jpg", f"{photo.id}.jpg",
                           hashlib.sha1(aid.bytes).digest(), taken)
        lines = ocr[photo.id]
        await conn.execute("INSERT INTO cnai.ocr (asset_id, text, lines, model) VALUES ($1, $2, $3::jsonb, 'bench')",
                           aid, "\n".join(ln["text"] for ln in lines), json.dumps(lines, ensure_ascii=False))
        if lines:  # Immich's ocrRepository.upsert: asset_ocr rows, and ocr_search only when there is text
            await conn.executemany(
                """INSERT INTO asset_ocr ("assetId", x1, y1, x2, y2, x3, y3, x4, y4, "boxScore", "textScore", text)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)""",
                [(aid, *ln["box"], ln["box_score"], ln["text_score"], ln["text"]) for ln in lines])
            tokens = [t for ln in lines for t in immich_tokenize(ln["text"])]
            await conn.execute("""INSERT INTO ocr_search ("assetId", text) VALUES ($1, $2)""", aid, " ".join(tokens))
    await conn.execute("ANALYZE")
    return str(owner), asset_of


def relevant(query: Query, photos: list[Photo]) -> set[int]:
    found = set()
    for photo in photos:
        text = "\n".join(canonical(line) for line in photo.lines)
        for d in query.distractors:
            text = text.replace(d, "\n")
        if all(n in text for n in query.needles):
            found.add(photo.id)
    return found


@dataclass
class Scores:
    r5: list[float] = field(default_factory=list)
    r20: list[float] = field(default_factory=list)
    rr: list[float] = field(default_factory=list)
    p5: list[float] = field(default_factory=list)
    zero: list[float] = field(default_factory=list)

    def add(self, ranked: list[int], rel: set[int]) -> None:
        hits = [p in rel for p in ranked]
        # of what a page of k could hold: a 1-character query with 60 relevant photos can't show them all in 5
        self.r5.append(sum(hits[:5]) / min(5, len(rel)))
        self.r20.append(sum(hits[:TOP]) / min(TOP, len(rel)))
        self.rr.append(next((1 / (i + 1) for i, h in enumerate(hits) if h), 0.0))
        if ranked:  # the results shown: what share of the first five is right
            self.p5.append(sum(hits[:5]) / len(hits[:5]))
        self.zero.append(0.0 if ranked else 1.0)

    def row(self) -> list[float]:
        mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
        return [mean(self.r5), mean(self.r20), mean(self.rr), mean(self.p5), mean(self.zero)]


def line_recovery(photos: list[Photo], ocr: dict[int, list[dict]]) -> dict[str, tuple[int, int]]:
    """Per condition: (labelled lines the OCR recovered whole, labelled lines)."""
    out: dict[str, list[int]] = {}
    for photo in photos:
        read = "".join(canonical(ln["text"]) for ln in ocr[photo.id])
        for line in photo.lines:
            ok = canonical(line) in read
            for cond in ["all", photo.kind, *photo.conditions, "Traditional" if photo.script == "t" else "Simplified"]:
                tally = out.setdefault(cond, [0, 0])
                tally[0] += ok
                tally[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


async def evaluate(dsn: str, photos: list[Photo], queries: list[Query], ocr: dict[int, list[dict]], seed: int,
                   show_misses: bool) -> None:
    conn = await asyncpg.connect(dsn)
    bigrams = await asyncpg.connect(dsn, server_settings={"cnai.zh_words": "off"})
    try:
        owner, asset_of = await load(conn, photos, ocr, seed)
        zhparser_state, zhparser_detail = await conn.fetchrow("SELECT state, detail FROM cnai.zhparser_state()")
        has_zhparser = zhparser_state not in ("absent", "dictionary missing")
        engines = {
            "cnai": lambda q: bigrams.fetch(CNAI_SEARCH, q, owner, TOP),
            "immich": lambda q: conn.fetch(IMMICH_OCR_SEARCH, " ".join(immich_tokenize(q)), [owner], TOP),
        }
        if has_zhparser:
            engines["cnai+zhparser"] = lambda q: conn.fetch(CNAI_SEARCH, q, owner, TOP)
            engines["zhparser"] = lambda q: conn.fetch(ZHPARSER_SEARCH, q, uuid.UUID(owner), TOP)
        scores: dict[str, dict[str, Scores]] = {e: {} for e in engines}
        skipped = []
        misses = []
        for query in queries:
            rel = relevant(query, photos)
            if not rel:
                skipped.append(query.text)
                continue
            for name, run in engines.items():
                ranked = [asset_of[str(r[0])] for r in await run(query.text)]
                for cls in (query.cls, "all"):
                    scores[name].setdefault(cls, Scores()).add(ranked, rel)
                if show_misses and name == "cnai" and not rel & set(ranked[:5]):
                    misses.append((query, rel, ranked))
    finally:
        await conn.close()
        await bigrams.close()

    classes = [q.cls for q in queries]
    classes = list(dict.fromkeys(classes)) + ["all"]
    n_queries = {c: sum(1 for q in queries if q.cls == c and q.text not in skipped) for c in classes}
    n_queries["all"] = sum(n_queries.values())
    print(f"\n{len(photos)} photos, {n_queries['all']} queries with relevant photos"
          + (f" ({len(skipped)} without any in this set: skipped)" if skipped else ""))
    print(f"zhparser: {zhparser_state}: {zhparser_detail}")
    header = f"{'class':22s} {'n':>3s}  " + "  ".join(f"{e:^34s}" for e in engines)
    print(header)
    print(f"{'':22s} {'':>3s}  " + "  ".join(f"{'R@5   R@20  MRR   P@5   zero':^34s}" for _ in engines))
    for cls in classes:
        cells = []
        for e in engines:
            s = scores[e].get(cls)
            cells.append("  ".join(f"{v:4.2f}" if not math.isnan(v) else "  - " for v in s.row()) if s else
                         f"{'-':^34s}")
        print(f"{cls:22s} {n_queries[cls]:3d}  " + "  ".join(f"{c:34s}" for c in cells))
    all_c, all_i = scores["cnai"]["all"].row(), scores["immich"]["all"].row()
    ratio = lambda a, b: f"{a / b:4.2f}x" if b else "inf"  # noqa: E731
    print(f"cnai / immich, all queries: R@5 {ratio(all_c[0], all_i[0])}, R@20 {ratio(all_c[1], all_i[1])}, "
          f"MRR {ratio(all_c[2], all_i[2])}; zero-result queries {all_c[4]:.0%} vs {all_i[4]:.0%}")
    if has_zhparser:
        all_z = scores["cnai+zhparser"]["all"].row()
        print(f"cnai+zhparser / cnai, all queries: R@5 {ratio(all_z[0], all_c[0])}, R@20 {ratio(all_z[1], all_c[1])}, "
              f"MRR {ratio(all_z[2], all_c[2])}; zero-result queries {all_z[4]:.0%} vs {all_c[4]:.0%}")

    rec = line_recovery(photos, ocr)
    total = rec.pop("all")
    print(f"\nOCR end to end: {total[0]} of {total[1]} labelled text lines recovered whole "
          f"({total[0] / total[1]:.0%}); by condition:")
    for cond, (ok, n) in sorted(rec.items(), key=lambda kv: kv[1][0] / kv[1][1]):
        print(f"  {cond:16s} {ok:4d}/{n:<4d} {ok / n:4.0%}")
    for query, rel, ranked in misses:
        print(f"miss ({query.cls}) {query.text!r}: {len(rel)} relevant, cnai's top 5 {ranked[:5]} "
              f"(relevant: {sorted(rel)[:8]})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=10)
    ap.add_argument("--photos", type=int, default=320, help="size of the labelled set (>= 300 for the full bench)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--ocr-threads", type=int, default=0, help="ONNX Runtime threads (0: one per core)")
    ap.add_argument("--dump-dir", type=Path, help="also write the rendered photos here, to look at them")
    ap.add_argument("--show-misses", action="store_true", help="list the queries cnai misses in its top 5")
    ap.add_argument("--zhparser-control-path", type=Path, default=os.environ.get("CNAI_ZHPARSER_CONTROL_PATH"),
                    help="a zhparser build for the embedded server: the folder holding extension/zhparser.control "
                         "(PostgreSQL 18's extension_control_path; default: $CNAI_ZHPARSER_CONTROL_PATH)")
    args = ap.parse_args(argv)
    if args.photos < 1:
        ap.error("--photos must be at least 1")
    if args.zhparser_control_path and not (args.zhparser_control_path / "extension" / "zhparser.control").is_file():
        ap.error(f"--zhparser-control-path: no extension/zhparser.control in {args.zhparser_control_path}")
    logging.basicConfig(level=logging.WARNING)

    missing = sorted({name for path, _, _, name in FONTS if not Path(path).exists()})
    if missing:
        print(f"fonts missing, skipped: {', '.join(missing)} (Debian: apt install fonts-noto-cjk fonts-wqy-zenhei)")
    if all(not Path(path).exists() for path, *_ in FONTS):
        sys.exit("no CJK font installed: apt install fonts-noto-cjk fonts-wqy-zenhei")
    photos, queries = build_set(args.seed, args.photos)
    if args.dump_dir:
        args.dump_dir.mkdir(parents=True, exist_ok=True)
        for photo in photos:
            render(photo).save(args.dump_dir / f"{photo.id:04d}-{photo.kind}.jpg", quality=90)
    print(f"labelled set: seed {args.seed}, {len(photos)} photos, {len(queries)} queries in "
          f"{len({q.cls for q in queries})} classes; fonts: "
          + ", ".join(sorted({FONTS[p.font][3] for p in photos})))
    ocr = run_ocr(photos, args.cache_dir, args.seed, args.ocr_threads)

    with scratch_server("cnai-bench-quality-") as server:
        dsn = server.dsn()
        # zhparser, where a build is given, is created by the migration; its functions then name their library
        control_path = (f"?extension_control_path=$system:{args.zhparser_control_path.resolve()}"
                        if args.zhparser_control_path else "")
        asyncio.run(migrate(dsn + control_path, standalone=True))
        asyncio.run(evaluate(dsn, photos, queries, ocr, args.seed, args.show_misses))


if __name__ == "__main__":
    main()
