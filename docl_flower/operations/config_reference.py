"""The configuration reference: every option of every config group, generated from ``conf/``.

Each option is composed the way ``docl-flower`` composes it (``compose_config``), so the
reference shows the values a run gets; the comments come from the option's YAML file (the
block above a key, or after it on its line). ``scripts/config_reference.py`` writes the page
(``docs/reference/config.md``); a test keeps the committed page equal to a fresh one.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from docl_flower.core.common.install import PACKAGE_ROOT
from docl_flower.core.pipeline.config import compose_config

#: Where the config groups live (``conf/GROUP/OPTION.yaml``).
CONF_DIR = PACKAGE_ROOT / "conf"
#: The page ``scripts/config_reference.py`` writes by default.
DEFAULT_OUT = PACKAGE_ROOT / "docs" / "reference" / "config.md"

_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")
_COMMENT_LINE = re.compile(r"^ *#(?P<text>.*)$")


@dataclass(frozen=True)
class Option:
    """One option of a config group: its file's header comment, keys, defaults and comments."""

    group: str
    name: str
    description: str
    values: dict[str, object]
    comments: dict[str, str] = field(default_factory=dict)
    selects: tuple[str, ...] = ()


def groups(conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """Every config group (a folder of ``conf_dir``) and its options, sorted by name."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(conf_dir.iterdir())
        if d.is_dir() and any(d.glob("*.yaml"))
    }


def _load(path: Path) -> DictConfig:
    """A YAML file of ``conf/`` as written (defaults list included), a mapping."""
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path}: expected a mapping")
    return cfg


def default_options(conf_dir: Path = CONF_DIR) -> dict[str, str]:
    """The option ``config.yaml``'s defaults list selects for each group."""
    root = _load(conf_dir / "config.yaml")
    found: dict[str, str] = {}
    for entry in root.get("defaults", []):
        if isinstance(entry, DictConfig):
            for key, value in entry.items():
                found[str(key)] = str(value)
    return found


def _comment_text(lines: list[str]) -> str:
    """Comment lines as one markdown line: prose joined, indented lines (code) backticked."""
    parts: list[str] = []
    for raw in lines:
        text = raw[1:] if raw.startswith(" ") else raw
        if text.startswith("  ") and text.strip():
            parts.append(f"`{text.strip()}`")
        elif text.strip():
            parts.append(_escape(text.strip()))
    return " ".join(parts)


def _escape(text: str) -> str:
    """Markdown-escape prose (``*``, ``_``, ``<``, ``[``, ``]``) outside backtick spans."""
    pieces = re.split(r"(`[^`]*`)", text)
    for i, piece in enumerate(pieces):
        if not piece.startswith("`"):
            pieces[i] = re.sub(r"([*_<\[\]])", r"\\\1", piece)
    return "".join(pieces)


def yaml_comments(path: Path) -> tuple[str, dict[str, str]]:
    """The file's header comment, and the comment of each (dotted) key that has one.

    A key's comment is the block of ``#`` lines right above it (no blank line between) or the
    text after ``#`` on its own line. The header is the comment block that opens the file.
    Lines of a block list (``- item``) and of a ``defaults`` list are not keys.
    """
    header: list[str] = []
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    seen_key = False
    for line in path.read_text(encoding="utf-8").splitlines():
        comment = _COMMENT_LINE.match(line)
        if comment:
            pending.append(comment.group("text"))
            continue
        if not line.strip():
            if not seen_key and pending and not header:
                header, pending = pending, []
            pending = []
            continue
        match = _KEY_LINE.match(line)
        if not match:
            pending = []
            continue
        if not seen_key and pending and not header:
            header, pending = pending, []
        seen_key = True
        indent = len(match.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(k for _, k in stack), match.group("key")])
        stack.append((indent, match.group("key")))
        rest = match.group("rest")
        inline = rest.split(" #", 1)[1] if " #" in rest else None
        text = [*pending, *([inline] if inline is not None else [])]
        if text:
            comments[dotted] = _comment_text(text)
        pending = []
    return _comment_text(header), comments


def flatten(node: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """``(dotted key, leaf value)`` of a config mapping; lists and empty mappings are leaves."""
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _container(node: object) -> object:
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=False)
    return node


def _option_rows(conf_dir: Path) -> list[list[tuple[str, str]]]:
    """Selections that cover every option of every group, one option per group each.

    Composing one row selects one option of every group at once (a group with fewer options
    repeats its first), which gives each group's node exactly as composing that option alone
    does, in a handful of compositions instead of one per option.
    """
    table = groups(conf_dir)
    depth = max(len(opts) for opts in table.values())
    return [
        [(g, opts[i] if i < len(opts) else opts[0]) for g, opts in table.items()]
        for i in range(depth)
    ]


@functools.cache
def load_options(conf_dir: Path = CONF_DIR) -> dict[tuple[str, str], Option]:
    """Every option of every group, keyed by ``(group, option)``, composed by ``compose_config``."""
    found: dict[tuple[str, str], Option] = {}
    for row in _option_rows(conf_dir):
        cfg = compose_config([f"{g}={o}" for g, o in row])
        for group, name in row:
            if (group, name) not in found:
                found[group, name] = _describe(group, name, cfg[group], conf_dir)
    return found


def load_option(group: str, name: str, conf_dir: Path = CONF_DIR) -> Option:
    """One option of a group (see :func:`load_options`)."""
    return load_options(conf_dir)[group, name]


def _describe(group: str, name: str, node: object, conf_dir: Path) -> Option:
    path = conf_dir / group / f"{name}.yaml"
    header, comments = yaml_comments(path)
    values = dict(flatten(_container(node)))
    raw = _load(path)
    selects = tuple(
        f"{str(k).split('/')[-1].split('@')[0]}={v}"
        for entry in raw.get("defaults", [])
        if isinstance(entry, DictConfig)
        for k, v in entry.items()
    )
    return Option(group, name, header, values, comments, selects)


def top_level(conf_dir: Path = CONF_DIR) -> Option:
    """The keys of ``config.yaml`` itself (outside every group; Hydra's own settings left out)."""
    cfg = compose_config()
    names = set(groups(conf_dir))
    values = {
        key: value
        for key, value in flatten(_container(cfg))
        if key.split(".", 1)[0] not in names | {"hydra"}
    }
    header, comments = yaml_comments(conf_dir / "config.yaml")
    return Option("", "config", header, values, comments)


def known_keys(conf_dir: Path = CONF_DIR) -> set[str]:
    """Every dotted key some option defines (``guard.alpha``, ``train.dp.epsilon``, ...).

    Inner nodes count too (``train.dp``), and so do the top-level keys (``num_users``).
    """
    keys: set[str] = set()
    options = [top_level(conf_dir), *load_options(conf_dir).values()]
    for option in options:
        for key in option.values:
            full = f"{option.group}.{key}" if option.group else key
            parts = full.split(".")
            keys.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return keys


def _value(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    text = text if text != "" else '""'
    return f"`{text}`" if "`" not in text else text


def _table(option: Option) -> list[str]:
    prefix = f"{option.group}." if option.group else ""
    rows = ["| key | default | comment |", "|---|---|---|"]
    for key, value in option.values.items():
        comment = option.comments.get(key, "").replace("|", "\\|")
        default = _value(value).replace("|", "\\|")
        rows.append(f"| `{prefix}{key}` | {default} | {comment} |")
    return rows


def render(conf_dir: Path = CONF_DIR) -> str:
    """The reference page (markdown) for every group and option of ``conf_dir``."""
    defaults = default_options(conf_dir)
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python scripts/config_reference.py` from conf/: do not edit. -->",
        "",
        "Every option of every config group, composed as `docl-flower` composes it. Defaults",
        "are shown as written in `conf/` (interpolations such as `${num_users}` unresolved);",
        "the comment is the one above the key in the option's YAML file. Select an option with",
        "`GROUP=OPTION` and set a key with `GROUP.KEY=VALUE`",
        "(see [Configuration](../configuration.md)).",
        "Regenerate this page with `python scripts/config_reference.py`.",
        "",
        "## Top level (`conf/config.yaml`)",
        "",
        *_table(top_level(conf_dir)),
    ]
    for group, options in groups(conf_dir).items():
        listed = ", ".join(
            f"`{o}` (default)" if defaults.get(group) == o else f"`{o}`" for o in options
        )
        out += ["", f"## `{group}`", "", f"Options: {listed}."]
        for name in options:
            option = load_option(group, name, conf_dir)
            out += ["", f"### `{group}={name}`", ""]
            if option.description:
                out += [option.description, ""]
            if option.selects:
                also = ", ".join(f"`{s}`" for s in option.selects)
                out += [f"Also selects {also}.", ""]
            out += _table(option)
    return "\n".join(out) + "\n"


def write(out: Path = DEFAULT_OUT, conf_dir: Path = CONF_DIR) -> Path:
    """Write the reference page to ``out`` (folders created) and return its path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(conf_dir), encoding="utf-8")
    return out
