"""``recontrast review export | import``: the human review loop (docs/operations.md, "Review").

``export`` writes the flagged and borderline images of a batch-scoring table as a LabelMe
project with polygons from the model's anomaly maps; ``import`` brings the reviewed project
back into the dataset (anomalies with their polygons into the test split, normals into
training) as a new DVC version pushed to the remote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import console, emit_json, summary_table, user_errors

review_app = typer.Typer(help="Human review: export doubtful images to LabelMe, import the reviewed ones into "
                              "the dataset (a new DVC version).", no_args_is_help=True)


def _band(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition(",")
    try:
        if not sep:
            raise ValueError
        return float(lo), float(hi)
    except ValueError:
        raise UserError(f"--band takes LO,HI (normalised scores around the threshold 0.5), not {text!r}") from None


@review_app.command("export")
def export_command(
    scores: str = typer.Option(..., "--scores", help="A batch-scoring table: results.parquet / results.csv, its "
                                                     "output folder, or the same under s3://"),
    out: Path = typer.Option(..., "--out", "-o", help="The LabelMe project folder to write (new)"),
    band: str = typer.Option("0.4,0.6", "--band", help="Borderline band of the normalised score, LO,HI (0.5 is the "
                                                       "threshold)"),
    flagged: bool = typer.Option(True, "--flagged/--no-flagged", help="Also every image the model flagged"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many images (the most doubtful "
                                                                      "first)"),
    label: str = typer.Option("anomaly", "--label", help="Label of the pre-filled polygons (the defect type)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Score with this model (default: the exact "
                                        "version that scored the table)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    device: str = typer.Option("auto", "--device"),
    json_out: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """The flagged images and those in the borderline band, as a LabelMe project with
    polygons pre-filled from the anomaly map at the threshold."""
    with user_errors():
        from ..mlops.review_loop import export_from_table

        payload = export_from_table(scores, out, band=_band(band), model_uri=model, tracking_uri=tracking_uri,
                                    label=label, limit=limit, flagged=flagged, device=device, progress=progress)
        console.print(summary_table("review export", {
            "images": len(payload["items"]), **payload["counts"],
            "polygons": sum(i["polygons"] for i in payload["items"]), "model": payload["model"].get("version"),
            "folder": str(out)}))
        console.print(payload["instructions"], highlight=False, soft_wrap=True)
        if json_out:
            emit_json(payload)


@review_app.command("import")
def import_command(
    project: Path = typer.Argument(..., help="The reviewed LabelMe project (from `review export`)"),
    dataset: Path = typer.Option(..., "--dataset", help="The dataset root (MVTec or LabelMe layout) in a DVC "
                                                        "repository"),
    layout: str = typer.Option("auto", "--layout", help="auto | mvtec | labelme"),
    dvc: bool = typer.Option(True, "--dvc/--no-dvc", help="Version the dataset with DVC (add, push, git commit)"),
    remote: Optional[str] = typer.Option(None, "--remote", help="DVC remote (default: the repository's)"),
    push: bool = typer.Option(True, "--push/--no-push", help="Push the new version to the DVC remote"),
    commit: bool = typer.Option(True, "--commit/--no-commit", help="Commit the .dvc file to git"),
    tag: Optional[str] = typer.Option(None, "--tag", help="Tag the commit (a dataset version name)"),
    json_out: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Confirmed anomalies (reviewed, with regions) into the test split with their masks,
    confirmed normals (reviewed, no regions) into training; the dataset is checked before
    and after, then versioned with DVC."""
    with user_errors():
        from ..mlops.review_loop import import_review

        payload = import_review(project, dataset, layout=layout, dvc=dvc, remote=remote, push=push, commit=commit,
                                tag=tag, progress=progress)
        version = payload.get("dvc") or {}
        console.print(summary_table("review import", {
            "anomalies": payload["anomalies"], "normals": payload["normals"],
            "already in the dataset": len(payload["skipped_duplicates"]), "not reviewed": payload["unreviewed"],
            "skipped": payload["skipped"], "files written": len(payload["written"]),
            "fingerprint": str(payload.get("fingerprint") or "")[:12],
            "dvc md5": version.get("md5") or "", "pushed": version.get("pushed", ""),
            "git commit": (version.get("commit") or "")[:12]}))
        if json_out:
            emit_json(payload)
