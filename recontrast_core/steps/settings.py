"""Settings: one shape (:class:`~recontrast_core.config.PipelineConfig`) and one override
function for every entry point.

* ``params.yaml`` is a serialised ``PipelineConfig`` (:func:`load_settings`);
* overrides are dotted keys, as ``dvc exp run --set-param`` and Hydra write them
  (``train.image_size=128``, ``registry.floors.image_auroc=0.8``): the CLI's ``--set``,
  its common flags (mapped onto dotted keys), the DVC stages and the KFP pipeline all go
  through :func:`apply_overrides`;
* the KFP pipeline carries the whole ``PipelineConfig`` as one JSON parameter plus the few
  values people set per run (:func:`with_run_values`).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import yaml
from pydantic import BaseModel

from ..config import AdaptConfig, PipelineConfig
from ..errors import UserError

PathLike = Union[str, os.PathLike]
Overrides = Union[Mapping[str, Any], Iterable[str], None]


def parse_assignment(item: str) -> tuple[str, Any]:
    """``"train.image_size=128"`` -> ``("train.image_size", 128)`` (the value is YAML:
    ``[1,1,1]``, ``null``, ``true``, ``0.5`` and plain strings all work)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. train.image_size=128")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise UserError(f"--set {item!r}: the value is not valid YAML ({exc.problem})") from exc


def _check_key(model: type[BaseModel], key: str) -> None:
    """Unknown keys name themselves and the closest known one."""
    node: Any = model
    walked = []
    for part in key.split("."):
        if isinstance(node, type) and issubclass(node, BaseModel):
            fields = node.model_fields
            if part not in fields:
                near = difflib.get_close_matches(part, list(fields), n=1)
                hint = f"; did you mean {'.'.join(walked + near)}?" if near else f"; known: {', '.join(fields)}"
                raise UserError(f"setting {key!r}: unknown key {'.'.join(walked + [part])!r}{hint}")
            walked.append(part)
            ann = fields[part].annotation
            args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
            node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (args[0] if args else None)
        else:
            return  # inside a dict field (floors.image_auroc): any key


def apply_overrides(base: Union[BaseModel, Mapping[str, Any], None], overrides: Overrides = None,
                    model: type[BaseModel] = PipelineConfig) -> Any:
    """``model`` from ``base`` plus dotted-key ``overrides`` (a mapping, or ``KEY=VALUE``
    strings). ``None`` values in a mapping keep the base value. Every error is a
    :class:`UserError` naming the setting."""
    if base is None:
        base = model()
    elif not isinstance(base, BaseModel):
        try:
            base = model.model_validate(json.loads(json.dumps(dict(base), default=str)))
        except Exception as exc:
            hint = _unknown_key_hint(exc) if model is PipelineConfig else None
            raise UserError(hint or f"invalid settings: {_first_error(exc)}") from exc
    data: dict[str, Any] = base.model_dump(mode="json")  # whole: a dotted key edits one leaf
    if isinstance(overrides, Mapping):
        items = [(k, v) for k, v in overrides.items() if v is not None]
    else:
        items = [parse_assignment(s) for s in (overrides or ())]
    for key, value in items:
        _check_key(model, key)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    try:
        return model.model_validate(data)
    except Exception as exc:  # pydantic ValidationError: name each field
        errors = getattr(exc, "errors", lambda: [])()
        if errors:
            msg = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in errors[:5])
        else:
            msg = str(exc)
        raise UserError(f"invalid settings: {msg}") from exc


PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"


def profile_path(name: str) -> Optional[Path]:
    """The packaged settings profile called ``name`` (``recontrast_core/profiles/<name>.yaml``)."""
    path = PROFILES_DIR / f"{name}.yaml"
    return path if path.is_file() and "/" not in name else None


def load_settings(params: Optional[PathLike] = None, overrides: Overrides = None) -> PipelineConfig:
    """``params`` (a params.yaml: a whole or partial serialised :class:`PipelineConfig`, or
    the name of a packaged profile such as ``cpu``; defaults when None) plus overrides."""
    base: Optional[Mapping[str, Any]] = None
    if params is not None and not Path(params).exists() and profile_path(str(params)) is not None:
        params = profile_path(str(params))
    if params is not None:
        path = Path(params)
        base = _read_settings_file(path)
        try:
            PipelineConfig.model_validate(base)
        except Exception as exc:
            raise UserError(f"{path}: {_unknown_key_hint(exc) or 'invalid setting ' + _first_error(exc)}") from None
    return apply_overrides(base, overrides)


SETTINGS_MAX_BYTES = 16 * 2**20  # a params.yaml is a few KB; anything this big is not one


def _read_settings_file(path: Path) -> dict:
    """The mapping in a settings file; every problem one line naming the file (binary,
    too large, invalid or too deeply nested YAML, not a mapping)."""
    try:
        size = path.stat().st_size
        if size > SETTINGS_MAX_BYTES:
            raise UserError(f"{path}: cannot read settings: {size / 2**20:.0f} MB is not a settings file "
                            f"(limit {SETTINGS_MAX_BYTES // 2**20} MB)")
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: cannot read settings: not a text file (byte {exc.start} is not UTF-8)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read settings: {exc.strerror or exc}") from None
    try:
        base = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: cannot read settings: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise UserError(f"{path}: cannot read settings: nested too deeply to be a settings file") from None
    if not isinstance(base, dict):
        raise UserError(f"{path}: expected a mapping of settings, got {type(base).__name__}")
    return base


def _unknown_key_hint(exc: Exception) -> Optional[str]:
    """For an unknown key (pydantic's extra_forbidden): the message of :func:`_check_key`,
    which names the closest known key, as ``--set`` gives it."""
    errors = getattr(exc, "errors", lambda: [])()
    for e in errors:
        if e.get("type") == "extra_forbidden":
            try:
                _check_key(PipelineConfig, ".".join(str(x) for x in e["loc"]))
            except UserError as hint:
                return str(hint)
    return None


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", lambda: [])()
    if errors:
        e = errors[0]
        return f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
    return str(exc).splitlines()[0]


def dump_settings(cfg: PipelineConfig) -> str:
    """``cfg`` as ``params.yaml`` text (the whole configuration, every field)."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def with_run_values(settings: Union[PipelineConfig, Mapping[str, Any]], *, source: str = "",
                    adapt_method: str = "", shots: int = 0, model_name: str = "", train_backend: str = "",
                    num_nodes: int = 0, gpus_per_node: int = 0) -> PipelineConfig:
    """The KFP pipeline's per-run parameters on top of its settings parameter (empty = keep)."""
    return apply_overrides(settings, {
        "data.source": source or None,
        "adapt_method": adapt_method or None,
        "shots": shots or None,
        "registry.model_name": model_name or None,
        "train_backend": train_backend or None,
        "trainjob.num_nodes": num_nodes or None,
        "trainjob.gpus_per_node": gpus_per_node or None,
    })


def adapt_settings(p: PipelineConfig) -> AdaptConfig:
    """The adapt step's settings inside a pipeline: the method and shots are the pipeline's,
    and the encoder is the one ReContrast will train (train.backbone, image size, device).
    ``adapt.*`` values left at ``None`` follow them; a value set to something else is an
    error rather than being overwritten."""
    a = p.adapt
    want = {
        "method": p.adapt_method if p.adapt_method != "none" else None,
        "shots": p.shots,
        "backbone": p.train.backbone,
        "image_size": p.train.image_size,
        "device": p.train.device,
    }
    for key, value in want.items():
        mine = getattr(a, key)
        if mine is not None and value is not None and mine != value:
            shown = mine.model_dump() if isinstance(mine, BaseModel) else mine
            source = {"method": "adapt_method", "shots": "shots"}.get(key, f"train.{key}")
            raise UserError(f"setting adapt.{key}={shown!r} differs from {source}; in a pipeline it follows "
                            f"{source} (leave adapt.{key} unset)")
    return a.model_copy(update={k: v for k, v in want.items() if v is not None}).resolved(p.train)

