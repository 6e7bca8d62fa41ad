#!/usr/bin/env python3
"""Independent FHIR R4 structural validation of hl7-edge output.

Uses the Python package fhir.resources 6.4.0 (the last release for FHIR R4 4.0.1, pydantic 1),
which shares no code with hl7-edge's own validation (fhir-sdk in Rust). Reads Bundle JSON files
named on the command line (or JSON Lines on stdin with `-`), validates each, and prints one line
per file: `ok PATH` or `FAIL PATH: reason`. Exit status 1 if any failed.
"""
import json
import sys

from fhir.resources.bundle import Bundle
from pydantic import ValidationError


def check(name, text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return f"FAIL {name}: not JSON: {e}"
    try:
        Bundle.parse_obj(data)
    except ValidationError as e:
        # Paths and messages only; values are not echoed.
        errs = "; ".join(".".join(str(p) for p in err["loc"]) + ": " + err["msg"] for err in e.errors())
        return f"FAIL {name}: {errs}"
    return f"ok {name}"


def main(argv):
    failed = 0
    inputs = []
    if argv == ["-"]:
        inputs = [(f"stdin:{i + 1}", line) for i, line in enumerate(sys.stdin) if line.strip()]
    else:
        for path in argv:
            with open(path, encoding="utf-8") as f:
                inputs.append((path, f.read()))
    for name, text in inputs:
        line = check(name, text)
        failed += line.startswith("FAIL")
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
