"""Replacing a set of data files as a unit (--overwrite, compact), and crash recovery at start.

A marker (`_overwrite-<id>.json`, `_compact-<id>.json`) names the files replaced and the files
that replace them, so a kill at any moment leaves either the old files or the new ones
answering for every image. The new files are written staged (hidden names) and published
only once the marker says "commit": locally by rename, on S3 by a server-side copy (S3 has no
rename), the same protocol either way. `recover` runs at every start, under the lock.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field, fields

from . import layout
from .base import OutputError, Store
from .parts import part_model


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Replacement:
    """Files `remove` are replaced by files `add` (written first as staged, hidden files:
    `store.write_file(layout.staged_name(name), ...)`).

    state "pending": the new files are still being made. A pending compaction is rolled back
    at the next start; a pending overwrite is continued by the next run of its model (its new
    parts are ordinary parts, committed as the run goes; `remove` does not count as done).
    state "commit": everything new is durable; the next start finishes the swap if a kill
    interrupted it. The swap publishes the staged files before it deletes the old ones, so a
    reader sees for a moment (or, after a kill in those milliseconds, until the next start)
    identical duplicate rows, never a missing one. Every step is fenced (store.fence), and
    the marker itself is written conditionally: created only if absent, replaced only if it is
    still the version this run wrote or read (`token`), so a run that took the lock over and
    rolled the marker back makes a late commit fail instead of landing.
    """

    store: Store
    kind: str  # "overwrite" | "compact"
    id: str
    model: str | None
    remove: list[str]
    add: list[str] = field(default_factory=list)
    state: str = "pending"
    started: str = field(default_factory=_now_iso)
    token: str | None = None  # the marker's version this run wrote or read (not saved)

    @property
    def marker(self) -> str:
        return layout.marker(self.kind, self.id)

    def save(self) -> None:
        data = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("store", "token")}
        body = json.dumps(data, indent=2, default=str).encode()
        self.store.fence()
        token = (self.store.replace_bytes(self.marker, body, self.token) if self.token
                 else self.store.create_bytes(self.marker, body))
        if token is None:
            raise OutputError(f"{self.store.uri(self.marker)} was changed by another run (it "
                              "took the lock over after this one's lease ran out); nothing was "
                              "committed")
        self.token = token

    def commit(self) -> None:
        """Make the new files the answer: mark committed, publish them, delete the old ones."""
        self.state = "commit"
        self.save()
        self.finish()

    def finish(self) -> None:
        """Publish the staged files, then delete the replaced files and the marker."""
        present = set(self.store.names())
        self.store.publish([(layout.staged_name(n), n) for n in self.add
                            if layout.staged_name(n) in present])
        present = set(self.store.names())
        missing = [n for n in self.add if n not in present]
        if missing:  # only if someone deleted files by hand: then keep the old parts
            raise OutputError(f"{self.marker}: new parts are missing ({', '.join(missing)}); "
                              "the parts it replaces are kept")
        self.store.delete(self.remove)
        self.store.delete([self.marker])

    def abandon(self) -> None:
        """Forget a pending replacement: delete its staged files (also those not yet named in
        the marker: a compaction names its files when they are all written) and the marker."""
        staged = {layout.staged_name(n) for n in self.add} | {
            n for n in self.store.names() if n.startswith(layout.staged_prefix(self.id))}
        self.store.delete(sorted(staged) + [self.marker])


def replacements(store: Store) -> list[Replacement]:
    """Every marker in OUTPUT, oldest first."""
    found = []
    for name in store.names():
        if layout.marker_kind(name):
            versioned = store.read_versioned(name)
            if versioned is not None:  # None: finished by another process meanwhile
                data, token, _ = versioned
                found.append(Replacement(store=store, **json.loads(data), token=token))
    return sorted(found, key=lambda r: r.started)


def recover(store: Store) -> list[str]:
    """Finish or roll back what a killed run left (under the lock); returns what was done."""
    notes = []
    for rep in replacements(store):
        if rep.state == "commit":
            rep.finish()
            notes.append(f"finished the interrupted {rep.kind} {rep.id}")
        elif rep.kind == "compact":
            rep.abandon()
            notes.append(f"rolled back the interrupted compaction {rep.id}")
    removed = store.remove_leftovers()
    if removed:
        notes.append(f"removed {removed} temp file(s) of an interrupted run")
    return notes


def unfinished_overwrite(store: Store, model: str) -> Replacement | None:
    return next((r for r in replacements(store)
                 if r.kind == "overwrite" and r.model == model and r.state == "pending"), None)


def start_overwrite(store: Store, model: str, run_id: str) -> Replacement:
    """Record the parts of `model` that this run replaces; they stay readable until it completes."""
    old = [f.name for f in store.data_files() if part_model(store, f.name) == model]
    rep = Replacement(store, "overwrite", run_id, model, old)
    rep.save()
    return rep
