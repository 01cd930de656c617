"""Pagination strategies of the source API, picked by name (``SourceApi.pagination``): each decides the first
request of a window and, from every answer, the next one (or None to stop), and guards against the source's
loops. Used by :func:`tasks.extract.fetch_pages`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from tasks.errors import ConfigurationError, PaginationLoopError, SourceResponseError, redact_url
from tasks.models import Window

if TYPE_CHECKING:
    from blocks.source import SourceApi


def dig(body: Any, dotted: str) -> tuple[bool, Any]:
    """Follow a dotted path into nested dicts: ``(found, value)``."""
    node = body
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


Request = tuple[str, dict[str, Any] | None]
"""URL and query parameters of the next request (None: the URL carries them)."""


class Paginator:
    """Decides the first request and, from each answer, the next one (or None to stop)."""

    name = "base"

    def __init__(self, source: SourceApi, window: Window) -> None:
        self.source = source
        self.url = source.url
        self.base_params: dict[str, Any] = {
            source.start_param: window.start.isoformat(),
            source.end_param: window.end.isoformat(),
        }
        self.page_size = source.page_size

    def first(self) -> Request:
        raise NotImplementedError

    def next(self, response: httpx.Response, body: Any, records: list, page_no: int) -> Request | None:
        raise NotImplementedError


class PageNumberPaginator(Paginator):
    """``?page=1,2,...&page_size=N``; stops at the first page shorter than ``page_size``."""

    name = "page_number"

    def first(self) -> Request:
        self.page = 1
        return self._request()

    def _request(self) -> Request:
        return self.url, {**self.base_params, self.source.page_param: self.page, self.source.size_param: self.page_size}

    def next(self, response: httpx.Response, body: Any, records: list, page_no: int) -> Request | None:
        if len(records) < self.page_size:
            return None
        self.page += 1
        return self._request()


class OffsetPaginator(Paginator):
    """``?offset=0,N,2N,...&limit=N``; stops at the first page shorter than ``page_size``."""

    name = "offset"

    def first(self) -> Request:
        self.offset = 0
        return self._request()

    def _request(self) -> Request:
        return self.url, {
            **self.base_params,
            self.source.offset_param: self.offset,
            self.source.limit_param: self.page_size,
        }

    def next(self, response: httpx.Response, body: Any, records: list, page_no: int) -> Request | None:
        if len(records) < self.page_size:
            return None
        self.offset += self.page_size
        return self._request()


class CursorPaginator(Paginator):
    """Token at ``cursor_path`` in the body, sent back as ``cursor_param``; null/empty/absent token ends.

    An absent token on a FULL page is treated as a misconfigured ``cursor_path`` (fail rather than silently
    stop after one page). A token handed out twice is a loop.
    """

    name = "cursor"

    def first(self) -> Request:
        self.seen: set[str] = set()
        return self.url, {**self.base_params, self.source.size_param: self.page_size}

    def next(self, response: httpx.Response, body: Any, records: list, page_no: int) -> Request | None:
        path = self.source.cursor_path
        found, token = dig(body, path)
        if not found and len(records) >= self.page_size:
            keys = sorted(body) if isinstance(body, dict) else []
            raise SourceResponseError(
                f"page {page_no}: cursor path {path!r} is not in a full page (keys present: {keys}); "
                "check the source's cursor_path",
                url=str(response.request.url),
            )
        if token is None or token == "":
            return None
        token = str(token)
        if token in self.seen:
            raise PaginationLoopError(
                f"page {page_no}: the source handed out cursor {token[:40]!r} again (pagination loop)",
                url=str(response.request.url),
            )
        self.seen.add(token)
        return self.url, {**self.base_params, self.source.size_param: self.page_size, self.source.cursor_param: token}


class LinkHeaderPaginator(Paginator):
    """RFC 8288 ``Link: <url>; rel="next"``; no next link ends. Next links must stay on the source's origin."""

    name = "link_header"

    def first(self) -> Request:
        self.seen: set[str] = set()
        self.origin = httpx.URL(self.url)
        return self.url, {**self.base_params, self.source.size_param: self.page_size}

    def next(self, response: httpx.Response, body: Any, records: list, page_no: int) -> Request | None:
        self.seen.add(str(response.request.url))
        link = response.links.get("next", {}).get("url")
        if not link:
            return None
        target = response.request.url.join(link)
        if (target.scheme, target.host, target.port) != (self.origin.scheme, self.origin.host, self.origin.port):
            raise SourceResponseError(
                f"page {page_no}: next link leaves the source's origin ({redact_url(target)}); "
                "refusing to send credentials there",
                url=str(response.request.url),
            )
        if str(target) in self.seen:
            raise PaginationLoopError(
                f"page {page_no}: the next link points to a page already fetched (pagination loop)",
                url=str(target),
            )
        return str(target), None


PAGINATORS: dict[str, type[Paginator]] = {
    cls.name: cls for cls in (PageNumberPaginator, OffsetPaginator, CursorPaginator, LinkHeaderPaginator)
}


def make_paginator(source: SourceApi, window: Window) -> Paginator:
    try:
        cls = PAGINATORS[source.pagination]
    except KeyError:
        raise ConfigurationError(
            "pagination", f"unknown strategy {source.pagination!r}; expected one of {sorted(PAGINATORS)}"
        ) from None
    return cls(source, window)
