"""The ``end2reg`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so
``end2reg --help`` is fast and needs neither torch nor rclpy.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("end2reg_ros.synth.cli", "generate synthetic specimens as rosbag2 recordings"),
    "evaluate": ("end2reg_ros.evaluation", "run registration methods on recordings, print the table"),
    "results-table": ("end2reg_ros.results_table", "the README's results table from evaluate reports"),
    "calibrate": ("end2reg_ros.calibration", "fit the node's confidence on validation reports, choose the gate"),
    "fit-bone-colour": ("end2reg_ros.registration.bone_colour", "fit the global search's bone colour classifier on labelled recordings"),
    "train": ("end2reg_ros.model.train", "train End2Reg (or an ablation) on recordings"),
    "benchmark-render": ("end2reg_ros.synth.benchmark", "frames per second of the synthetic renderer"),
    "benchmark-inference": ("end2reg_ros.model.benchmark", "per-stage inference time for one frame"),
    "replay": ("end2reg_ros.ros.replay", "publish a recording over ROS 2 with its original stamps"),
    "demo": ("end2reg_ros.ros.demo", "replay a synthetic specimen through the node and report TRE"),
    "benchmark-node": ("end2reg_ros.ros.soak", "the node on its defaults for minutes: results/s, latency, TRE, memory"),
    "import-ct": ("end2reg_ros.data.ct_import", "CT label map (NIfTI/NRRD) -> model folder, one mesh per level"),
}


def build_parser(load_modules: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="end2reg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if load_modules == name:
            importlib.import_module(module_name).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(load_modules=command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
