"""The `shoptune` command: run a stage in its environment, and the direct tools.

    shoptune run STAGE --profile P [--runner local|docker]
    shoptune evaluate QUESTIONS.jsonl PREDICTIONS.jsonl --out METRICS.json
    shoptune pad MODEL_DIR OUT_DIR --group-size N --tensor-parallel-size N
    shoptune env IMAGE...            build the local environments
    shoptune images IMAGE...         build the Docker images

The runner is --runner, else $SHOPTUNE_RUNNER, else local.
"""

from __future__ import annotations

import argparse
import os
import sys

from shoptune import UserError, params, runner

RUNNERS = ("local", "docker")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shoptune", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--runner",
        choices=RUNNERS,
        default=os.environ.get("SHOPTUNE_RUNNER", "local"),
        help="where stages run (default: $SHOPTUNE_RUNNER or local)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one pipeline stage (what dvc.yaml calls)")
    run.add_argument("stage", choices=list(runner.IMAGES))
    run.add_argument("--profile", required=True)

    evaluate = commands.add_parser("evaluate", help="score predictions as ShopBench does", add_help=False)
    evaluate.add_argument("args", nargs=argparse.REMAINDER)
    pad = commands.add_parser("pad", help="pad a model's MLP for AWQ under tensor parallelism", add_help=False)
    pad.add_argument("args", nargs=argparse.REMAINDER)

    env = commands.add_parser("env", help="build local environments (.venvs/IMAGE)")
    images = commands.add_parser("images", help="build Docker images (docker/IMAGE)")
    for command in (env, images):
        command.add_argument("images", nargs="*", default=sorted(set(runner.IMAGES.values())))
        command.add_argument(
            "--accelerator",
            choices=("cpu", "cuda"),
            default="cpu",
            help="which requirement variant (requirements-cpu.txt or -cuda.txt)",
        )

    args = parser.parse_args(argv)
    if os.environ.get("SHOPTUNE_RUNNER") and os.environ["SHOPTUNE_RUNNER"] not in RUNNERS:
        parser.error(f"SHOPTUNE_RUNNER={os.environ['SHOPTUNE_RUNNER']}: expected one of {', '.join(RUNNERS)}")
    try:
        if args.command == "run":
            gpus = bool(params.read_profile(args.profile).get("gpus", False))
            status = runner.run(args.stage, ["--profile", args.profile], args.runner, gpus)
        elif args.command in ("evaluate", "pad"):
            status = runner.run(args.command, args.args, args.runner)
        elif args.command == "env":
            for image in args.images:
                print(runner.local_python(image, args.accelerator))
            status = 0
        else:
            client = runner.docker_client()
            for image in args.images:
                print(runner.ensure_image(client, image, args.accelerator))
            status = 0
    except UserError as err:
        print(f"shoptune: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(status)
