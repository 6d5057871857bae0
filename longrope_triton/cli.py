"""``longrope-triton``: command-line entry point (argument parsing only; the work is in the package).

    longrope-triton demo                      # SmolLM2-135M, 8K -> 16K, on a CPU in < 10 minutes
    longrope-triton search --target 16384 --log search.jsonl --output factors.json
    longrope-triton eval --methods plain,yarn,longrope --lengths 8192,16384
    longrope-triton passkey --method longrope --lengths 16384
    longrope-triton finetune --factors factors.json --steps 100 --checkpoint ckpt/
    longrope-triton export --factors factors.json --model-dir my-model/ --output extended/
    longrope-triton serve extended/ --continuous-batching --port 8000

Under ``torchrun --nproc-per-node N -m -- longrope_triton.cli ...`` the work of search, eval,
passkey and finetune is split over the N ranks (see longrope_triton.parallel, docs/parallel.md).

Errors a user can fix (missing model or text, a length beyond what the config allows, a corrupt or
mismatched search log, bad arguments) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """\
examples:
  longrope-triton demo
      Load SmolLM2-135M (trained on 8K tokens) and compare plain RoPE with the shipped LongRoPE
      factors at 16K tokens of held-out text, then a passkey retrieval at 16K (CPU, ~10 min).
  longrope-triton search --target 16384 --population 12 --iterations 4 --log run.jsonl -o f.json
      Evolutionary search of rescale factors (kill it any time; rerun the same command to resume).
  longrope-triton eval --methods plain,pi,ntk,yarn,longrope --lengths 4096,8192,16384
      Perplexity of each method at each length on held-out novels (table + PNG plot).
  longrope-triton passkey --method longrope --lengths 8192,16384 --depths 0.1,0.5,0.9
      Passkey retrieval accuracy by length and depth (table + heat-map PNG).
  longrope-triton serve extended/ --continuous-batching --port 8000
      transformers' OpenAI-compatible server (`transformers serve`) with the model patched: each
      request runs its own short/long regime; any `transformers serve` option follows the model.
  torchrun --nproc-per-node 4 -m -- longrope_triton.cli search --target 16384 --log run.jsonl -o f.json
      The same commands over 4 ranks (one GPU each): candidates, windows, trials or rows split
      (the -- keeps torchrun from reading --log as its own --log-dir).

models: 'smollm2' (offline, installed by scripts/install_assets.sh) or a Hugging Face model directory.
texts:  austen:search | austen:heldout | austen:<novel>[,<novel>] | a .txt or .jsonl file.
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a meaningful default."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class UsageError(Exception):
    """An error the user can fix: printed as one line, exit status 2."""


def _ints(text: str) -> list:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list:
    return [x.strip() for x in text.split(",") if x.strip()]


def _common(p: argparse.ArgumentParser, text_default: str = "austen:heldout"):
    p.add_argument("--model", default="smollm2", help="'smollm2' or a Hugging Face model directory")
    p.add_argument("--text", default=text_default, help="text to use")
    p.add_argument("--backend", default="auto", choices=("auto", "fused", "stock"),
                   help="how the RoPE config is applied: fused = longrope_triton.hf.patch_model (default when "
                        "available), stock = the model's own attention with a replaced rotary embedding")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longrope-triton",
        description="Extend the context window of a RoPE language model with LongRoPE: search rescale factors, "
                    "evaluate them (perplexity, passkey), fine-tune, and export them to a Hugging Face model.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # ------------------------------------------------------------------ demo
    p = sub.add_parser("demo", help="context-extension demo on SmolLM2-135M (CPU, ~10 min)", formatter_class=_Formatter,
                       description="Load SmolLM2-135M (trained context 8K) and show context extension to 16K on "
                                   "held-out text: perplexity of the last tokens of a 16K window with only the "
                                   "model's native 8K of context, under plain RoPE, and under the shipped LongRoPE "
                                   "factors, then a passkey retrieval at 16K. Rows print as they finish; a PNG plot "
                                   "is written at the end. Offline, CPU only, ~6-10 minutes on 2 cores.")
    p.add_argument("--full", action="store_true",
                   help="every method (plain, PI, NTK, YaRN, LongRoPE, LongRoPE2) at 4K/8K/16K/32K and a passkey "
                        "grid (hours on a CPU)")
    p.add_argument("--length", type=int, default=16384, help="context length of the quick demo")
    p.add_argument("--score-tokens", type=int, default=2048, help="scored tail of each window")
    p.add_argument("--novel", default="emma", help="held-out novel")
    p.add_argument("--out-dir", default="longrope-demo", help="where the plot and results go")
    p.add_argument("--backend", default="auto", choices=("auto", "fused", "stock"),
                   help="how the RoPE config is applied (see `eval --help`)")

    # ------------------------------------------------------------------ search
    p = sub.add_parser("search", help="evolutionary search of LongRoPE / LongRoPE2 rescale factors",
                       description="Evolutionary search of rescale factors (DESIGN §5). Every evaluated candidate is "
                                   "appended to --log; rerunning the same command resumes the search where it "
                                   "stopped, evaluating nothing twice. Defaults are the paper's (population 64, 40 "
                                   "iterations; LongRoPE2: 128, 60); pass smaller numbers for a CPU budget.",
                       formatter_class=_Formatter)
    _common(p, "austen:search")
    p.add_argument("--target", type=int, required=True, help="target context length in tokens")
    p.add_argument("--method", default="longrope", choices=("longrope", "longrope2"),
                   help="longrope: perplexity fitness, n_hat searched; longrope2: critical-dimension constraint, "
                        "needle-driven perplexity")
    p.add_argument("--length", type=int, help="evaluation length (default: the target; L_orig with --short)")
    p.add_argument("--score-tokens", type=int, default=4096, help="scored tail of each window")
    p.add_argument("--windows", type=int, default=1, help="windows per fitness evaluation")
    p.add_argument("--needle-samples", type=int, default=2, help="needle samples per evaluation (longrope2)")
    p.add_argument("--previous", help="progressive extension: factors JSON of the previous stage "
                                      "(final factors = searched x previous)")
    p.add_argument("--short", action="store_true",
                   help="short-context readjustment: search the short factors at the original length")
    p.add_argument("--population", type=int, help="population size (default: 64; longrope2 128)")
    p.add_argument("--iterations", type=int, help="iterations (default: 40; longrope2 60)")
    p.add_argument("--parents", type=int, help="parents kept per iteration (default: population/2)")
    p.add_argument("--mutations", type=int, help="mutants per iteration (default: population/4)")
    p.add_argument("--crossovers", type=int, help="crossovers per iteration (default: population/4)")
    p.add_argument("--patience", type=int, default=20, help="early stop after this many iterations without "
                                                           "improvement > --tolerance")
    p.add_argument("--tolerance", type=float, default=1e-3, help="early-stop tolerance on the best fitness")
    p.add_argument("--start-tokens", type=_ints, help="n_hat choices, comma-separated (default: 0,1,2,4,...,256; "
                   "with --short, n_hat of --previous, which the long factors share)")
    p.add_argument("--upper", type=float, help="upper bound of the factors (default: 1.25 s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed + same log = same search)")
    p.add_argument("--log", required=True, help="JSON-lines log of every evaluation (resumed if it exists)")
    p.add_argument("-o", "--output", required=True, help="where the best LongRoPEConfig JSON is written "
                                                         "(the HF rope_parameters go to <output>.hf.json)")

    # ------------------------------------------------------------------ eval
    p = sub.add_parser("eval", help="perplexity of several methods at several lengths (table + PNG)",
                       description="Sliding-window perplexity of each method at each length; only the last "
                                   "--score-tokens tokens of each window are scored (and only their logits computed).",
                       formatter_class=_Formatter)
    _common(p)
    p.add_argument("--methods", type=_names, default=["plain", "pi", "ntk", "yarn", "longrope"],
                   help="comma-separated: plain, pi, ntk, yarn, longrope, longrope2")
    p.add_argument("--lengths", type=_ints, default=[8192, 16384], help="comma-separated context lengths")
    p.add_argument("--target", type=int, help="length the PI/NTK/YaRN configs extend to (default: max length)")
    p.add_argument("--factors", default="smollm2-135m-16k",
                   help="LongRoPE factor set: a JSON file or a name shipped in longrope_triton/factors")
    p.add_argument("--factors2", default="smollm2-135m-16k-longrope2", help="LongRoPE2 factor set")
    p.add_argument("--score-tokens", type=int, default=4096, help="scored tail of each window")
    p.add_argument("--windows", type=int, default=1, help="windows per (method, length)")
    p.add_argument("--unaligned", action="store_true",
                   help="slide windows per length independently (default: every length scores the same tokens, "
                        "the tails of the longest length's windows)")
    p.add_argument("--out", default="longrope-eval", help="output prefix: <out>.json and <out>.png")

    # ------------------------------------------------------------------ passkey
    p = sub.add_parser("passkey", help="passkey retrieval accuracy by length and depth (table + heat-map)",
                       formatter_class=_Formatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' or a Hugging Face model directory")
    p.add_argument("--backend", default="auto", choices=("auto", "fused", "stock"), help="see `eval --help`")
    p.add_argument("--method", default="longrope", help="plain, pi, ntk, yarn, longrope, longrope2")
    p.add_argument("--factors", default=None, help="factor set for longrope/longrope2 (JSON file or shipped name)")
    p.add_argument("--lengths", type=_ints, default=[16384], help="comma-separated prompt lengths")
    p.add_argument("--target", type=int, help="length PI/NTK/YaRN extend to (default: max length)")
    p.add_argument("--depths", type=_floats, default=[0.1, 0.5, 0.9], help="comma-separated key depths in [0, 1]")
    p.add_argument("--trials", type=int, default=1, help="random keys per (length, depth)")
    p.add_argument("--mode", default="score", choices=("score", "generate"),
                   help="score: teacher-forced greedy check of the 5 digits (one forward); generate: greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="longrope-passkey", help="output prefix: <out>.json and <out>.png")

    # ------------------------------------------------------------------ finetune
    p = sub.add_parser("finetune", help="fine-tune a patched model with LongRoPE2's mixed context window",
                       description="Training loop with LongRoPE2's mixed context window: each row packs short "
                                   "documents (original RoPE) and one long document (rescaled RoPE) with "
                                   "position_ids restarting per document. Resumable checkpoints.",
                       formatter_class=_Formatter)
    _common(p, "austen:search")
    p.add_argument("--factors", required=True, help="LongRoPEConfig JSON (file or shipped name) to train with")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--long-tokens", type=int, help="length of the long document of each row (default: the "
                                                    "factors' max_position_embeddings; must exceed L_orig)")
    p.add_argument("--short-tokens", type=int, help="length of the short documents (default: L_orig / 2)")
    p.add_argument("--shorts-per-row", type=int, default=2, help="short documents packed with each long one")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-accum", type=int, default=1, help="rows per optimizer step")
    p.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (resumed if it holds one)")
    p.add_argument("--save-every", type=int, default=50, help="save a checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="save the fine-tuned model (config carrying the factors) to this directory")
    p.add_argument("--context-parallel", type=int, default=1, metavar="K",
                   help="under torchrun: K ranks share each row, each holding a zigzag shard of every document "
                        "(context parallel); the W/K groups split the rows (data parallel)")

    # ------------------------------------------------------------------ export
    p = sub.add_parser("export", help="write factors into a Hugging Face model's config.json", formatter_class=_Formatter,
                       description="Write a LongRoPEConfig into a model directory's config.json (rope_parameters, "
                                   "max_position_embeddings) so stock transformers loads the extended model.")
    p.add_argument("--factors", required=True, help="LongRoPEConfig JSON (file or shipped name)")
    p.add_argument("--model-dir", help="Hugging Face model directory to update (config.json only)")
    p.add_argument("--model", help="or a model spec ('smollm2') to load and save_pretrained into --output")
    p.add_argument("--output", help="output directory (default: update --model-dir in place)")

    # ------------------------------------------------------------------ serve
    p = sub.add_parser("serve", help="serve a model with per-request LongRoPE regimes (transformers serve)",
                       description="Run transformers' OpenAI-compatible server (`transformers serve`) with the model "
                                   "patched where it loads: each request runs the short or long factors of its own "
                                   "length, also with --continuous-batching (docs/serving.md). Every option after "
                                   "MODEL goes to `transformers serve` (see `transformers serve --help`), e.g. --host, "
                                   "--port, --device, --continuous-batching, --cb-num-blocks. Needs the serving "
                                   "packages: pip install 'longrope_triton[serve]'.")
    p.add_argument("model", help="Hugging Face model directory (or hub id) with a LongRoPE config")
    p.add_argument("options", nargs=argparse.REMAINDER, help="`transformers serve` options")
    return parser


def _run(args) -> int:
    if args.command == "demo":
        from .demo import run_demo
        run_demo(full=args.full, length=args.length, score_tokens=args.score_tokens, novel=args.novel,
                 out_dir=args.out_dir, backend=args.backend)
    elif args.command == "search":
        from .search.evolution import SearchParams
        from .search.run import run_search
        params = SearchParams.longrope2() if args.method == "longrope2" else SearchParams()
        pop = args.population or params.population
        given = dict(population=pop, iterations=args.iterations, parents=args.parents,
                     mutations=args.mutations, crossovers=args.crossovers)
        if args.population and args.parents is None:
            given["parents"] = max(1, pop // 2)
        if args.population and args.mutations is None:
            given["mutations"] = max(1, pop // 4)
        if args.population and args.crossovers is None:
            given["crossovers"] = max(1, pop // 4)
        params = params.__class__(**{**params.to_dict(), **{k: v for k, v in given.items() if v is not None},
                                     "patience": args.patience, "tolerance": args.tolerance, "seed": args.seed})
        run_search(model=args.model, text=args.text, target=args.target, method=args.method, length=args.length,
                   score_tokens=args.score_tokens, windows=args.windows, needle_samples=args.needle_samples,
                   previous=args.previous, short=args.short, params=params, log=args.log, output=args.output,
                   backend=args.backend, start_token_choices=args.start_tokens, upper=args.upper)
    elif args.command == "eval":
        from .eval.runner import run_eval
        run_eval(model=args.model, text=args.text, methods=args.methods, lengths=args.lengths, target=args.target,
                 factors=args.factors, factors2=args.factors2, score_tokens=args.score_tokens, windows=args.windows,
                 out=args.out, backend=args.backend, aligned=not args.unaligned)
    elif args.command == "passkey":
        from .eval.runner import run_passkey
        run_passkey(model=args.model, method=args.method, factors=args.factors, lengths=args.lengths,
                    target=args.target, depths=args.depths, trials=args.trials, mode=args.mode, seed=args.seed,
                    out=args.out, backend=args.backend)
    elif args.command == "finetune":
        from .train.finetune import run_finetune
        run_finetune(model=args.model, text=args.text, factors=args.factors, steps=args.steps,
                     long_tokens=args.long_tokens, short_tokens=args.short_tokens, shorts_per_row=args.shorts_per_row,
                     output=args.output, lr=args.lr, weight_decay=args.weight_decay, grad_accum=args.grad_accum,
                     gradient_checkpointing=not args.no_checkpointing, checkpoint=args.checkpoint,
                     save_every=args.save_every, seed=args.seed, context_parallel=args.context_parallel)
    elif args.command == "export":
        from .eval.runner import run_export
        run_export(factors=args.factors, model_dir=args.model_dir, model=args.model, output=args.output)
    elif args.command == "serve":
        from .hf.serve import missing_packages, serve
        missing = missing_packages()
        if missing:
            raise UsageError(f"serving needs {', '.join(missing)}: pip install 'longrope_triton[serve]'")
        serve(args.model, args.options)
    return 0


def main(argv=None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage or input error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .parallel import launched
    from .search.evolution import SearchLogError
    try:
        with launched():  # the process group of a torchrun launch (WORLD_SIZE > 1), else nothing
            return _run(args)
    except (SearchLogError, FileNotFoundError, ValueError, UsageError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"longrope-triton {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longrope-triton {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
