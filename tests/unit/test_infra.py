"""Kubernetes manifests and the Dockerfile, checked offline.

* every manifest of ``infra/k8s/base`` and ``infra/k8s/overlays/*`` (not the kustomization
  files themselves) through ``kubernetes-validate --strict``;
* the overlays rendered with ``kubectl kustomize`` (skipped with a reason where kubectl is
  not installed) and the rendered output validated the same way;
* no secret value committed: the local overlay's credentials come from a git-ignored env
  file (rendered here from the committed ``*.example``), the others only reference Secrets.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
VALIDATE = Path(sys.executable).with_name("kubernetes-validate")

pytestmark = pytest.mark.timeout(180)


def _validate(paths: list[Path]) -> None:
    if not VALIDATE.exists() and shutil.which("kubernetes-validate") is None:
        pytest.fail("kubernetes-validate is not installed (pip install kubernetes-validate)")
    exe = str(VALIDATE) if VALIDATE.exists() else "kubernetes-validate"
    proc = subprocess.run([exe, "--strict", "--quiet", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _manifests() -> list[Path]:
    files = sorted(K8S.rglob("*.yaml"))
    out = []
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d]
        if f.name == "kustomization.yaml":
            continue
        # strategic-merge patches (partial objects) are checked after rendering
        if any("spec" in d and "template" in d.get("spec", {}) and "selector" not in d["spec"] for d in docs):
            continue
        out.append(f)
    return out


def test_raw_manifests_validate_strictly() -> None:
    files = _manifests()
    assert any(f.parent.name == "base" for f in files)
    _validate(files)


def test_validator_rejects_an_unknown_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  portz: []\n")
    with pytest.raises(AssertionError):
        _validate([bad])


@pytest.fixture
def k8s_copy(tmp_path: Path) -> Path:
    """A copy of infra/k8s with the local overlay's env file created from its example."""
    dst = tmp_path / "k8s"
    shutil.copytree(K8S, dst)
    for example in dst.rglob("*.env.example"):
        example.with_name(example.name[: -len(".example")]).write_text(example.read_text())
    return dst


@pytest.mark.parametrize("target", ["base"] + [f"overlays/{o}" for o in OVERLAYS])
def test_kustomize_renders_and_validates(target: str, k8s_copy: Path, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here: overlays are not rendered "
                    "(the raw manifests are still validated by test_raw_manifests_validate_strictly)")
    proc = subprocess.run([kubectl, "kustomize", str(k8s_copy / target)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(proc.stdout)
    _validate([rendered])
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "mlflow") in kinds and ("Service", "mlflow") in kinds
    assert ("ConfigMap", "recontrast-config") in kinds
    assert all(d["metadata"].get("namespace", "recontrast") == "recontrast" for d in docs)
    secrets = [d for d in docs if d["kind"] == "Secret"]
    if target == "overlays/local":
        assert [s["metadata"]["name"] for s in secrets] == ["recontrast-s3"]
    else:
        assert secrets == []  # referenced, created out of band


def test_no_secret_values_committed() -> None:
    ignored = (K8S / "overlays" / "local" / ".gitignore").read_text()
    assert "*.env" in ignored
    assert not list(K8S.rglob("*.env")) or all(
        subprocess.run(["git", "check-ignore", "-q", str(p)], cwd=REPO).returncode == 0
        for p in K8S.rglob("*.env")
    )
    for f in K8S.rglob("*.yaml"):
        for d in yaml.safe_load_all(f.read_text()):
            if d and d.get("kind") == "Secret":
                pytest.fail(f"{f}: a Secret object with data is committed")


def test_dockerfile_is_non_root_cuda_torch_with_pipeline_extra() -> None:
    text = (REPO / "infra" / "Dockerfile").read_text()
    assert "pytorch/pytorch" in text and "cuda" in text
    assert '".[pipeline]"' in text
    assert "--constraint" in text  # torch from the base image is kept
    user_lines = [ln for ln in text.splitlines() if ln.startswith("USER ")]
    assert user_lines and user_lines[-1].split()[1] not in ("root", "0")
