"""The GPU suite runs end to end on CPU with --tiny, so it cannot rot between GPU sessions;
its files survive a killed run; its levers and fallbacks do what they claim. Data:
``tiles_root`` (magnetic-tile-dev, or its synthetic stand-in where that is absent). A missing
or broken benchmarks/gpu_suite.py is an error, not a skip."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_suite  # noqa: E402  (benchmarks/gpu_suite.py: a missing module fails, never skips)


@pytest.mark.slow
def test_gpu_suite_tiny_runs_every_section(tiles_root, tmp_path):
    rc = gpu_suite.main(["--out", str(tmp_path / "out"), "--tiny", "--data", str(tiles_root)])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    env = res["environment"]
    assert env["torch"] == torch.__version__ and env["timm"] and "cudnn" in env and "cuda" in env
    assert env["device"].startswith("cpu") and env["adamw"] == "unfused (CPU)" and "tf32" in env
    assert res["status"] == "complete" and res["in_progress"] is None
    sections = res["sections"]
    assert set(sections) == {"smoke", "speed", "accuracy", "parity", "levers"}
    assert res["completed_sections"] == list(gpu_suite.SECTIONS)
    failed = {f"{s}.{c}": r.get("error") for s, checks in sections.items() for c, r in checks.items() if not r["ok"]}
    assert not failed, failed
    assert set(sections["smoke"]) == {"train", "adapt_msc", "adapt_coft", "evaluate", "predict"}
    speed = sections["speed"]
    assert set(speed) == {"paper", "paper_fp32", "paper_nchw", "lite0"}
    assert speed["paper"]["train_images_per_s"] > 0 and speed["lite0"]["eval_images_per_s"] > 0
    assert speed["paper"]["backbone"] == "wide_resnet50_2" and speed["paper"]["channels_last"] is True
    assert speed["paper_fp32"]["precision"] == "fp32" and speed["paper_nchw"]["channels_last"] is False
    assert all(r["adamw"] == "unfused" for r in speed.values())
    acc = sections["accuracy"]["lite0_paper_schedule"]
    assert acc["kind"] == "recontrast"
    assert 0 <= acc["image_auroc"] <= 1 and 0 <= acc["baseline_image_auroc"] <= 1
    for kind in ("patchknn", "fused"):  # the other model kinds, scored beside it
        assert sections["accuracy"][kind]["kind"] == kind and 0 <= sections["accuracy"][kind]["image_auroc"] <= 1
    par = sections["parity"]["fp32_vs_bf16"]
    assert par["recommended_inference_precision"] in ("bf16", "fp32") and par["n_images"] == 12
    assert par["bundle"] == "accuracy" and "TF32 off" in par["fp32_reference"]
    md = (tmp_path / "out" / "gpu_suite.md").read_text()
    assert "## parity" in md and "fp32_vs_bf16" in md and f"torch {torch.__version__}" in md


def _poll_json(path, proc, until, timeout_s=180.0):
    """The suite's JSON once ``until(results)`` holds (every read must parse: writes are atomic)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            res = json.loads(path.read_text())
            if until(res):
                return res
        if proc.poll() is not None:
            pytest.fail(f"the suite ended (rc {proc.returncode}) before the condition held")
        time.sleep(0.05)
    pytest.fail(f"{path}: condition not met within {timeout_s} s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killed_run_leaves_the_finished_sections(tiles_root, tmp_path, sig):
    out = tmp_path / "out"
    # TMPDIR: the killed suite's work folder (bundles, checkpoints) lands in tmp_path.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_suite.py"), "--tiny", "--sections", "smoke,speed",
         "--out", str(out), "--data", str(tiles_root)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(tmp_path))
    try:
        _poll_json(out / "gpu_suite.json", proc, lambda r: "smoke" in r["completed_sections"])
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res = json.loads((out / "gpu_suite.json").read_text())
    assert res["environment"]["torch"] == torch.__version__
    smoke = res["sections"]["smoke"]
    assert set(smoke) == {"train", "adapt_msc", "adapt_coft", "evaluate", "predict"}
    assert all(r["ok"] for r in smoke.values()), smoke
    assert "## smoke" in (out / "gpu_suite.md").read_text()
    if sig == signal.SIGTERM:  # what `timeout` sends: the suite marks the run and exits 124
        assert proc.returncode == 124, err.decode()[-2000:]
        assert res["status"] == "interrupted" and "signal" in res["interrupted"]
    else:
        assert proc.returncode == -signal.SIGKILL
        assert res["status"] in ("running", "complete")


def _tiny_suite(tmp_path, monkeypatch, **kw):
    monkeypatch.setattr(gpu_suite.tempfile, "tempdir", str(tmp_path))  # its work folder in tmp_path
    args = argparse.Namespace(tiny=True, device="cpu", data=tmp_path, out=None, compile=False, bundle=None, iterations=3)
    vars(args).update(kw)
    return gpu_suite.Suite(args, gpu_suite.SECTIONS, env={"device": "cpu"})


def test_compile_lever_compiles_the_module_the_trainer_calls(tmp_path, monkeypatch):
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(x.shape[0])
            return self.inner(x)

    monkeypatch.setattr(torch, "compile", lambda module, **_: Recorder(module))
    out = _tiny_suite(tmp_path, monkeypatch)._speed_one(gpu_suite.LITE0, compile_model=True)
    assert out["compiled"] == "trainer.net" and out["compile_s"] is not None
    assert len(calls) == 1 + 1 + 2  # the compile step, the warm-up, the timed steps: all through the compiled module


def test_sections_run_in_the_suite_order(tmp_path):
    assert gpu_suite.parse_sections("parity,smoke,smoke") == (["smoke", "parity"], [])
    assert gpu_suite.parse_sections("speed,nope") == (["speed"], ["nope"])


def test_gpu_suite_rejects_unknown_section(tmp_path, capsys):
    assert gpu_suite.main(["--out", str(tmp_path), "--tiny", "--sections", "smoke,nope"]) == 2
    captured = capsys.readouterr()
    assert "nope" in captured.err and f"torch {torch.__version__}" in captured.out  # versions come first


def test_tf32_off_restores_the_settings():
    before = gpu_suite.tf32_flags()
    with gpu_suite.tf32_off():
        inside = gpu_suite.tf32_flags()
        assert not inside["matmul_allow_tf32"] and not inside["cudnn_allow_tf32"]
        assert inside["float32_matmul_precision"] == "highest"
    assert gpu_suite.tf32_flags() == before


def test_fused_adamw_step_failure_falls_back_to_unfused(monkeypatch):
    from recontrast_core.train import Trainer

    import torch.optim.adam as adam_mod

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

    net = Tiny()
    trainer = Trainer.__new__(Trainer)  # only what trainer_step touches
    trainer.opt_decoder = torch.optim.AdamW(net.a.parameters(), lr=0.01, weight_decay=0.1, fused=True)
    trainer.opt_encoder = torch.optim.AdamW(net.b.parameters(), lr=0.002, fused=True)

    def step(x, alpha):
        loss = (net.a(x).sum() + net.b(x).sum()) * alpha
        trainer.opt_decoder.zero_grad()
        trainer.opt_encoder.zero_grad()
        loss.backward()
        trainer.opt_decoder.step()
        trainer.opt_encoder.step()
        return loss.detach()

    trainer.step = step
    if not hasattr(adam_mod, "_fused_adam"):
        pytest.skip("this torch has no torch.optim.adam._fused_adam to break")

    def broken(*a, **k):
        raise RuntimeError("no fused kernel here")

    monkeypatch.setattr(adam_mod, "_fused_adam", broken)
    before = net.a.weight.detach().clone()
    gpu_suite.trainer_step(trainer, torch.ones(2, 3), 1.0)
    assert "unfused" in trainer.adamw and "no fused kernel here" in trainer.adamw
    assert not gpu_suite._is_fused(trainer.opt_decoder) and not gpu_suite._is_fused(trainer.opt_encoder)
    assert trainer.opt_decoder.param_groups[0]["lr"] == 0.01 and trainer.opt_decoder.param_groups[0]["weight_decay"] == 0.1
    assert trainer.opt_encoder.param_groups[0]["lr"] == 0.002
    assert not torch.equal(before, net.a.weight)  # the retried step updated the parameters


def test_unfused_adamw_patch_is_scoped():
    original = torch.optim.AdamW
    with gpu_suite.unfused_adamw():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)
        assert not gpu_suite._is_fused(opt)
    assert torch.optim.AdamW is original
    assert gpu_suite.probe_fused_adamw(torch.device("cpu")) is None


def test_accuracy_kinds_is_the_place_for_other_model_kinds(tmp_path, monkeypatch):
    rec: dict = {}
    _tiny_suite(tmp_path, monkeypatch).accuracy_kinds(rec, manifest=None, kinds=("no-such-kind",))
    assert set(rec) == {"no-such-kind"} and rec["no-such-kind"]["ok"] is False  # recorded, not raised
