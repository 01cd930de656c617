"""The CSV that the Salesforce sync uploads: metrics frame -> validated string cells -> row hashes -> CSV chunks.

The CSV contract (column order, formats, nulls, quoting) is the one stated in :mod:`tasks.salesforce`, which
drives the Bulk API 2.0 jobs; this module only shapes the data: :func:`prepare` turns a frame into string cells
(failing on a null where Salesforce would read "leave unchanged"), :func:`row_hashes` gives each row a stable
BLAKE2b over its exact cells (the diff against the snapshot), :func:`chunks` splits rows under the upload size
cap and :func:`write_csv` writes one chunk.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterator

import polars as pl

from tasks.errors import ConfigurationError, SalesforceSyncError

CLEAR_VALUE = "#N/A"
FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_NEEDS_QUOTE = r'[,"\r\n]'
ROW_HASH = "_row_hash"  # internal column; cannot clash with an API name (those start with a letter)


def _format_floats(series: pl.Series) -> pl.Series:
    """Plain-decimal strings (Polars' cast gives '1e+20'; its CSV writer can be told not to)."""
    sentinel = "\x00"
    text = pl.DataFrame({"v": series}).write_csv(
        include_header=False, float_scientific=False, null_value=sentinel, line_terminator="\n"
    )
    values = text.split("\n")[:-1]
    out = pl.Series(series.name, values, dtype=pl.String)
    return pl.select(pl.when(out == sentinel).then(None).otherwise(out)).to_series().alias(series.name)


def _to_strings(frame: pl.DataFrame, source: str) -> pl.DataFrame:
    """Every column as the exact string Salesforce will receive (nulls stay null)."""
    exprs: list[pl.Expr] = []
    floats: list[str] = []
    for name, dtype in frame.schema.items():
        col = pl.col(name)
        if dtype == pl.String:
            exprs.append(col)
        elif dtype == pl.Null:  # an all-null (e.g. empty) column: the null policy below decides
            exprs.append(col.cast(pl.String))
        elif dtype == pl.Date:
            exprs.append(col.dt.to_string("%Y-%m-%d"))
        elif isinstance(dtype, pl.Datetime):
            utc = col.dt.replace_time_zone("UTC") if dtype.time_zone is None else col.dt.convert_time_zone("UTC")
            exprs.append(utc.dt.to_string("%Y-%m-%dT%H:%M:%S%.3fZ"))
        elif dtype == pl.Boolean:
            exprs.append(pl.when(col).then(pl.lit("true")).when(~col).then(pl.lit("false")))
        elif dtype.is_integer() or isinstance(dtype, pl.Decimal):
            exprs.append(col.cast(pl.String))
        elif dtype.is_float():
            floats.append(name)
            exprs.append(col)
        else:
            raise SalesforceSyncError(f"{source}: column {name!r} has type {dtype}, which cannot go into a CSV cell")
    out = frame.select(exprs)
    if floats:
        out = out.with_columns([_format_floats(out.get_column(name)) for name in floats])
    return out


def prepare(
    frame: pl.DataFrame, *, external_id_field: str, clear_nulls: Collection[str], source: str
) -> tuple[pl.DataFrame, list[str]]:
    """Validate the input and return (string frame in CSV column order, column order)."""
    if external_id_field not in frame.columns:
        raise SalesforceSyncError(f"{source}: external id column {external_id_field!r} is missing")
    bad = [c for c in frame.columns if not FIELD_NAME.match(c)]
    if bad:
        raise SalesforceSyncError(f"{source}: column names are not Salesforce API names: {bad}")
    if external_id_field in clear_nulls:
        raise ConfigurationError("clear_nulls", f"the external id {external_id_field!r} can never be cleared")
    unknown = sorted(set(clear_nulls) - set(frame.columns))
    if unknown:
        raise ConfigurationError("clear_nulls", f"columns not in {source}: {unknown}")
    columns = [external_id_field, *sorted(c for c in frame.columns if c != external_id_field)]
    text = _to_strings(frame.select(columns), source)
    # An empty string would become an empty cell = "leave unchanged": treat it as null, then apply the policy.
    text = text.with_columns(
        pl.when(pl.col(c).str.len_bytes() == 0).then(None).otherwise(pl.col(c)).alias(c) for c in columns
    )
    nulls = text.null_count().row(0, named=True)
    required_nulls = {c: n for c, n in nulls.items() if n and c not in clear_nulls}
    if required_nulls:
        raise SalesforceSyncError(
            f"{source}: null or empty values in required columns {required_nulls} "
            "(an empty CSV cell would leave the Salesforce field unchanged; pass clear_nulls to send #N/A)"
        )
    dupes = text.filter(pl.col(external_id_field).is_duplicated()).get_column(external_id_field).unique().sort()
    if dupes.len():
        raise SalesforceSyncError(
            f"{source}: {dupes.len()} duplicate {external_id_field} values, e.g. {dupes.head(5).to_list()}"
        )
    if clear_nulls:
        text = text.with_columns(pl.col(c).fill_null(CLEAR_VALUE) for c in clear_nulls)
    return text, columns


def row_hashes(text: pl.DataFrame, columns: list[str]) -> pl.Series:
    header = ",".join(columns)
    joined = text.select(pl.concat_str([pl.col(c) for c in columns], separator="\x1f").alias("j")).get_column("j")
    prefix = (header + "\x1e").encode()
    return pl.Series(
        ROW_HASH,
        [hashlib.blake2b(prefix + s.encode(), digest_size=16).hexdigest() for s in joined],
        dtype=pl.String,
    )


def _row_bytes(text: pl.DataFrame, columns: list[str]) -> pl.Series:
    """Exact bytes of each row's CSV line (QUOTE_NECESSARY rules: quote on , " CR LF; double inner quotes)."""
    cell = [
        pl.col(c).str.len_bytes()
        + pl.when(pl.col(c).str.contains(_NEEDS_QUOTE))
        .then(2 + pl.col(c).str.count_matches('"', literal=True))
        .otherwise(0)
        for c in columns
    ]
    return text.select((pl.sum_horizontal(cell) + len(columns)).cast(pl.Int64).alias("b")).get_column("b")


def write_csv(text: pl.DataFrame) -> bytes:
    return text.write_csv(line_terminator="\n", quote_style="necessary", null_value=CLEAR_VALUE).encode()


def chunks(text: pl.DataFrame, columns: list[str], max_csv_bytes: int) -> Iterator[pl.DataFrame]:
    """Split into frames whose CSV (header included) stays under ``max_csv_bytes``; order kept."""
    if text.height == 0:
        return
    header = len(",".join(columns)) + 1
    sizes = _row_bytes(text, columns)
    biggest = int(sizes.max())  # type: ignore[arg-type]
    budget = max_csv_bytes - header - biggest
    if budget <= 0:
        raise ConfigurationError(
            "max_csv_bytes", f"{max_csv_bytes} bytes cannot hold the header plus the largest row ({biggest} bytes)"
        )
    # Chunk k holds the rows whose cumulative end falls in (k*budget, (k+1)*budget]; it then spans less than
    # budget + biggest bytes, so header + chunk <= max_csv_bytes.
    ids = ((sizes.cum_sum() - 1) // budget).alias("chunk")
    for _, part in text.with_columns(ids).group_by("chunk", maintain_order=True):
        yield part.drop("chunk")
