"""One shared watch cache per kind (KubeSpawner's reflector; client-go's informer).

An ``Informer`` lists every object of its kind that Kiln manages (a label selector), then
watches from the list's resourceVersion, keeping a dict of the objects by
``(namespace, name)``. Every ``poll``/``status`` of the runtime reads that dict: starting or
watching a thousand workloads costs one watch connection, not a request per pod per second.

When the server says the resourceVersion is too old (``410 Gone``, or an ``ERROR`` event
with ``Expired``), the informer lists again and replaces its store; a dropped connection
resumes from the last resourceVersion seen (bookmarks keep it fresh on a quiet cluster).
Waiters (``wait_for``) are woken on every change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kiln.runtimes.kubernetes.client import Kube, KubeError

log = logging.getLogger("kiln.runtimes.kubernetes")

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped kinds
Listener = Callable[[str, dict[str, Any]], None]  # (event type, object)
RETRY_SECONDS = 1.0


def key_of(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


class Informer:
    """A list+watch of one kind, cluster-wide, filtered by ``label_selector``."""

    def __init__(
        self,
        kube: Kube,
        kind: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
        watch_seconds: int = 240,
    ) -> None:
        self.kube = kube
        self.kind = kind
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.watch_seconds = watch_seconds
        self._store: dict[Key, dict[str, Any]] = {}
        self._changed = threading.Condition()
        self._listeners: list[Listener] = []
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._resource_version = ""
        self.relists = 0  # how often the cache had to list again (410 Gone / expiry)
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"informer-{kind}")

    # ------------------------------------------------------------ life cycle

    def start(self, timeout: float = 30.0) -> Informer:
        """Start the list+watch and return once the first list is in the cache."""
        self._thread.start()
        if not self._synced.wait(timeout):
            raise TimeoutError(f"the {self.kind} cache did not sync within {timeout:.0f}s")
        return self

    def stop(self, wait: float = 0.5) -> None:
        """Stop watching. The watch request in flight ends within its timeout; the thread
        is a daemon, joined for at most ``wait`` seconds so that closing stays quick."""
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        if wait > 0:
            self._thread.join(timeout=wait)

    def add_listener(self, listener: Listener) -> None:
        """``listener(event_type, obj)`` after each change (from the informer's thread)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------ reads

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._changed:
            return self._store.get((namespace, name))

    def items(self) -> list[dict[str, Any]]:
        with self._changed:
            return list(self._store.values())

    def __len__(self) -> int:
        with self._changed:
            return len(self._store)

    def wait_for(
        self,
        predicate: Callable[[], Any],
        timeout: float,
    ) -> Any:
        """Block until ``predicate()`` (called under the cache's lock, after each change)
        returns something truthy, and return it; ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = predicate()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping.is_set():
                    raise TimeoutError(f"no matching {self.kind} change within {timeout:.0f}s")
                self._changed.wait(remaining)

    def observe(self, obj: dict[str, Any]) -> None:
        """Record an object the runtime just wrote (its reply), so a read right after a
        write sees it even before the watch event arrives. Older versions never win."""
        self._apply("MODIFIED", obj)

    # ------------------------------------------------------------ the loop

    def _query(self) -> dict[str, Any]:
        return {"labelSelector": self.label_selector, "fieldSelector": self.field_selector}

    def _list(self) -> None:
        items, version = self.kube.list(self.kind, **self._query())
        fresh = {key_of(obj): obj for obj in items}
        with self._changed:
            gone = [self._store[k] for k in self._store.keys() - fresh.keys()]
            self._store = fresh
            self._resource_version = version
            self._changed.notify_all()
        for obj in gone:  # deleted while we were not watching
            self._notify("DELETED", obj)
        for obj in items:
            self._notify("MODIFIED", obj)
        self._synced.set()

    def _run(self) -> None:
        need_list = True
        while not self._stopping.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                for event in self.kube.watch(
                    self.kind, self._resource_version, self.watch_seconds, **self._query()
                ):
                    if self._stopping.is_set():
                        return
                    if not self._handle(event):
                        need_list = True
                        break
            except KubeError as exc:
                need_list = need_list or exc.status == 410
                log.warning("%s watch: %s; retrying", self.kind, exc)
                self._stopping.wait(RETRY_SECONDS)
            except Exception as exc:  # a dropped connection: resume from the last version
                if self._stopping.is_set():
                    return
                log.warning("%s watch interrupted: %s; resuming", self.kind, exc)
                self._stopping.wait(RETRY_SECONDS)

    def _handle(self, event: dict[str, Any]) -> bool:
        """Apply one watch event; False when the cache must list again."""
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410 or obj.get("reason") in ("Expired", "Gone"):
                self.relists += 1
                log.info("%s watch expired; listing again", self.kind)
                return False
            raise KubeError(int(obj.get("code") or 0), str(obj.get("reason")), str(obj))
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if version:
                self._resource_version = version
            return True
        self._apply(str(kind), obj)
        if version:
            self._resource_version = version
        return True

    def _apply(self, kind: str, obj: dict[str, Any]) -> None:
        key = key_of(obj)
        with self._changed:
            old = self._store.get(key)
            if kind == "DELETED":
                self._store.pop(key, None)
            elif old is not None and _older(obj, old):
                return
            else:
                self._store[key] = obj
            self._changed.notify_all()
        self._notify(kind, obj)

    def _notify(self, kind: str, obj: dict[str, Any]) -> None:
        for listener in self._listeners:
            try:
                listener(kind, obj)
            except Exception:  # a listener's bug must not stop the cache
                log.exception("%s informer listener failed", self.kind)


def _older(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether ``new`` is an older version of ``old`` (resourceVersions of one object only
    grow; comparing them as integers is what etcd-backed servers give, and if either is not
    a number the newer arrival wins)."""
    try:
        return int(new["metadata"]["resourceVersion"]) < int(old["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return False
