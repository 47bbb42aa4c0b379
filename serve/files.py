"""Outputs served by URL (`response_format="url"`, a video's content) for a bounded time.

Each file lives in the server's own temporary folder under an unguessable name (the URL is the
capability, as a presigned URL is), expires `ttl_s` after it was written, and the folder goes with
the server. A cap on the total bytes drops the oldest files first."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass


@dataclass
class StoredFile:
    path: str
    media_type: str
    size: int
    expires_at: float  # time.time()


class FileStore:
    def __init__(self, ttl_s: float, max_bytes: int):
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self.folder = tempfile.mkdtemp(prefix="dfuse-serve-")
        self._files: dict[str, StoredFile] = {}  # name -> file, oldest first
        self._lock = threading.Lock()

    def put(self, data: bytes, suffix: str, media_type: str) -> str:
        """Store `data`; returns the file's name (what its URL ends with)."""
        def write(path: str) -> None:
            with open(path, "wb") as f:
                f.write(data)

        return self.write(write, suffix, media_type)

    def write(self, writer, suffix: str, media_type: str) -> str:
        """writer(path) creates the file (an encoder that wants a path: diffusers' export_to_video)."""
        name = f"{secrets.token_urlsafe(18)}.{suffix}"
        path = os.path.join(self.folder, name)
        try:
            writer(path)
        except BaseException:
            if os.path.exists(path):
                os.unlink(path)
            raise
        with self._lock:
            self._files[name] = StoredFile(path, media_type, os.path.getsize(path), time.time() + self.ttl_s)
            self._expire()
        return name

    def get(self, name: str) -> StoredFile | None:
        with self._lock:
            self._expire()
            return self._files.get(name)

    def remove(self, name: str) -> None:
        with self._lock:
            self._drop(name)

    def close(self) -> None:
        with self._lock:
            self._files.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _expire(self) -> None:
        now, total = time.time(), sum(f.size for f in self._files.values())
        for name, f in list(self._files.items()):
            if f.expires_at <= now or total > self.max_bytes:
                total -= f.size
                self._drop(name)

    def _drop(self, name: str) -> None:
        f = self._files.pop(name, None)
        if f is not None:
            try:
                os.unlink(f.path)
            except FileNotFoundError:
                pass
