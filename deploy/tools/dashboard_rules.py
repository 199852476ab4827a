#!/usr/bin/env python3
"""Turns every PromQL query of a Grafana dashboard into a Prometheus rules
file, so `promtool check rules` parses each one (run by .ci/run):

    python3 deploy/tools/dashboard_rules.py deploy/grafana/switchboard.json > rules.yml
    promtool check rules rules.yml

Grafana's variables are replaced by values Prometheus accepts ($__rate_interval
and friends by 1m, other variables by ".*", which every query uses inside a
=~ matcher). Before that it checks what promtool cannot: schemaVersion >= 38,
unique panel ids, every panel and query on the `datasource` variable, and a
layout with no panel past the 24 columns or on top of another. Exits 1 with a
message on the first problem.
"""
import json
import re
import sys


def fail(msg):
    print(f"dashboard_rules: {msg}", file=sys.stderr)
    sys.exit(1)


def main(path):
    with open(path) as f:
        dash = json.load(f)
    if dash.get("schemaVersion", 0) < 38:
        fail(f"schemaVersion {dash.get('schemaVersion')} < 38")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        fail("no `datasource` variable of type datasource (prometheus)")

    panels = []
    for p in dash.get("panels", []):
        panels.append(p)
        panels.extend(p.get("panels", []))  # collapsed rows keep theirs inside
    ids = [p["id"] for p in panels]
    if len(ids) != len(set(ids)):
        fail(f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}")

    cells = {}
    rules = []
    for p in panels:
        g = p["gridPos"]
        if g["x"] < 0 or g["w"] < 1 or g["x"] + g["w"] > 24 or g["h"] < 1:
            fail(f"panel {p['id']} ({p['title']}) is outside the 24 columns: {g}")
        for yy in range(g["y"], g["y"] + g["h"]):
            for xx in range(g["x"], g["x"] + g["w"]):
                if (xx, yy) in cells:
                    fail(f"panel {p['id']} ({p['title']}) overlaps panel {cells[(xx, yy)]}")
                cells[(xx, yy)] = p["id"]
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            fail(f"panel {p['id']} ({p['title']}) does not use the datasource variable")
        targets = p.get("targets", [])
        if not targets:
            fail(f"panel {p['id']} ({p['title']}) has no query")
        for t in targets:
            if t.get("datasource", {}).get("uid") != "${datasource}":
                fail(f"panel {p['id']} query {t['refId']} does not use the datasource variable")
            rules.append((f"panel_{p['id']}_{t['refId']}", t["expr"]))

    def substitute(expr):
        expr = re.sub(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}", "1m", expr)
        return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", ".*", expr)

    print("# Generated from %s by deploy/tools/dashboard_rules.py" % path)
    print("groups:")
    print("  - name: dashboard")
    print("    rules:")
    for name, expr in rules:
        print(f"      - record: dashboard:{name}")
        print(f"        expr: {json.dumps(substitute(expr))}")
    print(f"dashboard_rules: {len(rules)} queries in {len(panels)} panels", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        fail("usage: dashboard_rules.py DASHBOARD.json")
    main(sys.argv[1])
