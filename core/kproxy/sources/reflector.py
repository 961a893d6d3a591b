"""One reflector per API resource: paginated list, then watch, forever.

A ``Reflector`` keeps one kind of object (Services, EndpointSlices, the own Node,
ServiceCIDRs) in step with the API server, the way client-go's reflector does:

- **list** with ``limit``/``continue`` (a continue token that expired, 410, restarts the
  list), writing each page into the store and, once the last page is in, removing what
  the store holds of that kind but the list did not contain (deletions missed while
  away);
- **watch** from the list's ``resourceVersion`` with ``allowWatchBookmarks``, a random
  server-side ``timeoutSeconds`` and a client read timeout a little longer than that, so
  a stalled server or a half-open connection is noticed; every event and BOOKMARK
  advances the stored resourceVersion, and a watch that ends (timeout, dropped
  connection) is resumed from it;
- **410 Gone** (an ERROR event or an HTTP 410) means the history was compacted: list
  again (a consistent list) and compute the differences;
- failures back off exponentially with jitter, capped; a resource the server does not
  have (404, ServiceCIDRs on older clusters) is *disabled* and looked for again later.

Raw response bytes are decoded with msgspec straight into ``kproxy.api_types`` structs
(a typed List wrapper for pages); a page holding an object that does not fit is decoded
again item by item, so one malformed object is skipped, named in the log with its field,
and the rest is kept. The ``kubernetes`` package only configures, authenticates and
carries the HTTP requests (``ApiClient.param_serialize`` / ``call_api``, which returns
the raw urllib3 response); none of its model classes or watch helpers are used.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, replace

import msgspec
import urllib3

from .. import api_types as api
from .. import model

log = logging.getLogger("kproxy.kube")

_CONVERT = {
    "Service": model.service_from_raw,
    "EndpointSlice": model.slice_from_raw,
    "Node": model.node_from_raw,
    "ServiceCIDR": model.service_cidr_from_raw,
}
_RAW = {
    "Service": api.ServiceObj,
    "EndpointSlice": api.EndpointSliceObj,
    "Node": api.NodeObj,
    "ServiceCIDR": api.ServiceCIDRObj,
}


# -- wire shapes ------------------------------------------------------------------------
class ListMeta(msgspec.Struct, rename="camel", frozen=True):
    resource_version: str = ""
    continue_: str = msgspec.field(default="", name="continue")


class RawList(msgspec.Struct):
    """A list page whose items are kept as undecoded JSON (the slow, tolerant path)."""

    metadata: ListMeta = ListMeta()
    items: list[msgspec.Raw] = []


def _typed_list(kind: str) -> type:
    return msgspec.defstruct(f"{kind}List", [("metadata", ListMeta, ListMeta()), ("items", list[_RAW[kind]], [])])


_LISTS = {kind: _typed_list(kind) for kind in _RAW}


class Event(msgspec.Struct):
    type: str = ""
    object: msgspec.Raw = msgspec.Raw(b"null")


class KeyMeta(msgspec.Struct, rename="camel", frozen=True):
    name: str = ""
    namespace: str = ""
    resource_version: str = ""


class Named(msgspec.Struct, frozen=True):
    """Just what identifies an object (DELETED events, BOOKMARKs, any event's key)."""

    metadata: KeyMeta = KeyMeta()


class Status(msgspec.Struct):
    code: int = 0
    reason: str = ""
    message: str = ""
    details: dict | None = None


_list_decoders = {kind: msgspec.json.Decoder(cls) for kind, cls in _LISTS.items()}
_obj_decoders = {kind: msgspec.json.Decoder(cls) for kind, cls in _RAW.items()}
_raw_list = msgspec.json.Decoder(RawList)
_event = msgspec.json.Decoder(Event)
_named = msgspec.json.Decoder(Named)
_status = msgspec.json.Decoder(Status)


# -- errors -------------------------------------------------------------------------------
class ApiStatusError(Exception):
    """The API server answered with an error status (or an ERROR watch event)."""

    def __init__(self, code: int, reason: str, message: str, retry_after: float | None = None):
        self.code, self.reason, self.message, self.retry_after = code, reason, message, retry_after
        super().__init__(f"{code} {reason}: {message}" if reason or message else f"HTTP {code}")


class Expired(ApiStatusError):
    """410 Gone: the resourceVersion (or continue token) was compacted away; relist."""


def status_error(code: int, body: bytes, headers=None) -> ApiStatusError:
    """An ApiStatusError from an HTTP status and its (ideally ``kind: Status``) body."""
    try:
        st = _status.decode(body)
        reason, message = st.reason, st.message
        retry = (st.details or {}).get("retryAfterSeconds")
    except (msgspec.DecodeError, msgspec.ValidationError):
        reason, message, retry = "", body[:200].decode("utf-8", "replace").strip(), None
    if headers is not None and headers.get("Retry-After", "").isdigit():
        retry = int(headers["Retry-After"])
    cls = Expired if code == 410 else ApiStatusError
    return cls(code, reason, message, float(retry) if isinstance(retry, (int, float)) else None)


# -- configuration and status --------------------------------------------------------------
@dataclass(frozen=True)
class Resource:
    """One collection to reflect: the model kind, its path and the server-side selectors."""

    kind: str  # model kind: Service, EndpointSlice, Node, ServiceCIDR
    name: str  # resource name for logs and status: services, endpointslices, ...
    path: str  # e.g. /api/v1/services
    namespaced: bool = True
    label_selector: str = ""
    field_selector: str = ""
    optional: bool = False  # a 404 disables it (the API may not exist on this cluster)


@dataclass(frozen=True)
class WatchOptions:
    """Timeouts, page size and backoff of the reflectors (seconds unless noted)."""

    page_size: int = 500  # items per list page (``limit``)
    watch_timeout: tuple[int, int] = (300, 600)  # server-side timeoutSeconds, random in this range
    read_slack: float = 30.0  # client read timeout = timeoutSeconds + this
    connect_timeout: float = 10.0
    list_timeout: float = 60.0  # read timeout of one list page
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    disabled_retry: float = 300.0  # look again for a resource that was 404 (or 403) this often


@dataclass
class ReflectorStatus:
    """What health checks and metrics want to know about one reflector."""

    resource: str
    synced: bool = False  # the initial list is complete (stays True across reconnects)
    disabled: bool = False  # the server does not serve this (optional) resource
    watching: bool = False  # a watch stream is open right now
    resource_version: str = ""
    last_event: float | None = None  # time.time() of the last event or bookmark
    last_list: float | None = None  # time.time() of the last complete list
    lists: int = 0  # complete lists (1 + relists)
    events: int = 0  # ADDED/MODIFIED/DELETED events handled
    skipped: int = 0  # objects skipped as malformed
    errors: int = 0  # failed requests and broken streams
    last_error: str = ""


class Backoff:
    """Capped exponential backoff with jitter (each delay is 50-100% of the nominal one)."""

    def __init__(self, base: float, cap: float):
        self.base, self.cap, self.failures = base, cap, 0

    def next(self, at_least: float = 0.0) -> float:
        nominal = min(self.cap, self.base * (2 ** self.failures))
        self.failures += 1
        return max(at_least, nominal * random.uniform(0.5, 1.0))

    def reset(self):
        self.failures = 0


# -- the reflector ---------------------------------------------------------------------------
class Reflector:
    """Lists and watches one ``Resource`` into ``store`` in a thread of its own.

    ``store`` is the writer of the state: ``put(kind, key, obj)`` and ``remove(kind, key)``
    return whether anything changed, ``keys(kind)`` is what it holds of a kind,
    ``changed(kind)`` is called once after a batch of changes and ``listed(kind)`` after
    every complete list.
    """

    def __init__(self, client, resource: Resource, store, options: WatchOptions | None = None):
        self.client = client
        self.resource = resource
        self.store = store
        self.options = options or WatchOptions()
        self.status = ReflectorStatus(resource.name)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._response = None  # the open watch response, so stop() can break its read
        self._rv: str | None = None  # where the next watch starts; None: list first
        self._backoff = Backoff(self.options.backoff_base, self.options.backoff_cap)
        self._thread = threading.Thread(target=self._run, name=f"reflector-{resource.name}", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> "Reflector":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            resp = self._response
        if resp is not None:
            try:
                resp.shutdown()  # wakes the thread blocked reading the stream
            except Exception:
                pass

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def snapshot(self) -> ReflectorStatus:
        with self._lock:
            return replace(self.status)

    # -- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        consistent = False  # the first list may come from the watch cache (RV=0)
        while not self._stop.is_set():
            delay = 0.0
            try:
                if self._rv is None:
                    self._rv = self._list(consistent)
                    consistent = True
                    self._backoff.reset()
                start = time.monotonic()
                events = self._watch()
                if events or time.monotonic() - start > 1.0:
                    self._backoff.reset()
                elif not self._stop.is_set():
                    delay = self._backoff.next()  # a watch that ends at once: do not spin
            except Expired as e:
                log.info("%s: %s; listing again", self.resource.name, e)
                if self._rv is None:  # the list itself expired: do not spin
                    delay = self._backoff.next()
                self._rv, consistent = None, True
            except ApiStatusError as e:
                if e.code in (404, 403) and self.resource.optional:
                    self._disable(e)
                    self._rv, delay = None, self.options.disabled_retry
                else:
                    self._failed(e)
                    if e.code not in (429, 500, 502, 503, 504):
                        self._rv = None  # as client-go: an error other than overload ends in a relist
                    delay = self._backoff.next(e.retry_after or 0.0)
            except (urllib3.exceptions.HTTPError, OSError, msgspec.DecodeError) as e:
                if self._stop.is_set():
                    break
                self._failed(e)
                delay = self._backoff.next()  # the watch resumes from the last resourceVersion seen
            except Exception as e:  # a bug must not silently kill the reflector
                log.exception("%s: unexpected error", self.resource.name)
                self._failed(e)
                delay = self._backoff.next()
            if delay:
                log.debug("%s: retrying in %.2fs", self.resource.name, delay)
                self._stop.wait(delay)

    def _failed(self, e: Exception) -> None:
        text = f"{type(e).__name__}: {e}"
        with self._lock:
            self.status.errors += 1
            self.status.last_error = text
        log.warning("%s: %s (the datapath keeps its rules; retrying)", self.resource.name, text)

    def _disable(self, e: ApiStatusError) -> None:
        with self._lock:
            first = not self.status.disabled
            self.status.disabled = True
            self.status.last_error = str(e)
        if first:
            log.info("%s: not available from the API server (%s); continuing without it, looking again every %.0fs",
                     self.resource.name, e, self.options.disabled_retry)
        removed = [self.store.remove(self.resource.kind, k) for k in self.store.keys(self.resource.kind)]
        if any(removed):
            self.store.changed(self.resource.kind)
        if not self.status.synced:
            with self._lock:
                self.status.synced = True  # nothing to wait for
            self.store.listed(self.resource.kind)

    # -- HTTP --------------------------------------------------------------------------------
    def _request(self, query: list[tuple[str, str]], read_timeout: float):
        r = self.resource
        if r.label_selector:
            query.append(("labelSelector", r.label_selector))
        if r.field_selector:
            query.append(("fieldSelector", r.field_selector))
        method, url, headers, body, post = self.client.param_serialize(
            method="GET", resource_path=r.path, query_params=query,
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        rest = self.client.call_api(method, url, headers, body, post,
                                    _request_timeout=(self.options.connect_timeout, read_timeout))
        resp = rest.response  # the raw urllib3 response (preload_content=False)
        if resp.status != 200:
            try:
                data = resp.data
            finally:
                resp.release_conn()
            raise status_error(resp.status, data or b"", resp.headers)
        return resp

    # -- list -------------------------------------------------------------------------------
    def _list(self, consistent: bool) -> str:
        """List every page into the store; returns the list's resourceVersion."""
        kind, name = self.resource.kind, self.resource.name
        started = time.monotonic()
        while True:  # restarts when a continue token expires
            seen: set = set()
            token = ""
            changed = False
            while True:
                query = [("limit", str(self.options.page_size))]
                if token:
                    query.append(("continue", token))
                elif not consistent:
                    query.append(("resourceVersion", "0"))
                try:
                    resp = self._request(query, self.options.list_timeout)
                except Expired as e:
                    if not token:
                        raise
                    log.info("%s: continue token expired (%s); starting the list again", name, e.message)
                    consistent = True
                    break
                try:
                    data = resp.data
                finally:
                    resp.release_conn()
                meta, page_changed = self._store_page(data, seen)
                changed |= page_changed
                token = meta.continue_
                if not token:
                    break
            if token:  # broke out for a restart
                continue
            for key in self.store.keys(kind) - seen:
                changed |= self.store.remove(kind, key)
            with self._lock:
                st = self.status
                first = not st.synced
                st.synced, st.disabled = True, False
                st.resource_version = meta.resource_version
                st.last_list = time.time()
                st.lists += 1
            log.info("%s: listed %d in %.2fs (resourceVersion %s)%s", name, len(seen), time.monotonic() - started,
                     meta.resource_version, "" if first else "; differences applied")
            if changed:
                self.store.changed(kind)
            self.store.listed(kind)
            return meta.resource_version

    def _store_page(self, data: bytes, seen: set) -> tuple[ListMeta, bool]:
        kind = self.resource.kind
        changed = False
        try:
            page = _list_decoders[kind].decode(data)
            items = [(raw, None) for raw in page.items]
        except msgspec.ValidationError:
            page = _raw_list.decode(data)  # something in it does not fit: one item at a time
            items = [(None, raw) for raw in page.items]
        for raw, undecoded in items:
            obj, key = self._convert(raw, undecoded)
            if obj is not None:
                seen.add(key)
                changed |= self.store.put(kind, key, obj)
        return page.metadata, changed

    # -- watch --------------------------------------------------------------------------------
    def _watch(self) -> int:
        """Watch from the last resourceVersion until the stream ends (``self._rv``
        follows every event and bookmark); returns how many events changed something."""
        lo, hi = self.options.watch_timeout
        timeout = random.randint(lo, hi)
        query = [("watch", "true"), ("resourceVersion", self._rv), ("allowWatchBookmarks", "true"),
                 ("timeoutSeconds", str(timeout))]
        resp = self._request(query, timeout + self.options.read_slack)
        with self._lock:
            self._response = resp
            self.status.watching = True
        handled = 0
        try:
            for line in resp:
                if self._stop.is_set():
                    break
                if line.strip():
                    handled += self._event(line)
        finally:
            with self._lock:
                self._response = None
                self.status.watching = False
            resp.close()
        return handled

    def _event(self, line: bytes) -> int:
        """Handle one watch event line; returns 1 if the store changed, else 0."""
        kind = self.resource.kind
        ev = _event.decode(line)
        if ev.type == "BOOKMARK":
            self._advance(_named.decode(ev.object).metadata.resource_version, False)
            return 0
        if ev.type == "ERROR":
            st = _status.decode(ev.object)
            raise (Expired if st.code == 410 else ApiStatusError)(st.code, st.reason, st.message)
        if ev.type not in ("ADDED", "MODIFIED", "DELETED"):
            log.debug("%s: ignoring watch event of type %r", self.resource.name, ev.type)
            return 0
        try:
            meta = _named.decode(ev.object).metadata
        except msgspec.ValidationError as e:
            with self._lock:
                self.status.skipped += 1
            log.warning("%s: skipping a %s event whose object has no usable metadata: %s",
                        self.resource.name, ev.type, e)
            return 0
        key = (meta.namespace, meta.name) if self.resource.namespaced else ("", meta.name)
        if ev.type == "DELETED":
            changed = self.store.remove(kind, key)
        else:
            obj, _ = self._convert(None, ev.object)
            changed = self.store.put(kind, key, obj) if obj is not None else self.store.remove(kind, key)
        self._advance(meta.resource_version, True)
        if changed:
            self.store.changed(kind)
        return int(changed)

    def _advance(self, rv: str, event: bool) -> None:
        """Record the resourceVersion of an event or bookmark: the next watch starts there."""
        with self._lock:
            st = self.status
            if rv:
                self._rv = st.resource_version = rv
            st.last_event = time.time()
            st.events += event

    # -- decoding ------------------------------------------------------------------------------
    def _convert(self, raw, undecoded) -> tuple[object | None, tuple[str, str] | None]:
        """A model value and its key from a decoded raw struct or undecoded JSON; None for
        objects kproxy ignores or cannot use (the reason is logged)."""
        kind = self.resource.kind
        try:
            if raw is None:
                try:
                    raw = _obj_decoders[kind].decode(undecoded)
                except msgspec.ValidationError:
                    # decode again as plain JSON so the message can name the object
                    model.from_api(kind, msgspec.json.decode(undecoded))
                    raise
            return _CONVERT[kind](raw), self._key(raw.metadata)
        except model.Ignored as e:
            log.debug("%s: %s", self.resource.name, e)
        except model.InvalidObject as e:
            with self._lock:
                self.status.skipped += 1
            log.warning("%s: skipping malformed object: %s", self.resource.name, e)
        except msgspec.ValidationError as e:  # from_api above found no problem: should not happen
            with self._lock:
                self.status.skipped += 1
            log.warning("%s: skipping malformed object: %s", self.resource.name, e)
        return None, None

    def _key(self, meta) -> tuple[str, str]:
        return (meta.namespace, meta.name) if self.resource.namespaced else ("", meta.name)
