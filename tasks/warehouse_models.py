"""Warehouse models in Polars: staging -> intermediate -> marts.

* staging: trimmed, case-normalized, typed copies of the raw tables; duplicate customers (same e-mail after
  trimming and lower-casing) point to a canonical customer (the smallest id). Nothing is dropped: every rule
  that a row breaks becomes a flag in ``dq_flags`` (comma-separated, sorted) and lowers ``dq_score``
  (1.0 = clean, 0.0 = worst).
* intermediate: orders enriched with the (canonical) customer; order items enriched with product and order.
* marts: ``dim_customers`` (one row per source customer, RFM scores and segment computed per canonical customer),
  ``dim_products`` (category, pricing tier), ``fct_sales`` (one row per order item; built incrementally from the
  raw rows loaded since the last build), ``fct_orders`` (order totals and item counts).

Money is Float64 rounded to cents here and ``numeric(14,2)`` in PostgreSQL (reconciliation compares numerics).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import polars as pl
from sqlalchemy import Connection

from tasks.data_tests import DataTest
from tasks.warehouse_source import ORDER_STATUSES, TABLES, TableSpec, copy_out

Logger = logging.Logger | logging.LoggerAdapter

TS = pl.Datetime("us", "UTC")
EMAIL_RE = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
RFM_SEGMENTS = ("champion", "loyal", "new", "potential", "at_risk", "hibernating", "prospect")
PRICING_TIERS = ("budget", "standard", "premium", "unknown")
REVENUE_STATUSES = ("placed", "paid", "shipped", "delivered")

# How much each flag costs the row's quality score.
FLAG_WEIGHTS: dict[str, float] = {
    "email_missing": 0.3,
    "email_invalid": 0.3,
    "duplicate_customer": 0.2,
    "name_missing": 0.2,
    "category_missing": 0.3,
    "price_invalid": 0.5,
    "status_unknown": 0.3,
    "orphan_customer": 0.5,
    "orphan_order": 0.5,
    "orphan_product": 0.5,
    "negative_quantity": 0.6,
    "zero_quantity": 0.4,
    "has_invalid_items": 0.2,
    "no_items": 0.2,
}


@dataclass(frozen=True)
class MartSpec:
    """A mart table: primary key, columns with PostgreSQL types, and whether it is built incrementally."""

    name: str
    pk: str
    columns: dict[str, str]
    incremental: bool = False

    @property
    def polars_schema(self) -> dict[str, pl.DataType]:
        from tasks.warehouse_source import pg_to_polars

        return {c: pg_to_polars(t) for c, t in self.columns.items()}


_DQ = {"dq_score": "numeric(4,2)", "dq_flags": "text"}
MARTS: dict[str, MartSpec] = {
    m.name: m
    for m in (
        MartSpec(
            "dim_customers",
            "customer_id",
            {
                "customer_id": "bigint",
                "canonical_customer_id": "bigint",
                "email": "text",
                "full_name": "text",
                "country": "text",
                "created_at": "timestamptz",
                "first_order_at": "timestamptz",
                "last_order_at": "timestamptz",
                "order_count": "bigint",
                "monetary": "numeric(14,2)",
                "recency_days": "bigint",
                "r_score": "integer",
                "f_score": "integer",
                "m_score": "integer",
                "rfm_segment": "text",
                **_DQ,
                "updated_at": "timestamptz",
            },
        ),
        MartSpec(
            "dim_products",
            "product_id",
            {
                "product_id": "bigint",
                "sku": "text",
                "name": "text",
                "category": "text",
                "unit_price": "numeric(12,2)",
                "pricing_tier": "text",
                **_DQ,
                "updated_at": "timestamptz",
            },
        ),
        MartSpec(
            "fct_orders",
            "order_id",
            {
                "order_id": "bigint",
                "customer_id": "bigint",
                "status": "text",
                "ordered_at": "timestamptz",
                "order_date": "date",
                "item_count": "bigint",
                "units": "bigint",
                "order_total": "numeric(14,2)",
                "valid_total": "numeric(14,2)",
                **_DQ,
                "updated_at": "timestamptz",
            },
        ),
        MartSpec(
            "fct_sales",
            "order_item_id",
            {
                "order_item_id": "bigint",
                "order_id": "bigint",
                "product_id": "bigint",
                "customer_id": "bigint",
                "ordered_at": "timestamptz",
                "order_date": "date",
                "category": "text",
                "quantity": "bigint",
                "unit_price": "numeric(12,2)",
                "amount": "numeric(14,2)",
                "is_valid": "boolean",
                **_DQ,
                "updated_at": "timestamptz",
            },
            incremental=True,
        ),
    )
}


@dataclass(frozen=True)
class ModelSettings:
    """Business rules: pricing tier bounds and the RFM reference date."""

    budget_below: float = 20.0
    premium_from: float = 100.0


@dataclass
class MartBuild:
    """The frames of one build plus what the flow reports about them."""

    frames: dict[str, pl.DataFrame]
    full: dict[str, bool]
    flag_counts: dict[str, int] = field(default_factory=dict)
    loaded_through: datetime | None = None


# --- helpers -------------------------------------------------------------------------------------------


def _flags(rules: list[tuple[str, pl.Expr]]) -> list[pl.Expr]:
    """``dq_flags`` (sorted, comma-joined names of the rules a row breaks) and ``dq_score``."""
    rules = sorted(rules, key=lambda r: r[0])
    flags = pl.concat_str(
        [pl.when(cond.fill_null(False)).then(pl.lit(name)) for name, cond in rules], separator=",", ignore_nulls=True
    ).fill_null("")
    penalty = pl.sum_horizontal(
        [pl.when(cond.fill_null(False)).then(pl.lit(FLAG_WEIGHTS[name])).otherwise(0.0) for name, cond in rules]
    )
    score = (1.0 - penalty).clip(0.0, 1.0).round(2)
    return [flags.alias("dq_flags"), score.alias("dq_score")]


def _conform(frame: pl.DataFrame, spec: MartSpec) -> pl.DataFrame:
    return frame.select([pl.col(c).cast(t) for c, t in spec.polars_schema.items()])


def read_raw(conn: Connection, raw_schema: str = "raw") -> dict[str, pl.DataFrame]:
    """The four raw tables with their ``_loaded_at`` (via COPY)."""
    out = {}
    for spec in TABLES.values():
        cols = dict(spec.columns) | {"_loaded_at": "timestamptz"}
        with_loaded = TableSpec(spec.name, spec.pk, cols, spec.watermark)
        select = ", ".join(
            f"to_char({c} at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') as {c}" if t == "timestamptz" else c
            for c, t in cols.items()
        )
        out[spec.name] = copy_out(conn, f"select {select} from {raw_schema}.{spec.name}", with_loaded.polars_schema)
    return out


# --- staging -------------------------------------------------------------------------------------------


def stg_customers(raw: pl.DataFrame) -> pl.DataFrame:
    email = pl.col("email").str.strip_chars().str.to_lowercase()
    out = raw.with_columns(
        email=pl.when(email == "").then(None).otherwise(email),
        email_raw=pl.col("email"),
        full_name=pl.col("full_name").str.strip_chars().str.replace_all(r"\s+", " ").str.to_titlecase(),
        country=pl.col("country").str.strip_chars().str.to_uppercase(),
    )
    canonical = (
        pl.when(pl.col("email").is_null())
        .then(pl.col("customer_id"))
        .otherwise(pl.col("customer_id").min().over("email"))
    )
    out = out.with_columns(canonical_customer_id=canonical)
    return out.with_columns(
        _flags(
            [
                ("email_missing", pl.col("email").is_null()),
                ("email_invalid", pl.col("email").is_not_null() & ~pl.col("email").str.contains(EMAIL_RE)),
                ("duplicate_customer", pl.col("canonical_customer_id") != pl.col("customer_id")),
                ("name_missing", pl.col("full_name").is_null() | (pl.col("full_name") == "")),
            ]
        )
    )


def stg_products(raw: pl.DataFrame, settings: ModelSettings) -> pl.DataFrame:
    category = pl.col("category").str.strip_chars().str.to_lowercase()
    out = raw.with_columns(
        category=pl.when(category.is_null() | (category == "")).then(pl.lit("uncategorized")).otherwise(category),
        category_missing=category.is_null() | (category == ""),
        name=pl.col("name").str.strip_chars(),
        sku=pl.col("sku").str.strip_chars().str.to_uppercase(),
        unit_price=pl.col("unit_price").round(2),
    )
    price = pl.col("unit_price")
    out = out.with_columns(
        pricing_tier=pl.when(price.is_null() | (price <= 0))
        .then(pl.lit("unknown"))
        .when(price < settings.budget_below)
        .then(pl.lit("budget"))
        .when(price < settings.premium_from)
        .then(pl.lit("standard"))
        .otherwise(pl.lit("premium"))
    )
    return out.with_columns(
        _flags([("category_missing", pl.col("category_missing")), ("price_invalid", price.is_null() | (price <= 0))])
    )


def stg_orders(raw: pl.DataFrame, customers: pl.DataFrame) -> pl.DataFrame:
    status = pl.col("status").str.strip_chars().str.to_lowercase()
    known = customers.select("customer_id", "canonical_customer_id")
    out = raw.with_columns(status=status).join(known, on="customer_id", how="left")
    return out.with_columns(
        _flags(
            [
                ("status_unknown", ~pl.col("status").is_in(ORDER_STATUSES) | pl.col("status").is_null()),
                ("orphan_customer", pl.col("canonical_customer_id").is_null()),
            ]
        )
    )


def stg_order_items(raw: pl.DataFrame, orders: pl.DataFrame, products: pl.DataFrame) -> pl.DataFrame:
    out = raw.with_columns(
        unit_price=pl.col("unit_price").round(2),
        amount=(pl.col("quantity") * pl.col("unit_price")).round(2),
        _has_order=pl.col("order_id").is_in(orders.get_column("order_id").implode()),
        _has_product=pl.col("product_id").is_in(products.get_column("product_id").implode()),
    )
    rules = [
        ("negative_quantity", pl.col("quantity") < 0),
        ("zero_quantity", pl.col("quantity") == 0),
        ("price_invalid", pl.col("unit_price").is_null() | (pl.col("unit_price") <= 0)),
        ("orphan_order", ~pl.col("_has_order")),
        ("orphan_product", ~pl.col("_has_product")),
    ]
    return (
        out.with_columns(_flags(rules))
        .with_columns(is_valid=pl.col("dq_flags") == "")
        .drop("_has_order", "_has_product")
    )


# --- intermediate ------------------------------------------------------------------------------------------


def int_orders_enriched(orders: pl.DataFrame, customers: pl.DataFrame) -> pl.DataFrame:
    """Orders with the canonical customer's e-mail and country."""
    canon = customers.select(
        pl.col("customer_id").alias("canonical_customer_id"), pl.col("email").alias("customer_email"), "country"
    )
    return orders.join(canon, on="canonical_customer_id", how="left")


def int_items_enriched(items: pl.DataFrame, orders: pl.DataFrame, products: pl.DataFrame) -> pl.DataFrame:
    """Order items with their product (category, tier) and order (canonical customer, time, status)."""
    return items.join(products.select("product_id", "category", "pricing_tier"), on="product_id", how="left").join(
        orders.select(
            "order_id",
            pl.col("canonical_customer_id").alias("customer_id"),
            "ordered_at",
            "status",
            pl.col("updated_at").alias("_order_updated_at"),
        ),
        on="order_id",
        how="left",
    )


# --- marts -----------------------------------------------------------------------------------------------


def _quintile(col: str, descending: bool = False) -> pl.Expr:
    rank = pl.col(col).rank("average", descending=descending)
    return ((rank / pl.len()) * 5).ceil().clip(1, 5).cast(pl.Int64)


def dim_customers(customers: pl.DataFrame, orders: pl.DataFrame, as_of: datetime) -> pl.DataFrame:
    revenue = orders.filter(pl.col("status").is_in(REVENUE_STATUSES) & pl.col("canonical_customer_id").is_not_null())
    stats = revenue.group_by("canonical_customer_id").agg(
        first_order_at=pl.col("ordered_at").min(),
        last_order_at=pl.col("ordered_at").max(),
        order_count=pl.len().cast(pl.Int64),
        monetary=pl.col("valid_total").sum().round(2),
    )
    as_of_lit = pl.lit(as_of.astimezone(UTC), dtype=TS)
    stats = stats.with_columns(recency_days=(as_of_lit - pl.col("last_order_at")).dt.total_days().cast(pl.Int64))
    stats = stats.with_columns(
        r_score=_quintile("recency_days", descending=True),
        f_score=_quintile("order_count"),
        m_score=_quintile("monetary"),
    )
    r, f, m = pl.col("r_score"), pl.col("f_score"), pl.col("m_score")
    stats = stats.with_columns(
        rfm_segment=pl.when((r >= 4) & (f >= 4) & (m >= 4))
        .then(pl.lit("champion"))
        .when((r >= 3) & (f >= 3))
        .then(pl.lit("loyal"))
        .when((r >= 4) & (f <= 2))
        .then(pl.lit("new"))
        .when((r <= 2) & (f >= 3))
        .then(pl.lit("at_risk"))
        .when(r <= 2)
        .then(pl.lit("hibernating"))
        .otherwise(pl.lit("potential"))
    )
    out = customers.join(stats, on="canonical_customer_id", how="left").with_columns(
        order_count=pl.col("order_count").fill_null(0),
        monetary=pl.col("monetary").fill_null(0.0),
        rfm_segment=pl.col("rfm_segment").fill_null("prospect"),
    )
    return _conform(out, MARTS["dim_customers"])


def dim_products(products: pl.DataFrame) -> pl.DataFrame:
    return _conform(products, MARTS["dim_products"])


def fct_orders(orders: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    totals = items.group_by("order_id").agg(
        item_count=pl.len().cast(pl.Int64),
        units=pl.col("quantity").filter(pl.col("is_valid")).sum().cast(pl.Int64),
        order_total=pl.col("amount").sum().round(2),
        valid_total=pl.col("amount").filter(pl.col("is_valid")).sum().round(2),
        invalid_items=(~pl.col("is_valid")).sum(),
        _items_updated_at=pl.col("updated_at").max(),
    )
    out = orders.join(totals, on="order_id", how="left").with_columns(
        item_count=pl.col("item_count").fill_null(0),
        units=pl.col("units").fill_null(0),
        order_total=pl.col("order_total").fill_null(0.0),
        valid_total=pl.col("valid_total").fill_null(0.0),
        order_date=pl.col("ordered_at").dt.date(),
        customer_id=pl.col("canonical_customer_id"),
        updated_at=pl.max_horizontal("updated_at", "_items_updated_at"),
    )
    base_flags = pl.col("dq_flags")
    extra = _flags(
        [
            ("has_invalid_items", pl.col("invalid_items").fill_null(0) > 0),
            ("no_items", pl.col("item_count") == 0),
        ]
    )
    out = out.with_columns(extra[0].alias("_extra_flags"), extra[1].alias("_extra_score"))
    out = out.with_columns(
        dq_flags=pl.concat_str([base_flags, pl.col("_extra_flags")], separator=",")
        .str.strip_chars(",")
        .str.split(",")
        .list.sort()
        .list.join(","),
        dq_score=(pl.col("dq_score") - (1.0 - pl.col("_extra_score"))).clip(0.0, 1.0).round(2),
    )
    return _conform(out, MARTS["fct_orders"])


def fct_sales(enriched_items: pl.DataFrame) -> pl.DataFrame:
    out = enriched_items.with_columns(
        order_date=pl.col("ordered_at").dt.date(),
        updated_at=pl.max_horizontal("updated_at", "_order_updated_at"),
    )
    return _conform(out, MARTS["fct_sales"])


def build_marts(
    raw: dict[str, pl.DataFrame],
    *,
    as_of: datetime,
    sales_since: datetime | None = None,
    settings: ModelSettings | None = None,
    logger: Logger | None = None,
) -> MartBuild:
    """Staging -> intermediate -> marts. ``sales_since`` (a raw ``_loaded_at``) makes ``fct_sales`` incremental:
    only items whose own row, order or product was loaded into raw after it are rebuilt
    (raw loads and builds are serialized by the flow: one run at a time).
    """
    log = logger or logging.getLogger(__name__)
    settings = settings or ModelSettings()
    customers = stg_customers(raw["customers"])
    products = stg_products(raw["products"], settings)
    orders = stg_orders(raw["orders"], customers)
    items = stg_order_items(raw["order_items"], orders, products)
    enriched = int_items_enriched(items, orders, products)
    orders_totals = fct_orders(orders, items)
    orders_for_dim = orders.join(orders_totals.select("order_id", "valid_total"), on="order_id", how="left")
    if sales_since is not None:
        sales_since = sales_since.astimezone(UTC)
        changed_orders = raw["orders"].filter(pl.col("_loaded_at") > sales_since).get_column("order_id").implode()
        changed_products = raw["products"].filter(pl.col("_loaded_at") > sales_since).get_column("product_id").implode()
        enriched = enriched.filter(
            (pl.col("_loaded_at") > sales_since)
            | pl.col("order_id").is_in(changed_orders)
            | pl.col("product_id").is_in(changed_products)
        )
    frames = {
        "dim_customers": dim_customers(customers, int_orders_enriched(orders_for_dim, customers), as_of),
        "dim_products": dim_products(products),
        "fct_orders": orders_totals,
        "fct_sales": fct_sales(enriched),
    }
    loaded = [f.get_column("_loaded_at").max() for f in raw.values() if f.height]
    build = MartBuild(
        frames=frames,
        full={name: not (MARTS[name].incremental and sales_since is not None) for name in frames},
        flag_counts=flag_counts(frames),
        loaded_through=max(loaded) if loaded else None,
    )
    log.info(
        "marts built: %s; flags %s",
        ", ".join(f"{k}={v.height}{'' if build.full[k] else ' (incremental)'}" for k, v in frames.items()),
        build.flag_counts,
    )
    return build


def flag_counts(frames: dict[str, pl.DataFrame]) -> dict[str, int]:
    """How many rows carry each flag, over all marts (``model.flag`` -> rows)."""
    counts: dict[str, int] = {}
    for name, frame in frames.items():
        if "dq_flags" not in frame.columns or frame.is_empty():
            continue
        exploded = frame.select(pl.col("dq_flags").str.split(",").alias("f")).explode("f").filter(pl.col("f") != "")
        for flag, n in exploded.group_by("f").len().sort("f").iter_rows():
            counts[f"{name}.{flag}"] = int(n)
    return counts


def warehouse_tests(
    *, fresh_warn: timedelta = timedelta(days=2), fresh_error: timedelta = timedelta(days=30)
) -> list[DataTest]:
    """The data tests the warehouse flow runs on the marts before publishing."""
    tests: list[DataTest] = []
    for spec in MARTS.values():
        tests.append(DataTest(model=spec.name, kind="unique", column=spec.pk))
        tests.append(DataTest(model=spec.name, kind="not_null", column=spec.pk))
    tests += [
        DataTest(model="dim_customers", kind="not_null", column="email", warn_if=">0", error_if=">20%"),
        DataTest(model="dim_customers", kind="accepted_values", column="rfm_segment", values=RFM_SEGMENTS),
        DataTest(model="dim_products", kind="accepted_values", column="pricing_tier", values=PRICING_TIERS),
        DataTest(model="fct_orders", kind="accepted_values", column="status", values=ORDER_STATUSES, error_if=">5%"),
        DataTest(
            model="fct_orders",
            kind="relationships",
            column="customer_id",
            to_model="dim_customers",
            to_column="customer_id",
            error_if=">5%",
        ),
        DataTest(
            model="fct_sales",
            kind="relationships",
            column="order_id",
            to_model="fct_orders",
            to_column="order_id",
            error_if=">5%",
        ),
        DataTest(
            model="fct_sales",
            kind="relationships",
            column="product_id",
            to_model="dim_products",
            to_column="product_id",
            error_if=">5%",
        ),
        DataTest(
            model="fct_orders", kind="freshness", column="updated_at", warn_after=fresh_warn, error_after=fresh_error
        ),
    ]
    return tests
