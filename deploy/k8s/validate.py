#!/usr/bin/env python3
"""Validates Kubernetes manifests offline (run by .ci/run):

    kubectl kustomize deploy/k8s > rendered.yaml
    python3 deploy/k8s/validate.py rendered.yaml
    python3 deploy/k8s/validate.py deploy/k8s/kustomization.yaml   # without kubectl:
                                                  # each file it lists, unrendered

Built-in kinds go through kubernetes-validate in strict mode (unknown fields
are errors) against the JSON schemas its package ships, for each Kubernetes
version in VERSIONS. Nothing is fetched. The ServiceMonitor, a CRD the package
has no schema for, is checked against servicemonitor.schema.json beside this
file. Any other kind without a schema is an error, not a warning.
"""
import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils

# Oldest and newest releases the package has schemas for that we claim to support.
VERSIONS = ["1.29.0", "1.37.0"]

HERE = os.path.dirname(os.path.abspath(__file__))


def expand(paths):
    """A kustomization.yaml stands for the resource files it lists."""
    for path in paths:
        if os.path.basename(path) in ("kustomization.yaml", "kustomization.yml"):
            with open(path) as f:
                resources = yaml.safe_load(f).get("resources", [])
            if not resources:
                print(f"ERROR {path}: no resources")
            for r in resources:
                yield os.path.join(os.path.dirname(path), r)
        else:
            yield path


def main(paths):
    paths = list(expand(paths))
    with open(os.path.join(HERE, "servicemonitor.schema.json")) as f:
        servicemonitor = jsonschema.Draft202012Validator(json.load(f))
    failures = 0
    count = 0
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        if not docs:
            print(f"ERROR {path}: no resources")
            failures += 1
        for doc in docs:
            count += 1
            name = f"{doc.get('kind', '?').lower()}/{doc.get('metadata', {}).get('name', '?')}"
            if doc.get("kind") == "ServiceMonitor":
                errors = sorted(servicemonitor.iter_errors(doc), key=lambda e: list(e.path))
                for e in errors:
                    where = ".".join(str(p) for p in e.path)
                    print(f"ERROR {path} {name}: {where}: {e.message}")
                failures += len(errors)
                if not errors:
                    print(f"OK    {path} {name} against servicemonitor.schema.json")
                continue
            for version in VERSIONS:
                try:
                    got = kubernetes_validate.validate(doc, version, strict=True)
                    print(f"OK    {path} {name} against Kubernetes {got} (strict)")
                except utils.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    print(f"ERROR {path} {name} against Kubernetes {e.version}: {where}: {e.message}")
                    failures += 1
                except utils.SchemaNotFoundError as e:
                    print(f"ERROR {path} {name}: {e.message}")
                    failures += 1
    print(f"{count} resources, {failures} errors (kubernetes-validate {kubernetes_validate.__version__})")
    return 1 if failures or count == 0 else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: validate.py MANIFEST.yaml...")
    sys.exit(main(sys.argv[1:]))
