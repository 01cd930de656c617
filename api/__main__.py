"""``python -m api``: serve the read API with uvicorn.

The database comes from ``--database-url`` / ``INGEST_DATABASE_URL`` or from a prefect-sqlalchemy
``SqlAlchemyConnector`` block (``--database-block``). The optional API key comes from ``INGEST_API_KEY`` or from a
Prefect ``Secret`` block (``--api-key-secret``); it is never accepted on the command line.
"""

from __future__ import annotations

import argparse
import os
import sys

from pydantic import SecretStr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000, help="Port (default 8000).")
    parser.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: $INGEST_DATABASE_URL).")
    parser.add_argument("--database-block", default=None, help="Name of a SqlAlchemyConnector block to use instead.")
    parser.add_argument("--api-key-secret", default=None, help="Name of a Prefect Secret block holding the API key.")
    args = parser.parse_args(argv)

    import uvicorn

    from api.app import create_app

    if args.database_block:
        from prefect_sqlalchemy import SqlAlchemyConnector

        target = SqlAlchemyConnector.load(args.database_block).get_engine()
    else:
        target = args.database_url or os.environ.get("INGEST_DATABASE_URL")
        if not target:
            parser.error("give --database-url, --database-block or set INGEST_DATABASE_URL")
    key: SecretStr | None = None
    if args.api_key_secret:
        from prefect.blocks.system import Secret

        key = SecretStr(str(Secret.load(args.api_key_secret).get()))
    elif os.environ.get("INGEST_API_KEY"):
        key = SecretStr(os.environ["INGEST_API_KEY"])
    uvicorn.run(create_app(target, key), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
