"""`cpm2 plan`: will a model run on a machine, how fast, in how much memory, before the download.

cpm2 plan --config CONFIG.json --hardware PROFILE [--experts int4 ...] [--budget 4GiB ...] [--batch 1 16]
cpm2 plan --measure [--out FILE]        # this machine's profile
cpm2 plan --list-hardware               # the shipped profiles and their sources
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from engine.errors import ConfigError
from engine.planner.measure import MeasureOptions, measure_profile
from engine.planner.predict import DENSE_FORMATS, EXPERT_FORMATS, PlanCase, Prediction, predict
from engine.planner.profile import load_profile, reference_profiles
from engine.planner.recording import RoutingRecord, moe_layer_names
from engine.sizes import format_bytes
from engine.weights.loader import inspect_config


def cmd_plan(args: argparse.Namespace) -> int:
    if args.list_hardware:
        for name, path in sorted(reference_profiles().items()):
            profile = load_profile(path)
            print(f"{name:24s} {profile.source}")
        return 0
    if args.measure:
        scratch = args.scratch or Path.cwd()
        options = MeasureOptions.quick(scratch) if args.quick else MeasureOptions(scratch=scratch)
        profile = measure_profile(options, name=args.name, log=lambda m: print(m, flush=True))
        out = args.out or Path(f"{profile.name}.json")
        profile.save(out)
        print(f"wrote {out}")
        return 0
    if args.config is None or args.hardware is None:
        raise ConfigError("cpm2 plan needs --config CONFIG.json and --hardware PROFILE (or --measure, --list-hardware)")
    config = inspect_config(args.config).config
    profile = load_profile(args.hardware)
    record = RoutingRecord(popularity={})  # uniform routing, unless a recording says otherwise
    if args.routing is not None:
        record = RoutingRecord.load(args.routing)
        record.check(config, path=args.routing)
    popularity = record.popularity or None
    # --reuse and --concentration, where given, override what a recording fitted, in every layer.
    reuse = record.reuse
    if args.reuse is not None:
        if not 0 <= args.reuse <= 1:
            raise ConfigError(f"--reuse {args.reuse}: a share in [0, 1] (0: every decode step routes afresh)")
        decoder_layers = config.moe.decoder_layers if config.moe is not None else ()
        reuse = {f"decoder.{layer}": args.reuse for layer in decoder_layers}
    concentration = record.concentration
    if args.concentration is not None:
        if not args.concentration > 0:
            raise ConfigError(
                f"--concentration {args.concentration}: must be > 0 (small: a request's input tokens share few "
                "experts; leave it out for independent tokens)"
            )
        encoder_layers = config.moe.encoder_layers if config.moe is not None else ()
        concentration = {f"encoder.{layer}": args.concentration for layer in encoder_layers}
    precision = record.precision
    if args.precision is not None:
        if not 0 <= args.precision <= 1:
            raise ConfigError(
                f"--precision {args.precision}: a share in [0, 1] "
                "(the share of the provider's expert predictions that are right)"
            )
        precision = dict.fromkeys(moe_layer_names(config), args.precision)
    predictions = [
        predict(
            config,
            profile,
            PlanCase(
                batch=batch,
                budget=budget,
                experts=experts,
                group_size=args.group_size,
                dense=args.dense,
                source_len=args.source_len,
                window=args.window,
            ),
            popularity=popularity,
            reuse=reuse,
            concentration=concentration,
            precision=precision,
        )
        for experts in args.experts
        for budget in args.budget
        for batch in args.batch
    ]
    if args.json:
        print(json.dumps({"hardware": profile.to_dict(), "predictions": [p.to_dict() for p in predictions]}, indent=2))
        return 0
    # Piped output (a file, a test) gets a table wide enough not to fold its headers.
    console = Console(width=None if sys.stdout.isatty() else 160)
    print_predictions(str(args.config), profile.name, predictions, console, prefetch=bool(precision))
    return 0


def print_predictions(
    model: str, hardware: str, predictions: list[Prediction], console: Console, *, prefetch: bool = False
) -> None:
    guesses = "prefetch at the given precision" if prefetch else "no prefetch"
    table = Table(title=f"{model} on {hardware} (predicted: teacher-forced decode, strict offloading, {guesses})")
    columns = ("experts", "budget", "batch", "runs", "memory", "experts on disk", "TTFT s", "tok/s cold", "tok/s warm")
    for col in (*columns, "MB read/tok", "hit", "bound by"):
        table.add_column(col, justify="right")
    for p in predictions:
        warm = p.warm
        table.add_row(
            p.case.experts,
            p.case.budget,
            str(p.case.batch),
            "yes" if not p.problems else "no",
            f"{format_bytes(p.memory.total_bytes)} / {format_bytes(p.memory.limit_bytes)}",
            format_bytes(p.plan.store_bytes) if p.plan.is_offloaded else "-",
            f"{p.ttft_seconds:.2f}",
            f"{p.cold.tokens_per_second:.2f}",
            f"{warm.tokens_per_second:.2f}",
            f"{warm.bytes_read_per_token / 1e6:.0f}",
            f"{warm.hit_rate:.2f}",
            warm.bound_by,
        )
    console.print(table)
    for p in predictions:
        for problem in p.problems:
            console.print(f"[{p.case.experts} {p.case.budget} batch {p.case.batch}] {problem}")


def add_plan_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan", help="predict memory, TTFT and tok/s of a model on a machine (no weights needed); --measure this one"
    )
    p.add_argument("--config", type=Path, help="a config.json (native or Hugging Face) or a directory holding one")
    p.add_argument("--hardware", help="a profile file, or a shipped profile's name (--list-hardware)")
    p.add_argument("--experts", nargs="+", default=["bfloat16"], choices=EXPERT_FORMATS, help="expert formats")
    p.add_argument("--group-size", type=int, default=128, help="int4 experts' group size (default 128)")
    p.add_argument("--dense", default="bfloat16", choices=DENSE_FORMATS, help="dense weights' format")
    p.add_argument("--budget", nargs="+", default=["25%"], help="--expert-memory values (sizes or shares)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16], help="batch sizes")
    p.add_argument("--source-len", type=int, default=32, help="input tokens per request")
    p.add_argument("--window", type=int, default=4, help="expert loads in flight (--expert-window)")
    p.add_argument(
        "--routing",
        type=Path,
        help="routing recorded by `cpm2 generate --record-routing FILE` (popularity, reuse and concentration per "
        'layer), or bare tokens per expert per layer, {"decoder.3": [...]}: routing drawn from it (default uniform)',
    )
    p.add_argument(
        "--reuse",
        type=float,
        help="share of a decode step's expert choices that go to experts the request chose at earlier steps, in "
        "every decoder layer (bench.plan_validation prints what runs show; default: the --routing recording's, "
        "else 0: every step routes afresh)",
    )
    p.add_argument(
        "--concentration",
        type=float,
        help="how alike a request's input tokens route in its encoder pass: the Dirichlet concentration of its "
        "expert preferences (small: few experts a request; bench.plan_validation prints what runs show; default: "
        "the --routing recording's, else every token on its own, the most an encoder pass reads)",
    )
    p.add_argument(
        "--precision",
        type=float,
        help="share of the provider's expert predictions that are right, in every MoE layer (each from the layer "
        "before it, or the first from its stack's input): its guessed "
        "loads are replayed (`cpm2 generate --details` prints prefetch_precision; measured 0.38-0.57 on the random "
        "bench models, 0.93-0.96 on a random NLLB-MoE 54B; default: the --routing recording's, else no prefetch)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--measure", action="store_true", help="measure this machine and write its profile")
    p.add_argument("--out", type=Path, help="--measure: where to write the profile (default NAME.json)")
    p.add_argument("--name", help="--measure: the profile's name")
    p.add_argument("--scratch", type=Path, help="--measure: a folder on the disk experts will be read from")
    p.add_argument("--quick", action="store_true", help="--measure: seconds instead of a minute, rougher")
    p.add_argument("--list-hardware", action="store_true", help="list the shipped hardware profiles")
    p.set_defaults(handler=cmd_plan)
