"""Plugins: callables in the `wde.plugins` entry-point group, called once per process before an engine starts.

A plugin registers what it brings through wde's public functions (register_model, register_workflow,
register_attention_backend), as dotted paths resolved only when an engine needs them. WDE_PLUGINS (names,
comma-separated) limits which plugins load. A plugin that fails to import or to register is reported with a
warning and left out; the engine starts without it.
"""
import logging
import os
from dataclasses import dataclass

try:
    import importlib_metadata
except ImportError:  # the standard library's has the same entry_points(group=...) on Python 3.10+
    import importlib.metadata as importlib_metadata

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "wde.plugins"


@dataclass
class PluginStatus:
    name: str
    value: str  # "package.module:callable"
    distribution: str | None
    status: str  # "loaded", "failed" or "not selected (WDE_PLUGINS)"
    error: str | None = None


_statuses: list[PluginStatus] | None = None


def load_plugins() -> list[PluginStatus]:
    """Discover and run every selected plugin once in this process; return what happened to each."""
    global _statuses
    if _statuses is not None:
        return _statuses
    selected = os.environ.get("WDE_PLUGINS")
    wanted = {name.strip() for name in selected.split(",") if name.strip()} if selected is not None else None
    _statuses = []
    for entry_point in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
        distribution = entry_point.dist.name if entry_point.dist else None
        status = PluginStatus(entry_point.name, entry_point.value, distribution, "loaded")
        if wanted is not None and entry_point.name not in wanted:
            status.status = "not selected (WDE_PLUGINS)"
        else:
            try:
                entry_point.load()()
                logger.info("plugin %s loaded (%s)", entry_point.name, entry_point.value)
            except Exception as e:  # a broken plugin must not stop the engine: report it and go on
                status.status, status.error = "failed", f"{type(e).__name__}: {e}"
                logger.warning("plugin %s (%s) failed and is left out: %s", entry_point.name, entry_point.value,
                               status.error)
        _statuses.append(status)
    unknown = sorted((wanted or set()) - {status.name for status in _statuses})
    if unknown:
        logger.warning("WDE_PLUGINS names %s, which no installed plugin is called; installed: %s",
                       ", ".join(unknown), ", ".join(status.name for status in _statuses) or "none")
    return _statuses


def reset_for_tests() -> None:
    """Forget which plugins ran, so the next load_plugins() discovers them again."""
    global _statuses
    _statuses = None
