"""`edgepeft bench`: the documented figures, for both backends."""

import json

import pytest

from edgepeft.cli import main


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_bench_reports_speed_switch_and_memory_per_adapter(llama_bundle, backend, capsys):
    assert main(["bench", str(llama_bundle.root), "--backend", backend, "--runs", "1", "--new-tokens", "8",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == backend and set(r["adapters"]) == {"qv", "all", "mixed"}
    assert r["base"]["decode_tokens_per_s"] > 0 and r["base"]["reload_s"] > 0
    reads = llama_bundle.backends[backend]["decode_bytes"]
    assert r["base"]["decode_bytes"] == reads > 0
    assert r["base"]["decode_gb_per_s"] == round(reads * r["base"]["decode_tokens_per_s"] / 1e9, 2)
    for a in r["adapters"].values():
        assert 0 < a["switch_ms_median"] <= a["switch_ms_p95"]
        assert a["switch_vs_reload"] >= 1 and a["decode_tokens_per_s"] > 0 and a["file_bytes"] > 0
        assert 0 < a["decode_vs_base"] < 10  # median ratio to the base run right before each adapter run
    m = r["memory"]
    assert m["peak_rss_0_adapters"] > 0 and m["peak_rss_all_adapters"] >= m["peak_rss_0_adapters"] - 2**20
    assert m["peaks_from"] == "first call" and m["process_peak_rss"] >= m["peak_rss_all_adapters"]
    assert main(["bench", str(llama_bundle.root), "--backend", backend, "--runs", "1", "--new-tokens", "8",
                 "--no-memory"]) == 0
    text = capsys.readouterr().out
    assert "switch med" in text and "reload base per task" in text and "peak RSS" not in text
    assert "weights read per decoded token" in text


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_bench_concurrency_reports_each_count_on_the_base_and_on_different_adapters(llama_bundle, backend, capsys):
    assert main(["bench", str(llama_bundle.root), "--backend", backend, "--concurrency", "1,3", "--runs", "1",
                 "--new-tokens", "6", "--no-memory", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["batching"] is True and set(r["levels"]) == {"base", "adapters"}
    for mode, rows in r["levels"].items():
        assert set(rows) == {"1", "3"} and rows["1"]["vs_one"] == 1.0
        three = rows["3"]
        assert three["aggregate_tokens_per_s"] > 0 and three["per_stream_decode_tokens_per_s"] > 0
        assert 0 < three["ttft_ms_median"] <= three["ttft_ms_max"]
        assert three["vs_one"] == pytest.approx(three["aggregate_tokens_per_s"] / rows["1"]["aggregate_tokens_per_s"],
                                                rel=0.02)
    assert r["levels"]["adapters"]["3"]["adapters"] == ["qv", "all", "mixed"]  # a different adapter per stream
    assert r["levels"]["base"]["3"]["adapters"] == [None, None, None]
    assert main(["bench", str(llama_bundle.root), "--backend", backend, "--concurrency", "2", "--runs", "1",
                 "--new-tokens", "4", "--no-batching"]) == 0
    text = capsys.readouterr().out
    assert "one after another" in text and "2 on adapters" in text
