"""The benchmark scripts: FLOP formula against SPEC §6, and a CPU smoke run."""

import json

from eval import bench


def test_model_flops_matches_spec_floor():
    """SPEC §6: about 3.05e14 FLOP for 131072 tokens (text + memory tokens, all 16 layers)."""
    cfg, armt = bench.bench_config("1b")
    flops = bench.model_flops("diagonal", 131072, cfg, armt)
    assert abs(flops / 3.05e14 - 1) < 0.02
    assert bench.model_flops("sequential", 131072, cfg, armt) == flops
    # full attention: quadratic term dominates at 131072 tokens
    assert bench.model_flops("full_attention", 131072, cfg, armt) > 2 * flops


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "inference.json"
    assert bench.main(["--size", "tiny", "--schedules", "sequential", "diagonal",
                       "--lengths", "70", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["schedule"]: r for r in report["rows"]}
    assert set(rows) == {"sequential", "diagonal"}
    assert all(r["output_finite"] and r["seconds"] > 0 for r in rows.values())
    assert rows["diagonal"]["rel_err_vs_sequential"] < 2e-2          # bf16, tiny model
    assert "| diagonal | 70 |" in out.with_suffix(".md").read_text()
