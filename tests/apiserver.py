"""A faithful, in-process Kubernetes API server for tests (standard library only).

No real API server can be installed in the test environment, so kproxy's tests
point the real ``kubernetes`` Python client at this server over plain HTTP on
127.0.0.1.  It serves, read-only over HTTP, the four kinds kproxy watches:

==================  ==========================  =========================================
kind                apiVersion                  paths
==================  ==========================  =========================================
Service             v1                          /api/v1/services,
                                                /api/v1/namespaces/{ns}/services[/{name}]
EndpointSlice       discovery.k8s.io/v1         /apis/discovery.k8s.io/v1/endpointslices,
                                                .../namespaces/{ns}/endpointslices[/{name}]
Node                v1                          /api/v1/nodes[/{name}]
ServiceCIDR         networking.k8s.io/v1        /apis/networking.k8s.io/v1/servicecidrs[/{name}]
==================  ==========================  =========================================

plus minimal discovery (``/api``, ``/api/v1``, ``/apis``, ``/apis/{group}[/{version}]``),
``/version`` and ``/healthz``/``/livez``/``/readyz``.  Objects are written by the
test through Python methods (:meth:`FakeAPIServer.create`, ``update``, ``apply``,
``delete``, ``bulk_load``); any HTTP method other than GET gets 405.

Semantics modelled on kube-apiserver + etcd
-------------------------------------------
* One global, monotonically increasing resourceVersion (RV) shared by all kinds,
  like an etcd revision.  Every create/update/delete bumps it by exactly one
  and appends exactly one event to a global history, so history entry ``i``
  has RV ``compacted_rv + 1 + i``.  An update that changes nothing is a no-op
  (no RV bump, no event), as in the real server.
* LIST returns ``{"kind": "<Kind>List", "apiVersion", "metadata":
  {"resourceVersion", ["continue"], ["remainingItemCount"]}, "items": [...]}``
  with items sorted by namespace/name (etcd key order) and *without*
  kind/apiVersion, exactly like typed lists from a real server.
  ``limit``/``continue`` paginate over a consistent snapshot taken at the
  first page's RV (later writes do not show up in later pages); the snapshot
  is rebuilt from the current state by rolling back the event history, so a
  continue token whose RV was compacted away gets ``410 Expired``.
  ``resourceVersion``/``resourceVersionMatch`` are honoured (``Exact`` serves an
  old snapshot; an RV from the future waits ``rv_wait_timeout`` then gets 504
  "Too large resource version").  ``labelSelector`` supports the full
  equality/set grammar (``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``,
  ``k in (a,b)``, ``k notin (a,b)``, ``k>1``, ``k<1``); ``fieldSelector``
  supports ``metadata.name`` and ``metadata.namespace`` (namespaced kinds) and
  ``spec.unschedulable`` (nodes) with ``=``, ``==`` and ``!=``; other fields give
  400 "field label not supported", like the real server.
* WATCH (``watch=1``/``true``) answers 200 with ``Transfer-Encoding: chunked``,
  one JSON event per line; event objects carry kind and apiVersion.
  From ``resourceVersion=R`` it replays all history events with RV > R, then
  streams live ones.  ``resourceVersion`` unset or ``"0"`` first sends a
  synthetic ADDED for every current object.  R older than the history window
  gives an ERROR event carrying a 410 ``Expired`` Status ("too old resource
  version: R (C)") and a clean end of stream (or, with
  ``watch_expired_as_http_error=True``, a plain HTTP 410).  A watch from an
  RV newer than the current one simply waits for it (the real server would
  eventually fail it with "Too large resource version").
  ``allowWatchBookmarks=true`` adds BOOKMARK events whose object holds only
  kind, apiVersion and metadata.resourceVersion, every ``bookmark_interval``
  seconds and whenever :meth:`FakeAPIServer.bookmark` is called; a bookmark is
  sent only once the stream has delivered every event up to its RV.
  ``sendInitialEvents=true`` (with ``resourceVersionMatch=NotOlderThan`` and
  bookmarks, as the real server requires) sends the initial ADDED events and
  then a BOOKMARK annotated ``k8s.io/initial-events-end: "true"``.
  ``timeoutSeconds=N`` ends the stream cleanly after N seconds.
* Selectors on a watch behave like the real watch cache, not a plain filter:
  an update that makes an object start matching is sent as ADDED, one that
  makes it stop matching is sent as DELETED (carrying the previous object
  content with the new RV); updates where neither the old nor the new object
  matches are not sent.

Test controls
-------------
``compact()`` drops history, ``drop_watches()`` closes watch sockets abruptly in
mid-stream (the client sees a truncated chunked body), ``stall(seconds)``
makes every response - including bytes on open watch streams - hang,
``fail_next(n, status)`` fails the next n requests with a Status error,
``requests`` is a log of every request (path and decoded query parameters),
``open_watches()``/``wait_for_watches()`` count open watch streams, and
``kubeconfig(path)`` writes a kubeconfig pointing at the server.

Example::

    with FakeAPIServer(bookmark_interval=0.2) as api:
        api.create({"kind": "Service", "metadata": {"name": "a", "namespace": "ns"},
                    "spec": {"clusterIP": "10.0.0.1"}})
        api.kubeconfig(tmp_path / "kubeconfig")
        ...   # point the kubernetes client at it

Performance: each stored version is serialised to JSON bytes once (without
kind/apiVersion, which are spliced in for watch events and GETs); lists join
those bytes without copying objects, and pagination snapshots are cached, so
paging through 10,000 Services or EndpointSlices takes milliseconds per page.
:meth:`FakeAPIServer.bulk_load` stores many objects under one lock with a
single watcher wake-up.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import os
import re
import select
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "ApiError",
    "FakeAPIServer",
    "RequestRecord",
    "ResourceType",
    "RESOURCE_TYPES",
    "SERVICES",
    "ENDPOINTSLICES",
    "NODES",
    "SERVICECIDRS",
]


# --------------------------------------------------------------------------
# Resource types
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceType:
    """Static description of one served resource (one REST collection)."""

    kind: str
    group: str
    version: str
    plural: str
    singular: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    extra_field_labels: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        """``group/version``, or just ``v1`` for the core group."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def qualified_name(self) -> str:
        """``plural.group`` as used in Status messages (``endpointslices.discovery.k8s.io``)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def field_labels(self) -> tuple[str, ...]:
        """Field selector labels the real server accepts for this kind."""
        base = ("metadata.name", "metadata.namespace") if self.namespaced else ("metadata.name",)
        return base + self.extra_field_labels

    def fields_of(self, namespace: str, name: str, obj: Mapping[str, Any]) -> dict[str, str]:
        """Return the selectable field values of ``obj``."""
        fields = {"metadata.name": name}
        if self.namespaced:
            fields["metadata.namespace"] = namespace
        if self.kind == "Node":
            spec = obj.get("spec") or {}
            fields["spec.unschedulable"] = "true" if spec.get("unschedulable") else "false"
        return fields


SERVICES = ResourceType("Service", "", "v1", "services", "service", True, ("svc",))
ENDPOINTSLICES = ResourceType(
    "EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", "endpointslice", True
)
NODES = ResourceType(
    "Node", "", "v1", "nodes", "node", False, ("no",), extra_field_labels=("spec.unschedulable",)
)
SERVICECIDRS = ResourceType(
    "ServiceCIDR", "networking.k8s.io", "v1", "servicecidrs", "servicecidr", False
)
RESOURCE_TYPES: tuple[ResourceType, ...] = (SERVICES, ENDPOINTSLICES, NODES, SERVICECIDRS)


def _resolve_type(kind: str | ResourceType) -> ResourceType:
    """Find a resource type by kind, plural, singular or short name (case-insensitive)."""
    if isinstance(kind, ResourceType):
        return kind
    wanted = kind.lower()
    for rtype in RESOURCE_TYPES:
        names = {rtype.kind.lower(), rtype.plural, rtype.singular, *rtype.short_names}
        if wanted in names:
            return rtype
    raise ValueError(f"unknown resource kind {kind!r}")


# --------------------------------------------------------------------------
# Errors and Status objects
# --------------------------------------------------------------------------

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """An API error, rendered over HTTP as a ``kind: Status`` object.

    Also raised by the Python control methods (``create`` of an existing
    object gives 409 AlreadyExists, ``update`` of a missing one 404 NotFound,
    an ``update`` with a stale metadata.resourceVersion 409 Conflict).
    """

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        details: dict | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code} {reason or _REASONS.get(code, '')}: {message}")
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "")
        self.details = details
        self.headers = dict(headers or {})

    def status(self) -> dict:
        """The ``v1 Status`` object for this error."""
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details is not None:
            status["details"] = self.details
        status["code"] = self.code
        return status


def _too_old(rv: int, oldest: int) -> ApiError:
    return ApiError(410, f"too old resource version: {rv} ({oldest})", "Expired")


def _not_found(rtype: ResourceType, name: str) -> ApiError:
    details: dict[str, Any] = {"name": name, "kind": rtype.plural}
    if rtype.group:
        details["group"] = rtype.group
    return ApiError(404, f'{rtype.qualified_name} "{name}" not found', "NotFound", details)


def _invalid(message: str) -> ApiError:
    return ApiError(422, message, "Invalid")


# --------------------------------------------------------------------------
# Stored objects, events and snapshots
# --------------------------------------------------------------------------


class StoredObject:
    """One immutable version of an object, pre-serialised once.

    ``body`` is the compact JSON of the object *without* kind/apiVersion and
    with ``metadata`` first - exactly what a list item looks like.  The full
    form (used for watch events and GETs) is built by splicing the kind and
    apiVersion in front and is cached.
    """

    __slots__ = ("rtype", "namespace", "name", "rv", "uid", "created", "labels", "fields", "body", "_full")

    def __init__(self, rtype, namespace, name, rv, uid, created, labels, fields, body):
        self.rtype: ResourceType = rtype
        self.namespace: str = namespace
        self.name: str = name
        self.rv: int = rv
        self.uid: str = uid
        self.created: str = created
        self.labels: dict[str, str] = labels
        self.fields: dict[str, str] = fields
        self.body: bytes = body
        self._full: bytes | None = None

    @property
    def key(self) -> tuple[str, str]:
        """Store key; ``namespace`` is ``""`` for cluster-scoped kinds."""
        return (self.namespace, self.name)

    def full(self) -> bytes:
        """JSON bytes including ``kind`` and ``apiVersion``."""
        full = self._full
        if full is None:
            head = '{"kind":"%s","apiVersion":"%s",' % (self.rtype.kind, self.rtype.api_version)
            full = self._full = head.encode() + self.body[1:]
        return full

    def event_line(self, event_type: str) -> bytes:
        """One newline-terminated watch event carrying this object."""
        return b'{"type":"' + event_type.encode() + b'","object":' + self.full() + b"}\n"

    def to_dict(self) -> dict:
        """A fresh, mutable copy of the object (with kind and apiVersion)."""
        return json.loads(self.full())

    def with_rv(self, rv: int) -> "StoredObject":
        """The same content with a different metadata.resourceVersion (for DELETED events)."""
        obj = json.loads(self.body)
        obj["metadata"]["resourceVersion"] = str(rv)
        body = json.dumps(obj, separators=(",", ":")).encode()
        return StoredObject(
            self.rtype, self.namespace, self.name, rv, self.uid, self.created, self.labels, self.fields, body
        )


class _Event:
    """One entry of the global event history (one RV bump)."""

    __slots__ = ("rv", "rtype", "type", "key", "obj", "prev", "_stopped_matching")

    def __init__(self, rv, rtype, type_, key, obj, prev):
        self.rv: int = rv
        self.rtype: ResourceType = rtype
        self.type: str = type_  # ADDED, MODIFIED or DELETED
        self.key: tuple[str, str] = key
        self.obj: StoredObject = obj  # new state; for DELETED the last state stamped with this RV
        self.prev: StoredObject | None = prev  # state before this event (None for ADDED)
        self._stopped_matching: StoredObject | None = None

    def stopped_matching_object(self) -> StoredObject:
        """Object for a selector-induced DELETED: previous content, this event's RV."""
        if self.type == "DELETED":
            return self.obj
        if self._stopped_matching is None:
            assert self.prev is not None
            self._stopped_matching = self.prev.with_rv(self.rv)
        return self._stopped_matching


class _Snapshot:
    """The objects of one kind at some RV, sorted by key (etcd order)."""

    __slots__ = ("keys", "objs")

    def __init__(self, items: Mapping[tuple[str, str], StoredObject]):
        self.keys = sorted(items)
        self.objs = [items[k] for k in self.keys]

    def bounds(self, namespace: str | None) -> tuple[int, int]:
        """Index range of the keys in ``namespace`` (all keys if None)."""
        if namespace is None:
            return 0, len(self.keys)
        lo = bisect.bisect_left(self.keys, (namespace,))
        hi = bisect.bisect_left(self.keys, (namespace + "\x00",))
        return lo, hi


# --------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------

_LABEL_KEY = r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_RE_NOT_EXISTS = re.compile(rf"!\s*({_LABEL_KEY})")
_RE_EXISTS = re.compile(rf"({_LABEL_KEY})")
_RE_SET = re.compile(rf"({_LABEL_KEY})\s+(in|notin)\s*\(([^()]*)\)")
_RE_OP = re.compile(rf"({_LABEL_KEY})\s*(==|=|!=|>|<)\s*({_LABEL_VALUE})")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


class LabelSelector:
    """A parsed label selector (the apimachinery ``labels.Parse`` grammar)."""

    def __init__(self, text: str):
        self.text = text
        self.requirements: list[tuple[str, str, tuple[str, ...]]] = []
        if not text.strip():
            return
        for term in _split_top_level(text):
            term = term.strip()
            if m := _RE_NOT_EXISTS.fullmatch(term):
                self.requirements.append((m[1], "!", ()))
            elif m := _RE_SET.fullmatch(term):
                values = tuple(v.strip() for v in m[3].split(",") if v.strip())
                self.requirements.append((m[1], m[2], values))
            elif m := _RE_OP.fullmatch(term):
                op = "=" if m[2] == "==" else m[2]
                if op in "<>" and not re.fullmatch(r"-?\d+", m[3]):
                    raise ApiError(400, f"unable to parse requirement: {term!r}: value must be an integer")
                self.requirements.append((m[1], op, (m[3],)))
            elif m := _RE_EXISTS.fullmatch(term):
                self.requirements.append((m[1], "exists", ()))
            else:
                raise ApiError(400, f"unable to parse requirement: found {term!r}, expected a label requirement")

    def __bool__(self) -> bool:
        return bool(self.requirements)

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, op, values in self.requirements:
            present = key in labels
            value = labels.get(key)
            if op == "exists":
                ok = present
            elif op == "!":
                ok = not present
            elif op == "=":
                ok = present and value == values[0]
            elif op == "!=":
                ok = not present or value != values[0]
            elif op == "in":
                ok = present and value in values
            elif op == "notin":
                ok = not present or value not in values
            else:  # > or <, integer comparison
                try:
                    ok = present and (int(value) > int(values[0]) if op == ">" else int(value) < int(values[0]))
                except ValueError:
                    ok = False
            if not ok:
                return False
        return True


class FieldSelector:
    """A parsed field selector (``f=v``, ``f==v``, ``f!=v``, comma-joined)."""

    def __init__(self, text: str, rtype: ResourceType):
        self.text = text
        self.requirements: list[tuple[str, bool, str]] = []
        if not text.strip():
            return
        for term in text.split(","):
            m = re.fullmatch(r"\s*([^=!\s]+)\s*(==|=|!=)\s*(.*?)\s*", term)
            if not m:
                raise ApiError(400, f"invalid selector: {text!r}; can't understand {term!r}")
            name, op, value = m[1], m[2], m[3]
            if name not in rtype.field_labels:
                raise ApiError(400, f'field label not supported: {name}')
            self.requirements.append((name, op != "!=", value))

    def __bool__(self) -> bool:
        return bool(self.requirements)

    def matches(self, fields: Mapping[str, str]) -> bool:
        return all((fields.get(name) == value) == equal for name, equal, value in self.requirements)


class _Filter:
    """Namespace + label selector + field selector of one list or watch."""

    def __init__(self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str]):
        self.rtype = rtype
        self.namespace = namespace
        self.labels = LabelSelector(query.get("labelSelector", ""))
        self.fields = FieldSelector(query.get("fieldSelector", ""), rtype)

    @property
    def selects_everything(self) -> bool:
        """True if no label/field selector is given (namespace aside)."""
        return not self.labels and not self.fields

    def matches(self, obj: StoredObject) -> bool:
        """Label and field selectors (the namespace is checked by the caller)."""
        return self.labels.matches(obj.labels) and self.fields.matches(obj.fields)


# --------------------------------------------------------------------------
# Request log
# --------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One HTTP request as received (query parameters already URL-decoded)."""

    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]  # an http.client.HTTPMessage: case-insensitive lookups
    time: float = field(default_factory=time.monotonic)

    @property
    def watch(self) -> bool:
        """True if this was a watch request."""
        return _parse_bool_lenient(self.query.get("watch"))

    def param(self, name: str, default: str | None = None) -> str | None:
        return self.query.get(name, default)


def _parse_bool(name: str, value: str | None) -> bool:
    """Parse a boolean query parameter like Go's ``strconv.ParseBool``."""
    if value is None or value == "":
        return False
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ApiError(400, f'invalid value for {name}: "{value}"')


def _parse_bool_lenient(value: str | None) -> bool:
    try:
        return _parse_bool("", value)
    except ApiError:
        return False


def _parse_int(name: str, value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f'invalid value for {name}: "{value}"') from None


# --------------------------------------------------------------------------
# Continue tokens (same shape as the real server's: base64 of a small JSON)
# --------------------------------------------------------------------------


def _encode_continue(rv: int, key: tuple[str, str], rtype: ResourceType) -> str:
    start = f"{key[0]}/{key[1]}" if rtype.namespaced else key[1]
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start + "\x00"}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str, rtype: ResourceType) -> tuple[int, tuple[str, str]]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        rv = int(data["rv"])
        start = str(data["start"]).rstrip("\x00")
        if data.get("v") != "meta.k8s.io/v1":
            raise ValueError("bad version")
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise ApiError(400, "continue key is not valid: incorrect encoded start resourceVersion") from None
    if rtype.namespaced:
        ns, _, name = start.partition("/")
        return rv, (ns, name)
    return rv, ("", start)


# --------------------------------------------------------------------------
# Open watches
# --------------------------------------------------------------------------


class _Watch:
    """Book-keeping for one open watch stream."""

    def __init__(self, rtype: ResourceType, flt: _Filter, sock: socket.socket, query: dict[str, str]):
        self.rtype = rtype
        self.filter = flt
        self.sock = sock
        self.query = query
        self.dropped = False
        self.started = time.monotonic()
        self.bookmark_generation = 0  # last FakeAPIServer.bookmark() generation served

    def kill(self) -> None:
        """Abruptly close the connection (no terminating chunk is sent)."""
        self.dropped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def client_gone(self) -> bool:
        """True if the client closed its end (checked without blocking)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


# --------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers its connections so stop() can close them."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, api: "FakeAPIServer"):
        self.api = api
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        # Broken connections are routine here (drop_watches, clients giving up).
        import sys

        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive + chunked transfer encoding
    server_version = "kproxy-test-apiserver/1.0"

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        # Watch events are small writes that must leave immediately.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self.server.api._dispatch(self)

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def log_message(self, format, *args) -> None:  # noqa: A002 - silence stderr logging
        pass


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------

_POLL = 0.1  # how often idle watch streams check for stop/client disconnect
_MAX_CHUNK = 256 * 1024  # bytes per chunk on watch streams
_MAX_EVENTS_PER_BATCH = 2000


class FakeAPIServer:
    """A Kubernetes API server double serving Services, EndpointSlices, Nodes, ServiceCIDRs.

    Parameters
    ----------
    servicecidrs:
        Serve ``networking.k8s.io/v1`` servicecidrs.  When False the whole
        ``networking.k8s.io`` group is absent: it is left out of ``/apis`` and
        its paths answer ``404 page not found``, as on a cluster without the API.
        Can be changed later with :meth:`set_resource_enabled`.
    bookmark_interval:
        Seconds between periodic BOOKMARK events on watches that allow them
        (None or 0 disables periodic bookmarks; :meth:`bookmark` still works).
    history_limit:
        Maximum number of events kept for watch replay / old snapshots; older
        ones are compacted automatically (like the watch cache window).
        None keeps everything until :meth:`compact`.
    token:
        If set, every request must carry ``Authorization: Bearer <token>``
        (401 otherwise); :meth:`kubeconfig` writes it into the user entry.
    watch_expired_as_http_error:
        Answer a watch from a compacted RV with an HTTP 410 Status instead of
        a 200 stream holding one ERROR event.
    rv_wait_timeout:
        How long a list with a future ``resourceVersion`` waits for it before
        failing with 504 "Too large resource version" (3 s in kube-apiserver).
    git_version:
        Reported by ``/version``.
    """

    def __init__(
        self,
        *,
        servicecidrs: bool = True,
        bookmark_interval: float | None = 1.0,
        history_limit: int | None = 100_000,
        token: str | None = None,
        watch_expired_as_http_error: bool = False,
        rv_wait_timeout: float = 0.5,
        git_version: str = "v1.33.0",
    ) -> None:
        self.bookmark_interval = bookmark_interval
        self.history_limit = history_limit
        self.token = token
        self.watch_expired_as_http_error = watch_expired_as_http_error
        self.rv_wait_timeout = rv_wait_timeout
        self.git_version = git_version

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._enabled: dict[ResourceType, bool] = {rt: True for rt in RESOURCE_TYPES}
        self._enabled[SERVICECIDRS] = servicecidrs
        self._store: dict[ResourceType, dict[tuple[str, str], StoredObject]] = {rt: {} for rt in RESOURCE_TYPES}
        self._last_write_rv: dict[ResourceType, int] = {rt: 0 for rt in RESOURCE_TYPES}
        self._rv = 1  # like a fresh etcd: the first write gets RV 2
        self._history: list[_Event] = []
        self._compacted_rv = self._rv  # every event with RV > this is in _history
        self._snapshots: OrderedDict[tuple[ResourceType, int], _Snapshot] = OrderedDict()
        self._bookmark_generation = 0
        self._stall_until = 0.0
        self._failures: list[tuple[int, str | None, str | None, int | None]] = []
        self._requests: list[RequestRecord] = []
        self._watches: set[_Watch] = set()
        self._stopping = False
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------

    def start(self) -> "FakeAPIServer":
        """Bind 127.0.0.1 on a free port and serve in a background thread."""
        if self._httpd is not None:
            raise RuntimeError("already started")
        self._stopping = False
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-apiserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every connection (open watches end abruptly)."""
        httpd = self._httpd
        if httpd is None:
            return
        with self._cond:
            self._stopping = True
            watches = list(self._watches)
            self._cond.notify_all()
        for w in watches:
            w.kill()
        httpd.shutdown()
        httpd.close_all_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "FakeAPIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: str | os.PathLike, token: str | None = None) -> str:
        """Write a kubeconfig (JSON, which is valid YAML) pointing at this server.

        Uses plain http.  The user entry carries ``token`` (default: the
        server's token) or no credentials at all.  Returns the path as str.
        """
        token = token if token is not None else self.token
        user: dict[str, Any] = {"token": token} if token else {}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kproxy-test", "cluster": {"server": self.url}}],
            "users": [{"name": "kproxy-test", "user": user}],
            "contexts": [{"name": "kproxy-test", "context": {"cluster": "kproxy-test", "user": "kproxy-test"}}],
            "current-context": "kproxy-test",
            "preferences": {},
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        return os.fspath(path)

    # ------------------------------------------------------------------
    # Object store (Python API used by tests)
    # ------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The current global resourceVersion."""
        with self._lock:
            return self._rv

    @property
    def compacted_resource_version(self) -> int:
        """Watches/continues from an RV older than this get 410."""
        with self._lock:
            return self._compacted_rv

    def create(self, obj: Mapping[str, Any]) -> dict:
        """Create an object (``kind`` required); returns the stored copy.

        Sets uid, creationTimestamp and resourceVersion; a namespaced object
        without namespace goes to ``default``; ``metadata.generateName`` is
        honoured.  Raises :class:`ApiError` 409 if it already exists.
        """
        with self._cond:
            stored = self._put(obj, mode="create", now=_now())
            self._after_writes()
        return stored.to_dict()

    def update(self, obj: Mapping[str, Any]) -> dict:
        """Replace an existing object; returns the stored copy.

        If ``metadata.resourceVersion`` is set it must equal the current one
        (else 409 Conflict), like a real PUT.  Unchanged content is a no-op:
        no RV bump and no watch event.  Raises 404 if the object is missing.
        """
        with self._cond:
            stored = self._put(obj, mode="update", now=_now())
            self._after_writes()
        return stored.to_dict()

    def apply(self, obj: Mapping[str, Any]) -> dict:
        """Create or update, ignoring any resourceVersion in ``obj``."""
        with self._cond:
            stored = self._put(obj, mode="apply", now=_now())
            self._after_writes()
        return stored.to_dict()

    def delete(self, kind: str | ResourceType, namespace: str | None, name: str) -> dict:
        """Delete an object; returns its final state (stamped with the deletion RV).

        ``namespace`` is ignored for cluster-scoped kinds.  Raises 404 if missing.
        """
        rtype = _resolve_type(kind)
        key = (namespace or "default", name) if rtype.namespaced else ("", name)
        with self._cond:
            prev = self._store[rtype].get(key)
            if prev is None:
                raise _not_found(rtype, name)
            rv = self._rv + 1
            gone = prev.with_rv(rv)
            del self._store[rtype][key]
            self._record(rtype, "DELETED", key, gone, prev)
            self._after_writes()
        return gone.to_dict()

    def bulk_load(self, objects: Iterable[Mapping[str, Any]]) -> int:
        """Create or update many objects at once; returns the resulting RV.

        Every object still gets its own RV and history event (so watches and
        snapshots stay exact), but everything happens under one lock with one
        watcher wake-up and no per-object copies handed back.
        """
        now = _now()
        with self._cond:
            for obj in objects:
                self._put(obj, mode="apply", now=now)
            self._after_writes()
            return self._rv

    def get(self, kind: str | ResourceType, namespace: str | None, name: str) -> dict | None:
        """Current state of one object as a fresh dict, or None."""
        rtype = _resolve_type(kind)
        key = (namespace or "default", name) if rtype.namespaced else ("", name)
        with self._lock:
            stored = self._store[rtype].get(key)
        return stored.to_dict() if stored else None

    def objects(self, kind: str | ResourceType, namespace: str | None = None) -> list[dict]:
        """Current objects of a kind (optionally one namespace), sorted by key."""
        rtype = _resolve_type(kind)
        with self._lock:
            items = [o for k, o in sorted(self._store[rtype].items()) if namespace is None or k[0] == namespace]
        return [o.to_dict() for o in items]

    def count(self, kind: str | ResourceType) -> int:
        """Number of stored objects of a kind."""
        with self._lock:
            return len(self._store[_resolve_type(kind)])

    def _put(self, obj: Mapping[str, Any], mode: str, now: str) -> StoredObject:
        """Store one object (lock held); records the event unless it is a no-op."""
        kind = obj.get("kind")
        if not kind:
            raise ValueError("object has no kind")
        rtype = _resolve_type(kind)
        if rtype.kind != kind:
            raise ValueError(f"kind must be spelled {rtype.kind!r}, got {kind!r}")
        api_version = obj.get("apiVersion")
        if api_version and api_version != rtype.api_version:
            raise ValueError(f"{kind} has apiVersion {rtype.api_version}, got {api_version!r}")

        meta = dict(obj.get("metadata") or {})
        name = meta.get("name")
        if not name:
            prefix = meta.pop("generateName", None)
            if not prefix or mode == "update":
                raise ApiError(422, f"{kind}: metadata.name: Required value: name or generateName is required")
            name = meta["name"] = prefix + uuid.uuid4().hex[:5]
        if rtype.namespaced:
            namespace = meta["namespace"] = meta.get("namespace") or "default"
        else:
            namespace = ""
            meta.pop("namespace", None)
        key = (namespace, name)
        store = self._store[rtype]
        prev = store.get(key)

        if mode == "create" and prev is not None:
            raise ApiError(409, f'{rtype.qualified_name} "{name}" already exists', "AlreadyExists",
                           {"name": name, "group": rtype.group, "kind": rtype.plural})
        if mode == "update":
            if prev is None:
                raise _not_found(rtype, name)
            given_rv = meta.get("resourceVersion")
            if given_rv and given_rv != str(prev.rv):
                raise ApiError(
                    409,
                    f'Operation cannot be fulfilled on {rtype.qualified_name} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again",
                    "Conflict",
                    {"name": name, "group": rtype.group, "kind": rtype.plural},
                )

        labels = dict(meta.get("labels") or {})
        if prev is not None:
            uid, created = prev.uid, prev.created
        else:
            uid, created = str(uuid.uuid4()), now
        meta["uid"] = uid
        meta["creationTimestamp"] = created
        rest = {k: v for k, v in obj.items() if k not in ("kind", "apiVersion", "metadata")}
        fields = rtype.fields_of(namespace, name, rest)

        if prev is not None:
            # A no-op update keeps the RV and emits nothing, as in kube-apiserver.
            meta["resourceVersion"] = str(prev.rv)
            same = json.dumps({"metadata": meta, **rest}, separators=(",", ":")).encode()
            if same == prev.body or json.loads(same) == json.loads(prev.body):
                return prev

        rv = self._rv + 1
        meta["resourceVersion"] = str(rv)
        body = json.dumps({"metadata": meta, **rest}, separators=(",", ":")).encode()
        stored = StoredObject(rtype, namespace, name, rv, uid, created, labels, fields, body)
        store[key] = stored
        self._record(rtype, "MODIFIED" if prev is not None else "ADDED", key, stored, prev)
        return stored

    def _record(self, rtype: ResourceType, etype: str, key, obj: StoredObject, prev: StoredObject | None) -> None:
        """Append one event and bump the global RV (lock held)."""
        self._rv += 1
        assert obj.rv == self._rv
        self._history.append(_Event(self._rv, rtype, etype, key, obj, prev))
        self._last_write_rv[rtype] = self._rv

    def _after_writes(self) -> None:
        """Enforce the history window and wake watchers (lock held)."""
        limit = self.history_limit
        if limit is not None and len(self._history) > limit:
            self._compact_to(self._rv - int(limit * 0.9))
        self._cond.notify_all()

    # ------------------------------------------------------------------
    # Test controls
    # ------------------------------------------------------------------

    def compact(self, rv: int | None = None) -> None:
        """Drop history up to ``rv`` (default: everything), like etcd compaction.

        Afterwards watches and continue tokens from an older RV get 410.
        """
        with self._cond:
            self._compact_to(self._rv if rv is None else rv)
            self._cond.notify_all()

    def _compact_to(self, rv: int) -> None:
        rv = min(rv, self._rv)
        if rv <= self._compacted_rv:
            return
        del self._history[: rv - self._compacted_rv]
        self._compacted_rv = rv
        for snap_key in [k for k in self._snapshots if k[1] < rv]:
            del self._snapshots[snap_key]

    def bookmark(self) -> None:
        """Ask every watch that allows bookmarks to send one as soon as it is caught up."""
        with self._cond:
            self._bookmark_generation += 1
            self._cond.notify_all()

    def drop_watches(self, kind: str | ResourceType | None = None, wait: float = 2.0) -> int:
        """Abruptly close open watch connections (all, or of one kind) mid-stream.

        The client sees the chunked body end without its terminating chunk.
        Waits up to ``wait`` seconds for the handlers to finish, so
        :meth:`open_watches` is accurate afterwards.  Returns how many were dropped.
        """
        rtype = _resolve_type(kind) if kind is not None else None
        with self._cond:
            victims = [w for w in self._watches if rtype is None or w.rtype is rtype]
            for w in victims:
                w.kill()
            self._cond.notify_all()
            deadline = time.monotonic() + wait
            while any(w in self._watches for w in victims):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, _POLL))
        return len(victims)

    def stall(self, seconds: float) -> None:
        """Make all responses hang for ``seconds`` (0 ends a stall).

        New requests are not answered, and open watch streams send nothing
        (no events, bookmarks or timeouts) until the stall is over.
        """
        with self._cond:
            self._stall_until = time.monotonic() + seconds if seconds > 0 else 0.0
            self._cond.notify_all()

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        path: str | None = None,
        message: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Fail the next ``n`` requests (whose path contains ``path``, if given).

        They get a Status error with code ``status``.  ``retry_after`` adds a
        ``Retry-After`` header (default: 1 for 429, as API Priority and
        Fairness does, none otherwise).  Beware: urllib3, and hence the
        kubernetes client, silently retries 413/429/503 responses that carry
        Retry-After, sleeping that long.  Failures queue up across calls.
        """
        if retry_after is None and status == 429:
            retry_after = 1
        with self._lock:
            self._failures.extend([(status, path, message, retry_after)] * n)

    def set_resource_enabled(self, kind: str | ResourceType, enabled: bool) -> None:
        """Serve or hide a resource; a group with no served resource disappears."""
        with self._lock:
            self._enabled[_resolve_type(kind)] = enabled

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, path: str | None = None, *, watch: bool | None = None) -> list[RequestRecord]:
        """Logged requests with exactly this path and/or watch flag."""
        return [
            r for r in self.requests
            if (path is None or r.path == path) and (watch is None or r.watch == watch)
        ]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def open_watches(self, kind: str | ResourceType | None = None) -> int:
        """Number of currently open watch streams (all, or of one kind)."""
        rtype = _resolve_type(kind) if kind is not None else None
        with self._lock:
            return sum(1 for w in self._watches if rtype is None or w.rtype is rtype)

    def wait_for_watches(self, n: int, kind: str | ResourceType | None = None, timeout: float = 5.0) -> bool:
        """Wait until exactly ``n`` watches (of ``kind``) are open; returns success."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.open_watches(kind) != n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, _POLL))
            return True

    # ------------------------------------------------------------------
    # Snapshots
    # ------------------------------------------------------------------

    def _snapshot(self, rtype: ResourceType, rv: int) -> _Snapshot:
        """Objects of ``rtype`` as of ``rv`` (lock held; caller checked rv is not compacted).

        The current state is rolled back through the history events newer
        than ``rv``.  Results are cached; the current state is cached under
        the RV of the kind's last write so unrelated writes do not invalidate it.
        """
        if rv >= self._rv:
            rv = self._rv
            cache_key = (rtype, self._last_write_rv[rtype])
        else:
            cache_key = (rtype, rv)
        snap = self._snapshots.get(cache_key)
        if snap is not None:
            self._snapshots.move_to_end(cache_key)
            return snap
        items = dict(self._store[rtype])
        if rv < self._rv:
            for ev in reversed(self._history[rv - self._compacted_rv:]):
                if ev.rtype is rtype:
                    if ev.type == "ADDED":
                        del items[ev.key]
                    else:
                        items[ev.key] = ev.prev
        snap = _Snapshot(items)
        self._snapshots[cache_key] = snap
        while len(self._snapshots) > 16:
            self._snapshots.popitem(last=False)
        return snap

    # ------------------------------------------------------------------
    # HTTP dispatch
    # ------------------------------------------------------------------

    def _dispatch(self, h: _Handler) -> None:
        """Entry point for every HTTP request (runs in the connection's thread)."""
        parts = urlsplit(h.path)
        path = parts.path
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        record = RequestRecord(h.command, path, query, h.headers)
        with self._lock:
            self._requests.append(record)
        if h.command != "GET":
            length = int(h.headers.get("Content-Length") or 0)
            if length:
                h.rfile.read(length)
            h.close_connection = True
        try:
            if not self._wait_unstalled():
                h.close_connection = True
                return
            self._maybe_fail(path)
            if self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if h.command != "GET":
                raise ApiError(405, f"the server does not allow this method on the requested resource "
                                    f"({h.command} {path})", "MethodNotAllowed")
            self._route(h, path, query)
        except ApiError as e:
            self._send_json(h, e.code, json.dumps(e.status()).encode(), e.headers)
        except OSError:
            h.close_connection = True

    def _wait_unstalled(self) -> bool:
        """Block while stalled; False if the server is stopping."""
        with self._cond:
            while not self._stopping:
                remaining = self._stall_until - time.monotonic()
                if remaining <= 0:
                    return True
                self._cond.wait(min(remaining, _POLL))
            return False

    def _maybe_fail(self, path: str) -> None:
        with self._lock:
            for i, (status, needle, message, retry_after) in enumerate(self._failures):
                if needle is None or needle in path:
                    del self._failures[i]
                    break
            else:
                return
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        details = {"retryAfterSeconds": retry_after} if retry_after is not None else None
        raise ApiError(status, message or f"injected failure ({status})", details=details, headers=headers)

    def _groups(self) -> dict[str, list[ResourceType]]:
        """Served API groups ("" is core) and their enabled resources."""
        groups: dict[str, list[ResourceType]] = {}
        with self._lock:
            for rtype in RESOURCE_TYPES:
                if self._enabled[rtype]:
                    groups.setdefault(rtype.group, []).append(rtype)
        return groups

    def _route(self, h: _Handler, path: str, query: dict[str, str]) -> None:
        path = path.rstrip("/") or "/"  # the client asks for "/version/", "/api/", "/apis/"
        if path in ("/healthz", "/livez", "/readyz"):
            return self._send(h, 200, b"ok", "text/plain; charset=utf-8")
        if path == "/version":
            return self._send_obj(h, self._version_info())
        segs = [s for s in path.split("/") if s]
        groups = self._groups()
        if not segs or segs[0] not in ("api", "apis"):
            return self._page_not_found(h)
        if segs[0] == "api":
            if len(segs) == 1:
                return self._send_obj(h, {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}
                    ],
                })
            if segs[1] != "v1":
                return self._page_not_found(h)
            group, rest = "", segs[2:]
        else:
            if len(segs) == 1:
                return self._send_obj(h, {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [self._api_group(g, rts) for g, rts in groups.items() if g],
                })
            group = segs[1]
            if not group or group not in groups:
                return self._page_not_found(h)
            if len(segs) == 2:
                return self._send_obj(
                    h, {"kind": "APIGroup", "apiVersion": "v1", **self._api_group(group, groups[group])}
                )
            if segs[2] != groups[group][0].version:
                return self._page_not_found(h)
            rest = segs[3:]
        served = groups.get(group, [])
        if not rest:
            return self._send_obj(h, self._resource_list(group, served))

        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        rtype = next((rt for rt in served if rt.plural == rest[0]), None)
        if rtype is None or (namespace is not None and not rtype.namespaced) or len(rest) > 2:
            raise ApiError(404, "the server could not find the requested resource", "NotFound", {})
        if len(rest) == 2:
            return self._serve_get(h, rtype, namespace, rest[1])
        if _parse_bool("watch", query.get("watch")):
            return self._serve_watch(h, rtype, namespace, query)
        return self._serve_list(h, rtype, namespace, query)

    # -- discovery ----------------------------------------------------------

    def _version_info(self) -> dict:
        major, minor = self.git_version.lstrip("v").split(".")[:2]
        return {
            "major": major,
            "minor": minor,
            "emulationMajor": major,
            "emulationMinor": minor,
            "gitVersion": self.git_version,
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "go1.24.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    @staticmethod
    def _api_group(group: str, rtypes: list[ResourceType]) -> dict:
        gv = {"groupVersion": f"{group}/{rtypes[0].version}", "version": rtypes[0].version}
        return {"name": group, "versions": [gv], "preferredVersion": gv}

    @staticmethod
    def _resource_list(group: str, rtypes: list[ResourceType]) -> dict:
        resources = []
        for rt in rtypes:
            resource = {
                "name": rt.plural,
                "singularName": rt.singular,
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": ["get", "list", "watch"],
            }
            if rt.short_names:
                resource["shortNames"] = list(rt.short_names)
            resources.append(resource)
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/v1" if group else "v1",
            "resources": resources,
        }

    # -- GET one ------------------------------------------------------------

    def _serve_get(self, h: _Handler, rtype: ResourceType, namespace: str | None, name: str) -> None:
        with self._lock:
            stored = self._store[rtype].get((namespace or "", name))
        if stored is None:
            raise _not_found(rtype, name)
        self._send(h, 200, stored.full())

    # -- LIST ---------------------------------------------------------------

    def _serve_list(self, h: _Handler, rtype: ResourceType, namespace: str | None, query: dict[str, str]) -> None:
        flt = _Filter(rtype, namespace, query)
        limit = _parse_int("limit", query.get("limit")) or 0
        token = query.get("continue") or ""
        rv_param = query.get("resourceVersion") or ""
        match = query.get("resourceVersionMatch") or ""
        if "sendInitialEvents" in query:
            raise _invalid("sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list")
        if match and match not in ("Exact", "NotOlderThan"):
            raise _invalid(f'resourceVersionMatch: Unsupported value: "{match}"')
        if match and token:
            raise _invalid("resourceVersionMatch: Forbidden: "
                           "resourceVersionMatch is forbidden when continue is provided")
        if match and not rv_param:
            raise _invalid("resourceVersionMatch: Forbidden: "
                           "resourceVersionMatch is forbidden unless resourceVersion is provided")
        if match == "Exact" and rv_param == "0":
            raise _invalid('resourceVersionMatch: Forbidden: '
                           'resourceVersionMatch "exact" is forbidden for resourceVersion "0"')
        if token and rv_param not in ("", "0"):
            raise ApiError(400, "specifying resource version is not allowed when using continue")

        start_key = None
        if token:
            snap_rv, start_key = _decode_continue(token, rtype)
        elif rv_param not in ("", "0"):
            wanted = _parse_int("resourceVersion", rv_param)
            self._wait_for_rv(wanted)
            snap_rv = wanted if match == "Exact" else None
        else:
            snap_rv = None
        with self._lock:
            if snap_rv is not None and snap_rv < self._compacted_rv:
                if token:
                    raise ApiError(
                        410,
                        "The provided continue parameter is too old to display a consistent list result. "
                        "You can start a new list without the continue parameter, or use the continue "
                        "value from the response.",
                        "Expired",
                    )
                raise _too_old(snap_rv, self._compacted_rv)
            if snap_rv is None:
                snap_rv = self._rv
            snap = self._snapshot(rtype, snap_rv)

        lo, hi = snap.bounds(namespace)
        if start_key is not None:
            lo = max(lo, bisect.bisect_right(snap.keys, start_key))
        page: list[bytes] = []
        everything = flt.selects_everything
        i = lo
        while i < hi and (limit <= 0 or len(page) < limit):
            obj = snap.objs[i]
            if everything or flt.matches(obj):
                page.append(obj.body)
            i += 1
        meta = '"resourceVersion":"%d"' % snap_rv
        if limit > 0 and len(page) == limit and i < hi:
            meta += ',"continue":"%s"' % _encode_continue(snap_rv, snap.keys[i - 1], rtype)
            if everything:
                meta += ',"remainingItemCount":%d' % (hi - i)
        head = '{"kind":"%s","apiVersion":"%s","metadata":{%s},"items":[' % (rtype.list_kind, rtype.api_version, meta)
        self._send(h, 200, b"".join((head.encode(), b",".join(page), b"]}")))

    def _wait_for_rv(self, wanted: int | None) -> None:
        """Wait up to ``rv_wait_timeout`` for the store to reach ``wanted`` (else 504)."""
        if wanted is None:
            return
        deadline = time.monotonic() + self.rv_wait_timeout
        with self._cond:
            while self._rv < wanted:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    raise ApiError(
                        504,
                        f"Too large resource version: {wanted}, current: {self._rv}",
                        "Timeout",
                        {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                         "retryAfterSeconds": 1},
                    )
                self._cond.wait(min(remaining, _POLL))

    # -- WATCH --------------------------------------------------------------

    def _serve_watch(self, h: _Handler, rtype: ResourceType, namespace: str | None, query: dict[str, str]) -> None:
        flt = _Filter(rtype, namespace, query)
        bookmarks = _parse_bool("allowWatchBookmarks", query.get("allowWatchBookmarks"))
        timeout = _parse_int("timeoutSeconds", query.get("timeoutSeconds"))
        rv_param = query.get("resourceVersion") or ""
        match = query.get("resourceVersionMatch") or ""
        send_initial_param = query.get("sendInitialEvents")
        if send_initial_param is not None:
            send_initial = _parse_bool("sendInitialEvents", send_initial_param)
            if match != "NotOlderThan":
                raise _invalid("resourceVersionMatch: Forbidden: sendInitialEvents requires setting "
                               "resourceVersionMatch to NotOlderThan")
            if send_initial and not bookmarks:
                raise _invalid("allowWatchBookmarks: Forbidden: sendInitialEvents requires setting "
                               "allowWatchBookmarks to true")
        else:
            if match:
                raise _invalid("resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch "
                               "unless sendInitialEvents is provided")
            send_initial = rv_param in ("", "0")
        start_rv = None if rv_param in ("", "0") else _parse_int("resourceVersion", rv_param)

        expired: ApiError | None = None
        snap: _Snapshot | None = None
        w = _Watch(rtype, flt, h.connection, query)
        with self._cond:
            # Decide the starting point atomically with registering the watch,
            # so a write racing with the request is either in the initial
            # state or replayed, never lost.
            if send_initial:
                cursor = self._rv
                snap = self._snapshot(rtype, cursor)
            elif start_rv is None:  # sendInitialEvents=false without RV: start at most recent
                cursor = self._rv
            elif start_rv < self._compacted_rv:
                expired = _too_old(start_rv, self._compacted_rv)
                cursor = start_rv
            else:
                cursor = start_rv
            w.bookmark_generation = self._bookmark_generation
            if expired is None:
                self._watches.add(w)
                self._cond.notify_all()
        if expired is not None and self.watch_expired_as_http_error:
            raise expired
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Transfer-Encoding", "chunked")
            h.send_header("Cache-Control", "no-cache, private")
            h.end_headers()
            if expired is not None:
                self._write_chunk(h, self._error_line(expired))
                self._write_chunk(h, b"")
                return
            self._stream(h, w, cursor, snap, bookmarks, timeout)
        except OSError:
            h.close_connection = True
        finally:
            with self._cond:
                self._watches.discard(w)
                self._cond.notify_all()

    @staticmethod
    def _error_line(err: ApiError) -> bytes:
        return json.dumps({"type": "ERROR", "object": err.status()}, separators=(",", ":")).encode() + b"\n"

    @staticmethod
    def _bookmark_line(rtype: ResourceType, rv: int, initial_events_end: bool = False) -> bytes:
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if initial_events_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        obj = {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": meta}
        return json.dumps({"type": "BOOKMARK", "object": obj}, separators=(",", ":")).encode() + b"\n"

    @staticmethod
    def _write_chunk(h: _Handler, data: bytes) -> None:
        """Write one HTTP chunk (``b""`` writes the terminating chunk)."""
        h.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

    def _write_lines(self, h: _Handler, lines: list[bytes]) -> None:
        """Write event lines, batched into chunks of at most ~_MAX_CHUNK bytes."""
        batch: list[bytes] = []
        size = 0
        for line in lines:
            batch.append(line)
            size += len(line)
            if size >= _MAX_CHUNK:
                self._write_chunk(h, b"".join(batch))
                batch, size = [], 0
        if batch:
            self._write_chunk(h, b"".join(batch))

    def _convert(self, w: _Watch, ev: _Event) -> bytes | None:
        """Turn a history event into this watch's event line (None to skip).

        Mirrors the watch cache: with selectors, start-matching updates become
        ADDED and stop-matching ones DELETED (previous content, new RV).
        """
        if ev.rtype is not w.rtype:
            return None
        if w.filter.namespace is not None and ev.key[0] != w.filter.namespace:
            return None
        if w.filter.selects_everything:
            return ev.obj.event_line(ev.type)
        cur = ev.type != "DELETED" and w.filter.matches(ev.obj)
        old = ev.prev is not None and w.filter.matches(ev.prev)
        if cur:
            return ev.obj.event_line("MODIFIED" if old else "ADDED")
        if old:
            return ev.stopped_matching_object().event_line("DELETED")
        return None

    def _stream(
        self,
        h: _Handler,
        w: _Watch,
        cursor: int,
        snap: _Snapshot | None,
        bookmarks: bool,
        timeout: int | None,
    ) -> None:
        """The body of a watch: initial events (from ``snap``, taken at RV
        ``cursor``), then every event with RV > ``cursor``, until the end."""
        now = time.monotonic()
        deadline = now + timeout if timeout and timeout > 0 else None
        interval = self.bookmark_interval
        next_bookmark = now + interval if bookmarks and interval else None
        seen_generation = w.bookmark_generation
        if snap is not None:
            self._wait_unstalled()
            lo, hi = snap.bounds(w.filter.namespace)
            everything = w.filter.selects_everything
            self._write_lines(
                h, [o.event_line("ADDED") for o in snap.objs[lo:hi] if everything or w.filter.matches(o)]
            )
            if bookmarks and "sendInitialEvents" in w.query:
                self._write_chunk(h, self._bookmark_line(w.rtype, cursor, initial_events_end=True))

        while True:
            action: str
            events: list[_Event] = []
            with self._cond:
                now = time.monotonic()
                stalled = now < self._stall_until
                if self._stopping or w.dropped:
                    action = "abort"
                elif stalled:
                    action = "wait"
                elif deadline is not None and now >= deadline:
                    action = "finish"
                elif cursor < self._compacted_rv:
                    action = "expired"
                elif self._rv > cursor:
                    start = cursor - self._compacted_rv
                    events = self._history[start:start + _MAX_EVENTS_PER_BATCH]
                    cursor = events[-1].rv
                    action = "events"
                elif bookmarks and cursor == self._rv and (
                    seen_generation != self._bookmark_generation
                    or (next_bookmark is not None and now >= next_bookmark)
                ):
                    seen_generation = self._bookmark_generation
                    if interval:
                        next_bookmark = now + interval
                    action = "bookmark"
                else:
                    action = "wait"
                if action == "wait":
                    wake = [_POLL]
                    if stalled:
                        wake.append(self._stall_until - now)
                    else:
                        if deadline is not None:
                            wake.append(deadline - now)
                        if next_bookmark is not None:
                            wake.append(next_bookmark - now)
                    self._cond.wait(max(0.0, min(wake)))
                elif action == "expired":
                    expired = _too_old(cursor, self._compacted_rv)
            if action == "wait":
                if w.client_gone():
                    h.close_connection = True
                    return
            elif action == "abort":
                h.close_connection = True
                return
            elif action == "finish":
                self._write_chunk(h, b"")
                return
            elif action == "expired":
                self._write_chunk(h, self._error_line(expired))
                self._write_chunk(h, b"")
                return
            elif action == "events":
                lines = [line for line in (self._convert(w, ev) for ev in events) if line is not None]
                if lines:
                    self._write_lines(h, lines)
                elif w.client_gone():  # busy with other kinds' events: still notice hang-ups
                    h.close_connection = True
                    return
            elif action == "bookmark":
                self._write_chunk(h, self._bookmark_line(w.rtype, cursor))

    # -- response helpers ---------------------------------------------------

    def _send(self, h: _Handler, code: int, body: bytes, content_type: str = "application/json",
              headers: Mapping[str, str] | None = None) -> None:
        h.send_response(code)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Cache-Control", "no-cache, private")
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _send_obj(self, h: _Handler, obj: Any) -> None:
        self._send(h, 200, json.dumps(obj, separators=(",", ":")).encode())

    def _send_json(self, h: _Handler, code: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self._send(h, code, body, headers=headers)

    def _page_not_found(self, h: _Handler) -> None:
        """What kube-apiserver answers for paths of unknown groups: plain text 404."""
        self._send(h, 404, b"404 page not found\n", "text/plain; charset=utf-8")


def _now() -> str:
    """RFC 3339 timestamp in UTC, second precision (metadata.creationTimestamp format)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
