"""`armt`: the console command. Each subcommand is a thin layer over library functions.

    armt demo       a small random ARMT over a long input on this machine: tokens/s per schedule
    armt convert    weights between Hugging Face Llama, PyTorch ARMT state dicts and Orbax
    armt generate   continue a text file with a converted checkpoint
    armt train      finetune on BABILong (train/)
    armt eval       BABILong accuracy per task and length, with a heatmap (eval/run_babilong.py)
    armt bench      the inference benchmark (eval/bench.py)

Before the command, `--compilation-cache DIR` keeps compiled programs in DIR for later runs.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

from armt_jax.cli_args import bounded, non_negative_int, positive_int, probability
from armt_jax.config import ConfigError


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="run a small random ARMT over a long input, print tokens/s")
    p.add_argument("--tokens", type=positive_int, default=32768, help="input length")
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--hidden", type=bounded(int, 64), default=256,
                   help="hidden size (heads of 64)")
    p.add_argument("--segment-size", type=positive_int, default=512)
    p.add_argument("--num-mem-tokens", type=positive_int, default=16)
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from armt_jax import ArmtConfig, LlamaConfig, diagonal_forward, init_params, sequential_forward

    heads = max(args.hidden // 64, 1)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=heads,
                      num_key_value_heads=heads, head_dim=args.hidden // heads,
                      tie_word_embeddings=True)
    armt = ArmtConfig(segment_size=args.segment_size, num_mem_tokens=args.num_mem_tokens, d_mem=32)
    params = init_params(jax.random.key(0), cfg, armt)
    params["memory"]["w_mv"] = 0.02 * jax.random.normal(jax.random.key(1),
                                                        params["memory"]["w_mv"].shape)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.tokens)),
                         jnp.int32)
    print(f"random ARMT: {args.layers} layers, hidden {args.hidden}, segments of "
          f"{args.segment_size} + {args.num_mem_tokens} memory tokens; input {args.tokens} tokens "
          f"on {jax.devices()[0].device_kind}")
    results = {}
    for name, forward in (("sequential", sequential_forward), ("diagonal", diagonal_forward)):
        fn = jax.jit(lambda p, t, forward=forward: forward(p, t, cfg, armt, output="last_logits"))
        t0 = time.perf_counter()
        out = fn(params, tokens)
        jax.block_until_ready(out)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = fn(params, tokens)
        jax.block_until_ready(out)
        seconds = time.perf_counter() - t0
        results[name] = out
        print(f"{name:10s}  {args.tokens / seconds:10.0f} tokens/s  ({seconds:.2f} s; first call "
              f"with compilation {first:.2f} s)")
    diff = float(jnp.max(jnp.abs(results["sequential"].out - results["diagonal"].out)))
    print(f"max |sequential - diagonal| on the last segment's logits: {diff:.2e}")
    return 0


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue a text file with an armt-jax checkpoint")
    p.add_argument("checkpoint", type=Path, help="Orbax checkpoint from `armt convert --to orbax`")
    p.add_argument("prompt_file", type=Path, help="text file with the context")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="Hugging Face tokenizer.json (default: <checkpoint>/tokenizer.json); "
                        "without one the prompt file holds whitespace-separated token ids")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--schedule", choices=("diagonal", "sequential"), default="diagonal")
    p.add_argument("--temperature", type=bounded(float, 0.0), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=probability, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    import jax
    import jax.numpy as jnp
    from armt_jax.model import ArmtModel

    if not args.prompt_file.exists():
        raise SystemExit(f"armt generate: no prompt file {args.prompt_file}")
    model = ArmtModel.from_checkpoint(args.checkpoint)
    tok_path = args.tokenizer or args.checkpoint / "tokenizer.json"
    text = args.prompt_file.read_text()
    tokenizer = None
    if args.tokenizer is not None or tok_path.exists():
        if not tok_path.exists():
            raise SystemExit(f"armt generate: no tokenizer file {tok_path}")
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(tok_path))
        ids = prompt_encoder(tokenizer, model.cfg)(text)
    else:
        try:
            ids = [int(t) for t in text.split()]
        except ValueError:
            raise SystemExit(f"armt generate: {args.prompt_file} is not a list of token ids and no "
                             f"tokenizer was found at {tok_path} (pass --tokenizer)") from None
    if not ids:
        raise SystemExit(f"armt generate: {args.prompt_file} gives no tokens")
    t0 = time.perf_counter()
    out = model.generate(jnp.asarray([ids], jnp.int32), max_new_tokens=args.max_new_tokens,
                         schedule=args.schedule, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, key=jax.random.key(args.seed))
    new = [int(t) for t in out.tokens[0, :int(out.lengths[0])]]
    seconds = time.perf_counter() - t0
    print(tokenizer.decode(new) if tokenizer else " ".join(map(str, new)))
    print(f"[{len(ids)} context tokens, {len(new)} generated in {seconds:.2f} s]", file=sys.stderr)
    return 0


def _add_babilong_arguments(p, data_required: bool = True) -> None:
    """What `armt train` and `armt eval` share: the model, its tokenizer and the BABILong data."""
    p.add_argument("checkpoint", type=Path, help="Orbax checkpoint with ARMT memory "
                                                 "(`armt convert --to orbax --with-memory`)")
    also = "" if data_required else " (unless --published)"
    p.add_argument("--babi", type=Path, required=data_required,
                   help="bAbI v1.2 archive or folder" + also)
    p.add_argument("--books", type=Path, required=data_required,
                   help="Gutenberg books archive or folder" + also)
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="Hugging Face tokenizer.json (default: <checkpoint>/tokenizer.json); "
                        "context lengths are counted in its tokens")
    p.add_argument("--tasks", type=bounded(int, 1, 20), nargs="+", default=[1, 2, 3, 4, 5],
                   help="bAbI tasks (qa1-qa20)")


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="finetune a checkpoint on BABILong (bAbI facts in book text)")
    _add_babilong_arguments(p)
    p.add_argument("--context-tokens", type=non_negative_int, default=1024,
                   help="BABILong context length")
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--accum-steps", type=positive_int, default=1, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=non_negative_int, default=100)
    p.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="steps between checkpoints (0: only the last)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: mixed precision (float32 master weights and optimizer state,"
                        " bf16 matmuls: the Pallas kernels on a Hopper GPU)")
    p.add_argument("--schedule", choices=("sequential", "diagonal"), default="sequential",
                   help="the forward the loss runs through (same loss and gradients; diagonal"
                        " runs a diagonal's layers as grouped matmuls: on an H200 faster at 16384"
                        " tokens, slower at 4096, eval/results/train_h200.md)")
    p.add_argument("--deterministic", action="store_true",
                   help="bitwise reproducible steps on a GPU (XLA's deterministic ops; slower)")
    p.add_argument("--out", type=Path, required=True, help="metrics.jsonl and checkpoints go here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from eval.babilong import build_sample, read_babi, read_books
    from train.data import batches, qa_example
    from train.loop import fit
    from train.step import default_compiler_options

    params, cfg, armt, tokenizer = _load_for_text(args, "train")
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids   # BOS: qa_example
    count = lambda text: len(encode(text))
    samples = {t: read_babi(args.babi, t, "train") for t in args.tasks}
    books = read_books(args.books)
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None

    def make_example(rng):
        task = args.tasks[int(rng.integers(len(args.tasks)))]
        sample = samples[task][int(rng.integers(len(samples[task])))]
        return qa_example(build_sample(sample, books, args.context_tokens, count, rng), encode, eos,
                          cfg.bos_token_id)

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.warmup, 1),
                                                  max(args.steps, args.warmup + 1))
    optimizer = optax.adamw(schedule, weight_decay=args.weight_decay)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)   # float32 master weights
    stream = batches(make_example, args.batch_size, armt.segment_size,
                     np.random.default_rng(args.seed))
    _, history = fit(params, cfg, armt, stream, steps=args.steps, optimizer=optimizer,
                     accum_steps=args.accum_steps, out_dir=args.out,
                     checkpoint_every=args.checkpoint_every, schedule=args.schedule,
                     compiler_options=default_compiler_options(deterministic=args.deterministic),
                     compute_dtype=None if args.compute_dtype == "float32" else jnp.bfloat16)
    timed = [h["seconds"] for h in history if not h["includes_compile"]]
    step_time = (f"; {statistics.median(timed):.3f} s a step (median of the steps that did not"
                 f" compile)" if timed else "")
    print(f"final loss {history[-1]['loss']:.4f}{step_time}; metrics and checkpoints in {args.out}")
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="BABILong accuracy per task and context length")
    _add_babilong_arguments(p, data_required=False)
    p.add_argument("--published", type=Path, default=None,
                   help="a local copy of the published BABILong set (its qa{task}/{length}.json "
                        "files, or jsonl / parquet) instead of samples built from --babi and --books")
    p.add_argument("--lengths", type=_length_arg, nargs="+", default=None,
                   help="context lengths: token counts for built samples (default 0 1024 4096 "
                        "16384), the set's names with --published (default 0k 1k 4k 16k)")
    p.add_argument("--samples", type=positive_int, default=50, help="questions per task and length")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=16)
    p.add_argument("--schedule", choices=("diagonal", "sequential"), default="diagonal")
    p.add_argument("--out", type=Path, required=True, help="babilong.{json,md,png} go here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_eval)


def _length_arg(text: str):
    """A context length: a token count (>= 0), or a name of the published set ("4k", "1M")."""
    if re.fullmatch(r"\d+[kKmM]", text):
        return text
    return non_negative_int(text)


def prompt_encoder(tokenizer, cfg):
    """text -> token ids of a prompt, as `armt generate`, `train` and `eval` all build it: the
    model's BOS (config.json's bos_token_id, if any), then the text without the tokenizer's own
    special tokens (whether its post-processor adds a BOS differs between tokenizer files)."""
    bos = [] if cfg.bos_token_id is None else [cfg.bos_token_id]
    return lambda text: bos + tokenizer.encode(text, add_special_tokens=False).ids


def _load_for_text(args, command: str):
    """(params, cfg, armt, tokenizer) from a checkpoint with memory and a tokenizer file."""
    from tokenizers import Tokenizer

    from armt_jax.checkpoint import load_checkpoint
    params, cfg, armt = load_checkpoint(args.checkpoint)
    if armt is None:
        raise SystemExit(f"armt {command}: {args.checkpoint} has no ARMT memory (convert with "
                         "--with-memory)")
    tok_path = args.tokenizer or args.checkpoint / "tokenizer.json"
    if not tok_path.exists():
        raise SystemExit(f"armt {command}: no tokenizer file {tok_path} (pass --tokenizer)")
    return params, cfg, armt, Tokenizer.from_file(str(tok_path))


def run_eval(args) -> int:
    from eval.babilong import read_books
    from eval.run_babilong import evaluate, evaluate_published, model_answer_fn, write_report

    lengths = args.lengths
    if args.published is not None:
        lengths = lengths or ["0k", "1k", "4k", "16k"]
        if counts := [n for n in lengths if isinstance(n, int)]:
            raise SystemExit(f"armt eval: with --published, --lengths are the set's names (0k, 4k, "
                             f"...), got {counts}")
    else:
        lengths = lengths or [0, 1024, 4096, 16384]
        if names := [n for n in lengths if isinstance(n, str)]:
            raise SystemExit(f"armt eval: --lengths {' '.join(names)} name lengths of the published "
                             f"set: pass --published, or token counts")
        if args.babi is None or args.books is None:
            raise SystemExit("armt eval: needs --babi and --books (samples are built from them), "
                             "or --published")
    params, cfg, armt, tokenizer = _load_for_text(args, "eval")
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    answer = model_answer_fn(params, cfg, armt, prompt_encoder(tokenizer, cfg), tokenizer.decode,
                             max_new_tokens=args.max_new_tokens, schedule=args.schedule)
    if args.published is not None:
        rows = evaluate_published(answer, args.published, args.tasks, lengths,
                                  samples=args.samples, batch_size=args.batch_size)
    else:
        rows = evaluate(answer, args.babi, read_books(args.books), args.tasks, lengths,
                        lambda text: len(encode(text)), samples=args.samples,
                        batch_size=args.batch_size, seed=args.seed)
    write_report(rows, args.out, f"BABILong accuracy, {args.checkpoint.name}, "
                                 f"{args.samples} questions per cell")
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="inference benchmark (see eval/bench.py)", add_help=False)
    p.set_defaults(func=None)


def add_global_options(parser) -> None:
    parser.add_argument(
        "--compilation-cache", type=Path, default=None, metavar="DIR",
        help="keep compiled programs in DIR (JAX's persistent compilation cache, also set by"
             " $JAX_COMPILATION_CACHE_DIR): a later run with the same shapes and flags skips XLA's"
             " compile; a diagonal training step compiled in 38 s instead of 119 s on an H200")


def apply_global_options(args) -> None:
    if args.compilation_cache is not None:
        import jax

        args.compilation_cache.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(args.compilation_cache))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The global options come before the command; they take effect before anything compiles.
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_global_options(pre)
    options, argv = pre.parse_known_args(argv)
    apply_global_options(options)
    if argv[:1] == ["bench"]:            # eval/bench.py owns its flags
        from eval.bench import main as bench_main
        return bench_main(argv[1:])
    from armt_jax.convert.cli import add_convert_parser

    parser = argparse.ArgumentParser(prog="armt", description=__doc__.split("\n\n")[0])
    add_global_options(parser)           # for --help; already applied
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    add_convert_parser(sub)
    add_generate_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_bench_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:   # a bad option, config.json or path: the
        parser.exit(2, f"armt {args.command}: error: {e}\n")   # message names it; no traceback


if __name__ == "__main__":
    sys.exit(main())
