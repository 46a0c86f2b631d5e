"""The benchmark scripts: FLOP formula against SPEC §6, and a CPU smoke run."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

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


def test_bench_generate_tiny_on_cpu(tmp_path):
    """eval.bench_generate (through `armt bench --op generate`): one row per attention choice,
    schedule, batch and length, with the prefill timed only where there is a prefix (a context
    of one segment has none), each row's tokens compared with the first row's at that batch and
    length; bad arguments refused."""
    from eval import bench_generate
    out = tmp_path / "generate.json"
    assert bench.main(["--size", "tiny", "--lengths", "20", "70", "--op", "generate",
                       "--batches", "2", "--new-tokens", "3", "--schedules", "diagonal",
                       "sequential", "--attn", "auto", "xla", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["attn"], r["schedule"], r["context"]) for r in rows] == [
        (a, s, n) for n in (20, 70) for a in ("auto", "xla") for s in ("diagonal", "sequential")]
    for r in rows:
        assert r["first_token_s"] > 0 and len(r["generate_runs"]) == 3
        assert np.isnan(r["prefill_s"]) == (r["context"] <= 32)            # T = 32
        assert 0 <= r["tokens_as_diagonal/auto"] <= 4
    assert rows[0]["tokens_as_diagonal/auto"] == 4                         # itself
    assert "| sequential | xla | 2 | 70 |" in out.with_suffix(".md").read_text()
    for bad in (["--reps", "2"], ["--new-tokens", "0"], ["--batches", "0"]):
        with pytest.raises(SystemExit):
            bench_generate.main(["--size", "tiny", *bad])


def test_bench_op_hands_the_rest_of_the_command_line_to_its_benchmark():
    assert bench._delegated_op(["--op=grouped_matmul", "--quick"]) == ("grouped_matmul", ["--quick"])
    assert bench._delegated_op(["--size", "tiny", "--op", "generate", "--reps", "3"]) == (
        "generate", ["--size", "tiny", "--reps", "3"])
    for own in (["--op", "model"], ["--op"], ["--size", "tiny"]):
        assert bench._delegated_op(own) is None


def test_probe_decode_tiny_on_cpu(tmp_path):
    """eval/probe_decode.py: each variant timed, its optimised HLO dumped, both decoding the
    same tokens (on the CPU "auto" is XLA)."""
    import importlib.util
    path = Path(__file__).parents[1] / "eval" / "probe_decode.py"
    spec = importlib.util.spec_from_file_location("probe_decode", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    out = tmp_path / "rows.jsonl"
    assert probe.main(["--size", "tiny", "--context", "20", "--new-tokens", "2", "--reps", "3",
                       "--gmm-impls", "xla", "auto", "--out", str(out),
                       "--dump-hlo", str(tmp_path / "hlo")]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["gmm_impl"] for r in rows] == ["xla", "auto"]
    assert rows[0]["tokens_head"] == rows[1]["tokens_head"] and len(rows[0]["tokens_head"]) == 3
    with gzip.open(tmp_path / "hlo" / "decode_b1_auto.hlo.txt.gz", "rt") as f:
        assert f.read().startswith("HloModule")
    # the kernel's decode-step calls by product: the last segment's 4 per layer left out
    segment, step = [9e-6] * 8, [1e-6, 2e-6, 3e-6, 4e-6]
    times = {"anonymous_mosaic_gpu_kernel": segment + step * 3, "loop_add_fusion": [5e-6]}
    assert probe.kernel_us_by_product(times, layers=2) == {"qkv": 1.0, "o": 2.0, "gate_up": 3.0,
                                                           "down": 4.0}
    assert probe.kernel_us_by_product({"loop_add_fusion": [5e-6]}, layers=2) == {}


def test_agreement_tiny_on_cpu(capsys):
    """eval.agreement: float32 schedules agree to rounding; --gmm-impl auto adds the distance
    from the XLA-matmul sequential result (plumbing only here: zero on CPU, where auto means
    XLA); contradictory flags are refused."""
    from eval import agreement
    assert agreement.main(["--size", "tiny", "--tokens", "40", "--float32-only"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["gmm_impl"] == "xla" and row["float32"]["hidden"] < 1e-5
    assert agreement.main(["--size", "tiny", "--tokens", "40", "--gmm-impl", "auto"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row) == {"tokens", "gmm_impl", "device", "bfloat16"}
    assert row["bfloat16"]["hidden_sequential_vs_xla"] == 0.0
    with pytest.raises(SystemExit):
        agreement.main(["--size", "tiny", "--float32-only", "--gmm-impl", "auto"])


def test_bench_train_tiny_on_cpu(tmp_path):
    """eval.bench_train: both impls compiled, checked against each other and timed (plumbing:
    on CPU "auto" is XLA, so the first step's loss and gradient norm agree exactly); --profile
    writes a summary per impl (a CPU trace has no device kernels); bad arguments are refused."""
    from eval import bench_train
    out = tmp_path / "train.json"
    assert bench_train.main(["--size", "tiny", "--tokens", "70", "--batch", "2", "--reps", "2",
                             "--profile", "--dump-hlo", "--out", str(out)]) == 0
    for impl in ("xla", "auto"):
        summary = json.loads((tmp_path / f"train_profile_{impl}_70.json").read_text())
        assert set(summary) == {"busy_s_per_run", "by_kind_s", "kernels"}
        with gzip.open(tmp_path / f"train_hlo_{impl}_70.txt.gz", "rt") as f:
            assert f.read().startswith("HloModule")
    rows = json.loads(out.read_text())["rows"]
    assert [r["gmm_impl"] for r in rows] == ["xla", "auto"]
    assert all(len(r["runs"]) == 2 and r["seconds"] > 0 and r["tflops"] > 0 for r in rows)
    assert 0 < rows[0]["loss"] < 10 and rows[1]["loss_rel_diff"] == 0.0
    assert "| auto | bfloat16 | 70 x 2 |" in out.with_suffix(".md").read_text()
    assert all(r["compiler_options"] == {} for r in rows)
    # an XLA option reaches the step's compilation (a CPU one here; same loss)
    assert bench_train.main(["--size", "tiny", "--tokens", "70", "--batch", "2", "--reps", "1",
                             "--impls", "xla", "--compiler-option", "xla_cpu_enable_fast_math=false",
                             "--out", str(out)]) == 0
    row, = json.loads(out.read_text())["rows"]
    assert row["compiler_options"] == {"xla_cpu_enable_fast_math": False}
    assert abs(row["loss"] - rows[0]["loss"]) <= 1e-6 * rows[0]["loss"]
    assert bench_train.parse_compiler_option("xla_a=3") == ("xla_a", 3)
    for bad in (["--batch", "0"], ["--reps", "0"], ["--tokens", "1"], ["--dump-hlo"],
                ["--compiler-option", "fast=true"], ["--compiler-option", "xla_no_value"]):
        with pytest.raises(SystemExit):
            bench_train.main(["--size", "tiny", *bad, "--out", str(out)])


def test_grad_precision_table_on_cpu(capsys):
    """eval.grad_precision: a row per weight; the diagonal schedule's float32 gradients equal the
    sequential one's to float32 rounding, the bf16 ones are off by bf16 rounding (not zero: the
    cast reached the computation)."""
    from eval import grad_precision
    assert grad_precision.main(["--size", "tiny", "--tokens", "70"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| [")]
    assert {r[0].strip() for r in rows} >= {"['layers']['w_qkv']", "['memory']['w_mv']"}
    for _, _, diag32, seq16, diag16 in rows:
        assert float(diag32) <= 1e-5 and 1e-4 < float(seq16) < 0.5 and 1e-4 < float(diag16) < 0.5
    with pytest.raises(SystemExit):
        grad_precision.main(["--size", "huge"])


def test_profile_kinds_and_cpu_run(tmp_path):
    """eval.profile: kernel names from H200 traces land in the right kind; a CPU run writes its
    summary (CPU traces carry no device kernels, so only the wall time is filled)."""
    from eval import profile
    assert profile.kind_of("anonymous_mosaic_gpu_kernel") == "grouped_matmul_kernel"
    assert profile.kind_of("nvjet_sm90_tss_128x128_64x6_2x1_v_bz_NNT") == "matmul"
    assert profile.kind_of("gemm_fusion_dot_5") == "matmul"
    assert profile.kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert profile.kind_of("loop_dynamic_slice_fusion_3") == "copy_slice"
    assert profile.kind_of("input_concatenate_fusion_23") == "copy_slice"
    assert profile.kind_of("loop_multiply_fusion_8") == "other"
    assert profile.parse_compiler_option("xla_a=true") == ("xla_a", True)
    assert profile.parse_compiler_option("xla_a=7") == ("xla_a", 7)
    assert profile.main(["--size", "tiny", "--schedules", "diagonal", "--tokens", "70",
                         "--runs", "1", "--out", str(tmp_path),
                         "--compiler-option", "xla_gpu_enable_dynamic_slice_fusion=false"]) == 0
    summary = json.loads(next(tmp_path.glob("profile_diagonal*_70.json")).read_text())
    assert summary["tokens"] == 70 and summary["wall_s_median"] > 0
    assert summary["compiler_options"] == {"xla_gpu_enable_dynamic_slice_fusion": False}


def test_plot_results_from_the_committed_json(tmp_path):
    """eval.plot_results draws every figure from the committed H200 results."""
    pytest.importorskip("matplotlib")
    from eval import plot_results
    assert plot_results.main(["--out", str(tmp_path)]) == 0
    for name in ("inference_h200.png", "grouped_matmul_h200.png", "grouped_matmul_h200.3b.png",
                 "grouped_matmul_h200.8b.png", "train_h200_diagonal.png", "generate_h200.png",
                 "grouped_matmul_h200.parity.png", "grouped_matmul_h200.parity_off_full_load.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (tmp_path / "grouped_matmul_h200.parity.md").read_text()
    assert "## Against cuBLAS, G = 16" in table and "## Against the XLA path, G = 16" in table
    assert "forward and dx: median at or above cuBLAS on" in table
    assert "## Against cuBLAS under sustained load, G = 16" in table
    assert "| 8b down dx | s21_sustained_orders2 | auto@gm12 |" in table
    with pytest.raises(ValueError, match="no main-run rows for model '70b'"):
        plot_results.plot_grouped_matmul({"rows": []}, tmp_path / "x.png", model="70b")
    with pytest.raises(ValueError, match="no training rows"):
        plot_results.plot_train({"rows": []}, tmp_path / "y.png")
    with pytest.raises(ValueError, match="at G = 16"):
        plot_results.plot_parity({"runs": {}}, tmp_path / "z.png")


def test_parity_points_take_todays_config_and_cublas():
    """eval.plot_results.parity_points: a run's product counts where it timed XLA's plain einsum
    and a kernel config equal to today's select_config choice (by the rows' device times; a dx
    product's choice is the one for the transposed weights; a config written before a field
    existed takes that field's default); other configs, configs that ran the cooperative
    schedule on JAX's pipelines (rows written with chain_tiles, without ring=True), partial
    loads and the transposed forward (no schedule's product) are left out."""
    import dataclasses

    from eval.plot_results import config_fields, parity_points, parity_table
    from kernels.tuning import (DEFAULT_CONFIG, PINGPONG_CONFIG, WIDE_CLUSTER_N_CONFIG,
                                WIDE_THREE_WG_CONFIG, select_config)

    def row(shape, m, k, n, name, config, us, active=16, model="1b"):
        return {"model": model, "shape": shape, "m": m, "k": k, "n": n, "G": 16, "active": active,
                "config": config if isinstance(config, str) else str(config) if config else "",
                "note": f"ab {name} | device {us} us/call = 1 TF/s: kernel {us} us"}

    def written_before_s14(config, ring):
        """``config`` as a run wrote it while the cooperative schedule had two implementations."""
        return str(config)[:-1] + f", chain_tiles=True, ring={ring})"

    wide, cluster = WIDE_THREE_WG_CONFIG, WIDE_CLUSTER_N_CONFIG
    assert select_config(16, 1152, 2048, 3072, num_sms=132) == wide
    assert select_config(16, 1152, 2048, 8192, transpose_rhs=True, num_sms=132) == DEFAULT_CONFIG
    assert select_config(16, 4224, 4096, 28672, num_sms=132) == cluster
    no_epi_slots = str(DEFAULT_CONFIG).replace(", epi_slots=2", "")   # before that field
    assert no_epi_slots != str(DEFAULT_CONFIG)
    rows = [row("qkv", 1152, 2048, 3072, "auto", wide, 300),
            row("qkv", 1152, 2048, 3072, "wg3_192x192", written_before_s14(wide, True), 310),
            row("qkv", 1152, 2048, 3072, "auto", written_before_s14(wide, False), 100),
            row("qkv", 1152, 2048, 3072, "delay0", dataclasses.replace(wide, delay_release=0), 90),
            row("qkv", 1152, 2048, 3072, "xla_einsum", None, 294),
            row("down dx", 1152, 2048, 8192, "default", no_epi_slots, 800),
            row("down dx", 1152, 2048, 8192, "xla_einsum", None, 808),
            row("o", 1152, 2048, 2048, "auto", wide, 50, active=4),
            row("o", 1152, 2048, 2048, "xla_einsum", None, 200, active=4),
            row("gate_up", 4224, 4096, 28672, "auto", written_before_s14(cluster, False), 20000,
                model="8b"),
            row("gate_up", 4224, 4096, 28672, "wg3_192x192_cn", cluster, 22000, model="8b"),
            row("gate_up", 4224, 4096, 28672, "xla_einsum", None, 21800, model="8b"),
            row("down", 4224, 14336, 4096, "auto", written_before_s14(DEFAULT_CONFIG, False),
                10000, model="8b"),
            row("down", 4224, 14336, 4096, "xla_einsum", None, 10900, model="8b"),
            row("qkv fwd_t", 3072, 2048, 1152, "auto", select_config(16, 3072, 2048, 1152), 90),
            row("qkv fwd_t", 3072, 2048, 1152, "xla_einsum", None, 80)]
    report = {"runs": {"r1": {"date": "2026-11-29T17:00", "code": "abc", "rows": rows}}}
    got = {p["product"]: p["speedup"] for p in parity_points(report)}
    assert got == pytest.approx({"1b qkv": 294 / 305, "1b down dx": 808 / 800,
                                 "8b gate_up": 21800 / 22000})
    # against the library's XLA path ("xla" rows), where a run timed it
    rows += [row("qkv", 1152, 2048, 3072, "xla", None, 366),
             row("down", 4224, 14336, 4096, "xla", None, 12000, model="8b")]
    got = {p["product"]: p["speedup"] for p in parity_points(report, baseline="xla")}
    assert got == pytest.approx({"1b qkv": 366 / 305})
    # the same points as tables: median and range per product, the count at or above
    table = parity_table(report, groups=(16, 1))
    assert "## Against cuBLAS, G = 16\n" in table and "## Against cuBLAS, G = 1\n" not in table
    assert f"| 1b qkv | 1 | {294 / 305:.3f} | {294 / 305:.3f}-{294 / 305:.3f} | r1 |" in table
    assert "| 1b o | 0 | not timed | | |" in table
    assert ("forward and dx: median at or above cuBLAS on 1 of the 3 timed products, at or "
            f"above 0.99 on 2 (lowest: 1b qkv, {294 / 305:.3f})") in table
    against_xla_path = table.split("## Against the XLA path, G = 16\n")[1]
    assert f"| 1b qkv | 1 | {366 / 305:.3f} |" in against_xla_path
    assert ("forward and dx: median at or above the XLA path on 1 of the 1 timed products"
            in against_xla_path)
    assert ("(16 x 1152 x 2048 -> 3072 / 2048, forward; its bar: >= 1.2): "
            f"1b qkv {366 / 305:.3f}") in against_xla_path
    assert config_fields("") is None
    assert config_fields(no_epi_slots) == config_fields(str(DEFAULT_CONFIG))
    # the ping-pong kernel is the same before and after
    assert config_fields(written_before_s14(PINGPONG_CONFIG, False)) == config_fields(
        str(PINGPONG_CONFIG))
    # but a ping-pong row written before early_turn existed passed the turn late
    late = str(PINGPONG_CONFIG).replace(", early_turn=True", "")
    assert late != str(PINGPONG_CONFIG)
    assert config_fields(late) == config_fields(str(dataclasses.replace(PINGPONG_CONFIG,
                                                                        early_turn=False)))
    assert config_fields(late) != config_fields(str(PINGPONG_CONFIG))
    # while a cooperative row from before then is today's config
    assert config_fields(str(cluster).replace(", early_turn=True", "")) == config_fields(
        str(cluster))
    # a row that ran a since-removed option (L2 prefetches) is no config of today's, but one
    # that wrote the option off is
    with_field = lambda v: str(DEFAULT_CONFIG)[:-1] + f", l2_prefetch_steps={v})"
    assert config_fields(with_field(0)) == config_fields(str(DEFAULT_CONFIG))
    assert config_fields(with_field(4)) != config_fields(str(DEFAULT_CONFIG))


def test_profile_names_the_source_of_each_kernel():
    """eval.profile.kernel_sources: a fusion of the compiled HLO is labelled with the library's
    source lines of the operations inside it (via the module's stack-frame tables)."""
    import inspect

    import jax
    import jax.numpy as jnp

    from armt_jax.layers import rms_norm
    from eval.profile import kernel_sources

    def f(x, w):
        return jnp.cos(rms_norm(x, w, 1e-5))

    compiled = jax.jit(f).lower(jnp.ones((8, 64)), jnp.ones((64,))).compile()
    sources = kernel_sources(compiled.as_text())
    norm_line = inspect.getsourcelines(rms_norm)[1]
    assert any("rms_norm" in text and "layers.py:" in text for text in sources.values()), sources
    lines = {int(part.split(":")[1].split()[0]) for text in sources.values()
             for part in text.split("; ") if part.startswith("layers.py:")}
    assert lines and all(norm_line <= line < norm_line + 10 for line in lines), (lines, norm_line)


def test_grouped_matmul_ab_compare_on_cpu():
    """eval/bench_grouped_matmul.py --ab: an interpret-mode kernel config, the XLA path, XLA's
    plain einsum and the fused / unfused SwiGLU product are checked, timed in rounds and
    tabulated; a config that cannot serve the shape is reported as a failure instead of stopping
    the comparison."""
    import jax

    import eval.bench_grouped_matmul as gmm
    from kernels import grouped_matmul_mgpu, ops

    configs = {"interp": ops.INTERPRET_CONFIG,
               "too_wide": grouped_matmul_mgpu.TuningConfig(tile_n=256)}  # 512 > n = 256
    rows, failures = [], []
    gmm.ab_compare([("smoke", "a", 72, 128, 256)],
                   ["interp", "too_wide", "xla_einsum", "swiglu", "swiglu#2", "swiglu_unfused"],
                   4, 2, 1.0, jax.random.key(0), rows, failures, g=4, configs=configs,
                   impl="interpret")
    by_config = {r.note[3:]: r for r in rows}
    assert set(by_config) == {"xla", "interp", "xla_einsum", "swiglu", "swiglu#2",
                              "swiglu_unfused"}
    assert by_config["swiglu#2"].impl == "interpret"
    assert by_config["interp"].impl == "interpret" and by_config["xla_einsum"].impl == "xla"
    assert all(r.seconds > 0 and r.tflops_range[0] <= r.tflops <= r.tflops_range[1]
               for r in rows)
    assert len(failures) == 1 and "too_wide" in failures[0]
    table = gmm.markdown_ab(rows)
    assert "| smoke | a 72x128x256 | 4 of 4 | interp |" in table
    assert table.count("\n") == 7   # header, rule, six rows
    # the backward products and the transposed forward (transposed operand views): checked
    # against the XLA path too
    rows, failures = [], []
    gmm.ab_compare([("smoke", "a", 136, 128, 256)],
                   ["interp", "auto", "auto#2", "xla_einsum", "swiglu"], None, 1, 1.0,
                   jax.random.key(1), rows, failures, g=2, configs=configs, impl="interpret",
                   products=("dx", "dw", "fwd_t"))
    assert not failures, failures
    got = {(r.shape, r.m, r.k, r.n, r.note[3:]) for r in rows}
    assert got == {(f"a {p}", *dims, c) for p, dims in (("dx", (136, 256, 128)),
                                                         ("dw", (128, 136, 256)),
                                                         ("fwd_t", (256, 128, 136)))
                   for c in ("xla", "interp", "auto", "auto#2", "xla_einsum")}, got
    # "auto#2" is "auto" timed a second time: the same config, its own row
    config_of = {(r.shape, r.note[3:]): r.config for r in rows}
    assert config_of["a dx", "auto#2"] == config_of["a dx", "auto"] != ""


def test_device_summary_takes_the_median_trace():
    """--ab_profile's note: the median round's device time and its longest kernels, the range
    over the rounds; the note's figure is what device_us (and so the parity figure) reads."""
    import eval.bench_grouped_matmul as gmm

    rounds = [{"kernel": 300e-6, "concat": 1e-6}, {"kernel": 280e-6, "concat": 1e-6},
              {"kernel": 350e-6, "concat": 2e-6}]
    text, median, fastest, slowest = gmm.device_summary(rounds, flops=2.81e8)
    assert (round(median * 1e6), round(fastest * 1e6), round(slowest * 1e6)) == (301, 281, 352)
    assert text.startswith("device 301 us/call (281-352 over 3 traces) = 1 TF/s: kernel 300 us")
    assert gmm.device_us("ab auto | " + text) == 301


def test_probe_tile_overhead_needs_a_gpu():
    """eval/probe_tile_overhead.py times the Hopper kernel: off a GPU it stops with a message
    saying so, before any work."""
    import jax

    import eval.probe_tile_overhead as probe

    if jax.devices()[0].platform == "gpu":
        pytest.skip("on a GPU the probe runs")
    with pytest.raises(SystemExit, match="needs a GPU"):
        probe.main()


def test_probe_ring_needs_a_gpu():
    """eval/probe_ring.py times the ring kernel with and without its loads and wgmma: off a GPU
    it stops with a message saying so, before any work."""
    import jax

    import eval.probe_ring as probe

    if jax.devices()[0].platform == "gpu":
        pytest.skip("on a GPU the probe runs")
    with pytest.raises(SystemExit, match="needs a GPU"):
        probe.main([])
    with pytest.raises(SystemExit) as stop:   # argparse (status 2): --rounds must be >= 1
        probe.main(["--rounds", "0"])
    assert stop.value.code == 2


def test_ptxas_report_reads_registers_and_spills():
    """eval/ptxas_report.py: registers and spill bytes from ptxas' verbose lines (every kernel
    of a compile, comma-joined; "?" where ptxas said nothing); off a GPU it stops, saying so."""
    import jax

    import eval.ptxas_report as report

    text = ("ptxas info    : Compiling entry function 'mosaic_gpu_body' for 'sm_90a'\n"
            "ptxas info    : Used 168 registers, used 1 barriers\n"
            "ptxas info    : 16 bytes stack frame, 212 bytes spill stores, 180 bytes spill loads\n")
    assert report.ptxas_lines(text) == ("168", "212/180")
    assert report.ptxas_lines("") == ("?", "?")
    if jax.devices()[0].platform != "gpu":
        with pytest.raises(SystemExit, match="needs one"):
            report.main(["--configs", "auto"])


def test_gpu_session_names_only_known_configs():
    """Every config name eval/gpu_session.sh passes to the grouped-matmul benchmark (--ab lists,
    C= lists, wg3_variants' configs) or to ncu_products.py / sustained_ab.py / probe_skinny.py
    (--configs; a tile-order suffix like @gm12 allowed) exists, so no stage dies on an unknown
    name mid-session (the benchmark refuses one up front: checked with a stale name)."""
    import re

    from eval.bench_grouped_matmul import SWEEP, SWIGLU_VARIANTS, main
    from eval.probe_skinny import CONFIGS as SPLIT_K_CONFIGS

    known = {*SWEEP, "auto", "xla_einsum", *SWIGLU_VARIANTS, *SPLIT_K_CONFIGS}
    script = (Path(__file__).parents[1] / "eval" / "gpu_session.sh").read_text()
    lists = [*re.findall(r"--ab ([\w#,$]+)", script), *re.findall(r"\bC=([\w#,$]+)", script),
             *re.findall(r'wg3_variants \w+ "[^"]*" ([\w,]+)', script),
             *re.findall(r"--configs ([\w#@,$]+)", script),
             *re.findall(r"(?m)^[^#\n]*ncu_profile \w+ \S+ ([\w@,]+)", script)]
    names = {n for lst in lists for n in lst.split(",") if not n.startswith("$")}
    assert len(names) > 10 and "auto" in names and "default" in names
    base = lambda n: re.sub(r"@g[nm]\d+$", "", n.split("#")[0])
    assert sorted(n for n in names if base(n) not in known) == []
    with pytest.raises(SystemExit):
        main(["--ab", "auto,ring", "--models", ""])


def test_per_call_seconds_takes_the_median_call():
    """eval/bench_grouped_matmul.per_call_seconds: a kernel's device time per call is the
    median over calls of its launches in each call, so one slow call in a trace does not move
    it (a mean would: 10 calls of 300 us and one of 3000 us read 545 us); launches of unlike
    sizes within a call add up; launches that do not divide into the calls: their mean."""
    from eval.bench_grouped_matmul import per_call_seconds

    rng = np.random.default_rng()
    base = float(rng.uniform(1e-4, 1e-3))
    times = {"gemm": [base] * 10 + [10 * base],                # 11 calls, one slow
             "select": [base / 4, base / 4, base / 2] * 11,    # 3 unlike launches per call
             "odd": [base] * 5}                                # 5 launches in 11 calls
    got = per_call_seconds(times, 11)
    assert got == pytest.approx({"gemm": base, "select": base, "odd": 5 * base / 11})


def test_reproducibility_summary_counts_outcomes_and_differing_choices():
    """eval.reproducibility's report: distinct first steps per variant, whether the second call
    repeated the first, which autotune entries and weight leaves differ between processes."""
    import argparse

    from eval.reproducibility import parse_variant, summarize
    run = lambda loss, fp: {"loss": loss, "grad_norm": 1.0, "fingerprint": {"['w']": fp, "['b']": 7}}
    results = [
        {"variant": "default", "process": 0, "runs": [run(1.0, 1), run(1.0, 2)],
         "autotune": {"a.pb": "x", "b.pb": "y"}},
        {"variant": "default", "process": 1, "runs": [run(1.5, 3), run(1.5, 3)],
         "autotune": {"a.pb": "x", "b.pb": "z"}},
        {"variant": "det", "process": 0, "runs": [run(2.0, 5)] * 2, "autotune": {}},
        {"variant": "det", "process": 1, "runs": [run(2.0, 5)] * 2, "autotune": {}},
    ]
    text = summarize(results)
    assert "default: 2 processes, 2 distinct first steps, repeat in-process identical: False" in text
    assert "differing between processes: 1" in text and "b.pb: y, z" in text
    assert "process 1 vs 0: 1 of 2 weight leaves differ: ['w']" in text
    assert "det: 2 processes, 1 distinct first steps, repeat in-process identical: True" in text
    assert parse_variant("det=--xla_gpu_deterministic_ops=true") == (
        "det", "--xla_gpu_deterministic_ops=true")
    assert parse_variant("plain=") == ("plain", "")
    for bad in ("--xla_flag", "--xla_gpu_deterministic_ops=true", "=--xla_flag"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=XLA_FLAGS"):
            parse_variant(bad)


def test_sustained_points_take_todays_config_and_cublas():
    """eval.plot_results.sustained_points: per sustained-load run and product, cuBLAS's median
    time per call over that of the config equal to today's select_config choice (the windows'
    "tuning"), whatever the run named it; other configs, and products without a cuBLAS window,
    are left out; the markdown section lists each point."""
    import dataclasses

    from eval.plot_results import sustained_points, sustained_table
    from kernels.tuning import DEFAULT_CONFIG, ROW_STRIPE_CONFIG

    def window(product, name, tuning, ms, clock=1400):
        return {"product": product, "config": name, "tuning": str(tuning) if tuning else "",
                "ms_per_call": ms, "clock_mhz": clock}

    gn4 = dataclasses.replace(DEFAULT_CONFIG, grid_tile_width=4)
    windows = [window("8b down dx", "auto", DEFAULT_CONFIG, 12.0),       # the order before
               window("8b down dx", "auto@gm12", ROW_STRIPE_CONFIG, 11.7, 1437),
               window("8b down dx", "auto@gm12", ROW_STRIPE_CONFIG, 11.6, 1437),
               window("8b down dx", "auto@gm12", ROW_STRIPE_CONFIG, 11.9, 1437),
               window("8b down dx", "auto@gn4", gn4, 11.5),
               window("8b down dx", "xla_einsum", None, 11.7, 1449),
               window("8b down dx", "xla_einsum", None, 11.8, 1449),
               window("3b down", "auto", DEFAULT_CONFIG, 2.6),
               window("3b down", "xla_einsum", None, 2.63),
               window("8b o", "auto@gm12", ROW_STRIPE_CONFIG, 3.4)]    # no cuBLAS window
    report = {"runs": {"s": {"code": "abc", "windows": windows}}}
    got = {p["product"]: p for p in sustained_points(report)}
    assert set(got) == {"8b down dx", "3b down"}
    assert got["8b down dx"]["speedup"] == pytest.approx(11.75 / 11.7)
    assert got["8b down dx"]["config"] == "auto@gm12" and got["8b down dx"]["rounds"] == 3
    assert (got["8b down dx"]["clock_mhz"], got["8b down dx"]["base_clock_mhz"]) == (1437, 1449)
    assert got["3b down"]["speedup"] == pytest.approx(2.63 / 2.6)
    table = sustained_table(sustained_points(report))
    assert f"| 8b down dx | s | auto@gm12 | {11.75 / 11.7:.3f} | 3 | 1437 | 1449 |" in table
    assert ("forward and dx: at or above cuBLAS in every run on 2 of the 2 timed products, at or"
            f" above 0.99 on 2 (lowest: 8b down dx, {11.75 / 11.7:.3f}-{11.75 / 11.7:.3f})") in table
    # a product counts by its slowest run; no dw product timed: no dw line
    slow = {"code": "abd", "windows": [window("3b down", "auto", DEFAULT_CONFIG, 2.65),
                                       window("3b down", "xla_einsum", None, 2.63)]}
    table = sustained_table(sustained_points({"runs": {"s": report["runs"]["s"], "t": slow}}))
    assert (f"on 1 of the 2 timed products, at or above 0.99 on 2 (lowest: 3b down,"
            f" {2.63 / 2.65:.3f}-{2.63 / 2.6:.3f})") in table and "\ndw:" not in table


def test_ncu_kernels_are_labelled_in_launch_order():
    """eval/ncu_products.label_kernels: each manifest entry takes the first profiled kernel
    after the previous entry's whose name matches its pattern, so helper kernels between them
    (a fusion beside the Mosaic GPU kernel) and repeated names map right; an entry with no
    match is left out, not given a later entry's kernel."""
    from eval.ncu_products import label_kernels

    kernels = [{"Kernel Name": n, "ID": str(i)} for i, n in enumerate(
        ["input_concatenate_fusion", "anonymous_mosaic_gpu_kernel", "nvjet_sm90_tst_x",
         "anonymous_mosaic_gpu_kernel", "nvjet_sm90_tst_y"])]
    manifest = [{"product": "8b down dx", "config": "auto", "kernel": "mosaic"},
                {"product": "8b down dx", "config": "xla_einsum", "kernel": "nvjet|gemm"},
                {"product": "8b down", "config": "auto", "kernel": "mosaic"},
                {"product": "8b down", "config": "auto@gm12", "kernel": "mosaic"},
                {"product": "8b down", "config": "xla_einsum", "kernel": "nvjet|gemm"}]
    got = [(label, k["ID"]) for label, k in label_kernels(kernels, manifest)]
    assert got == [("8b down dx / auto", "1"), ("8b down dx / xla_einsum", "2"),
                   ("8b down / auto", "3"), ("8b down / xla_einsum", "4")]


def test_ncu_sass_summary_ranks_instructions_by_samples(tmp_path, capsys):
    """eval/ncu_products.summarize_sass (the source page exported as CSV, gzipped): per kernel,
    instructions by sampled stalls, largest first, with their share of the kernel's samples and
    main reasons; samples without a per-reason column (waits on the wgmma unit) show as
    "unlisted"; two kernels of one name stay apart."""
    import gzip

    from eval.ncu_products import summarize_sass

    rng = np.random.default_rng()
    header = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
              '"stall_long_sb","stall_barrier","stall_long_sb (Not Issued)"')
    waits, mma, depbar = (int(v) for v in rng.choice(np.arange(10, 1000), 3, replace=False))
    unlisted = int(rng.integers(1, mma))
    kernel = lambda name, rows: f'"Kernel Name","{name}",\n{header}\n' + "".join(
        f'"{hex(0x7f00 + 16 * i)}","{src}","{n}","64","{lsb}","{bar}","0"\n'
        for i, (src, n, lsb, bar) in enumerate(rows))
    text = (kernel("mosaic", [("BRA 0x1", waits, waits, 0), ("HGMMA.64x128x16", mma, 0,
                                                                 mma - unlisted),
                              ("DEPBAR", depbar, 0, depbar)])
            + kernel("mosaic", [("NOP", 5, 5, 0)]))
    path = tmp_path / "sass.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    summarize_sass(str(path))
    out = capsys.readouterr().out
    first, second = out.split("mosaic: ")[1:]
    total = waits + mma + depbar
    assert first.startswith(f"samples {total}, instructions 3")
    lines = [ln for ln in first.splitlines() if ln.startswith("| ") and "`" in ln]
    order = sorted([(waits, "BRA"), (mma, "HGMMA"), (depbar, "DEPBAR")], reverse=True)
    assert [ln.split("`")[1].split()[0].split(".")[0] for ln in lines] == [n for _, n in order]
    hgmma = next(ln for ln in lines if "HGMMA" in ln)
    assert f"| 10 | 64 | {mma} | {100 * mma / total:.1f} % |" in hgmma
    assert f"unlisted {unlisted}" in hgmma and "long_sb" not in hgmma
    assert second.startswith("samples 5, instructions 1") and "long_sb 5" in second


def test_full_load_calls_parse_check_and_report():
    """eval/bench_grouped_matmul.full_load_calls (the profiling scripts' products): a spec names
    a diagonal product ("1b:o:dx"), an unknown one stops with the known shapes; cuBLAS's call
    computes the product like the XLA path; a config that cannot run here (the Pallas kernel on
    a CPU) is reported with its error, not timed."""
    import jax

    from eval.bench_grouped_matmul import full_load_calls

    with pytest.raises(SystemExit, match="8b:down"):
        full_load_calls("8b:downn:dx", ["xla_einsum"], jax.random.PRNGKey(0))
    label, (a, b, lo, hi), calls, failed = full_load_calls(
        "1b:o:dx", ["xla_einsum", "auto@gm12"], jax.random.PRNGKey(0), g=1)
    assert label == "1b o dx" and a.shape == (1, 1152, 2048) and b.shape == (1, 2048, 2048)
    assert list(calls) == ["xla_einsum"] and calls["xla_einsum"][1] == ""
    want = np.einsum("gmn,gkn->gmk", np.asarray(a, np.float32), np.asarray(b, np.float32))
    got = np.asarray(calls["xla_einsum"][0](a, b, lo, hi), np.float32)
    assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)
    assert [name for name, _ in failed] == ["auto@gm12"] and failed[0][1]


def test_sustained_windows_and_summary():
    """eval/sustained_ab.py on a CPU: a window runs its call back to back for about the asked
    seconds, the sampler's clock and power over the window's settled part (samples before
    SETTLE_S and after the window left out) give the cycles and energy per call; the summary
    gives cuBLAS's median time over each config's; a traced stretch gives the wall time per
    call (and on a GPU the device time)."""
    import time

    import jax

    from eval import sustained_ab

    fn, x = jax.jit(lambda x: x @ x), jax.numpy.ones((64, 64))
    sampler = object.__new__(sustained_ab.GpuSampler)   # no nvidia-smi here: planted samples
    now = time.perf_counter()
    sampler.samples = [(now + t, clock, power, 50.0) for t, clock, power in
                       [(0.1, 1900, 300), (sustained_ab.SETTLE_S + 0.25, 1400, 700),
                        (sustained_ab.SETTLE_S + 0.35, 1500, 690), (60.0, 100, 100)]]
    row = sustained_ab.run_window(fn, (x,), 1.0, sampler)
    assert row["calls"] >= 8 and row["calls"] % 8 == 0
    assert (row["clock_mhz"], row["power_w"], row["samples"]) == (1450, 695, 2)
    assert row["mcycles_per_call"] == pytest.approx(row["ms_per_call"] * 1.45)
    assert row["joules_per_call"] == pytest.approx(row["ms_per_call"] * 0.695)
    with pytest.raises(RuntimeError, match="no nvidia-smi samples"):
        sampler.window(now + 100, now + 101)
    rows = [{"product": "8b down", "config": c, "ms_per_call": ms, "clock_mhz": 1400,
             "power_w": 690, "mcycles_per_call": 1, "joules_per_call": 1}
            for c, ms in [("auto", 11.5), ("xla_einsum", 11.6), ("auto", 11.7),
                          ("xla_einsum", 11.8), ("auto", 11.6), ("xla_einsum", 11.7)]]
    table = sustained_ab.summarize(rows)
    assert "| 8b down | auto | 11.600 | 11.500-11.700 | 1400 | 690 |" in table
    assert f"| {11.7 / 11.6:.3f} | 3 |" in table
    # a traced stretch: wall time per call always; device time only where the trace holds
    # device kernels (none on a CPU)
    trace = sustained_ab.traced_window(fn, (x,), 16)
    assert trace["traced_calls"] == 16 and 0 < trace["traced_ms_per_call"] < 1e3
    if jax.devices()[0].platform == "cpu":
        assert trace["device_ms_per_call"] is None
    else:
        assert 0 < trace["device_ms_per_call"] <= 1.5 * trace["traced_ms_per_call"]


def test_chained_products_run_in_sequence_in_one_call():
    """sustained_ab.chained: k products in one jitted call, each one's operands tied to the
    previous result by an optimization barrier, so XLA keeps all k (no common-subexpression
    merge of the identical calls) and the result is the product's; compiled_calls compiles a
    chain before the windows; a window of chained calls reports the time per product."""
    import time

    import jax

    from eval import sustained_ab

    rng = np.random.default_rng()
    a, b = (jax.numpy.asarray(rng.standard_normal((48, 48)), jax.numpy.float32) for _ in "ab")
    fn = jax.jit(lambda a, b: a @ b)
    want = np.asarray(a) @ np.asarray(b)
    for k in (1, 3):
        run = sustained_ab.chained(fn, k)
        out, check = run(a, b)
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
        assert float(check) == pytest.approx(k * want[0, 0], rel=1e-5)
        hlo = run.lower(a, b).compile().as_text()
        assert hlo.count(" dot(") == k, (k, hlo)   # neither merged nor dropped
    with pytest.raises(ValueError, match="at least 1"):
        sustained_ab.chained(fn, 0)
    sampler = object.__new__(sustained_ab.GpuSampler)
    now = time.perf_counter()   # planted samples every 50 ms over the two windows
    sampler.samples = [(now + 0.05 * i, 1400, 700, 50.0) for i in range(60)]
    # the windows' calls, compiled before any window (a chain is a new jitted function)
    fns = sustained_ab.compiled_calls({"mm": (fn, None)}, (a, b), 3)
    assert fns["mm"]._cache_size() == 1
    assert sustained_ab.compiled_calls({"mm": (fn, None)}, (a, b))["mm"] is fn
    one = sustained_ab.run_window(fn, (a, b), 0.5, sampler)
    three = sustained_ab.run_window(fns["mm"], (a, b), 0.5, sampler, 3)
    for row, per_call in ((one, 1), (three, 3)):   # per product: times x products = window
        assert row["calls"] % 8 == 0
        assert 0.5 <= row["ms_per_call"] * row["calls"] * per_call / 1e3 < 1.0, (per_call, row)
    trace = sustained_ab.traced_window(fns["mm"], (a, b), 8, 3)
    assert trace["traced_calls"] == 8 and trace["traced_ms_per_call"] > 0
    if jax.devices()[0].platform != "cpu":   # 3 products and the sum per dispatch
        assert trace["launches_per_call"] >= 3
