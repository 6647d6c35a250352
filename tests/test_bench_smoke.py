"""The search benchmarks still run, end to end, at a tiny size (their numbers are for people, not asserted here)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_search_quality_runs_real_ocr_and_both_searches(tmp_path):
    out = run_bench("search_quality.py", "--photos", "6", "--cache-dir", str(tmp_path))
    assert "OCR of 6 photos" in out
    assert "cnai / immich, all queries" in out and "labelled text lines recovered" in out
    # the second run reads the OCR from the cache
    assert "OCR of" not in run_bench("search_quality.py", "--photos", "6", "--cache-dir", str(tmp_path))


def test_search_scale_runs_ocr_and_hybrid():
    out = run_bench("search_scale.py", "--docs", "300", "--owners", "3", "--clients", "2", "--seconds", "0.5",
                    "--rounds", "1")
    assert "very common char" in out and "hybrid p95" in out


@pytest.mark.parametrize("text, tokens", [
    ("東京タワー tower", ["東京", "京タ", "タワ", "ワー", "tower"]),  # Immich's own example
    ("北 京", ["北", "京"]),
    ("发票No.12 ¥38", ["发票", "No.12", "¥38"]),
])
def test_immich_tokenizer_matches_immichs(text, tokens):
    spec = importlib.util.spec_from_file_location("search_quality", ROOT / "bench" / "search_quality.py")
    search_quality = importlib.util.module_from_spec(spec)
    sys.modules["search_quality"] = search_quality  # dataclasses look their module up
    spec.loader.exec_module(search_quality)
    assert search_quality.immich_tokenize(text) == tokens


def test_mtphotos_bench_runs_both_protocols():
    pytest.importorskip("cn_clip")
    out = run_bench("mtphotos.py", "--images", "2", "--rounds", "1", "--clients", "2")
    assert "clip " in out and "ocr " in out and out.count("ratio MT Photos / Immich") == 2
