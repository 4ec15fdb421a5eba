"""A per-user secret that signs stage records (stage.json), so a build only reuses what it wrote itself.

A build directory may come from elsewhere; its `.stages/` entries are then untrusted: a stage.json edited
to `passed: true`, with hashes to match, must not be reused as this user's verdict. Each record carries an
HMAC-SHA256 over its canonical JSON, keyed by a random secret kept outside every build directory
(`$QUANTPIPE_KEY_FILE`, default `~/.local/state/quantpipe/stage-records.key`, mode 0600; where that
cannot be written, a per-user folder in the temporary directory). A record that
was not signed with this key (another machine's, or edited) is not reused: the stage runs again.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Optional

KEY_ENV = "QUANTPIPE_KEY_FILE"


def key_file() -> Path:
    configured = os.environ.get(KEY_ENV)
    if configured:
        return Path(configured)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "quantpipe" / "stage-records.key"


@functools.lru_cache(maxsize=4)
def _key(path: str) -> Optional[bytes]:
    file = Path(path)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        if not file.exists():
            fresh = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(secrets.token_bytes(32))
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(fresh, file)  # first writer wins; a concurrent build reads the winner's key
            except FileExistsError:
                pass
            finally:
                fresh.unlink(missing_ok=True)
        key = file.read_bytes()
    except OSError:
        return None  # no writable state folder: nothing is signed, so nothing cached is reused
    return key if len(key) >= 32 else None


def _fallback_key_file() -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / f"quantpipe-{os.getuid()}" / "stage-records.key"


def sign(payload: bytes) -> Optional[str]:
    key = _key(str(key_file())) or _key(str(_fallback_key_file()))
    return None if key is None else hmac.new(key, payload, hashlib.sha256).hexdigest()


def verify(payload: bytes, signature: object) -> bool:
    expected = sign(payload)
    return expected is not None and isinstance(signature, str) and hmac.compare_digest(expected, signature)
