#!/usr/bin/env python3
"""Generates `r4_elements.txt`, the FHIR R4 element catalogue that mappings are checked against.

Run from the repository root, with the FHIR R4 JSON schema (hl7.org/fhir/R4/fhir.schema.json):

    python3 src/map/fhir_model/generate.py ../shared/ref/fhir-r4-json-schema/fhir.schema.json \
        > src/map/fhir_model/r4_elements.txt

The output is committed so that neither the build nor the appliance needs the schema. Format, one
definition per line, fields separated by a tab:

    <Type> <kind R|C|P> <element>...

where each element is `name:Type` (single) or `name*Type` (a list), optionally followed by
`=code1|code2` (the required value set of a `code` element, from the schema's `enum`).
"""
import json
import sys

PRIMS = ["base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id",
         "instant", "integer", "markdown", "oid", "positiveInt", "string", "time", "unsignedInt",
         "uri", "url", "uuid", "xhtml"]


def prim_from_name(name, json_type):
    # Choice elements (deceasedBoolean, valueInteger) are inlined with a pattern: the suffix names
    # the type.
    for p in sorted(PRIMS, key=len, reverse=True):
        cap = p[0].upper() + p[1:]
        if name.endswith(cap) and len(name) > len(cap):
            return p
    return {"boolean": "boolean", "number": "decimal"}.get(json_type, "string")


def elem_type(name, spec):
    if "$ref" in spec:
        return spec["$ref"].rsplit("/", 1)[1], None
    if "enum" in spec:
        return "code", spec["enum"]
    if "const" in spec:
        return "code", [spec["const"]]
    return prim_from_name(name, spec.get("type")), None


def main():
    schema = json.load(open(sys.argv[1]))
    defs = schema["definitions"]
    resources = {r["$ref"].rsplit("/", 1)[1] for r in defs["ResourceList"]["oneOf"]}
    for tname, d in defs.items():
        if tname == "ResourceList":
            continue
        if tname in PRIMS:
            print(f"{tname}\tP")
            continue
        kind = "R" if tname in resources else "C"
        parts = [tname, kind]
        for name, spec in d.get("properties", {}).items():
            if name.startswith("_") or name == "resourceType":
                continue
            if spec.get("type") == "array":
                t, enum = elem_type(name, spec["items"])
                s = f"{name}*{t}"
            else:
                t, enum = elem_type(name, spec)
                s = f"{name}:{t}"
            if enum:
                s += "=" + "|".join(enum)
            parts.append(s)
        print("\t".join(parts))


main()
