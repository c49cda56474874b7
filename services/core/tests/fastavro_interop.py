"""fastavro's side of the Avro interoperability test (services/core/tests/fastavro_interop.rs).

Everything here is fastavro's own: schemas are parsed by fastavro.parse_schema, the
single-object fingerprint is fastavro's CRC-64-AVRO of fastavro's Parsing Canonical
Form, and datums are read and written by fastavro's schemaless reader and writer.

Usage: fastavro_interop.py SCHEMAS_DIR MODE < requests.jsonl > answers.jsonl

  read    requests {"kind": "interaction", "hex": "<single-object bytes>"}: checks the
          magic and that the fingerprint is the specification's, decodes the datum
          (every byte must be consumed), and answers {"kind", "fingerprint", "json",
          "hex"}: the datum as JSON (payload unions as {"<record full name>": {...}},
          timestamps as ms, bytes as lists of ints) and fastavro's own re-encoding.
  write   requests {"kind", "json"} with a record in Flywheel's JSON form; answers
          {"kind", "hex"}: fastavro's single-object encoding of it.

Exits non-zero, naming the record, on any mismatch or decoding error.
"""

import datetime
import io
import json
import os
import re
import sys

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

MAGIC = b"\xc3\x01"
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def load_schemas(schemas_dir):
    schemas = {}
    for name in sorted(os.listdir(schemas_dir)):
        if name.endswith(".avsc"):
            with open(os.path.join(schemas_dir, name)) as f:
                parsed = fastavro.parse_schema(json.load(f))
            canonical = to_parsing_canonical_form(parsed)
            header = MAGIC + bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
            schemas[name[: -len(".avsc")]] = (parsed, header)
    return schemas


def snake(name):
    short = name.rsplit(".", 1)[-1]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", short).lower()


def branch_type(branch):
    return branch["type"] if isinstance(branch, dict) else branch


def to_datum(schema, value, named):
    """Flywheel's JSON form (serde's) -> the datum fastavro writes."""
    if isinstance(schema, str) and schema in named:
        return to_datum(named[schema], value, named)
    if isinstance(schema, list):
        if value is None:
            return None
        non_null = [b for b in schema if branch_type(b) != "null"]
        if len(non_null) == 1:
            return to_datum(non_null[0], value, named)
        # A union of records is externally tagged: {"shown": {...}} names SuggestionShown.
        ((key, inner),) = value.items()
        for branch in non_null:
            if isinstance(branch, dict) and "name" in branch:
                name = snake(branch["name"])
                if name == key or name.endswith("_" + key):
                    return (branch["name"], to_datum(branch, inner, named))
        raise ValueError(f"no union branch for {key!r}")
    if isinstance(schema, str):
        return bytes(value) if schema == "bytes" else value
    kind = schema["type"]
    if kind == "record":
        return {f["name"]: to_datum(f["type"], value.get(f["name"]), named) for f in schema["fields"]}
    if kind == "array":
        return [to_datum(schema["items"], v, named) for v in value]
    if kind == "map":
        return {k: to_datum(schema["values"], v, named) for k, v in value.items()}
    if kind == "bytes":
        return bytes(value)
    return value


def to_json(value):
    """A decoded datum -> JSON: timestamps back to ms, bytes as lists, tagged unions as objects."""
    if isinstance(value, datetime.datetime):
        delta = value - EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    if isinstance(value, bytes):
        return list(value)
    if isinstance(value, tuple):
        name, inner = value
        return {name: to_json(inner)}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def read(schemas, request):
    kind, raw = request["kind"], bytes.fromhex(request["hex"])
    schema, header = schemas[kind]
    if raw[:2] != MAGIC:
        raise ValueError(f"{kind}: magic {raw[:2].hex()} is not c301")
    if raw[:10] != header:
        raise ValueError(
            f"{kind}: fingerprint {raw[2:10].hex()} is not the specification's {header[2:].hex()}"
        )
    body = io.BytesIO(raw[10:])
    datum = fastavro.schemaless_reader(body, schema, return_record_name=True)
    if body.tell() != len(raw) - 10:
        raise ValueError(f"{kind}: {len(raw) - 10 - body.tell()} bytes left after the datum")
    again = io.BytesIO()
    fastavro.schemaless_writer(again, schema, datum)
    return {"kind": kind, "fingerprint": raw[2:10].hex(), "json": to_json(datum), "hex": (header + again.getvalue()).hex()}


def write(schemas, request):
    kind = request["kind"]
    schema, header = schemas[kind]
    out = io.BytesIO()
    datum = to_datum(schema, request["json"], schema.get("__named_schemas", {}))
    fastavro.schemaless_writer(out, schema, datum)
    return {"kind": kind, "hex": (header + out.getvalue()).hex()}


def main():
    schemas_dir, mode = sys.argv[1], sys.argv[2]
    schemas = load_schemas(schemas_dir)
    handle = {"read": read, "write": write}[mode]
    for n, line in enumerate(sys.stdin):
        if line.strip():
            try:
                answer = handle(schemas, json.loads(line))
            except Exception as e:  # name the record, then fail
                sys.exit(f"request {n}: {type(e).__name__}: {e}")
            print(json.dumps(answer))


if __name__ == "__main__":
    main()
