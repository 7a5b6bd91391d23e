"""The `shoptune` command: run a stage in its environment, and the direct tools.

    shoptune run STAGE --profile P [--runner local|docker]
    shoptune evaluate QUESTIONS.jsonl PREDICTIONS.jsonl --out METRICS.json
    shoptune pad MODEL_DIR OUT_DIR --group-size N --tensor-parallel-size N
    shoptune build [IMAGE...]        build the runner's environments (venvs or images)
    shoptune lock [IMAGE...]         regenerate docker/<image>/lock-*.txt from the requirements
    shoptune plan --profile P [--config CONFIG.json] [--tensor-parallel-size N] [--json]
    shoptune doctor --profile P [--stage STAGE ...] [--config CONFIG.json]
    shoptune compare PROFILE PROFILE...   the profiles' headline scores side by side

The runner is --runner, else $SHOPTUNE_RUNNER, else local.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shoptune import UserError, environments, params, runner
from shoptune import doctor as doctor_checks

RUNNERS = ("local", "docker")
# Commands whose arguments belong to the stage program (its own --help included).
DIRECT = ("evaluate", "pad")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="shoptune", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--runner",
        choices=RUNNERS,
        default=os.environ.get("SHOPTUNE_RUNNER") or "local",
        help="where stages run (default: $SHOPTUNE_RUNNER or local)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one pipeline stage (what dvc.yaml calls)")
    run.add_argument("stage", choices=list(runner.IMAGES))
    run.add_argument("--profile", required=True)

    commands.add_parser("evaluate", help="score predictions as ShopBench does (shoptune evaluate --help)")
    commands.add_parser("pad", help="pad a model's MLP for AWQ under tensor parallelism (shoptune pad --help)")

    plan = commands.add_parser("plan", help="does the profile fit its hardware? sizes, GPU memory, RAM, disk")
    plan.add_argument("--profile", required=True)
    plan.add_argument("--tensor-parallel-size", type=int, help="instead of infer.tensor_parallel_size")
    plan.add_argument("--overhead-gib", type=float, help="per-GPU allowance for activations and CUDA graphs (1)")
    plan.add_argument("--json", action="store_true", help="the figures and checks as JSON")
    doctor = commands.add_parser("doctor", help="is this machine ready for the profile? Docker, GPUs, disk, RAM, key")
    doctor.add_argument("--profile", required=True)
    doctor.add_argument(
        "--stage", action="append", choices=doctor_checks.STAGES, help="only what this stage needs (repeatable)"
    )
    for command in (plan, doctor):
        command.add_argument("--config", type=Path, help="the model's config.json (default: finetune.base_model's)")

    compare = commands.add_parser("compare", help="the headline scores of several profiles side by side")
    compare.add_argument("profiles", nargs="+", metavar="PROFILE")

    build = commands.add_parser("build", help="build the runner's environments: .venvs/IMAGE or Docker images")
    lock = commands.add_parser("lock", help="regenerate docker/IMAGE/lock-*.txt (uv) from the requirements")
    for command in (build, lock):
        command.add_argument("images", nargs="*", default=environments.images())
    build.add_argument("--accelerator", choices=environments.ACCELERATORS, default="cpu", help="which lock to install")
    lock.add_argument("--uv", default="uv", help="the uv executable (default: uv on the PATH)")

    # evaluate and pad hand every argument after their name to the stage program
    split = command_position(argv)
    split = split if split is not None and argv[split] in DIRECT else None
    args = parser.parse_args(argv if split is None else argv[: split + 1])
    if os.environ.get("SHOPTUNE_RUNNER") and os.environ["SHOPTUNE_RUNNER"] not in RUNNERS:
        parser.error(f"SHOPTUNE_RUNNER={os.environ['SHOPTUNE_RUNNER']}: expected one of {', '.join(RUNNERS)}")
    try:
        if args.command == "run":
            profile = params.load_profile(args.profile)  # the whole profile checked before anything runs
            status = runner.run(args.stage, ["--profile", args.profile], args.runner, args.profile, profile)
        elif args.command in DIRECT:
            status = runner.run(args.command, argv[split + 1 :], args.runner)
        elif args.command == "plan":
            status = show_plan(args)
        elif args.command == "doctor":
            stages = args.stage or list(doctor_checks.STAGES)
            results = doctor_checks.diagnose(args.profile, args.runner, stages, args.config)
            print(doctor_checks.render(args.profile, args.runner, stages, results))
            status = 1 if any(not r.ok for r in results) else 0
        elif args.command == "compare":
            from shoptune.comparison import table

            print(table(args.profiles))
            status = 0
        elif args.command == "build":
            for image in args.images:
                print(runner.build(args.runner, image, args.accelerator))
            status = 0
        else:
            for image in args.images:
                for accelerator in environments.ACCELERATORS:
                    print(environments.compile_lock(image, accelerator, args.uv))
            status = 0
    except UserError as err:
        print(f"shoptune: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(status)


def show_plan(args) -> int:
    """Print the plan; 1 and each reason on stderr, one a line, when the profile does not fit."""
    from shoptune import plan

    result = plan.load(args.profile, args.config, args.tensor_parallel_size, args.overhead_gib)
    print(plan.as_json(result) if args.json else plan.render(result))
    for check in result.failures:
        print(f"shoptune: plan: {args.profile}: {check.detail}", file=sys.stderr)
    return 0 if result.fits else 1


def command_position(argv: list[str]) -> int | None:
    """Where the command's name stands in argv (after the global options)."""
    i = 0
    while i < len(argv):
        if argv[i] == "--runner":
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            return i
    return None
