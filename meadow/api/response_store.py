"""The Responses API's stored responses, each with its whole conversation (what `previous_response_id` continues), in
MEADOW_HOME/responses.sqlite: they outlive the API process, as OpenAI keeps them for days, and every API on the machine
finds them. The latest `kept` are kept, the oldest forgotten first."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

from meadow.home import meadow_home

logger = logging.getLogger(__name__)

KEPT = 1024  # stored responses (their conversations, each within a context)


class ResponseStore:
    def __init__(self, path: Path | None = None, kept: int = KEPT):
        self.path, self.kept = path or meadow_home() / "responses.sqlite", kept
        self._lock = threading.Lock()  # one connection, used by the event loop and FastAPI's worker threads
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._open(self.path)
        except (OSError, sqlite3.OperationalError) as e:  # no place for it (a read-only home): kept while the API runs
            logger.warning(f"stored responses are kept in memory only: {self.path} cannot be written ({e})")
            self._db = self._open(":memory:")
        except sqlite3.DatabaseError as e:  # not a database (a torn copy, another file): start afresh beside it
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            self.path.rename(aside)
            logger.warning(f"{self.path} could not be read ({e}); moved to {aside.name}, stored responses start afresh")
            self._db = self._open(self.path)

    @staticmethod
    def _open(path: Path | str) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer (another API on this machine)
        db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, response TEXT, conversation TEXT)")
        return db

    def get(self, response_id: str) -> tuple[dict, list[dict]] | None:
        """The response and its whole conversation, or None if none is kept under `response_id`."""
        with self._lock:
            found = self._db.execute("SELECT response, conversation FROM responses WHERE id = ?", (response_id,))
            row = found.fetchone()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def put(self, response_id: str, response: dict, conversation: list[dict]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)",
                             (response_id, json.dumps(response), json.dumps(conversation)))  # fmt: skip
            self._db.execute("DELETE FROM responses WHERE rowid NOT IN "
                             "(SELECT rowid FROM responses ORDER BY rowid DESC LIMIT ?)", (self.kept,))  # fmt: skip

    def delete(self, response_id: str) -> bool:
        """Forget a response; False if none was kept under `response_id`."""
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0
