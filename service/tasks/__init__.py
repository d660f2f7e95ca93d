"""The built-in task types, Foo, Bar, Baz and Http: plugins like any other (see service.plugins).

Each lives in a module of its own; importing this package registers them, in this order.
"""

from __future__ import annotations

import importlib

BUILTINS = ("foo", "bar", "baz", "http")

for _name in BUILTINS:
    importlib.import_module(f"{__name__}.{_name}")
