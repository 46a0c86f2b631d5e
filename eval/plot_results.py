"""Plots of the committed H200 results (needs matplotlib: `pip install -e ".[plot]"`).

* inference_h200.png: seconds per forward and model TFLOP/s against input length, every schedule
  (eval/results/inference_h200.json);
* grouped_matmul_h200.png: time per call against active groups (of G = 16), kernel vs the XLA
  path, one panel per Llama-1B diagonal shape, with XLA's plain batched matmul at full load
  (eval/results/grouped_matmul_h200.json);
* grouped_matmul_h200.3b.png, .8b.png: the same for the Llama-3B and 8B shapes
  (eval/results/grouped_matmul_h200.big.json);
* train_h200_diagonal.png: seconds per training step at each length, the sequential and the
  diagonal schedule with XLA and kernel grouped matmuls (the kernels only at 32768 and 65536
  tokens; eval/results/train_h200_diagonal.json);
* generate_h200.png: seconds to the first token against the context length per schedule,
  with XLA's attention dashed, and ms per decoded token, the run before the split-k decode
  dotted (eval/results/generate_h200.json, generate_h200_xla_attention.json,
  generate_h200_c4e0048.json);
* grouped_matmul_h200.parity.png: the kernel's speed over cuBLAS's (XLA's plain batched matmul)
  on every diagonal product at full load, one dot per profiled A/B run that timed today's
  `select_config` choice for it (eval/results/grouped_matmul_h200.ab.json);
* grouped_matmul_h200.parity_off_full_load.png: the same at G = 1, 2, 4, 8;
* grouped_matmul_h200.parity.md: those figures' points as tables (per product: timings,
  median, range; a count of the products at or above cuBLAS), and the same against the
  library's own XLA path (``impl="xla"``: the einsum and the select that zeroes idle groups).

    python -m eval.plot_results                 # reads and writes eval/results/
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULE_STYLE = {  # schedule: (label, colour, marker)
    "full_attention": ("full attention (cuDNN)", "tab:gray", "s"),
    "sequential": ("ARMT sequential", "tab:blue", "o"),
    "diagonal": ("ARMT diagonal, XLA matmuls", "tab:orange", "^"),
    "diagonal_pallas": ("ARMT diagonal, Pallas kernels", "tab:red", "v"),
}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _log2_ticks(ax, values, labels):
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, labels)
    ax.minorticks_off()


def _length_axes(axes, lengths, label: str) -> None:
    """Token-count x axes: log2 ticks labelled in k, a label, a grid."""
    for ax in axes:
        _log2_ticks(ax, lengths, [f"{n // 1024}k" for n in lengths])
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)


def plot_inference(report: dict, path: Path) -> None:
    plt = _pyplot()
    rows = report["rows"]
    fig, (ax_time, ax_rate) = plt.subplots(1, 2, figsize=(11, 4.2))
    for schedule, (label, colour, marker) in SCHEDULE_STYLE.items():
        mine = sorted((r for r in rows if r["schedule"] == schedule), key=lambda r: r["tokens"])
        if not mine:
            continue
        tokens = [r["tokens"] for r in mine]
        ax_time.plot(tokens, [r["seconds"] for r in mine], marker=marker, color=colour, label=label)
        ax_rate.plot(tokens, [r["tflops"] for r in mine], marker=marker, color=colour, label=label)
    _length_axes((ax_time, ax_rate), sorted({r["tokens"] for r in rows}), "input tokens")
    ax_time.set_yscale("log")
    ax_time.set_ylabel("seconds per forward")
    ax_time.set_title("Forward time (Llama-3.2-1B shapes, batch 1)")
    ax_rate.set_ylabel("model TFLOP/s")
    ax_rate.set_title("Model FLOP rate")
    ax_time.legend(fontsize=8)
    device = rows[0].get("device", "GPU") if rows else "GPU"
    fig.suptitle(f"{device}, jax {rows[0].get('jax', '?') if rows else '?'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grouped_matmul(report: dict, path: Path, model: str = "1b", groups: int = 16) -> None:
    plt = _pyplot()
    rows = [r for r in report["rows"]
            if r["model"] == model and r["G"] == groups and not r["note"]]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes:
        raise ValueError(f"no main-run rows for model {model!r} with G = {groups}")
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.2 * len(shapes), 3.6), squeeze=False)
    styles = {"pallas": ("Pallas kernel", "tab:red", "v"),
              "xla": ("XLA path (einsum + select)", "tab:orange", "^")}
    for ax, shape in zip(axes[0], shapes, strict=True):
        mine = [r for r in rows if r["shape"] == shape]
        for impl, (label, colour, marker) in styles.items():
            pts = sorted((r["active"], r["seconds"] * 1e3) for r in mine if r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, color=colour, label=label)
        einsum = [r["seconds"] * 1e3 for r in mine if r["impl"] == "xla_einsum"]
        if einsum:
            ax.axhline(min(einsum), color="tab:gray", ls="--", lw=1,
                       label="XLA batched matmul, all groups")
        r0 = mine[0]
        ax.set_title(f"{shape}: {r0['m']}x{r0['k']}x{r0['n']}", fontsize=9)
        actives = sorted({r["active"] for r in mine})
        _log2_ticks(ax, actives, [str(a) for a in actives])
        ax.set_xlabel(f"active groups of {groups}")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("ms per call (wall clock)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"Grouped matmul, Llama-{model.upper()} diagonal shapes, G = {groups}"
                 f" ({report.get('device', '')}, jax {report.get('jax_version', '?')},"
                 f" {str(report.get('date', ''))[:10]})", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_train(report: dict, path: Path) -> None:
    """Grouped bars: one group per length, one bar per (schedule, gmm_impl), seconds per step."""
    plt = _pyplot()
    rows = report["rows"]
    variants = list(dict.fromkeys((r.get("schedule", "sequential"), r["gmm_impl"]) for r in rows))
    lengths = sorted({r["tokens"] for r in rows})
    if not variants:
        raise ValueError("no training rows to plot")
    colours = {("sequential", "xla"): "tab:blue", ("sequential", "auto"): "tab:cyan",
               ("diagonal", "xla"): "tab:orange", ("diagonal", "auto"): "tab:red"}
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.8), squeeze=False)
    for ax, n in zip(axes[0], lengths, strict=True):
        def row(schedule, impl):
            return next((r for r in rows if r["tokens"] == n and r["gmm_impl"] == impl
                         and r.get("schedule", "sequential") == schedule), None)

        for i, v in enumerate(variants):
            r = row(*v)
            if r is None:
                continue
            # The label compares the schedules on the same matmuls (the long runs time only the
            # kernels' path).
            base = (row("sequential", v[1]) or {}).get("seconds")
            name = f"{v[0]}, {'kernels' if v[1] == 'auto' else v[1]}"
            ax.bar(i, r["seconds"], color=colours.get(v, "tab:gray"), label=name)
            lo, hi = min(r["runs"]), max(r["runs"])
            ax.errorbar(i, r["seconds"], yerr=[[r["seconds"] - lo], [hi - r["seconds"]]],
                        color="black", capsize=3, lw=1)
            if base:
                ax.annotate(f"{base / r['seconds']:.2f}x", (i, hi), ha="center",
                            va="bottom", fontsize=8, xytext=(0, 4), textcoords="offset points")
        ax.set_xticks([])
        ax.set_title(f"{n} tokens x {rows[0]['batch']}", fontsize=9)
        ax.set_ylim(0, 1.15 * max(max(r["runs"]) for r in rows if r["tokens"] == n))
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("seconds per training step (median, min-max)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"Training step, Llama-3.2-1B shapes, bf16 ({rows[0].get('device', '')},"
                 f" jax {rows[0].get('jax', '?')}, {str(rows[0].get('date', ''))[:10]});"
                 " labels: speed vs the sequential schedule on the same matmuls", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_generate(report: dict, path: Path, xla_attention: dict | None = None,
                  earlier: dict | None = None) -> None:
    """Time to the first token against the context length per schedule (with the same run under
    XLA's attention dashed, where given), and ms per decoded token (eval/bench_generate.py),
    with an earlier run's decode dotted where given (its "code" names it)."""
    plt = _pyplot()
    rows = [r for r in report["rows"] if r["batch"] == 1]
    if not rows:
        raise ValueError("no batch-1 generation rows to plot")
    fig, (ax_first, ax_decode) = plt.subplots(1, 2, figsize=(11, 4.2))
    xla_rows = [r for r in (xla_attention or {}).get("rows", []) if r["batch"] == 1]
    for schedule, (label, colour, marker) in SCHEDULE_STYLE.items():
        for source, style, suffix in ((rows, "-", ""), (xla_rows, "--", ", XLA attention")):
            mine = sorted((r for r in source if r["schedule"] == schedule),
                          key=lambda r: r["context"])
            if not mine:
                continue
            contexts = [r["context"] for r in mine]
            ax_first.plot(contexts, [r["first_token_s"] for r in mine], style, marker=marker,
                          color=colour, label=label + suffix)
            if source is rows:
                ax_decode.plot(contexts, [r["ms_per_token"] for r in mine], marker=marker,
                               color=colour, label=label)
    for schedule, (label, colour, marker) in SCHEDULE_STYLE.items():
        mine = sorted((r for r in (earlier or {}).get("rows", [])
                       if r["batch"] == 1 and r["schedule"] == schedule), key=lambda r: r["context"])
        if mine:
            ax_decode.plot([r["context"] for r in mine], [r["ms_per_token"] for r in mine], ":",
                           marker=marker, color=colour, alpha=0.6,
                           label=f"{label}, {earlier.get('code', 'earlier run').split()[0]}")
    _length_axes((ax_first, ax_decode), sorted({r["context"] for r in rows}), "context tokens")
    ax_first.set_yscale("log")
    ax_first.set_ylabel("seconds to the first token")
    ax_first.set_title("Prefill + last segment + one token (batch 1)")
    ax_decode.set_ylim(0, 1.2 * max(r["ms_per_token"] for r in rows + (earlier or {}).get("rows", [])))
    ax_decode.legend(fontsize=7)
    ax_decode.set_ylabel("ms per decoded token")
    ax_decode.set_title("Decode (batch 1, greedy)")
    ax_first.legend(fontsize=7)
    fig.suptitle(f"Generation, Llama-3.2-1B shapes with the LM head, bf16 ({rows[0]['device']},"
                 f" jax {rows[0]['jax']}, {rows[0]['date'][:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Fields a run wrote that today's TuningConfig no longer has, with the value today's kernel runs:
# a row with another value ran a kernel that no longer exists.
REMOVED_FIELDS = {"l2_prefetch_steps": "0"}   # L2 prefetches ahead of the ring (4b3cc2c)


def config_fields(text: str) -> dict[str, str] | None:
    """The fields of the TuningConfig a result row ran (``str(config)``), comparable with
    today's configs; None for a row without one (XLA). A field an older run did not write
    (added since) takes its default, which that run ran, but for ``early_turn``: the ping-pong
    runs before it passed the turn late (``False``); the cooperative schedule ignores it. A row
    written while the cooperative schedule had a second implementation on JAX's pipelines (it
    wrote ``chain_tiles``) that ran there (neither ``ring=True`` nor ping-pong) gets
    ``"schedule": "JAX pipelines"``, so it equals no config of today's kernel; so does a row
    with a ``REMOVED_FIELDS`` field at another value than today's kernel runs."""
    from kernels.tuning import TuningConfig

    if not text.startswith("TuningConfig(") or not text.endswith(")"):
        return None
    written = dict(item.split("=", 1) for item in text[len("TuningConfig("):-1].split(", "))
    ran_before = {"early_turn": "False"}   # what a run that did not write the field ran
    fields = {f.name: written.get(f.name, ran_before.get(f.name, repr(f.default)))
              for f in dataclasses.fields(TuningConfig)}
    if fields["pingpong"] != "True":
        fields["early_turn"] = "unused"   # a ping-pong option: the cooperative kernel ignores it
    if "chain_tiles" in written and "True" not in (written.get("ring"), written.get("pingpong")):
        fields["schedule"] = "JAX pipelines"
    for name, today in REMOVED_FIELDS.items():
        if written.get(name, today) != today:
            fields["removed"] = f"{name}={written[name]}"
    return fields


# parity_points' baselines: the A/B rows' names for them, and how the tables call them.
BASELINES = {"xla_einsum": "cuBLAS", "xla": "the XLA path"}
# The forward products the issue asks >= 1.2x on (its "16 x 1152 x 2048 -> 2048 or 3072").
ATTENTION_BAR_PRODUCTS = ("1b qkv", "1b o")


def parity_points(report: dict, num_sms: int = 132, baseline: str = "xla_einsum") -> list[dict]:
    """Per A/B run and product at full load: the baseline's device time over the kernel's
    ("speedup"), where the run timed the baseline (BASELINES: "xla_einsum", XLA's plain einsum,
    which runs cuBLAS; or "xla", the library's XLA path, which adds the select that zeroes idle
    groups) and a kernel config equal to today's `select_config` choice for the product
    (`config_fields`; several such rows in one run: their mean time). Device times come from
    the rows' profiled notes ("device N us/call"); rows without one, and products no schedule
    runs (the transposed forward "fwd_t"), are skipped."""
    from eval.bench_grouped_matmul import device_us
    from kernels.tuning import select_config

    diagonal = set(_diagonal_products())
    points = []
    for run_name, run in report["runs"].items():
        products = {}
        for r in run["rows"]:
            us = device_us(r.get("note"))
            if us is None or r["active"] != r["G"]:
                continue
            name = r["note"].split(" | ")[0].removeprefix("ab ").strip()
            key = (r["model"], r["shape"], r["G"], r["m"], r["k"], r["n"])
            products.setdefault(key, []).append((name, r["config"], us))
        for (model, shape, g, m, k, n), timed in products.items():
            if f"{model} {shape}" not in diagonal:
                continue
            base = [us for name, _, us in timed if name == baseline]
            today = config_fields(str(select_config(
                g, m, k, n, transpose_lhs=shape.endswith(" dw"),
                transpose_rhs=shape.endswith(" dx"), num_sms=num_sms)))
            kernel = [us for name, config, us in timed if config_fields(config) == today]
            if base and kernel:
                points.append({"product": f"{model} {shape}", "G": g, "run": run_name,
                               "code": run.get("code"), "date": run.get("date", ""),
                               "speedup": base[0] / statistics.mean(kernel)})
    return points


def _diagonal_products() -> list[str]:
    """Every product of the benchmark's diagonal shapes, as parity_points names them
    ("1b qkv", "1b qkv dx", "1b qkv dw", ...), in the figures' order."""
    from eval.bench_grouped_matmul import diagonal_products

    return list(diagonal_products())


def _parity_panel(ax, report: dict, points: list[dict], groups: int,
                  sustained: list[dict] = ()) -> None:
    """One parity panel: a column per diagonal product, a dot per run that timed today's
    choice for it at G = groups (runs in date order, coloured oldest to newest), bars at the
    medians of those dots; a product no run timed keeps its column, in gray, marked so.
    ``sustained``: `sustained_points` (G = 16), drawn as red diamonds beside the dots (a
    product timed only that way is marked "no burst run", its name in black)."""
    plt = _pyplot()
    points = [p for p in points if p["G"] == groups]
    products = _diagonal_products()
    timed = {q["product"] for q in points}
    runs = sorted({p["run"] for p in points}, key=lambda r: report["runs"][r].get("date", ""))
    shade = [i / max(len(runs) - 1, 1) for i in range(len(runs))]   # 0..1, oldest to newest
    colours = plt.get_cmap("viridis")(shade)
    for i, run in enumerate(runs):
        mine = [p for p in points if p["run"] == run]
        offset = 0.3 * (shade[i] - 0.5)   # runs side by side within a product's column
        ax.scatter([products.index(p["product"]) + offset for p in mine],
                   [p["speedup"] for p in mine], s=18, color=colours[i],
                   label=f"{run} ({report['runs'][run].get('date', '')[:16]})")
    if sustained:
        ax.scatter([products.index(p["product"]) + 0.38 for p in sustained],
                   [p["speedup"] for p in sustained], s=26, marker="D", color="tab:red",
                   edgecolor="black", linewidth=0.4, zorder=3,
                   label="sustained load (seconds of back-to-back calls a window)")
    sustained_only = {p["product"] for p in sustained} - timed
    for x, product in enumerate(products):
        if product not in timed:   # no burst run of today's choice (maybe sustained ones)
            ax.text(x, 0.03, "no burst run" if product in sustained_only else "not timed",
                    transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                    va="bottom", fontsize=6, color="gray")
            continue
        median = statistics.median(p["speedup"] for p in points if p["product"] == product)
        ax.plot([x - 0.3, x + 0.3], [median, median], color="black", lw=1.5)
    ax.axhline(1.0, color="tab:red", ls="--", lw=1, label="cuBLAS (XLA's batched matmul)")
    ax.set_xticks(range(len(products)), products, rotation=60, ha="right", fontsize=8)
    for label in ax.get_xticklabels():
        if label.get_text() not in timed | sustained_only:
            label.set_color("gray")
    ax.set_ylabel("kernel speed / cuBLAS speed (device time)", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="A/B run (UTC)",
              title_fontsize=7)


def plot_parity(report: dict, path: Path, groups: tuple[int, ...] = (16,),
                sustained: list[dict] = ()) -> None:
    """Today's select_config choice against cuBLAS (`parity_points`), all groups active: a
    panel per G in ``groups`` (G = 16: the issue's full-load bar; 1, 2, 4, 8: the sequential
    schedule and training at G = 1, the benchmark's grid), one dot per run and product; with
    ``sustained`` (`sustained_points`), those on the G = 16 panel."""
    plt = _pyplot()
    points = parity_points(report)
    for g in groups:
        if not any(p["G"] == g for p in points):
            raise ValueError(f"no A/B run timed today's select_config choice and cuBLAS at G = {g}")
    fig, axes = plt.subplots(len(groups), 1, figsize=(21.5, 4.4 * len(groups)), squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        _parity_panel(ax, report, points, g, sustained if g == 16 else ())
        if len(groups) > 1:
            ax.set_title(f"G = {g}", fontsize=9)
    where = ("at full load (G = 16)" if groups == (16,) else
             f"at G = {', '.join(map(str, groups))}, all groups active")
    fig.suptitle(f"Grouped matmul {where}: today's select_config choice against cuBLAS, each dot"
                 f" one profiled A/B run of bursts of calls (with that day's kernel code); bars:"
                 f" their medians{'; diamonds: sustained-load runs' if sustained else ''}"
                 f" ({report.get('device', '')}, jax {report.get('jax_version', '?')})",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120 if len(groups) == 1 else 100)
    plt.close(fig)


def parity_table(report: dict, groups: tuple[int, ...] = (16, 1, 2, 4, 8),
                 xla_path_groups: tuple[int, ...] = (16,)) -> str:
    """`parity_points` as markdown: per G, every diagonal product's timings of today's choice
    against cuBLAS, with their median and range, and a count of the products whose median is at
    or above cuBLAS's speed (the forward and dx products, which the issue's full-load bar
    covers, apart from dw); then the same against the library's XLA path at
    ``xla_path_groups``. The median over runs is the statistic the parity figure draws."""
    lines = [f"# Grouped matmul against cuBLAS and the XLA path, today's select_config choice "
             f"({report.get('device', '')}, jax {report.get('jax_version', '?')})", "",
             "Written by `python -m eval.plot_results` from `grouped_matmul_h200.ab.json`: "
             "per product, the baseline's device time over the kernel's in each profiled A/B run "
             "that timed both (with that run's kernel code; `parity_points`), all groups "
             "active. Baselines: cuBLAS (XLA's plain batched einsum: the issue's \"XLA's "
             "batched matmul\") and the XLA path (`impl=\"xla\"`, what the schedules run "
             "without the kernel: the same einsum, then the select that zeroes idle groups). "
             "Timed alone, that select is a pass over the output of its own; in the model it "
             "fuses into the consumer, so the ratios against the XLA path overstate the "
             "kernel's lead inside a diagonal step (the end-to-end benchmark measures that).", ""]
    for baseline, baseline_groups in (("xla_einsum", groups), ("xla", xla_path_groups)):
        lines += _parity_sections(parity_points(report, baseline=baseline), baseline_groups,
                                  BASELINES[baseline])
    return "\n".join(lines)


# The two kinds of product the summaries count apart: (label, predicate on the product name).
PRODUCT_KINDS = (("forward and dx", lambda product: not product.endswith(" dw")),
                 ("dw", lambda product: product.endswith(" dw")))


def _kind_summaries(scores: dict[str, float], claim: str, lowest_detail) -> list[str]:
    """A line per PRODUCT_KINDS kind with timed products: how many of them score >= 1 ("{label}:
    {claim} on N of the M timed products") and >= 0.99, and the lowest one with
    ``lowest_detail(product)``."""
    lines = []
    for label, wanted in PRODUCT_KINDS:
        chosen = {q: v for q, v in scores.items() if wanted(q)}
        if chosen:
            lowest = min(chosen, key=chosen.get)
            lines += ["", f"{label}: {claim} on {sum(v >= 1.0 for v in chosen.values())} of the"
                          f" {len(chosen)} timed products, at or above 0.99 on"
                          f" {sum(v >= 0.99 for v in chosen.values())} (lowest: {lowest},"
                          f" {lowest_detail(lowest)})"]
    return lines


def _parity_sections(points: list[dict], groups: tuple[int, ...], against: str) -> list[str]:
    """parity_table's sections for one baseline (``against``: its name), one per G."""
    lines = []
    for g in groups:
        mine = [p for p in points if p["G"] == g]
        if not mine:
            continue
        lines += [f"## Against {against}, G = {g}", "",
                  "| product | timings | median | min-max | runs |", "|---|---:|---:|---:|---|"]
        medians = {}
        for product in _diagonal_products():
            ratios = [p["speedup"] for p in mine if p["product"] == product]
            if not ratios:
                lines.append(f"| {product} | 0 | not timed | | |")
                continue
            medians[product] = statistics.median(ratios)
            runs = ", ".join(sorted({p["run"] for p in mine if p["product"] == product}))
            lines.append(f"| {product} | {len(ratios)} | {medians[product]:.3f} | "
                         f"{min(ratios):.3f}-{max(ratios):.3f} | {runs} |")
        lines += _kind_summaries(medians, f"median at or above {against}",
                                 lambda q: f"{medians[q]:.3f}")
        attention = [f"{q} {medians[q]:.3f}" for q in ATTENTION_BAR_PRODUCTS if q in medians]
        if attention and g == 16:   # the bar is at full load of the 16 groups
            lines += ["", "the issue's attention-projection shapes (16 x 1152 x 2048 -> 3072 / "
                          f"2048, forward; its bar: >= 1.2): {', '.join(attention)}"]
        lines.append("")
    return lines


def sustained_points(report: dict, num_sms: int = 132) -> list[dict]:
    """Per sustained-load run (``sustained_h200.json``, eval/sustained_ab.py) and product:
    cuBLAS's median time per call over the kernel's, over the run's rounds, where the run timed
    cuBLAS and a config equal to today's `select_config` choice (its windows' "tuning" fields);
    with the kernel's and cuBLAS's median SM clock."""
    from eval.bench_grouped_matmul import diagonal_products
    from kernels.tuning import select_config

    dims = diagonal_products()
    points = []
    for run_name, run in report["runs"].items():
        by_product = {}
        for w in run["windows"]:
            by_product.setdefault(w["product"], []).append(w)
        for product, windows in by_product.items():
            (m, k, n), transpose = dims[product]
            tl, tr = transpose or (False, False)
            today = config_fields(str(select_config(16, m, k, n, transpose_lhs=tl,
                                                    transpose_rhs=tr, num_sms=num_sms)))
            kernel = [w for w in windows if config_fields(w.get("tuning", "")) == today]
            base = [w for w in windows if w["config"] == "xla_einsum"]
            if not (kernel and base):
                continue
            med = lambda ws, f: statistics.median(w[f] for w in ws)
            points.append({"product": product, "run": run_name, "code": run.get("code"),
                           "config": kernel[0]["config"],
                           "speedup": med(base, "ms_per_call") / med(kernel, "ms_per_call"),
                           "clock_mhz": med(kernel, "clock_mhz"),
                           "base_clock_mhz": med(base, "clock_mhz"), "rounds": len(kernel)})
    return points


def sustained_table(points: list[dict]) -> str:
    """`sustained_points` as a markdown section for the parity table."""
    lines = ["## Against cuBLAS under sustained load, G = 16", "",
             "From `sustained_h200.json` (`eval/sustained_ab.py`): each config run back to back "
             "for seconds per window, rounds in rotated order, so each settles at its own clock "
             "under the H200's power limit (the profiled A/B above times bursts of 10 calls, whose "
             "clock depends on what ran before). Per run: cuBLAS's median time per call over "
             "today's choice's (named as the run named it), and both median SM clocks.", "",
             "| product | run | config (as run) | speedup | rounds | clock MHz | cuBLAS clock MHz |",
             "|---|---|---|---:|---:|---:|---:|"]
    order = {product: i for i, product in enumerate(_diagonal_products())}
    for p in sorted(points, key=lambda p: (order[p["product"]], p["run"])):
        lines.append(f"| {p['product']} | {p['run']} | {p['config']} | {p['speedup']:.3f} |"
                     f" {p['rounds']} | {p['clock_mhz']:.0f} | {p['base_clock_mhz']:.0f} |")
    runs = {}
    for p in points:
        runs.setdefault(p["product"], []).append(p["speedup"])
    lines += _kind_summaries({q: min(v) for q, v in runs.items()},   # by its slowest run
                             "at or above cuBLAS in every run",
                             lambda q: f"{min(runs[q]):.3f}-{max(runs[q]):.3f}")
    return "\n".join(lines + [""])


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.plot_results",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder with the JSON results")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the PNGs and the parity table (default --results)")
    args = ap.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    report = _load(args.results / "sustained_h200.json")
    sustained = sustained_points(report) if report else []   # figure and table
    jobs = (("inference_h200.json", "inference_h200.png", plot_inference),
            ("grouped_matmul_h200.json", "grouped_matmul_h200.png", plot_grouped_matmul),
            ("grouped_matmul_h200.big.json", "grouped_matmul_h200.3b.png",
             functools.partial(plot_grouped_matmul, model="3b")),
            ("grouped_matmul_h200.big.json", "grouped_matmul_h200.8b.png",
             functools.partial(plot_grouped_matmul, model="8b")),
            ("train_h200_diagonal.json", "train_h200_diagonal.png", plot_train),
            ("generate_h200.json", "generate_h200.png", functools.partial(
                plot_generate,
                xla_attention=_load(args.results / "generate_h200_xla_attention.json"),
                earlier=_load(args.results / "generate_h200_c4e0048.json"))),
            ("grouped_matmul_h200.ab.json", "grouped_matmul_h200.parity.png",
             functools.partial(plot_parity, sustained=sustained)),
            ("grouped_matmul_h200.ab.json", "grouped_matmul_h200.parity_off_full_load.png",
             functools.partial(plot_parity, groups=(1, 2, 4, 8))))
    reports = {}   # each JSON read once (the A/B report feeds two figures and the table)
    for name, figure, plot in jobs:
        if name not in reports:
            reports[name] = _load(args.results / name)
        if reports[name] is None:
            print(f"skipped {name}: not found in {args.results}")
            continue
        plot(reports[name], out / figure)
        print(f"wrote {out / figure}")
    ab = reports["grouped_matmul_h200.ab.json"]
    if ab is not None:
        table = parity_table(ab)
        if sustained:
            table += "\n" + sustained_table(sustained)
        (out / "grouped_matmul_h200.parity.md").write_text(table)
        print(f"wrote {out / 'grouped_matmul_h200.parity.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
