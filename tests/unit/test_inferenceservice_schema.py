"""``infra/k8s/serving/inferenceservice.yaml`` validated offline against a JSON schema of
KServe's ``InferenceService``, as ``kubernetes-validate --strict`` validates built-in kinds.

kubernetes-validate ships no schema for custom resources ("Couldn't find schema"), the
installed ``kserve`` package ships no CRD YAML, and nothing outside the package
registries can be fetched here. So the schema is built from what is installed:

* KServe's own types from the ``kserve.models`` classes generated from KServe's OpenAPI
  spec (``openapi_types`` + ``attribute_map``; a field is required where its generated
  setter refuses ``None``), closed (``additionalProperties: false``) as in strict mode;
* every Kubernetes type they embed (``V1Container``, ``V1Probe``, ``V1ObjectMeta``,
  quantities, int-or-string ports, ...) as a ``$ref`` into kubernetes-validate's own
  strict definitions for the newest Kubernetes version it has: the schema ``kubectl``
  would apply to those fields.

What this cannot see: constraints that live only in the CRD (its enums, patterns, CEL
rules), fields newer than the installed kserve models (kserve==0.21.0), and the types the
models name but do not define (Knative status types; ``V1beta1MetricQuantity``), which stay
open. A live cluster's ``kubectl apply --dry-run=server`` remains the final word.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kserve", reason="the serve extra (kserve) holds the InferenceService models")
pytest.importorskip("kubernetes_validate", reason="kubernetes-validate holds the Kubernetes schemas")

import jsonschema  # noqa: E402
from referencing import Registry, Resource  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "infra" / "k8s" / "serving" / "inferenceservice.yaml"
K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"
SCALARS = {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
           "float": {"type": "number"}, "object": {}}


def _kserve_models():
    argv, sys.argv = sys.argv, sys.argv[:1]  # kserve parses sys.argv on import
    try:
        import kserve.models
        from kserve.configuration import Configuration
    finally:
        sys.argv = argv
    return kserve.models, Configuration


@lru_cache(maxsize=None)
def k8s_definitions() -> tuple[str, dict]:
    """(Kubernetes version, kubernetes-validate's strict ``_definitions.json``), newest version."""
    root = importlib.resources.files("kubernetes_validate").joinpath("kubernetes-json-schema")
    strict = [p.name for p in root.iterdir() if re.fullmatch(r"v\d+\.\d+\.\d+-local-strict", p.name)]
    newest = max(strict, key=lambda n: tuple(int(x) for x in n[1:].split("-")[0].split(".")))
    return newest, json.loads(root.joinpath(newest, "_definitions.json").read_text())


def k8s_definition_name(type_name: str) -> str | None:
    """The kubernetes-validate definition of a Kubernetes python-client type name, or None
    (``V1Container`` -> ``io.k8s.api.core.v1.Container``)."""
    defs = k8s_definitions()[1]["$defs"]
    special = {"ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity"}
    if type_name in special:
        return special[type_name]
    m = re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d+(?:alpha\d+|beta\d+)?)(\w+)", type_name)
    if m:  # K8sIoApiAppsV1DeploymentStrategy
        name = f"io.k8s.api.{m[1].lower()}.{m[2].lower()}.{m[3]}"
        return name if name in defs else None
    m = re.fullmatch(r"(V\d+(?:alpha\d+|beta\d+)?)([A-Z]\w*)", type_name)
    if not m:
        return None
    suffix = f".{m[1].lower()}.{m[2]}"
    found = sorted(k for k in defs if k.endswith(suffix))
    for prefix in ("io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta.", "io.k8s.api."):
        preferred = [k for k in found if k.startswith(prefix)]
        if len(preferred) == 1:
            return preferred[0]
    return found[0] if len(found) == 1 else None


def required_fields(cls, configuration) -> list[str]:
    """The JSON keys whose generated setter refuses ``None`` (client-side validation)."""
    required = []
    for attr, key in cls.attribute_map.items():
        probe = cls.__new__(cls)
        probe.local_vars_configuration = configuration()
        try:
            setattr(probe, attr, None)
        except ValueError:
            required.append(key)
    return required


@lru_cache(maxsize=None)
def inferenceservice_schema(root: str = "V1beta1InferenceService") -> dict:
    """A draft 2020-12 schema for ``root`` (see the module docstring); types found neither
    in kserve.models nor among the Kubernetes definitions are left open and listed in
    ``x-unresolved``."""
    models, configuration = _kserve_models()
    defs: dict[str, dict] = {}
    unresolved: set[str] = set()

    def schema_of(type_name: str) -> dict:
        if type_name.startswith("list["):
            return {"type": "array", "items": schema_of(type_name[5:-1])}
        if type_name.startswith("dict("):
            return {"type": "object", "additionalProperties": schema_of(type_name[5:-1].split(", ", 1)[1])}
        if type_name in SCALARS:
            return dict(SCALARS[type_name])
        cls = getattr(models, type_name, None)
        if cls is not None and hasattr(cls, "openapi_types"):
            if type_name not in defs:
                defs[type_name] = {}  # recursion guard
                properties = {key: schema_of(cls.openapi_types[attr]) for attr, key in cls.attribute_map.items()}
                defs[type_name] = {"type": "object", "properties": properties, "additionalProperties": False,
                                   "required": required_fields(cls, configuration)}
            return {"$ref": f"#/$defs/{type_name}"}
        k8s = k8s_definition_name(type_name)
        if k8s is not None:
            return {"$ref": f"{K8S_DEFS_ID}#/$defs/{k8s}"}
        unresolved.add(type_name)
        return {}

    top = schema_of(root)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:recontrast:kserve-isvc",
              **top, "$defs": defs, "x-unresolved": sorted(unresolved), "x-kubernetes": k8s_definitions()[0]}
    defs[root]["properties"]["apiVersion"] = {"const": "serving.kserve.io/v1beta1"}
    defs[root]["properties"]["kind"] = {"const": "InferenceService"}
    defs[root]["required"] = sorted({"apiVersion", "kind", "metadata", "spec", *defs[root]["required"]})
    return schema


def validate(doc: dict) -> list[str]:
    """Every violation of the schema by ``doc``, as ``path: message`` lines."""
    schema = inferenceservice_schema()
    registry = Registry().with_resources([
        (K8S_DEFS_ID, Resource.from_contents(k8s_definitions()[1])),
        (schema["$id"], Resource.from_contents(schema)),
    ])
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def _manifest() -> dict:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    assert [d["kind"] for d in docs] == ["InferenceService"]
    return docs[0]


def test_the_schema_covers_the_inferenceservice():
    schema = inferenceservice_schema()
    # open (any value): Knative's status types, which a manifest never sets, and the
    # autoscaler's metric quantity, which kserve's python models reference but do not define
    opened = [t for t in schema["x-unresolved"] if not t.startswith("Knative")]
    assert opened == ["V1beta1MetricQuantity"], schema["x-unresolved"]
    defs = schema["$defs"]
    assert defs["V1beta1InferenceServiceSpec"]["required"] == ["predictor"]
    assert defs["V1beta1PredictorSpec"]["properties"]["containers"]["items"] == {
        "$ref": f"{K8S_DEFS_ID}#/$defs/io.k8s.api.core.v1.Container"}
    assert defs["V1beta1InferenceService"]["properties"]["metadata"] == {
        "$ref": f"{K8S_DEFS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}


def test_inferenceservice_manifest_validates_against_the_kserve_schema():
    errors = validate(_manifest())
    assert errors == [], "\n".join(errors)
    print(f"validated against kserve.models + Kubernetes {inferenceservice_schema()['x-kubernetes']} (strict)")


def _broken(change) -> list[str]:
    doc = copy.deepcopy(_manifest())
    change(doc)
    return validate(doc)


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["spec"]["predictor"].update(minReplica=1), "'minReplica' was unexpected"),
    (lambda d: d["spec"]["predictor"].update(minReplicas="1"), "'1' is not of type 'integer'"),
    (lambda d: d["spec"].pop("predictor"), "'predictor' is a required property"),
    (lambda d: d["spec"]["predictor"]["containers"][0].update(
        readinesProbe=d["spec"]["predictor"]["containers"][0].pop("readinessProbe")), "'readinesProbe' was unexpected"),
    (lambda d: d["spec"]["predictor"]["containers"][0].pop("name"), "'name' is a required property"),
    (lambda d: d["spec"]["predictor"]["containers"][0].update(env={"A": "b"}), "is not of type 'array'"),
    (lambda d: d["spec"]["predictor"]["containers"][0]["resources"]["requests"].update(memory=["2Gi"]),
     "['2Gi'] is not valid under any of the given schemas"),  # a Quantity: a string or a number
    (lambda d: d["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"].update(port=[8080]),
     "[8080] is not valid under any of the given schemas"),  # IntOrString
    (lambda d: d["spec"]["predictor"]["containers"][0]["securityContext"].update(runAsUser="1000"),
     "'1000' is not of type 'integer'"),
    (lambda d: d["metadata"].update(label={"a": "b"}), "'label' was unexpected"),
    (lambda d: d.update(kind="InferenceServices"), "'InferenceService' was expected"),
])
def test_schema_catches_mistakes(change, expected):
    errors = _broken(change)
    assert any(expected in e for e in errors), errors


def test_named_ports_and_quantities_are_accepted():
    def change(d):
        c = d["spec"]["predictor"]["containers"][0]
        c["readinessProbe"]["httpGet"]["port"] = "http1"  # IntOrString, as kubectl takes it
        c["resources"]["requests"]["cpu"] = "1500m"
    assert _broken(change) == []
