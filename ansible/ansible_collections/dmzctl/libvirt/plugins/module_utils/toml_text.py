# -*- coding: utf-8 -*-
# BSD-3-Clause (see the dmzctl repository)
"""A small TOML writer for dmzctl's config schema, in the standard library alone.

The targets are Debian 12 hosts: Python 3.11 reads TOML (tomllib) but writes none, and
python3-tomli-w is not installed by default. dmzctl's schema needs strings, integers,
floats, booleans, arrays of those, tables and arrays of tables; that is what this writes.
Keys keep their order. A value TOML cannot hold (null, a date object, an array mixing
tables with other values) raises TomlError naming where it is.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import math
import re

BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


class TomlError(ValueError):
    """A value with no TOML form; str() names its place (e.g. vm[0].memory)."""


def dumps(data):
    """The TOML document for a dict, ending in a newline."""
    if not isinstance(data, dict):
        raise TomlError("the document must be a table (a dict), not %s" % type(data).__name__)
    lines = _table_body(data, [], "")
    return "\n".join(lines).strip("\n") + "\n"


def key(name):
    name = str(name)
    return name if BARE_KEY.match(name) else string(name)


def string(text):
    out = []
    for char in text:
        if char in ESCAPES:
            out.append(ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append("\\u%04x" % ord(char))
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _is_table_array(value):
    return isinstance(value, list) and value and all(isinstance(item, dict) for item in value)


def _table_body(table, path, where):
    """Plain keys first, then sub-tables, then arrays of tables (TOML's order rule)."""
    lines = []
    subtables, arrays = [], []
    for name, value in table.items():
        place = "%s.%s" % (where, name) if where else str(name)
        if isinstance(value, dict):
            subtables.append((name, value, place))
        elif _is_table_array(value):
            arrays.append((name, value, place))
        else:
            lines.append("%s = %s" % (key(name), inline(value, place)))
    for name, value, place in subtables:
        header = ".".join(key(part) for part in path + [name])
        lines += ["", "[%s]" % header] + _table_body(value, path + [name], place)
    for name, value, place in arrays:
        header = ".".join(key(part) for part in path + [name])
        for index, item in enumerate(value):
            lines += ["", "[[%s]]" % header] + _table_body(item, path + [name], "%s[%d]" % (place, index))
    return lines


def inline(value, where):
    """A value on one line: scalars, arrays of scalars, inline tables inside arrays."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(inline(item, "%s[%d]" % (where, i)) for i, item in enumerate(value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join("%s = %s" % (key(k), inline(v, "%s.%s" % (where, k))) for k, v in value.items()) + "}"
    if value is None:
        raise TomlError("%s: null has no TOML form; leave the key out instead" % where)
    raise TomlError("%s: a %s has no TOML form here" % (where, type(value).__name__))
