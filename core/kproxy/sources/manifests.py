"""The embedded default source: Kubernetes objects from YAML (or JSON) files.

``--manifests PATH`` names a file or a directory (``*.yaml``, ``*.yml``, ``*.json``,
not recursive). Files may hold several documents and ``kind: List`` objects; a Service or
EndpointSlice without a namespace is in ``default``, as with ``kubectl apply``. An invalid
object is skipped with a message naming the file, the object and the field; everything
else is still programmed. ``ManifestWatcher`` re-reads the files when they change.
"""

from __future__ import annotations

import logging
import os
import threading

import yaml

from ..model import KINDS, Ignored, InvalidObject, from_api
from ..state import ClusterState

log = logging.getLogger("kproxy.manifests")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SUFFIXES = (".yaml", ".yml", ".json")
NAMESPACED = ("Service", "EndpointSlice")


class ManifestError(Exception):
    """The manifest path itself cannot be used (missing, unreadable)."""


def manifest_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(SUFFIXES))
    if os.path.isfile(path):
        return [path]
    raise ManifestError(f"manifest path {path} does not exist")


def _objects(doc):
    if isinstance(doc, dict) and doc.get("kind") == "List":
        for item in doc.get("items") or ():
            yield item
    elif doc is not None:
        yield doc


def load(path: str, node_name: str, warn=None) -> tuple[ClusterState, list[str]]:
    """Read every object under ``path``; returns the state and the problems found."""
    warn = warn or log.warning
    state = ClusterState(node_name=node_name)
    problems: list[str] = []
    for fname in manifest_files(path):
        try:
            with open(fname) as f:
                docs = list(yaml.load_all(f, Loader=_Loader))
        except (OSError, yaml.YAMLError) as e:
            problems.append(f"{fname}: cannot read: {e}")
            continue
        for n, doc in enumerate(d for raw in docs for d in _objects(raw)):
            if not isinstance(doc, dict):
                problems.append(f"{fname}: document {n + 1} is not a Kubernetes object")
                continue
            kind = doc.get("kind")
            if kind not in KINDS:
                problems.append(f"{fname}: document {n + 1}: kind {kind!r} is not one kproxy reads ({', '.join(KINDS)}); skipped")
                continue
            md = doc.get("metadata")
            if kind in NAMESPACED and isinstance(md, dict) and not md.get("namespace"):
                doc = {**doc, "metadata": {**md, "namespace": "default"}}  # as kubectl apply does
            try:
                state.put(from_api(kind, doc))
            except Ignored as e:
                log.debug("%s: %s", fname, e)
            except InvalidObject as e:
                problems.append(f"{fname}: {e}; skipped")
    for p in problems:
        warn(p)
    return state, problems


class ManifestWatcher:
    """Polls the manifest files and replaces the app's state when any of them changes."""

    def __init__(self, path: str, app, interval: float = 0.2):
        self.path, self.app, self.interval = path, app, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="manifests", daemon=True)
        self._seen = self._fingerprint()

    def _fingerprint(self):
        try:
            files = manifest_files(self.path)
        except ManifestError:
            return None
        out = []
        for f in files:
            try:
                st = os.stat(f)
                out.append((f, st.st_mtime_ns, st.st_size))
            except OSError:
                pass
        return tuple(out)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()

    def _run(self):
        while not self._stop.wait(self.interval):
            fp = self._fingerprint()
            if fp == self._seen:
                continue
            self._seen = fp
            try:
                state, _ = load(self.path, self.app.config.node_name)
            except ManifestError as e:
                log.error("%s; keeping the previous state", e)
                continue
            self.app.state.replace_all(state)
            log.info("manifests changed, syncing")
            self.app.request_sync()
