"""The quota configuration in force, re-read when its file changes or on SIGHUP (SPEC 3)."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import ConfigError, PolicyConfig, parse_config

log = logging.getLogger("tollgate.policy")
EMPTY = "{}"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read quota configuration {path}: {exc.strerror}") from None


class ConfigSource:
    """The quota configuration, reloaded without a restart.

    An edit that does not validate is logged and the last good configuration stays in force,
    so a typo in the YAML never takes quotas away.
    """

    def __init__(self, config: PolicyConfig, path: Path | None = None, text: str = "") -> None:
        self._config = config
        self._path = path
        self._text = text
        self._stamp = self._stat()

    @classmethod
    def load(cls, path: Path | None) -> ConfigSource:
        """Read `path` now (raising `ConfigError` if invalid); None means no quotas."""
        if path is None:
            return cls(parse_config(EMPTY, "<no quota file>"), None, EMPTY)
        text = _read(path)
        return cls(parse_config(text, str(path)), path, text)

    @classmethod
    def fixed(cls, config: PolicyConfig, text: str = "") -> ConfigSource:
        """A configuration that never changes (tests, embedded use)."""
        return cls(config, None, text)

    def _stat(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> PolicyConfig:
        """The configuration in force, re-read first if the file changed on disk."""
        stamp = self._stat()
        if self._path is not None and stamp is not None and stamp != self._stamp:
            self._stamp = stamp
            self.reload()
        return self._config

    def reload(self) -> None:
        """Take the file as it is now (SIGHUP); a broken file keeps the last good config."""
        if self._path is None:
            return
        try:
            text = _read(self._path)
            new = parse_config(text, str(self._path))
        except ConfigError as exc:
            log.warning("%s\nkeeping quota configuration version %s", exc, self.version)
            return
        if new.version != self._config.version:
            log.info("reloaded quota configuration %s: version %s -> %s",
                     self._path, self._config.version, new.version)  # fmt: skip
        self._config, self._text = new, text

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def version(self) -> str:
        return self._config.version

    @property
    def text(self) -> str:
        """The YAML of the configuration in force (recorded with its version)."""
        return self._text
