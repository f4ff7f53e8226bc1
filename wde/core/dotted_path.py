"""Import the object that a "package.module:Name" path names, only when it is needed."""
import importlib
from typing import Any


def import_object(path: str) -> Any:
    """Return the object named by `path` ("package.module:Name" or "package.module:Outer.Inner").

    Raises ValueError for a malformed path, ImportError when the module cannot be imported and
    AttributeError when the module has no such name; callers add what the path was for.
    """
    module_name, sep, qualname = path.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"{path!r} is not a 'package.module:Name' path")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"module {module_name!r} has no attribute {qualname!r}")
        obj = getattr(obj, part)
    return obj
