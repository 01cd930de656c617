"""The warehouse source side: a sample OLTP schema, its generator, and the incremental copy into ``raw``.

* :data:`TABLES` describes the four OLTP tables (customers, products, orders, order_items): primary key,
  columns with their PostgreSQL types, and the watermark column (``updated_at``).
* :func:`generate_oltp` builds realistic, deterministic Polars frames of any size, with deliberately dirty rows
  (null e-mails, duplicate customers differing by case/whitespace, negative quantities, orphan order items).
* :func:`sync_table` copies one table incrementally: rows with ``updated_at >= watermark - overlap`` are read with
  COPY, de-duplicated on the primary key (latest ``updated_at`` wins), COPY'd into a temp table and upserted into
  ``raw`` with one set-based ``INSERT .. ON CONFLICT``; the watermark row in ``meta.watermarks`` is written in the
  SAME transaction, so it only advances when the load commits. The overlap window re-reads rows written at the
  boundary (or committed late by a long transaction); the upsert ignores stale and identical versions.
* :func:`read_file_extract` reads CSV / JSON / NDJSON extracts of the same tables (all columns typed per spec).
* :func:`mssql_merge_sql` is the SQL Server variant of the raw upsert (MERGE), rendered with SQLAlchemy's mssql
  dialect quoting; :func:`upsert_raw` runs it through pyodbc when the connection is SQL Server.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

import polars as pl
from sqlalchemy import Connection, Engine, text

from tasks.errors import ConfigurationError, SourceFileError
from tasks.lake import LakeFS

Logger = logging.Logger | logging.LoggerAdapter

ISO_US = "%Y-%m-%dT%H:%M:%S%.6f"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class TableSpec:
    """One source table: name, primary key, ordered columns with PostgreSQL types, watermark column."""

    name: str
    pk: str
    columns: dict[str, str]
    watermark: str = "updated_at"

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    @property
    def polars_schema(self) -> dict[str, pl.DataType]:
        return {c: pg_to_polars(t) for c, t in self.columns.items()}


TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec(
            "customers",
            "customer_id",
            {
                "customer_id": "bigint",
                "email": "text",
                "full_name": "text",
                "country": "text",
                "created_at": "timestamptz",
                "updated_at": "timestamptz",
            },
        ),
        TableSpec(
            "products",
            "product_id",
            {
                "product_id": "bigint",
                "sku": "text",
                "name": "text",
                "category": "text",
                "unit_price": "numeric(12,2)",
                "updated_at": "timestamptz",
            },
        ),
        TableSpec(
            "orders",
            "order_id",
            {
                "order_id": "bigint",
                "customer_id": "bigint",
                "status": "text",
                "ordered_at": "timestamptz",
                "updated_at": "timestamptz",
            },
        ),
        TableSpec(
            "order_items",
            "order_item_id",
            {
                "order_item_id": "bigint",
                "order_id": "bigint",
                "product_id": "bigint",
                "quantity": "integer",
                "unit_price": "numeric(12,2)",
                "updated_at": "timestamptz",
            },
        ),
    )
}

ORDER_STATUSES = ("placed", "paid", "shipped", "delivered", "cancelled", "returned")
CATEGORIES = ("electronics", "home", "garden", "toys", "books", "sports", "beauty", "grocery")
COUNTRIES = ("US", "GB", "DE", "FR", "NL", "ES", "IT", "CA", "AU", "JP")


def pg_to_polars(pg_type: str) -> pl.DataType:
    base = pg_type.split("(")[0].strip().lower()
    if base in ("bigint", "integer", "int", "smallint"):
        return pl.Int64()
    if base in ("numeric", "double precision", "real"):
        return pl.Float64()
    if base == "timestamptz":
        return pl.Datetime("us", "UTC")
    if base == "date":
        return pl.Date()
    if base == "boolean":
        return pl.Boolean()
    if base == "text":
        return pl.String()
    raise ConfigurationError("column type", f"unsupported PostgreSQL type {pg_type!r}")


# --- DDL --------------------------------------------------------------------------------------------


def _table_ddl(schema: str, spec: TableSpec, extra: str = "") -> str:
    cols = ",\n  ".join(
        f"{c} {t}{' not null' if c in (spec.pk, spec.watermark) else ''}" for c, t in spec.columns.items()
    )
    return f"create table if not exists {schema}.{spec.name} (\n  {cols}{extra},\n  primary key ({spec.pk})\n)"


def create_oltp_schema(conn: Connection, schema: str = "oltp") -> None:
    """Create the sample OLTP tables (no foreign keys: the source is allowed to be dirty)."""
    conn.execute(text(f"create schema if not exists {schema}"))
    for spec in TABLES.values():
        conn.execute(text(_table_ddl(schema, spec)))
        index = f"{spec.name}_{spec.watermark}_idx"
        conn.execute(text(f"create index if not exists {index} on {schema}.{spec.name} ({spec.watermark})"))


def create_raw_schema(conn: Connection, schema: str = "raw") -> None:
    """Create ``raw`` (source columns + load metadata) and ``meta.watermarks``."""
    conn.execute(text(f"create schema if not exists {schema}"))
    conn.execute(text("create schema if not exists meta"))
    for spec in TABLES.values():
        extra = ",\n  _loaded_at timestamptz not null default now(),\n  _source text not null default 'oltp'"
        conn.execute(text(_table_ddl(schema, spec, extra)))
    conn.execute(
        text(
            "create table if not exists meta.watermarks (\n"
            "  source_name text not null, table_name text not null, watermark timestamptz,\n"
            "  rows_last_run bigint not null default 0, last_run_at timestamptz not null default now(),\n"
            "  primary key (source_name, table_name))"
        )
    )


# --- generator --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSize:
    """How big the generated OLTP database is. Dirty rows are a fixed, deterministic fraction."""

    customers: int = 1_000
    products: int = 100
    orders: int = 3_000
    order_items: int = 10_000

    @classmethod
    def for_items(cls, order_items: int) -> SourceSize:
        """Proportions used by the demo and the bench: ~4 items per order, ~3 orders per customer."""
        orders = max(1, order_items // 4)
        return cls(
            customers=max(10, orders // 3),
            products=max(10, min(20_000, order_items // 200)),
            orders=orders,
            order_items=order_items,
        )


# Every Nth row is dirty (deterministic so tests can count them exactly).
NULL_EMAIL_EVERY = 97
DUPLICATE_CUSTOMER_EVERY = 89
NEGATIVE_QTY_EVERY = 211
ORPHAN_ITEM_EVERY = 173
ORPHAN_OFFSET = 1_000_000_000


def _rand(n: int, seed: int, modulo: int, *, offset: int = 0) -> pl.Expr:
    """A deterministic pseudo-random integer in [0, modulo) per row (Polars hash, no Python loop)."""
    return ((pl.int_range(offset, offset + n, dtype=pl.Int64).hash(seed)) % modulo).cast(pl.Int64)


def _pick(values: Iterable[str], idx: pl.Expr) -> pl.Expr:
    values = list(values)
    return pl.lit(pl.Series(values, dtype=pl.String)).gather(idx)


def generate_oltp(
    size: SourceSize | None = None,
    *,
    as_of: datetime | None = None,
    seed: int = 7,
    id_offset: int = 0,
) -> dict[str, pl.DataFrame]:
    """Deterministic sample OLTP frames (timestamps within the 365 days before ``as_of``).

    Dirty rows: every ``NULL_EMAIL_EVERY``-th customer has no e-mail; every ``DUPLICATE_CUSTOMER_EVERY``-th
    customer repeats an earlier customer's e-mail in upper case with surrounding spaces; every
    ``NEGATIVE_QTY_EVERY``-th item has a negative quantity; every ``ORPHAN_ITEM_EVERY``-th item points to an
    order that does not exist. ``id_offset`` shifts every id (to generate a later batch of new rows).
    """
    size = size or SourceSize()
    as_of = (as_of or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    year_s = 365 * 86_400
    as_of_lit = pl.lit(as_of, dtype=pl.Datetime("us", "UTC"))

    def ago(n: int, salt: int, span: int = year_s) -> pl.Expr:
        return as_of_lit - pl.duration(seconds=_rand(n, seed + salt, span, offset=id_offset) + 1)

    nc, np_, no, ni = size.customers, size.products, size.orders, size.order_items
    cid = pl.int_range(1, nc + 1, dtype=pl.Int64) + id_offset
    customers = (
        pl.select(
            customer_id=cid,
            first=_pick(
                ["ana", "ben", "chloe", "dev", "emma", "finn", "gia", "hugo", "ines", "jon"], _rand(nc, seed, 10)
            ),
            last=_pick(
                ["smith", "jones", "garcia", "muller", "rossi", "dubois", "tanaka", "kowalski"], _rand(nc, seed + 1, 8)
            ),
            country=_pick(COUNTRIES, _rand(nc, seed + 2, len(COUNTRIES), offset=id_offset)),
            created_at=ago(nc, 3),
        )
        .with_columns(
            full_name=pl.concat_str(pl.col("first").str.to_titlecase(), pl.lit(" "), pl.col("last").str.to_titlecase()),
            email=pl.concat_str(
                pl.col("first"),
                pl.lit("."),
                pl.col("last"),
                pl.col("customer_id").cast(pl.String),
                pl.lit("@example.com"),
            ),
        )
        .with_columns(
            email=pl.when(pl.col("customer_id") % NULL_EMAIL_EVERY == 0)
            .then(None)
            .when((pl.col("customer_id") % DUPLICATE_CUSTOMER_EVERY == 0) & (pl.col("customer_id") > 1))
            .then(pl.concat_str(pl.lit("  "), pl.col("email").shift(1).str.to_uppercase(), pl.lit(" ")))
            .otherwise(pl.col("email")),
            full_name=pl.when(pl.col("customer_id") % DUPLICATE_CUSTOMER_EVERY == 0)
            .then(pl.col("full_name").shift(1))
            .otherwise(pl.col("full_name")),
            updated_at=pl.min_horizontal(
                pl.col("created_at") + pl.duration(days=_rand(nc, seed + 4, 30, offset=id_offset)), as_of_lit
            ),
        )
        .select(TABLES["customers"].column_names)
    )
    pid = pl.int_range(1, np_ + 1, dtype=pl.Int64) + id_offset
    products = (
        pl.select(product_id=pid, cat=_rand(np_, seed + 5, len(CATEGORIES), offset=id_offset))
        .with_columns(
            sku=pl.format("SKU-{}", pl.col("product_id")),
            name=pl.format("Product {}", pl.col("product_id")),
            category=_pick(CATEGORIES, pl.col("cat")),
            # Prices from 1.99 to ~500, skewed low.
            unit_price=((_rand(np_, seed + 6, 1000, offset=id_offset).pow(2) / 2000.0) + 1.99).round(2),
            updated_at=ago(np_, 7),
        )
        .select(TABLES["products"].column_names)
    )
    oid = pl.int_range(1, no + 1, dtype=pl.Int64) + id_offset
    orders = (
        pl.select(
            order_id=oid,
            customer_id=_rand(no, seed + 8, nc, offset=id_offset) + 1 + id_offset,
            status=_pick(ORDER_STATUSES, _rand(no, seed + 9, len(ORDER_STATUSES), offset=id_offset)),
            ordered_at=ago(no, 10),
        )
        .with_columns(
            updated_at=pl.min_horizontal(
                pl.col("ordered_at") + pl.duration(hours=_rand(no, seed + 11, 96, offset=id_offset)), as_of_lit
            )
        )
        .select(TABLES["orders"].column_names)
    )
    iid = pl.int_range(1, ni + 1, dtype=pl.Int64) + id_offset
    items = pl.select(
        order_item_id=iid,
        order_id=_rand(ni, seed + 12, no, offset=id_offset) + 1 + id_offset,
        product_id=_rand(ni, seed + 13, np_, offset=id_offset) + 1 + id_offset,
        quantity=_rand(ni, seed + 14, 5, offset=id_offset) + 1,
    )
    items = (
        items.join(products.select("product_id", "unit_price"), on="product_id", how="left")
        .join(orders.select("order_id", "updated_at"), on="order_id", how="left")
        .with_columns(
            order_id=pl.when(pl.col("order_item_id") % ORPHAN_ITEM_EVERY == 0)
            .then(pl.col("order_id") + ORPHAN_OFFSET)
            .otherwise(pl.col("order_id")),
            quantity=pl.when(pl.col("order_item_id") % NEGATIVE_QTY_EVERY == 0)
            .then(-pl.col("quantity"))
            .otherwise(pl.col("quantity")),
        )
        .sort("order_item_id")
        .select(TABLES["order_items"].column_names)
    )
    return {"customers": customers, "products": products, "orders": orders, "order_items": items}


# --- COPY helpers -------------------------------------------------------------------------------------


def _dbapi(conn: Connection) -> Any:
    """The psycopg 3 connection under a SQLAlchemy connection (same transaction)."""
    return conn.connection.driver_connection


def frame_to_csv(frame: pl.DataFrame) -> bytes:
    """CSV bytes PostgreSQL's COPY reads back exactly (nulls unquoted empty, empty strings quoted)."""
    exprs = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, pl.Datetime):
            col = pl.col(name)
            if dtype.time_zone is None:
                col = col.dt.replace_time_zone("UTC")
            exprs.append(col.dt.convert_time_zone("UTC").dt.strftime(ISO_US + "+00:00").alias(name))
        else:
            exprs.append(pl.col(name))
    return frame.select(exprs).write_csv().encode()


def copy_in(conn: Connection, table: str, frame: pl.DataFrame, *, chunk: int = 1 << 20) -> int:
    """COPY ``frame`` into ``table`` (its columns, by name) inside the connection's transaction."""
    data = frame_to_csv(frame)
    cols = ", ".join(frame.columns)
    with _dbapi(conn).cursor() as cur:
        with cur.copy(f"copy {table} ({cols}) from stdin (format csv, header true)") as cp:
            for start in range(0, len(data), chunk):
                cp.write(data[start : start + chunk])
    return frame.height


def copy_out(conn: Connection, select_sql: str, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Run ``select_sql`` through COPY TO STDOUT and type the columns per ``schema`` (timestamps in UTC)."""
    buf = io.BytesIO()
    with _dbapi(conn).cursor() as cur:
        cur.execute("set local time zone 'UTC'")
        with cur.copy(f"copy ({select_sql}) to stdout (format csv, header true)") as cp:
            for block in cp:
                buf.write(block)
    buf.seek(0)
    raw = pl.read_csv(buf, schema={c: pl.String for c in schema}) if buf.getbuffer().nbytes else None
    if raw is None:
        return pl.DataFrame(schema=schema)
    return _cast_strings(raw, schema, origin="database")


def _cast_strings(frame: pl.DataFrame, schema: dict[str, pl.DataType], *, origin: str) -> pl.DataFrame:
    exprs = []
    for name, dtype in schema.items():
        col = pl.col(name)
        if isinstance(dtype, pl.Datetime):
            text_col = col.str.strip_chars().str.replace(" ", "T").str.replace(r"(\+00(:00)?|Z)$", "")
            exprs.append(text_col.str.to_datetime(time_unit="us", strict=False).dt.replace_time_zone("UTC").alias(name))
        else:
            exprs.append(col.cast(dtype, strict=False).alias(name))
    out = frame.select(exprs)
    bad = [name for name in schema if out.get_column(name).null_count() > frame.get_column(name).null_count()]
    if bad:
        name = bad[0]
        mask = out.get_column(name).is_null() & frame.get_column(name).is_not_null()
        sample = frame.filter(mask).get_column(name).head(3).to_list()
        raise SourceFileError(origin, name, f"{int(mask.sum())} value(s) are not {schema[name]}, e.g. {sample!r}")
    return out


def _select_list(spec: TableSpec) -> str:
    parts = []
    for c, t in spec.columns.items():
        if t == "timestamptz":
            parts.append(f"to_char({c} at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') as {c}")
        else:
            parts.append(c)
    return ", ".join(parts)


def read_table(conn: Connection, schema: str, spec: TableSpec, where: str = "") -> pl.DataFrame:
    """Read a whole table (or a filtered part) of ``spec``'s shape into Polars via COPY."""
    sql = f"select {_select_list(spec)} from {schema}.{spec.name}"
    if where:
        sql += f" where {where}"
    return copy_out(conn, sql, spec.polars_schema)


def load_oltp(engine: Engine, frames: dict[str, pl.DataFrame], *, schema: str = "oltp") -> dict[str, int]:
    """Create the OLTP schema and COPY the frames in (one transaction). Returns rows per table."""
    with engine.begin() as conn:
        create_oltp_schema(conn, schema)
        return {name: copy_in(conn, f"{schema}.{name}", frame) for name, frame in frames.items()}


# --- incremental raw load -------------------------------------------------------------------------------


@dataclass
class RawLoadResult:
    """What one incremental (or full) copy of a table did."""

    table: str
    extracted: int
    deduplicated: int
    inserted: int
    updated: int
    unchanged: int
    watermark_before: datetime | None
    watermark_after: datetime | None
    full_refresh: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def dedupe_on_pk(frame: pl.DataFrame, spec: TableSpec) -> pl.DataFrame:
    """One row per primary key: the one with the latest watermark (ties: the last one seen)."""
    return frame.sort(spec.watermark, maintain_order=True, nulls_last=False).unique(
        subset=[spec.pk], keep="last", maintain_order=True
    )


def get_watermark(conn: Connection, source_name: str, table: str) -> datetime | None:
    row = conn.execute(
        text("select watermark from meta.watermarks where source_name = :s and table_name = :t"),
        {"s": source_name, "t": table},
    ).first()
    return row[0] if row else None


def _set_watermark(conn: Connection, source_name: str, table: str, watermark: datetime | None, rows: int) -> None:
    conn.execute(
        text(
            "insert into meta.watermarks (source_name, table_name, watermark, rows_last_run, last_run_at) "
            "values (:s, :t, :w, :n, now()) on conflict (source_name, table_name) do update set "
            "watermark = excluded.watermark, rows_last_run = excluded.rows_last_run, last_run_at = now()"
        ),
        {"s": source_name, "t": table, "w": watermark, "n": rows},
    )


def upsert_raw(
    conn: Connection, spec: TableSpec, frame: pl.DataFrame, *, source: str = "oltp", raw_schema: str = "raw"
) -> tuple[int, int]:
    """Set-based upsert of ``frame`` into ``raw.<table>``: returns (inserted, updated).

    A row replaces the stored one only if its watermark is not older and its content differs, so re-reading the
    overlap window costs nothing and a late, older version never overwrites a newer one.
    """
    if frame.is_empty():
        return 0, 0
    if conn.dialect.name == "mssql":
        return _mssql_upsert(conn, spec, frame, source=source, raw_schema=raw_schema)
    tmp = f"_stage_{spec.name}"
    cols = spec.column_names
    conn.execute(text(f"drop table if exists {tmp}"))
    conn.execute(
        text(f"create temp table {tmp} as select {', '.join(cols)} from {raw_schema}.{spec.name} with no data")
    )
    copy_in(conn, tmp, frame.select(cols))
    non_pk = [c for c in cols if c != spec.pk]
    target = f"{raw_schema}.{spec.name}"
    sql = (
        f"insert into {target} as t ({', '.join(cols)}, _loaded_at, _source) "
        f"select {', '.join(cols)}, now(), :source from {tmp} "
        f"on conflict ({spec.pk}) do update set "
        + ", ".join(f"{c} = excluded.{c}" for c in non_pk)
        + ", _loaded_at = excluded._loaded_at, _source = excluded._source "
        f"where t.{spec.watermark} <= excluded.{spec.watermark} and "
        f"({', '.join('t.' + c for c in non_pk)}) is distinct from ({', '.join('excluded.' + c for c in non_pk)}) "
        "returning (xmax = 0) as inserted"
    )
    # Count server-side: a million RETURNING rows shipped to Python would cost more than the upsert.
    inserted, changed = conn.execute(
        text(f"with w as ({sql}) select count(*) filter (where inserted), count(*) from w"), {"source": source}
    ).one()
    conn.execute(text(f"drop table {tmp}"))
    return int(inserted), int(changed) - int(inserted)


def sync_table(
    engine: Engine,
    spec: TableSpec,
    *,
    source_engine: Engine | None = None,
    source_schema: str = "oltp",
    raw_schema: str = "raw",
    source_name: str = "oltp",
    overlap: timedelta = timedelta(minutes=10),
    full_refresh: bool = False,
    logger: Logger | None = None,
) -> RawLoadResult:
    """Copy one table from the source into ``raw`` incrementally (or fully) in ONE transaction with its watermark.

    Extract: rows with ``updated_at >= watermark - overlap`` (all rows on a full refresh or first run). The new
    watermark is the largest ``updated_at`` read (never the clock), so rows committed during the run with an
    older timestamp are re-read next time through the overlap window.
    """
    log = logger or logging.getLogger(__name__)
    source_engine = source_engine or engine
    with engine.begin() as conn:
        create_raw_schema(conn, raw_schema)
        before = get_watermark(conn, source_name, spec.name)
        low = None if (full_refresh or before is None) else before - overlap
        with source_engine.connect() as src:
            where = ""
            if low is not None:
                where = f"{spec.watermark} >= '{low.astimezone(UTC).isoformat()}'::timestamptz"
            frame = read_table(src, source_schema, spec, where)
            src.rollback()
        deduped = dedupe_on_pk(frame, spec)
        if full_refresh:
            conn.execute(text(f"delete from {raw_schema}.{spec.name}"))
        inserted, updated = upsert_raw(conn, spec, deduped, source=source_name, raw_schema=raw_schema)
        wm_max = deduped.get_column(spec.watermark).max() if deduped.height else None
        candidates = [x for x in (wm_max, None if full_refresh else before) if x is not None]
        after = max(candidates) if candidates else None
        _set_watermark(conn, source_name, spec.name, after, deduped.height)
    result = RawLoadResult(
        table=spec.name,
        extracted=frame.height,
        deduplicated=frame.height - deduped.height,
        inserted=inserted,
        updated=updated,
        unchanged=deduped.height - inserted - updated,
        watermark_before=before,
        watermark_after=after,
        full_refresh=full_refresh,
    )
    log.info(
        "raw.%s: extracted=%d inserted=%d updated=%d unchanged=%d watermark %s -> %s%s",
        spec.name,
        result.extracted,
        inserted,
        updated,
        result.unchanged,
        before.isoformat() if before else None,
        after.isoformat() if after else None,
        " (full refresh)" if full_refresh else "",
    )
    return result


def sync_all(engine: Engine, **kwargs: Any) -> list[RawLoadResult]:
    """:func:`sync_table` for every table in :data:`TABLES` (one transaction each)."""
    return [sync_table(engine, spec, **kwargs) for spec in TABLES.values()]


# --- file extracts ---------------------------------------------------------------------------------------


def read_file_extract(lake: LakeFS, rel_or_url: str, spec: TableSpec) -> pl.DataFrame:
    """Read a CSV, JSON (array of objects) or NDJSON extract of ``spec``'s table, typed per the spec.

    Raises :class:`SourceFileError` naming the file and the field when a column is missing or a value
    does not parse.
    """
    name = PurePosixPath(rel_or_url.split("?")[0]).name
    suffix = PurePosixPath(name).suffix.lower()
    data = lake.read_bytes(rel_or_url)
    string_schema = {c: pl.String for c in spec.columns}
    try:
        if suffix == ".csv":
            frame = pl.read_csv(io.BytesIO(data), infer_schema=False)
        elif suffix == ".json":
            frame = pl.read_json(io.BytesIO(data), infer_schema_length=None)
        elif suffix in (".ndjson", ".jsonl"):
            frame = pl.read_ndjson(io.BytesIO(data), infer_schema_length=None)
        else:
            raise SourceFileError(name, "format", f"unsupported extension {suffix!r} (csv, json, ndjson, jsonl)")
    except pl.exceptions.PolarsError as exc:
        raise SourceFileError(name, "content", f"cannot be parsed: {exc}") from exc
    missing = [c for c in spec.columns if c not in frame.columns]
    if missing:
        raise SourceFileError(name, missing[0], f"column missing (table {spec.name})")
    frame = frame.select([pl.col(c).cast(pl.String) for c in string_schema])
    typed = _cast_strings(frame, spec.polars_schema, origin=name)
    nulls = typed.filter(pl.col(spec.pk).is_null() | pl.col(spec.watermark).is_null()).height
    if nulls:
        field_name = spec.pk if typed.get_column(spec.pk).null_count() else spec.watermark
        raise SourceFileError(name, field_name, f"{nulls} row(s) without a value")
    return typed


def load_file_extract(
    engine: Engine,
    lake: LakeFS,
    rel_or_url: str,
    spec: TableSpec,
    *,
    raw_schema: str = "raw",
    logger: Logger | None = None,
) -> RawLoadResult:
    """Upsert a file extract into ``raw`` (PK de-dup, stale versions ignored), recording the file as the source."""
    log = logger or logging.getLogger(__name__)
    frame = read_file_extract(lake, rel_or_url, spec)
    deduped = dedupe_on_pk(frame, spec)
    source = f"file:{PurePosixPath(rel_or_url).name}"
    with engine.begin() as conn:
        create_raw_schema(conn, raw_schema)
        inserted, updated = upsert_raw(conn, spec, deduped, source=source, raw_schema=raw_schema)
        wm = deduped.get_column(spec.watermark).max() if deduped.height else None
        before = get_watermark(conn, "files", spec.name)
        candidates = [x for x in (before, wm) if x is not None]
        after = max(candidates) if candidates else None
        _set_watermark(conn, "files", spec.name, after, deduped.height)
    log.info("raw.%s from %s: rows=%d inserted=%d updated=%d", spec.name, source, frame.height, inserted, updated)
    return RawLoadResult(
        table=spec.name,
        extracted=frame.height,
        deduplicated=frame.height - deduped.height,
        inserted=inserted,
        updated=updated,
        unchanged=deduped.height - inserted - updated,
        watermark_before=before,
        watermark_after=after,
    )


# --- SQL Server -----------------------------------------------------------------------------------------


def mssql_merge_sql(spec: TableSpec, *, raw_schema: str = "raw", staging: str | None = None) -> str:
    """The SQL Server MERGE that upserts a staged (#temp) table into ``raw`` with the same rules as PostgreSQL.

    Identifiers are quoted by SQLAlchemy's mssql dialect. HOLDLOCK makes the MERGE safe against concurrent
    inserts of the same key; OUTPUT $action gives the insert/update counts.
    """
    from sqlalchemy.dialects import mssql

    q = mssql.dialect().identifier_preparer.quote
    staging = staging or f"#stage_{spec.name}"
    cols = spec.column_names
    non_pk = [c for c in cols if c != spec.pk]
    differs = " OR ".join(
        f"(t.{q(c)} <> s.{q(c)} OR (t.{q(c)} IS NULL AND s.{q(c)} IS NOT NULL) "
        f"OR (t.{q(c)} IS NOT NULL AND s.{q(c)} IS NULL))"
        for c in non_pk
    )
    return (
        f"MERGE INTO {q(raw_schema)}.{q(spec.name)} WITH (HOLDLOCK) AS t\n"
        f"USING {staging} AS s\n"
        f"ON t.{q(spec.pk)} = s.{q(spec.pk)}\n"
        f"WHEN MATCHED AND t.{q(spec.watermark)} <= s.{q(spec.watermark)} AND ({differs}) THEN\n"
        f"  UPDATE SET {', '.join(f't.{q(c)} = s.{q(c)}' for c in non_pk)}, "
        f"t.{q('_loaded_at')} = SYSUTCDATETIME(), t.{q('_source')} = s.{q('_source')}\n"
        f"WHEN NOT MATCHED BY TARGET THEN\n"
        f"  INSERT ({', '.join(q(c) for c in cols)}, {q('_loaded_at')}, {q('_source')})\n"
        f"  VALUES ({', '.join('s.' + q(c) for c in cols)}, SYSUTCDATETIME(), s.{q('_source')})\n"
        "OUTPUT $action;"
    )


MSSQL_TYPES = {"bigint": "BIGINT", "integer": "INT", "text": "NVARCHAR(400)", "timestamptz": "DATETIMEOFFSET(6)"}


def _mssql_upsert(
    conn: Connection, spec: TableSpec, frame: pl.DataFrame, *, source: str, raw_schema: str
) -> tuple[int, int]:
    """SQL Server path: fast_executemany into a #temp table, then one MERGE (pyodbc)."""
    from sqlalchemy.dialects import mssql

    q = mssql.dialect().identifier_preparer.quote
    staging = f"#stage_{spec.name}"
    col_defs = ", ".join(
        f"{q(c)} {MSSQL_TYPES.get(t, 'DECIMAL(12,2)' if t.startswith('numeric') else t.upper())}"
        for c, t in spec.columns.items()
    )
    dbapi = _dbapi(conn)
    cur = dbapi.cursor()
    try:
        cur.execute(f"IF OBJECT_ID('tempdb..{staging}') IS NOT NULL DROP TABLE {staging}")
        cur.execute(f"CREATE TABLE {staging} ({col_defs}, {q('_source')} NVARCHAR(200))")
        cur.fast_executemany = True
        placeholders = ", ".join("?" for _ in range(len(spec.columns) + 1))
        rows = frame.select(spec.column_names).with_columns(pl.lit(source).alias("_source")).rows()
        cur.executemany(f"INSERT INTO {staging} VALUES ({placeholders})", rows)
        cur.execute(mssql_merge_sql(spec, raw_schema=raw_schema, staging=staging))
        actions = [r[0] for r in cur.fetchall()]
    finally:
        cur.close()
    return actions.count("INSERT"), actions.count("UPDATE")
