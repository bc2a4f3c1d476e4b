"""What Meadow changes in how its dependencies start, done as `meadow` is imported, before any of them is.

- Modules they import that Meadow never uses are imported only if something reads from them (`Deferred`).
  hivemind's package imports its averaging code, which imports scipy.optimize (for one linear program in its load
  balancing): 0.3 s of every server's and DHT node's start, a tenth of a server's start to ready. The standard
  library's LazyLoader does not help here: Python 3.11's `import scipy.optimize` reads the module's `__spec__`, which
  makes a LazyLoader module load.
- hivemind shares one byte per DHT call's future (MPFuture) with the DHT's process, and switches torch's sharing of
  CPU tensors from its default (file descriptors) to named files (`file_system`). Named files need a manager process,
  torch_shm_manager, started at a process's first shared tensor: a program that loads libtorch, 0.25 s of every
  process that starts a DHT node, with the interpreter's lock held all along. The futures work as well with file
  descriptors (passed over a socket, as multiprocessing passes them), which need no manager: Meadow keeps torch's
  default, unless HIVEMIND_MEMORY_SHARING_STRATEGY says otherwise (hivemind reads it as it is imported).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

NEVER_USED_AT_START = ("scipy.optimize",)


class Deferred(types.ModuleType):
    """Stands in sys.modules (and in its parent package) for a module nobody has used yet. `import` statements find
    it there as they find any imported module (its __spec__ is None, so they read nothing else), and it has the real
    one's __file__ (`inspect.getmodule`, which torch runs as it registers operators, reads every module's); the first
    read of an attribute it lacks imports the real module, which replaces it in both places, and returns the real
    one's."""

    def __getattr__(self, attr: str):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)  # which sets the parent's attribute too


def defer(name: str) -> None:
    """A stand-in for module `name`, if it exists and is not imported yet."""
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)  # imports the parent package (scipy's own is cheap and lazy)
    except ImportError:
        return
    if spec is None:
        return
    stand_in = sys.modules[name] = Deferred(name)
    stand_in.__file__ = spec.origin
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, stand_in)


for _name in NEVER_USED_AT_START:
    defer(_name)
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")  # our children inherit it, as they should
