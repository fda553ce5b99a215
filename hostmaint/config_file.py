"""Reading the files operators write (the inventory, windows.yaml) and snapshot JSON: strictly.

Three mistakes that used to pass or crash are refused with :class:`FileFormatError` (exit 2),
naming the file and the place:

- bytes that are not UTF-8 (a file saved as Latin-1, a stray binary): the byte, its line and
  column, instead of a traceback;
- a key given twice in one mapping (a second ``limits:`` block under a cluster): YAML parsers
  and ``json.loads`` silently keep the last one, so half of what the operator wrote would be
  ignored. The key, its path and both lines are named. YAML merge keys (``<<: *defaults``) still
  override as YAML defines;
- YAML that does not parse: the line and column, as PyYAML's marks give them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostmaint.errors import FileFormatError

if TYPE_CHECKING:  # imported where YAML is read: planning from a snapshot file reads none (~15 ms, ~1 MiB)
    import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_text(path: str | Path) -> str:
    """The file's text, decoded as UTF-8 (a leading BOM is allowed); FileFormatError naming a bad byte."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise FileFormatError(f"cannot read: {exc.strerror}", str(p)) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"not UTF-8: {_byte_place(data, exc.start)}; save the file as UTF-8",
                              str(p)) from None


def read_utf8(path: str | Path) -> bytes:
    """:func:`read_text`'s check without the text: the file's bytes, a leading BOM dropped, once
    they are known to be UTF-8 (a 60 MB snapshot need not be held twice)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise FileFormatError(f"cannot read: {exc.strerror}", str(p)) from None
    if not data.isascii():
        try:
            data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise FileFormatError(f"not UTF-8: {_byte_place(data, exc.start)}; save the file as UTF-8",
                                  str(p)) from None
    return data.removeprefix(b"\xef\xbb\xbf")


def _byte_place(data: bytes, offset: int) -> str:
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return f"byte 0x{data[offset]:02x} at line {line}, column {column} (byte offset {offset})"


def _text_place(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    return f"line {line}, column {index - (text.rfind(chr(10), 0, index) + 1) + 1}"


def _mark(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def parse_yaml(text: str, source: str) -> Any:
    """YAML text as Python data (safe types only), refusing a key repeated in any mapping."""
    import yaml

    try:
        loader = yaml.SafeLoader(text)  # its reader refuses a character YAML does not allow, here
    except yaml.reader.ReaderError as exc:
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise FileFormatError(f"character U+{code:04X} is not allowed in YAML, at "
                              f"{_text_place(text, exc.position)}", source) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(loader, node, source)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        where = _mark(exc.problem_mark) if exc.problem_mark is not None else "an unknown position"
        raise FileFormatError(f"malformed YAML at {where}: {exc.problem or exc}", source) from None
    except yaml.YAMLError as exc:
        raise FileFormatError(f"malformed YAML: {exc}", source) from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(loader: yaml.SafeLoader, root: yaml.Node, source: str) -> None:
    import yaml

    seen_nodes: set[int] = set()  # anchors and aliases share nodes; a recursive alias would loop
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    stack.append((value_node, path))
                    continue
                key = loader.construct_object(key_node, deep=True)
                try:
                    earlier = first.get(key)
                except TypeError:  # an unhashable key: the constructor refuses it with its own mark
                    continue
                if earlier is not None:
                    raise FileFormatError(
                        f"{path or 'top level'}: key {key!r} is given twice, at {_mark(earlier.start_mark)} "
                        f"and at {_mark(key_node.start_mark)}; only the last would count: merge them or "
                        "remove one", source)
                first[key] = key_node
                label = key if isinstance(key, str) else repr(key)
                stack.append((value_node, f"{path}.{label}" if path else str(label)))


def load_yaml(path: str | Path) -> Any:
    """Read and parse a YAML file strictly (see the module docstring); FileFormatError naming it."""
    return parse_yaml(read_text(path), str(path))


def parse_json(text: str, source: str) -> Any:
    """JSON text as Python data, refusing a key repeated in any object; FileFormatError naming the place."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)  # in C: a snapshot has ~100,000 objects; a key given twice makes it shorter
        if len(out) < len(items):
            seen: set[str] = set()
            for key, _ in items:
                if key in seen:
                    raise FileFormatError(f"key {key!r} is given twice in one object; only the last would "
                                          "count", source)
                seen.add(key)
        return out

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", source) from None


__all__ = ["load_yaml", "parse_json", "parse_yaml", "read_text", "read_utf8"]
