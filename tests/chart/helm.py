"""The chart through Helm's own engine (helm-python-sdk), for tests/tests/chart.rs.

Reads one JSON request on stdin and prints one JSON answer:
  {"render": VALUES, "name": N, "namespace": NS} -> {"ok": {template: text}} (like `helm template`)
  {"validate": VALUES}                           -> {"ok": null} or {"error": message}
  {"lint": VALUES, "namespace": NS}              -> {"ok": report} (strict, like `helm lint --strict`)
"""
import json
import sys

import helm_python

CHART = sys.argv[1]


def main():
    request = json.load(sys.stdin)
    try:
        if "render" in request:
            chart = helm_python.Chart.load(CHART)
            answer = chart.render(
                request["render"],
                name=request["name"],
                namespace=request["namespace"],
                is_install=True,
            )
        elif "validate" in request:
            chart = helm_python.Chart.load(CHART)
            chart.validate_schema(request["validate"])
            answer = None
        elif "lint" in request:
            answer = helm_python.lint(
                CHART, request["lint"], strict=True, namespace=request["namespace"]
            )
        else:
            raise ValueError(f"an unknown request: {sorted(request)}")
    except helm_python.HelmError as error:
        json.dump({"error": str(error)}, sys.stdout)
        return
    json.dump({"ok": answer}, sys.stdout)


main()
