"""``recontrast registry status [--all] | promote | rollback`` (mounted by cli.py as ``registry``).

Every command takes ``--model-name`` (default ``recontrast``), ``--tracking-uri`` (default
``MLFLOW_TRACKING_URI``, else the embedded ``sqlite:///./mlflow.db``) and ``--json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import console, emit_json, summary_table, user_errors

registry_app = typer.Typer(
    name="registry",
    help="Model registry: champion / challenger aliases, gated promotion, rollback.",
    no_args_is_help=True,
)

ModelName = typer.Option("recontrast", "--model-name", "-m", help="Registered model name.")
TrackingUri = typer.Option(
    None,
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking/registry URI (default: sqlite:///./mlflow.db).",
)
AsJson = typer.Option(False, "--json", help="Machine-readable output on stdout.")


def _client(tracking_uri: Optional[str]):
    from ..mlops import registry

    # create=False: every registry command needs an existing registered model, so a
    # mistyped or absent SQLite store is an error here, not a new empty database
    return registry.get_client(tracking_uri, create=False)


def _parse_floors(floors: list[str]) -> dict[str, float]:
    out = {}
    for item in floors:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise UserError(f"--floor must look like METRIC=VALUE, not {item!r}") from None
    return out


@registry_app.command("status")
def status_cmd(
    model_name: str = ModelName,
    all_lines: bool = typer.Option(False, "--all", help="The fleet: every product line's champion (models named "
                                   "recontrast and recontrast-<line>), its kind, primary metric, age and the last "
                                   "monitor verdict."),
    tracking_uri: Optional[str] = TrackingUri,
    as_json: bool = AsJson,
) -> None:
    """Aliases (champion, challenger, previous_champion) and every version's key metrics;
    with --all, one row per product line."""
    from rich.table import Table

    from ..mlops import registry

    with user_errors():
        if all_lines:
            _fleet(tracking_uri, as_json)
            return
        info = registry.status(model_name, client=_client(tracking_uri))
        if as_json:
            emit_json(info)
            return
        console.print(summary_table(f"{model_name}: aliases", info["aliases"] or {"(none)": ""}))
        table = Table(title=f"{model_name}: versions", header_style="bold")
        for col in ("version", "aliases", "image_auroc", "pixel_auroc", "fingerprint", "decision", "reason"):
            table.add_column(col)
        for v in info["versions"]:
            m = v["metrics"]
            table.add_row(
                v["version"],
                ",".join(v["aliases"]),
                f"{m['image_auroc']:.4f}" if "image_auroc" in m else "",
                f"{m['pixel_auroc']:.4f}" if "pixel_auroc" in m else "",
                (v.get("dataset_fingerprint") or "")[:12],
                v.get("decision") or "",
                v.get("reason") or "",
            )
        console.print(table)


def _fleet(tracking_uri: Optional[str], as_json: bool) -> None:
    from rich.table import Table

    from ..mlops.fleet import fleet_status

    rows = fleet_status(_client(tracking_uri))
    if as_json:
        emit_json({"lines": rows})
        return
    if not rows:
        raise UserError("no registered model named recontrast or recontrast-<line> in this registry")
    table = Table(title="fleet: the champion of each product line (model recontrast-<line>)", header_style="bold")
    for col in ("line", "champion", "kind", "primary metric", "age", "monitor", "challenger"):
        table.add_column(col, no_wrap=col in ("monitor", "champion"))
    for r in rows:
        value = f"{r['primary_metric']} {r['primary_value']:.3f}" if r["primary_value"] is not None else ""
        table.add_row(r["line"] or "(no line)", f"v{r['champion']}" if r["champion"] else "none",
                      r["model_kind"] or "", value, r["age"], r["monitor_verdict"] or "",
                      f"v{r['challenger']}" if r["challenger"] else "")
    console.print(table)


@registry_app.command("promote")
def promote_cmd(
    version: Optional[str] = typer.Argument(
        None, help="Version to promote (default: the one aliased 'challenger')."
    ),
    reason: Optional[str] = typer.Option(
        None, "--reason", help="Why (required for a forced promotion)."
    ),
    gate: bool = typer.Option(
        False, "--gate", help="Run the promotion gate (floors + margin) instead of forcing."
    ),
    floor: list[str] = typer.Option(
        [], "--floor", help="Absolute floor METRIC=VALUE (repeatable; default: the policy's, image_auroc=0.7)."
    ),
    primary_metric: Optional[str] = typer.Option(None, "--primary-metric", help="Default: the policy's (image_auroc)."),
    margin: Optional[float] = typer.Option(None, "--margin", min=0.0, help="Default: the policy's (0.005)."),
    eval_manifest: Optional[Path] = typer.Option(
        None,
        "--eval-manifest",
        help="With --gate: re-evaluate the champion on this manifest when it was "
        "evaluated on other data.",
    ),
    model_name: str = ModelName,
    tracking_uri: Optional[str] = TrackingUri,
    as_json: bool = AsJson,
) -> None:
    """Make a version the champion: forced (with --reason) or through the gate (--gate)."""
    from ..mlops import registry

    with user_errors():
        client = _client(tracking_uri)
        registry.get_registered_model(client, model_name)
        if version is None:
            mv = registry.alias_version(client, model_name, registry.CHALLENGER)
            if mv is None:
                raise UserError(f"{model_name}: no version given and no 'challenger' alias")
            version = str(mv.version)
        registry.get_version(client, model_name, version)
        if gate:
            from ..promotion import PromotionPolicy

            given = {"floors": _parse_floors(floor) if floor else None, "primary_metric": primary_metric,
                     "margin": margin}
            policy = PromotionPolicy(**{k: v for k, v in given.items() if v is not None})
            fn = None
            if eval_manifest is not None:
                from ..steps.artifacts import load_manifest
                from ..steps.register import champion_reevaluator

                fn = champion_reevaluator(client, model_name, load_manifest(eval_manifest))
            decision = registry.promote_if_better(client, model_name, version, policy, fn)
        else:
            if not reason:
                raise UserError("a forced promotion needs --reason (or use --gate)")
            decision = registry.force_promote(model_name, version, reason, client=client)
        payload = {
            "model_name": model_name,
            "version": version,
            "promoted": decision.promote,
            "reason": decision.reason,
        }
        if as_json:
            emit_json(payload)
        else:
            console.print(summary_table("promotion", payload))


@registry_app.command("rollback")
def rollback_cmd(
    reason: str = typer.Option("", "--reason", help="Why (stored on the demoted version)."),
    model_name: str = ModelName,
    tracking_uri: Optional[str] = TrackingUri,
    as_json: bool = AsJson,
) -> None:
    """Put previous_champion back as champion."""
    from ..mlops import registry

    with user_errors():
        result = registry.rollback(model_name, reason=reason, client=_client(tracking_uri))
        payload = {"model_name": model_name, **result}
        if as_json:
            emit_json(payload)
        else:
            console.print(summary_table("rollback", payload))
