"""THE event contract of the weekly reverse ETL: what one raw record must look like to count.

``EventRecord`` (pydantic v2) is the reference implementation and the oracle of the tests;
``tasks.validation`` applies the very same rules vectorized in Polars. Change a rule here and there together.

Rules, in field order (the first failing field is the one reported):

* payload: must be strict JSON (RFC 8259: no NaN/Infinity, no number that overflows a double, no lone
  surrogate, no BOM) and a JSON object. A duplicated key keeps its FIRST value (as Polars' reader does).
* ``id``: required JSON string; ASCII whitespace trimmed; non-empty; at most 255 characters; no control
  characters (U+0000-U+001F, U+007F). Numbers are NOT accepted as ids.
* ``customer_id``: same as ``id``, at most 200 characters (so ``External_Id__c`` fits Salesforce's 255).
* ``event_type``: required JSON string; trimmed; exactly one of ``EVENT_TYPES`` (case-sensitive).
* ``amount``: required; a JSON number, or a JSON string holding a plain decimal number
  (``[+-]digits[.digits][e[+-]digits]``, trimmed; "12.50" is accepted, "NaN"/"inf"/"1_000"/"0x10" are not);
  booleans are rejected; must be finite, ``>= 0`` and ``< 1e12``. Carried as a float.
* ``currency``: required JSON string; trimmed; three ASCII letters; upper-cased; one of ``CURRENCIES``.
* ``occurred_at``: required JSON string, RFC 3339 ``YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)``
  (trimmed; ``T`` and ``Z`` upper-case; 1-9 fraction digits, truncated to microseconds). A timestamp
  without an offset (naive) is rejected. Normalized to UTC and must fall in [1970-01-01, 2100-01-01) UTC.
* ``metadata``: optional; a JSON object or null/absent.
* Any other field is ignored (not an error, not carried).
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

EVENT_TYPES: tuple[str, ...] = ("page_view", "add_to_cart", "purchase", "refund", "subscription_renewal")

# Active ISO 4217 currency codes (funds, precious metals and testing codes such as XAU/XTS/XXX excluded).
CURRENCIES: tuple[str, ...] = tuple(
    sorted(
        """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP BYN BZD CAD
    CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ
    GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR
    LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN
    PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB
    TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
    """.split()
    )
)

FIELDS: tuple[str, ...] = ("id", "customer_id", "event_type", "amount", "currency", "occurred_at", "metadata")
TRIM_CHARS = " \t\n\r\x0b\x0c"  # ASCII whitespace only (Python's str.strip() and Rust's trim differ beyond it)
ID_MAX_LEN = 255
CUSTOMER_ID_MAX_LEN = 200
AMOUNT_MAX = 1e12  # exclusive
OCCURRED_MIN = datetime(1970, 1, 1, tzinfo=UTC)  # inclusive
OCCURRED_MAX = datetime(2100, 1, 1, tzinfo=UTC)  # exclusive

# Regexes shared verbatim with the Polars (Rust regex) implementation: ASCII classes only, anchored.
CONTROL_CHARS_RE = r"[\x00-\x1f\x7f]"
AMOUNT_RE = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$"
CURRENCY_RE = r"^[A-Za-z]{3}$"
_TS_CORE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?"
TS_RE = rf"^{_TS_CORE}(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
TS_NAIVE_RE = rf"^{_TS_CORE}$"

_control = re.compile(CONTROL_CHARS_RE)
_amount = re.compile(AMOUNT_RE)
_currency = re.compile(CURRENCY_RE)
_ts = re.compile(TS_RE)
_ts_naive = re.compile(TS_NAIVE_RE)


def show(value: Any, limit: int = 60) -> str:
    """A short printable rendering of a bad value for reject reasons."""
    text = value if isinstance(value, str) else json_text(value)
    text = repr(text) if isinstance(value, str) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def json_text(value: Any) -> str | None:
    """The text a JSON value reads as when decoded into a String column (strings unquoted)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)  # with Polars' spacing: {"k": "v", "n": [1, 2]}


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows a double")
    return value


def parse_payload(text: str | None) -> Any:
    """Parse one raw payload with the contract's JSON rules; raises ``ValueError`` with a reason."""
    if text is None:
        raise ValueError("payload is null")
    try:
        value = json.loads(text, object_pairs_hook=_first_wins, parse_constant=_no_constant, parse_float=_finite_float)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # lone surrogates cannot be stored
    except (ValueError, RecursionError, UnicodeEncodeError) as exc:
        raise ValueError(f"payload is not valid JSON: {str(exc)[:80]}") from None
    return value


def _trim(value: str) -> str:
    return value.strip(TRIM_CHARS)


def _required_string(name: str, value: Any) -> str:
    if value is None:
        raise ValueError(f"{name} is required")
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {json_type(value)} {show(value)}")
    return _trim(value)


def _identifier(name: str, value: Any, max_len: int) -> str:
    text = _required_string(name, value)
    if not text:
        raise ValueError(f"{name} must not be empty")
    if len(text) > max_len:
        raise ValueError(f"{name} must be at most {max_len} characters, got {len(text)}")
    if _control.search(text):
        raise ValueError(f"{name} must not contain control characters, got {show(text)}")
    return text


def parse_occurred_at(text: str) -> datetime:
    """RFC 3339 text (already trimmed) -> aware UTC datetime; ``ValueError`` with the contract's reason."""
    match = _ts.match(text)
    if match is None:
        if _ts_naive.match(text):
            raise ValueError(
                f"occurred_at must include a timezone offset (naive timestamps are rejected), got {show(text)}"
            )
        raise ValueError(f"occurred_at must be an RFC 3339 timestamp, got {show(text)}")
    frac = match.group(2)  # ".123456789" or None
    micro = int((frac[1:] + "000000")[:6]) if frac else 0
    tz_text = match.group(3)
    offset = 0 if tz_text == "Z" else (1 if tz_text[0] == "+" else -1) * (int(tz_text[1:3]) * 60 + int(tz_text[4:6]))
    try:
        local = datetime(
            int(text[0:4]),
            int(text[5:7]),
            int(text[8:10]),
            int(text[11:13]),
            int(text[14:16]),
            int(text[17:19]),
            micro,
            tzinfo=timezone(timedelta(minutes=offset)),
        )
        utc = local.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(f"occurred_at is not a valid date and time, got {show(text)}") from None
    if not OCCURRED_MIN <= utc < OCCURRED_MAX:
        raise ValueError(f"occurred_at must be in [1970-01-01, 2100-01-01) UTC, got {show(text)}")
    return utc


class EventRecord(BaseModel):
    """One valid event. Build with :func:`validate_payload` or ``EventRecord.model_validate(parsed_dict)``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(default=None, validate_default=True, description="Event id (trimmed, non-empty).")
    customer_id: str = Field(default=None, validate_default=True, description="Customer id (trimmed, non-empty).")
    event_type: str = Field(default=None, validate_default=True, description="One of EVENT_TYPES.")
    amount: float = Field(default=None, validate_default=True, description="Finite, >= 0, < 1e12.")
    currency: str = Field(default=None, validate_default=True, description="ISO 4217 code, upper-case.")
    occurred_at: datetime = Field(default=None, validate_default=True, description="Aware, normalized to UTC.")
    metadata: dict[str, Any] | None = Field(default=None, description="Free-form JSON object, or null.")

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: Any) -> str:
        return _identifier("id", value, ID_MAX_LEN)

    @field_validator("customer_id", mode="before")
    @classmethod
    def _customer_id(cls, value: Any) -> str:
        return _identifier("customer_id", value, CUSTOMER_ID_MAX_LEN)

    @field_validator("event_type", mode="before")
    @classmethod
    def _event_type(cls, value: Any) -> str:
        text = _required_string("event_type", value)
        if text not in EVENT_TYPES:
            raise ValueError(f"event_type must be one of {', '.join(EVENT_TYPES)}, got {show(text)}")
        return text

    @field_validator("amount", mode="before")
    @classmethod
    def _amount(cls, value: Any) -> float:
        if value is None:
            raise ValueError("amount is required")
        if isinstance(value, str) and _amount.match(_trim(value)):
            number = float(_trim(value))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
        else:
            raise ValueError(f"amount must be a number, got {show(value)}")
        if not math.isfinite(number):
            raise ValueError(f"amount must be finite, got {show(value)}")
        if number < 0:
            raise ValueError(f"amount must be >= 0, got {show(value)}")
        if number >= AMOUNT_MAX:
            raise ValueError(f"amount must be < 1e12, got {show(value)}")
        return number

    @field_validator("currency", mode="before")
    @classmethod
    def _currency(cls, value: Any) -> str:
        text = _required_string("currency", value)
        if not _currency.match(text):
            raise ValueError(f"currency must be a 3-letter ISO 4217 code, got {show(text)}")
        code = text.upper()
        if code not in CURRENCIES:
            raise ValueError(f"currency must be an active ISO 4217 code, got {show(code)}")
        return code

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _occurred_at(cls, value: Any) -> datetime:
        return parse_occurred_at(_required_string("occurred_at", value))

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> dict[str, Any] | None:
        if value is None or isinstance(value, dict):
            return value
        raise ValueError(f"metadata must be an object or null, got {json_type(value)}")


def validate_record(value: Any) -> tuple[EventRecord | None, str | None, str | None]:
    """(record, None, None) when ``value`` (a parsed payload) is valid, else (None, field, reason)."""
    if not isinstance(value, dict):
        return None, "payload", f"payload must be a JSON object, got {json_type(value)}"
    try:
        return EventRecord.model_validate(value), None, None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "payload"
        reason = str(first["msg"]).removeprefix("Value error, ")
        return None, field, reason


def validate_payload(text: str | None) -> tuple[EventRecord | None, str | None, str | None]:
    """Validate one raw payload string end to end (JSON rules + contract)."""
    try:
        value = parse_payload(text)
    except ValueError as exc:
        return None, "payload", str(exc)
    return validate_record(value)
