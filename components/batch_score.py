"""batch_score: score the images of a folder or an s3:// prefix with a bundle or a registered
model; results (parts, results.parquet, results.csv, overlays) go to a folder or an s3://
prefix. Restart-safe: a retried task resumes from the parts already written."""

from kfp import dsl
from kfp.dsl import Metrics, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def batch_score_op(
    model_uri: str,
    input_uri: str,
    output_uri: str,
    chunk_size: int,
    device: str,
    run_subfolder: bool,
    kfp_run_id: str,
    metrics: Output[Metrics],
) -> str:
    """Returns the run's summary JSON (counts, results URIs, up to 100 unreadable images);
    ``run_subfolder`` writes to ``output_uri/<KFP run id>/`` instead of ``output_uri``."""
    import json

    from recontrast_core.mlops.batch_scoring import output_for_run, run_batch_scoring

    output = output_for_run(output_uri, kfp_run_id if run_subfolder else "")
    summary = run_batch_scoring(model_uri, [input_uri], output, chunk_size=chunk_size, device=device, progress=False)
    for key in ("images", "scored", "reused", "unreadable", "anomalous"):
        metrics.log_metric(key, float(summary[key]))
    for row in summary["failed"]:
        print(f"unreadable: {row['path']}: {row['error']}")
    return json.dumps({**summary, "failed": summary["failed"][:100]}, default=str)
