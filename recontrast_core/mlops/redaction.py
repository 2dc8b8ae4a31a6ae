"""Credentials never reach MLflow: flatten settings into params and redact them.

* a key whose last component names a secret (``secret``, ``password``, ``token``, ``*key``,
  ``credential``) keeps its name but gets the value ``***``;
* any value containing the value of a credential environment variable (``AWS_*`` keys,
  ``*_TOKEN``, ``*_PASSWORD``, ``*_SECRET``, ``*_KEY``) has it replaced by ``***``;
* the password of a URI in a value (``http://user:password@host``) becomes ``***``
  (:func:`redact_uri`, also for error messages that name a server).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, is_dataclass
from typing import Any, Iterable, Mapping, Optional

REDACTED = "***"
# A key names a secret when one of its words (split on . _ - / and camelCase) is one of
# these, or it contains secret/password/token anywhere (aws_secret_access_key, apiToken).
_SECRET_WORDS = {"secret", "password", "passwd", "pwd", "token", "key", "apikey", "accesskey",
                 "credential", "credentials", "auth", "authorization", "passphrase"}
_SECRET_SUBSTRINGS = ("secret", "password", "passwd", "token", "credential")
# Environment variables whose values are never logged, whatever key they appear under:
# AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN, MLFLOW_TRACKING_PASSWORD,
# MLFLOW_TRACKING_TOKEN, any *_SECRET* / *_TOKEN / *_KEY / *PASSWORD* / *CREDENTIAL*.
_SECRET_ENV_RE = re.compile(r".*(SECRET|PASSWORD|PASSWD|TOKEN|_KEY$|_KEY_ID$|CREDENTIAL)")
_MIN_SECRET_LEN = 6  # shorter values ("true", "1") would redact ordinary text
_MAX_PARAM_VALUE = 6000  # MLflow's limit on one param value


def flatten_params(obj: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Flatten a pydantic model / dataclass / mapping into ``{"a.b.c": value}``.

    Lists and tuples of scalars stay one value (``"[1, 2, 3]"`` when logged).
    """
    if hasattr(obj, "model_dump") and callable(obj.model_dump):
        obj = obj.model_dump(mode="json")
    elif is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            key = f"{prefix}{sep}{k}" if prefix else str(k)
            if isinstance(v, Mapping) or hasattr(v, "model_dump") or (
                is_dataclass(v) and not isinstance(v, type)
            ):
                out.update(flatten_params(v, key, sep))
            else:
                out[key] = v
    elif prefix:
        out[prefix] = obj
    else:
        raise TypeError(f"cannot flatten {type(obj).__name__} into params")
    return out


def is_secret_key(key: str) -> bool:
    """True when the last component of a (flattened) key names a secret."""
    leaf = re.split(r"[./]", str(key))[-1]
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", leaf).lower()
    if any(s in words for s in _SECRET_SUBSTRINGS):
        return True
    return any(w in _SECRET_WORDS for w in re.split(r"[_\-\s]+", words))


def secret_env_values(env: Optional[Mapping[str, str]] = None) -> set[str]:
    """Values of credential environment variables (AWS keys, *_TOKEN, *PASSWORD*, ...)."""
    env = os.environ if env is None else env
    return {
        value
        for name, value in env.items()
        if value and len(value) >= _MIN_SECRET_LEN and _SECRET_ENV_RE.match(name.upper())
    }


# The userinfo of a URI (``scheme://user:password@host``, ``scheme://token@host``): the
# password (or a lone token) is replaced, the user name kept.
_URI_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:]*)(?::(?P<pw>[^\s/@]*))?@")


def redact_uri(text: str) -> str:
    """``text`` with the password of every URI in it replaced by ``***``
    (``http://u:pw@host`` -> ``http://u:***@host``; ``https://token@host`` -> ``https://***@host``)."""

    def sub(m: re.Match) -> str:
        if m.group("pw") is None:
            return f"{m.group('scheme')}{REDACTED}@" if m.group("user") else m.group(0)
        return f"{m.group('scheme')}{m.group('user')}:{REDACTED}@"

    return _URI_USERINFO.sub(sub, str(text))


def redact_value(value: Any, secrets: Iterable[str]) -> Any:
    if isinstance(value, str):
        value = redact_uri(value)
        for s in secrets:
            if s and s in value:
                value = value.replace(s, REDACTED)
    elif isinstance(value, (list, tuple)):
        return type(value)(redact_value(v, secrets) for v in value)
    elif value is not None and not isinstance(value, (bool, int, float)):
        text = str(value)  # a Path, a URL object, ...: check its text form too
        if any(s and s in text for s in secrets):
            return redact_value(text, secrets)
    return value


def redact_params(
    params: Mapping[str, Any], env: Optional[Mapping[str, str]] = None
) -> dict[str, Any]:
    """Drop every credential from a flat param dict before it reaches MLflow.

    * a key whose last component names a secret (``secret``, ``password``, ``token``,
      ``*key``, ``credential``) keeps its name but gets the value ``***``;
    * any value that contains the value of a credential environment variable
      (``AWS_SECRET_ACCESS_KEY``, ``AWS_ACCESS_KEY_ID``, ``AWS_SESSION_TOKEN``, any
      ``*_TOKEN`` / ``*_PASSWORD`` / ``*_SECRET`` / ``*_KEY``) has it replaced by ``***``.
    """
    secrets = sorted(secret_env_values(env), key=len, reverse=True)
    out: dict[str, Any] = {}
    for key, value in params.items():
        if is_secret_key(key):
            out[key] = REDACTED
        else:
            out[key] = redact_value(value, secrets)
    return out


def param_str(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


def redact_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in redact_params({k: v for k, v in tags.items() if v is not None}).items()}
