"""``python -m recontrast_core.steps STEP ...``: the DVC stages' entry point.

Settings come from ``params.yaml`` (a serialised PipelineConfig) plus ``--set KEY=VALUE``
overrides. MLflow logging per step happens when ``RECONTRAST_PIPELINE_RUN_ID`` is set (or
``--pipeline-run-id``); ``register`` always talks to the registry.

``train`` runs data-parallel under ``torchrun --nproc-per-node N -m recontrast_core.steps
train ...`` (docs/distributed.md); with ``s3://`` locations (a TrainJob's nodes, which
get ``--settings-json``) it stages its inputs and output through S3 (:mod:`.train_job`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from ..distributed import is_main_process
from ..errors import UserError
from . import STEPS, adapt, evaluate, ingest, register, skip_adapt, train, train_job
from .artifacts import METRICS_SUMMARY_FILE
from .register import ENV_PIPELINE_RUN_ID
from .settings import apply_overrides, load_settings


def _json_settings(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UserError(f"--settings-json is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError("--settings-json must be a JSON object (a PipelineConfig)")
    return value


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recontrast_core.steps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=STEPS)
    ap.add_argument("--params", default="params.yaml", help="settings file (PipelineConfig)")
    ap.add_argument("--settings-json", help="the whole settings as JSON instead of --params (a TrainJob's nodes)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    ap.add_argument("--out", required=True, help="output folder (register: the result JSON)")
    ap.add_argument("--manifest", help="ingest output folder or manifest.json")
    ap.add_argument("--encoder", help="adapt output folder (train)")
    ap.add_argument("--bundle", help="model bundle folder (evaluate, register)")
    ap.add_argument("--metrics", help="metrics.json (register)")
    ap.add_argument("--summary", help="evaluate: also write the scalar metrics here (DVC metrics)")
    ap.add_argument("--pipeline-run-id", default=os.environ.get(ENV_PIPELINE_RUN_ID))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    def need(*names: str) -> None:
        missing = [n for n in names if not getattr(args, n)]
        if missing:
            ap.error(f"{args.step} needs " + ", ".join("--" + n for n in missing))

    try:
        if args.settings_json:
            p = apply_overrides(_json_settings(args.settings_json), args.set)
        else:
            p = load_settings(args.params if Path(args.params).is_file() else None, args.set)
        run = dict(pipeline_run_id=args.pipeline_run_id)
        progress = not args.no_progress
        if args.step == "ingest":
            result: Any = ingest(args.out, p, progress=progress, **run)
        elif args.step == "adapt":
            need("manifest")
            result = skip_adapt(args.out) if p.adapt_method == "none" else adapt(
                args.manifest, args.out, p, progress=progress, **run)
        elif args.step == "train":
            need("manifest")
            if train_job.is_remote(args.manifest, args.out, args.encoder):  # a TrainJob's process
                result = train_job.train_from_s3(args.manifest, args.out, p, encoder_uri=args.encoder,
                                                 progress=progress, **run)
            else:
                result = train(args.manifest, args.out, p, init_encoder=args.encoder, progress=progress, **run)
        elif args.step == "evaluate":
            need("bundle", "manifest")
            result = evaluate(args.bundle, args.manifest, args.out, p, progress=progress, **run)
            if args.summary:
                Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(args.out) / METRICS_SUMMARY_FILE, args.summary)
        else:
            need("bundle", "metrics")
            result = register(args.bundle, args.metrics, p, manifest=args.manifest, out_path=args.out, **run)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if is_main_process():  # under torchrun, rank 0 answers
        print(json.dumps(result, indent=2, default=str) if isinstance(result, dict) else str(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
