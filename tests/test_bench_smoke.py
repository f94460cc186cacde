"""The benchmark runs end to end in --quick mode (tiny shape); speed itself is never asserted."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")

from gptneo_onnx.bench import run  # noqa: E402
from gptneo_onnx.bench.report import evaluate_targets  # noqa: E402


def test_quick_benchmark_writes_json_table_and_chart(tmp_path):
    variants = "ours-portable-fp32,ours-optimized-fp32,ours-optimized-int4,transformers-fp32"
    results = run.main(["--quick", "--out", str(tmp_path), "--variants", variants, "--no-cold"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["medians"]) == set(variants.split(","))
    for metrics in saved["medians"].values():
        assert (
            metrics["decode_tok_s@8"] > 0 and metrics["prefill_tok_s@96"] > 0 and metrics["batch2_tok_s"] > 0
        )
    assert (tmp_path / "speedup_vs_context.png").stat().st_size > 0  # charted against transformers
    table = (tmp_path / "table.md").read_text()
    assert "| ours-optimized-int4 |" in table and "% of read bandwidth" in table
    assert len(results["targets"]) == 11
    bandwidth = saved["bandwidth"]
    assert bandwidth["read_gb_s"] > 0 and "transformers-fp32" not in bandwidth["variants"]
    int4 = bandwidth["variants"]["ours-optimized-int4"]
    assert int4["gb_s"] == pytest.approx(int4["mb_per_token"] * int4["tok_s"] / 1000)
    assert int4["percent"] == pytest.approx(100 * int4["gb_s"] / bandwidth["read_gb_s"])


def test_cold_start_process_reports_first_token_and_peak_rss(tmp_path):
    from gptneo_onnx.bench.models import build_all

    artifacts = build_all(tmp_path / "work", "tiny", ["ours-optimized-fp32"], lambda text: None)
    samples = run.measure_cold(run.QUICK, "ours", "ours-shared", artifacts.exports["ours-optimized-fp32"])
    assert 0 < samples["cold_start_s"][0] < 120
    assert 10 < samples["peak_rss_mb"][0] < 4000


def test_targets_compare_against_the_right_peer():
    medians = {
        "ours-optimized-fp32": {"decode_tok_s@8": 60.0, "decode_tok_s@96": 40.0, "peak_rss_mb": 400.0},
        "ours-optimized-int4": {"decode_tok_s@8": 150.0},
        "optimum-fp32": {"decode_tok_s@8": 40.0, "decode_tok_s@96": 20.0, "peak_rss_mb": 1000.0},
        "optimum-int4": {"decode_tok_s@8": 100.0, "prefill_tok_s@96": 50.0},
    }
    medians["ours-optimized-int4"]["prefill_tok_s@96"] = 100.0
    bandwidth = {"variants": {"ours-optimized-int4": {"percent": 70.0}}}
    targets = evaluate_targets(medians, run.QUICK, bandwidth)
    short, long, int4_fp32, int4_int4, rss, cold = targets[:6]
    ttft = {(t["variant"], t["metric"]): t for t in targets[6:10]}
    assert ttft[("ours-optimized-int4", "prefill_tok_s@96")]["peer"] == "optimum-int4"
    assert ttft[("ours-optimized-int4", "prefill_tok_s@96")]["measured_x"] == pytest.approx(2.0)
    assert ttft[("ours-optimized-fp32", "prefill_tok_s@32")]["met"] is None  # not measured
    assert targets[10]["measured_x"] == pytest.approx(0.7) and targets[10]["met"] is False
    assert short["measured_x"] == pytest.approx(1.5) and short["met"] is True
    assert long["measured_x"] == pytest.approx(2.0) and long["met"] is True
    assert int4_fp32["measured_x"] == pytest.approx(3.75) and int4_fp32["met"] is True
    assert int4_int4["peer"] == "optimum-int4" and int4_int4["measured_x"] == pytest.approx(1.5)
    assert rss["measured_x"] == pytest.approx(2.5) and rss["met"] is True  # 400 MB is 0.4x of 1000 MB
    assert cold["met"] is None  # not measured


def test_a_worker_that_cannot_load_its_system_fails_with_its_log(tmp_path):
    from gptneo_onnx.bench.worker import Worker

    with pytest.raises(RuntimeError, match="benchmark worker failed(.|\n)*gptneo_onnx.json"):
        Worker("ours", tmp_path / "missing", tmp_path / "worker.log")
