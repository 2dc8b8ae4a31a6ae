"""redact_params / flatten_params: no credential reaches MLflow params."""

from pydantic import BaseModel

from recontrast_core.config import TrainConfig
from recontrast_core.mlops.redaction import REDACTED, flatten_params, is_secret_key, redact_params
from recontrast_core.mlops.tracking import embedded_tracking_uri, resolve_tracking_uri


def test_secret_keys_are_redacted():
    params = {
        "storage.aws_secret_access_key": "abc",
        "storage.aws_access_key_id": "AKIA123",
        "db.password": "pw",
        "hub.token": "t",
        "api_key": "k",
        "s3.secretKey": "x",
        "train.iterations": 2000,
        "train.lr_decoder": 0.002,
    }
    out = redact_params(params, env={})
    for key in ("storage.aws_secret_access_key", "db.password", "hub.token", "api_key", "s3.secretKey"):
        assert out[key] == REDACTED, key
    assert out["train.iterations"] == 2000
    assert out["train.lr_decoder"] == 0.002


def test_env_secret_values_are_redacted_anywhere():
    env = {
        "AWS_SECRET_ACCESS_KEY": "some-unique-secret",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_DEFAULT_REGION": "us-east-1",
        "HOME": "/root",
    }
    params = {
        "note": "uses some-unique-secret inside",
        "uri": "s3://AKIAEXAMPLE:some-unique-secret@host/bucket",
        "list": ["a", "some-unique-secret"],
        "region": "us-east-1",
        "home": "/root",
    }
    out = redact_params(params, env=env)
    flat = repr(out)
    assert "some-unique-secret" not in flat
    assert "AKIAEXAMPLE" not in flat
    assert out["region"] == "us-east-1"  # the region is not a secret
    assert out["home"] == "/root"


def test_is_secret_key_words():
    assert is_secret_key("a.b.secret")
    assert is_secret_key("aws_session_token")
    assert is_secret_key("key")
    assert not is_secret_key("backbone.name")
    assert not is_secret_key("monkey_count")
    assert not is_secret_key("keypoints")


def test_flatten_pydantic_config():
    flat = flatten_params(TrainConfig())
    assert flat["backbone.name"] == "tf_efficientnet_lite0"
    assert flat["iterations"] == 2000
    assert "backbone" not in flat

    class Outer(BaseModel):
        train: TrainConfig = TrainConfig()
        secret_key: str = "zzz"

    flat = redact_params(flatten_params(Outer()), env={})
    assert flat["train.backbone.name"] == "tf_efficientnet_lite0"
    assert flat["secret_key"] == REDACTED


def test_embedded_default(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(workdir=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert embedded_tracking_uri(tmp_path).endswith("/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(workdir=tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_only_credential_env_vars_count():
    env = {
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "MLFLOW_TRACKING_PASSWORD": "pw-123456",
        "GITHUB_TOKEN": "ghp_abcdef",
        "AWS_SESSION_TOKEN": "sess-987654",
    }
    out = redact_params(
        {"flag": "true", "region": "eu-west-1", "a": "x pw-123456", "b": "ghp_abcdef", "c": "sess-987654"},
        env=env,
    )
    assert out["flag"] == "true" and out["region"] == "eu-west-1"
    assert out["a"] == "x ***" and out["b"] == REDACTED and out["c"] == REDACTED
