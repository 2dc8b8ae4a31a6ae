"""``python -m recontrast_core.steps STEP ...``: the DVC stages' entry point.

Settings come from ``params.yaml`` (a serialised PipelineConfig) plus ``--set KEY=VALUE``
overrides. MLflow logging per step happens when ``RECONTRAST_PIPELINE_RUN_ID`` is set (or
``--pipeline-run-id``); ``register`` always talks to the registry. The steps, their input
flags and which are required come from the step records (:mod:`.records`).

``train`` runs data-parallel under ``torchrun --nproc-per-node N -m recontrast_core.steps
train ...`` (docs/distributed.md); with ``s3://`` locations (a TrainJob's nodes, which
get ``--settings-json``) it stages its inputs and output through S3 (:mod:`.train_job`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

from ..distributed import is_main_process
from ..errors import UserError
from . import STEPS, get_step, step_records
from .register import ENV_PIPELINE_RUN_ID
from .settings import apply_overrides, load_settings

FLAG_HELP = {
    "manifest": "ingest output folder or manifest.json",
    "encoder": "adapt output folder",
    "bundle": "model bundle folder (train output)",
    "report": "evaluate output folder (or its metrics.json)",
}


def _json_settings(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UserError(f"--settings-json is not JSON ({exc})") from None
    except RecursionError:
        raise UserError("--settings-json is nested too deeply to be settings") from None
    if not isinstance(value, dict):
        raise UserError("--settings-json must be a JSON object (a PipelineConfig)")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m recontrast_core.steps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=STEPS)
    ap.add_argument("--params", default="params.yaml", help="settings file (PipelineConfig)")
    ap.add_argument("--settings-json", help="the whole settings as JSON instead of --params (a TrainJob's nodes)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    ap.add_argument("--out", required=True, help="output folder (register: the result JSON)")
    flags: dict[str, list[str]] = {}
    for record in step_records():
        for port in record.inputs:
            if port.flag:
                flags.setdefault(port.flag, []).append(record.name)
    for flag, users in flags.items():
        ap.add_argument(f"--{flag}", help=f"{FLAG_HELP.get(flag, flag)} ({', '.join(users)})")
    ap.add_argument("--summary", help="evaluate: also write the scalar metrics here (DVC metrics)")
    ap.add_argument("--pipeline-run-id", default=os.environ.get(ENV_PIPELINE_RUN_ID))
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    record = get_step(args.step)
    missing = [p.flag for p in record.inputs if p.flag and not p.optional and not getattr(args, p.flag)]
    if missing:
        ap.error(f"{args.step} needs " + ", ".join("--" + n for n in missing))
    try:
        if args.settings_json:
            p = apply_overrides(_json_settings(args.settings_json), args.set)
        else:
            p = load_settings(args.params if os.path.isfile(args.params) else None, args.set)
        result: Any = record.cli(args, p, not args.no_progress, args.pipeline_run_id)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk outside the atomic writer (a dataset copy): one line
        from ..runtime import disk_full_message

        line = disk_full_message(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    if is_main_process():  # under torchrun, rank 0 answers
        print(json.dumps(result, indent=2, default=str) if isinstance(result, dict) else str(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
