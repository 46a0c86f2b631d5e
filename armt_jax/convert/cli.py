r"""`armt convert`: move weights between Hugging Face Llama, PyTorch ARMT state dicts and Orbax.

    armt convert --from hf   --to orbax  meta-llama/Llama-3.2-1B-dir  ckpt/  [--with-memory --num-mem-tokens 16]
    armt convert --from armt --to orbax  armt_babilong.safetensors    ckpt/  --config-dir llama-dir \
                 --segment-size 1008 --num-mem-tokens 16 --lora-r 8 --lora-alpha 32
    armt convert --from orbax --to hf    ckpt/  hf-out/  --max-shard-size 2GB
    armt convert --from orbax --to armt  ckpt/  armt-out.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from armt_jax.cli_args import positive_int
from armt_jax.config import ArmtConfig, LlamaConfig

FORMATS = ("hf", "armt", "orbax")
DTYPES = ("float32", "bfloat16", "float16")


def add_convert_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--from", dest="src_format", choices=FORMATS, required=True,
                   help="input format: hf (Hugging Face Llama directory), armt (PyTorch ARMT state dict, "
                        ".safetensors or .bin, or a directory with one), orbax (armt-jax checkpoint)")
    p.add_argument("--to", dest="dst_format", choices=FORMATS, required=True, help="output format")
    p.add_argument("input", type=Path, help="input path")
    p.add_argument("output", type=Path, help="output path (a directory; for --to armt a .safetensors "
                                             "file or a directory)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="cast every parameter (default: keep the checkpoint's dtype)")
    g = p.add_argument_group("ARMT input / memory")
    g.add_argument("--config-dir", type=Path, default=None,
                   help="directory with the base model's Hugging Face config.json (--from armt; default: "
                        "the input directory if it has one)")
    g.add_argument("--segment-size", type=positive_int, default=None,
                   help="text tokens per segment (T; --from armt: read from the file where armt-jax "
                        "wrote it, else required: the published checkpoints used 1008)")
    g.add_argument("--num-mem-tokens", type=positive_int, default=None,
                   help="memory tokens M (--from armt: default read off the checkpoint)")
    g.add_argument("--d-mem", type=positive_int, default=None,
                   help="memory key size (--from armt: default read off the checkpoint)")
    g.add_argument("--no-correction", action="store_true", help="ARMT without the delta-rule correction")
    g.add_argument("--lora-r", type=positive_int, default=None, help="LoRA rank, to merge PEFT adapters")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha, to merge PEFT adapters")
    g.add_argument("--with-memory", action="store_true",
                   help="--from hf: attach freshly initialised ARMT memory parameters (implied by --to armt)")
    g.add_argument("--seed", type=int, default=0, help="seed of the fresh memory parameters")
    g = p.add_argument_group("output")
    g.add_argument("--max-shard-size", default="5GB", help="--to hf: largest shard (e.g. 5GB, 500MB)")
    g.add_argument("--armt-layer-prefix", choices=("model", "layers", "both"), default="model",
                   help="--to armt: per-layer key prefix, memory_cell.model.model.layers.{i}. (model), "
                        "memory_cell.layers.{i}. (layers) or both")
    g.add_argument("--overwrite", action="store_true", help="replace existing weights at the output")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Register `convert` on an argparse subparsers object; the handler is `run_convert(args)`."""
    p = subparsers.add_parser("convert", help="convert weights between hf, armt and orbax formats",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_convert_arguments(p)
    p.set_defaults(func=run_convert)
    return p


def _armt_overrides(args) -> dict:
    o = {"segment_size": args.segment_size, "num_mem_tokens": args.num_mem_tokens, "d_mem": args.d_mem}
    if args.no_correction:
        o["correction"] = False
    return {k: v for k, v in o.items() if v is not None}


def _load(args) -> tuple[dict, LlamaConfig, ArmtConfig | None]:
    from armt_jax.checkpoint import load_checkpoint
    from armt_jax.convert.armt import infer_armt_config, load_armt
    from armt_jax.convert.hf import load_hf
    from armt_jax.params import cast

    progress = False if args.no_progress else None
    overrides = _armt_overrides(args)
    if args.src_format == "hf":
        want_memory = args.with_memory or args.dst_format == "armt"
        if overrides and not want_memory:
            flags = ", ".join("--" + k.replace("_", "-") if k != "correction" else "--no-correction"
                              for k in overrides)
            raise SystemExit(f"armt convert: {flags} configure ARMT memory, which --from hf attaches "
                             f"only with --with-memory (or --to armt)")
        armt = ArmtConfig(**overrides) if want_memory else None
        cfg, params = load_hf(args.input, dtype=args.dtype, armt=armt, key=args.seed, progress=progress,
                              as_numpy=True)
        return params, cfg, armt
    if args.src_format == "armt":
        config_dir = args.config_dir
        if config_dir is None:
            if args.input.is_dir() and (args.input / "config.json").exists():
                config_dir = args.input
            else:
                raise SystemExit("--from armt needs --config-dir (the base model's Hugging Face config.json)")
        cfg = LlamaConfig.from_json(config_dir)
        armt = infer_armt_config(args.input, **overrides)
        params = load_armt(args.input, cfg, armt, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                           dtype=args.dtype, progress=progress, as_numpy=True)
        return params, cfg, armt
    params, cfg, armt = load_checkpoint(args.input)
    if overrides and (armt is not None or "memory" in params):
        armt = dataclasses.replace(armt or ArmtConfig(), **overrides)  # check_shapes catches a mismatch
    if args.dtype is not None:
        params = cast(params, args.dtype)
    return params, cfg, armt


def run_convert(args: argparse.Namespace) -> int:
    """Run `armt convert` with parsed arguments; returns the exit status."""
    from armt_jax.checkpoint import save_checkpoint
    from armt_jax.convert.armt import save_armt
    from armt_jax.convert.hf import hf_config_dict, save_hf
    from armt_jax.convert.table import ConversionError

    progress = False if args.no_progress else None
    try:
        params, cfg, armt = _load(args)
    except ConversionError as e:   # the message names the file and the key or setting
        raise SystemExit(f"armt convert: error: {e}") from None
    if args.dst_format == "orbax":
        save_checkpoint(args.output, params, cfg, armt, overwrite=args.overwrite)
        written = args.output
    elif args.dst_format == "hf":
        if "memory" in params:
            print("note: the ARMT memory parameters have no place in a Hugging Face Llama and are left out",
                  file=sys.stderr)
            params = {k: v for k, v in params.items() if k != "memory"}
        files = save_hf(args.output, params, cfg, max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite, progress=progress)
        written = f"{args.output} ({len(files)} safetensors file(s))"
    else:
        if armt is None or "memory" not in params:
            raise SystemExit("--to armt needs ARMT memory parameters; the input has none "
                             "(from hf, they are initialised freshly)")
        out = args.output
        target = out if out.suffix == ".safetensors" else out / "model.safetensors"
        if target.exists() and not args.overwrite:
            raise SystemExit(f"{target} exists; pass --overwrite to replace it")
        written = save_armt(target, params, cfg, armt, layer_prefix=args.armt_layer_prefix,
                            progress=progress)
        if out.suffix != ".safetensors":  # a directory: the base config beside, so --from armt finds it
            (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, params), indent=2) + "\n")
    print(f"converted {args.src_format} {args.input} -> {args.dst_format} {written}", file=sys.stderr)
    return 0


def convert_main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: `python -m armt_jax.convert --from hf --to orbax IN OUT`."""
    parser = add_convert_arguments(argparse.ArgumentParser(
        prog="armt convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    return run_convert(parser.parse_args(argv))

