"""``recontrast serve --model models:/NAME@champion``: the KServe custom predictor.

Open inference protocol v2 over REST on ``--port`` (docs/serving.md): ``POST
/v2/models/<NAME>/infer``, ``/v2/health/live``, ``/v2/models/<NAME>/ready``. The alias is
re-resolved every ``--poll-s`` seconds and a moved alias is loaded and swapped in
(:mod:`recontrast_core.mlops.serving.kserve_predictor`). Also ``python -m recontrast_core.cli serve``.
Bad flags, an unknown model or alias exit with code 2 and one line.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import typer

from ..errors import UserError
from .common import user_errors

# Without the serve extra the command stays listed and explains itself (cli/app.py _mount);
# find_spec keeps `recontrast --help` from importing kserve.
for _module in ("kserve", "mlflow"):
    if importlib.util.find_spec(_module) is None:
        raise ImportError(f"No module named {_module!r}")


def serve_command(
    model: str = typer.Option(..., "--model", "-m", envvar="RECONTRAST_MODEL_URI",
                              help="models:/NAME@ALIAS (re-resolved every --poll-s) or models:/NAME/VERSION"),
    port: int = typer.Option(8080, "--port", "-p", envvar="RECONTRAST_SERVE_PORT", help="HTTP port"),
    poll_s: float = typer.Option(30.0, "--poll-s", envvar="RECONTRAST_POLL_S",
                                 help="Seconds between alias checks; 0 = load once"),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in the v2 paths (default: NAME)"),
    device: str = typer.Option("auto", "--device", envvar="RECONTRAST_DEVICE", help="auto | cpu | cuda | cuda:N"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow tracking/registry URI"),
    score_log: Optional[str] = typer.Option(None, "--score-log", envvar="RECONTRAST_SCORE_LOG",
                                            help="Folder or s3:// prefix: one row per scored image, for "
                                                 "`recontrast monitor` (off by default)"),
) -> None:
    """Serve a registered model with KServe's ModelServer (open inference protocol v2);
    reload when the alias moves."""
    with user_errors():
        if not 0 < port < 65536:
            raise UserError(f"--port must be 1..65535, not {port}")
        if poll_s < 0:
            raise UserError(f"--poll-s must be >= 0, not {poll_s}")
        if name is not None and not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise UserError(f"--name may hold letters, digits, '-', '_' and '.', not {name!r}")
        from ..mlops.serving.kserve_predictor import serve

        serve(model, name=name, port=port, poll_s=poll_s, device=device, tracking_uri=tracking_uri,
              score_log=score_log or None)
