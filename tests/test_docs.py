"""The documentation stays honest: the site builds strictly, and what it names still exists.

README.md and docs/ name config keys (``guard.alpha=2``, `` `strategy.max_block_share` ``),
config options (``features=face``), files, ``make`` targets and tests; each must exist. The
site builds with ``mkdocs build --strict`` (a broken link or anchor fails it), and the
configuration reference in docs/reference/ equals a fresh one generated from conf/. Each
check is also shown to fail on a made-up reference.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml
from markdown.extensions.toc import slugify
from omegaconf import OmegaConf

from docl_flower.operations.config_reference import (
    CONF_DIR,
    DEFAULT_OUT,
    flatten,
    groups,
    known_keys,
    render,
)

from .conftest import PROJECT_ROOT

MKDOCS = Path(sys.executable).with_name("mkdocs")
README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"
#: Longest README: the front door, the rest lives in docs/.
README_MAX_LINES = 250


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _rel(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT))


def plain(text: str) -> str:
    """``text`` without markdown backslash escapes (``random\\_classes`` -> ``random_classes``)."""
    return re.sub(r"\\([\\`*_{}\[\]()#+\-.!<>|])", r"\1", text)


def code_of(text: str) -> str:
    """The code of ``text``: fenced blocks and inline code spans, one per line."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"``(.+?)``|`([^`\n]+)`", rest)
    return "\n".join([*blocks, *(a or b for a, b in spans)])


def build_site(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of ``config`` into ``site`` (offline; stdout and stderr)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


# ---------------------------------------------------------------- the site


def test_the_site_builds_strictly_without_a_warning(tmp_path):
    proc = build_site(PROJECT_ROOT / "mkdocs.yml", tmp_path / "site")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "WARNING" not in out, out
    pages = ["concepts", "configuration", "experiments", "deployment", "serving"]
    pages += ["reliability", "privacy", "scale", "development", "reference/config"]
    for page in pages:
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    assert (tmp_path / "site" / "figures" / "fig2_per_class.png").is_file()


def test_a_broken_link_or_anchor_fails_the_strict_build(tmp_path):
    settings = yaml.safe_load((PROJECT_ROOT / "mkdocs.yml").read_text())
    for key in ("nav", "hooks", "exclude_docs", "site_dir"):
        settings.pop(key, None)
    (tmp_path / "docs").mkdir()
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump({**settings, "docs_dir": "docs"}))
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[fine](other.md#part)\n")
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Part\n")
    assert build_site(tmp_path / "mkdocs.yml", tmp_path / "site").returncode == 0

    (tmp_path / "docs" / "index.md").write_text(
        "# Home\n\n[gone](missing.md) and [no anchor](other.md#no-such-part)\n"
    )
    proc = build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "missing.md" in out, out
    assert "no-such-part" in out, out


# ---------------------------------------------------------------- config keys


@cache
def config_keys() -> frozenset[str]:
    """Every key an option defines, and the Hydra settings ``conf/config.yaml`` makes."""
    hydra = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").hydra)
    keys = set(known_keys())
    for key, _ in flatten(hydra, "hydra"):
        parts = key.split(".")
        keys.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return frozenset(keys)


#: ``name=value`` as a command line writes it (not ``--flag=``, ``user-id=``, ``ENV=``).
OVERRIDE = re.compile(r"(?<![\w./$:-])([a-z_]\w*(?:\.\w+)*)=([\w.,-]*)")
#: A dotted name that starts with a config group (``guard.max_alpha``, not ``x.guard.y``).
DOTTED = re.compile(r"(?<![\w./:-])([a-z_]\w*(?:\.[A-Za-z_]\w*)+)(?![\w/(-])")
#: Files whose names start like a config group (``strategy.py``): not config keys.
FILE_SUFFIXES = {"py", "json", "yaml", "md", "cpp", "png", "toml", "sh", "txt", "lock", "pem"}


def unknown_config_refs(text: str) -> list[str]:
    """Config keys and options that ``text`` writes and the config does not have."""
    text = plain(text)
    table = groups()
    keys = config_keys()
    roots = set(table) | {k for k in keys if "." not in k}
    bad: list[str] = []
    for name, value in OVERRIDE.findall(text):
        if "." not in name and name in table:
            options = value.rstrip(".,").split(",")  # `features=face.` ends a sentence
            for option in (o for o in options if re.fullmatch(r"\w+", o)):
                if not (CONF_DIR / name / f"{option}.yaml").is_file():
                    bad.append(f"{name}={option}")
        elif name.split(".")[0] in roots and name not in keys:
            bad.append(name)
    for name in DOTTED.findall(text):
        if name.split(".")[0] not in table or name.rsplit(".", 1)[1] in FILE_SUFFIXES:
            continue
        if name not in keys:
            bad.append(name)
    return sorted(set(bad))


@pytest.mark.parametrize("path", doc_files(), ids=_rel)
def test_every_config_key_the_docs_write_exists(path):
    assert unknown_config_refs(path.read_text(encoding="utf-8")) == []


def test_the_key_check_reports_what_does_not_exist():
    doc = (
        "Run `docl-flower guard.no_such_key=1 guard.alpha=2 features=face,no_such_option`;\n"
        "`guard.max_alphaa` is not `guard.max_alpha`. Not keys: `docl_flower.core.filter`,\n"
        "`federation/strategy.py`, `strategy.py`, `--run-config`, `user-id=0`, `A_B=1`.\n"
        "Escaped: partition=random\\_classes. Hydra: `hydra.run.dir=x` but not `hydra.nope=1`.\n"
    )
    assert unknown_config_refs(doc) == [
        "features=no_such_option",
        "guard.max_alphaa",
        "guard.no_such_key",
        "hydra.nope",
    ]


# ---------------------------------------------------------------- files, targets, tests

#: A repository path as the docs write it (``core/...`` is short for ``docl_flower/core/...``),
#: optionally followed by ``:function`` or ``::test``.
PATH = re.compile(
    r"(?<![\w./-])((?:docl_flower|scripts|tests|conf|data|docs|core|federation|operations)"
    r"/[\w./-]*[\w/])(?:(::?)(\w+))?"
)
MAKE = re.compile(r"(?<![\w-])make ([a-z][\w-]*)")
TEST_NAME = re.compile(r"(?<![\w.])(test_\w+)(?:\[[^\]]*\])?(?![\w.])")
TEST_FILE = re.compile(r"(?<![\w/.])(test_\w+\.py)\b")
#: Paths the docs name on purpose although they do not exist.
GONE_ON_PURPOSE = {
    "data/data",  # Reliability: the tracked symlink that was removed (test_repository.py)
}


@cache
def _defined(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset(
        n.name
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    )


def _test_names() -> frozenset[str]:
    names: set[str] = set()
    for path in (PROJECT_ROOT / "tests").glob("test_*.py"):
        names |= _defined(path)
    return frozenset(names)


def make_targets() -> set[str]:
    text = (PROJECT_ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, flags=re.M))


def missing_references(text: str) -> list[str]:
    """Files, functions, ``make`` targets and tests that ``text`` names and that do not exist."""
    text = plain(text)
    bad: list[str] = []
    for raw, sep, name in PATH.findall(text):
        rel = raw.rstrip(".")
        if rel.split("/")[0] in ("core", "federation", "operations"):
            rel = f"docl_flower/{rel}"
        path = PROJECT_ROOT / rel
        if not path.exists():
            if raw not in GONE_ON_PURPOSE:
                bad.append(raw)
        elif sep and path.suffix == ".py" and name not in _defined(path):
            bad.append(f"{raw}{sep}{name}")
    code = code_of(text)
    bad += [f"make {t}" for t in MAKE.findall(code) if t not in make_targets()]
    known = _test_names()
    leaves = {key.rsplit(".", 1)[-1] for key in config_keys()}  # `test_fraction` is a key
    bad += [n for n in TEST_NAME.findall(code) if n not in known and n not in leaves]
    bad += [f for f in TEST_FILE.findall(text) if not (PROJECT_ROOT / "tests" / f).is_file()]
    return sorted(set(bad))


@pytest.mark.parametrize("path", doc_files(), ids=_rel)
def test_every_file_target_and_test_the_docs_name_exists(path):
    assert missing_references(path.read_text(encoding="utf-8")) == []


def test_the_reference_check_reports_what_does_not_exist():
    doc = (
        "`scripts/feature_stats.py face`, `core/device.py:fit_user`, `make no-such-target`,\n"
        "`test_repository.py::test_nothing_like_this`, `test_gone.py`.\n"
        "Fine: `scripts/extractor_ranges.py`, `core/pipeline/user_fit.py:fit_user`, `make docs`,\n"
        "`tests/test_docs.py`, `test_docs.py::test_the_readme_is_a_front_door`.\n"
    )
    assert missing_references(doc) == [
        "core/device.py",
        "make no-such-target",
        "scripts/feature_stats.py",
        "test_gone.py",
        "test_nothing_like_this",
    ]


# ---------------------------------------------------------------- the README


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES
    assert "make run" in README.read_text() and "make test" in README.read_text()


def _anchors(md: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", md.read_text(encoding="utf-8"), flags=re.S | re.M)
    headings = re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)
    return {slugify(h.replace("`", ""), "-") for h in headings}


def broken_local_links(md: Path) -> list[str]:
    """Links of ``md`` to local files (and headings of .md files) that do not exist."""
    text = re.sub(r"^```.*?^```", "", md.read_text(encoding="utf-8"), flags=re.S | re.M)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        path = (md.parent / file).resolve() if file else md
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
            bad.append(target)
    return bad


def test_the_readme_links_to_local_files_that_exist():
    assert broken_local_links(README) == []
    assert "docs/configuration.md" in README.read_text()


def test_the_link_check_reports_a_missing_file_and_anchor(tmp_path):
    doc = tmp_path / "x.md"
    (tmp_path / "y.md").write_text("# Y\n\n## A part\n")
    doc.write_text("[a](y.md#a-part) [b](y.md#gone) [c](z.md) [d](https://example.org/z.md)\n")
    assert broken_local_links(doc) == ["y.md#gone", "z.md"]


# ---------------------------------------------------------------- the configuration reference


def test_the_configuration_reference_is_up_to_date():
    assert DEFAULT_OUT.read_text(encoding="utf-8") == render(), (
        "docs/reference/config.md is stale: run python scripts/config_reference.py"
    )


def test_the_reference_lists_every_option_and_key():
    page = DEFAULT_OUT.read_text(encoding="utf-8")
    for group, options in groups().items():
        for option in options:
            assert f"### `{group}={option}`" in page
    assert "| `guard.max_alpha` | `2.0` | The loosest alpha" in page
    assert "| `train.dp.epsilon` | `null` | Total epsilon per autoencoder upload" in page


# --------------------------------------------------------------- the deployment guide's commands
#: The programs the guide's "Several machines" commands call, and how to ask each for its options.
GUIDE_PROGRAMS = {
    "flower-superlink": ["flower-superlink", "--help"],
    "flower-supernode": ["flower-supernode", "--help"],
    "flwr supernode register": ["flwr", "supernode", "register", "--help"],
    "flwr run": ["flwr", "run", "--help"],
    "python scripts/make_certs.py server": [
        sys.executable,
        "scripts/make_certs.py",
        "server",
        "-h",
    ],
    "python scripts/make_certs.py node-key": [
        sys.executable,
        "scripts/make_certs.py",
        "node-key",
        "-h",
    ],
    "docl-flower filter check": ["docl-flower", "filter", "check", "--help"],
}


def guide_commands() -> list[str]:
    """The shell commands of the fenced blocks of "Several machines" (continuations joined)."""
    text = (DOCS / "deployment.md").read_text()
    section = text[text.index("**Several machines**") : text.index("**A new user joins**")]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(line)
    return commands


def test_every_option_the_deployment_guide_passes_exists():
    # A flag that the installed Flower (or our scripts) does not know fails this test, not a
    # reader who pastes the command.
    bindir = Path(sys.executable).parent
    seen = set()
    for command in guide_commands():
        program = next((p for p in GUIDE_PROGRAMS if command.startswith(p + " ")), None)
        if program is None:
            continue
        seen.add(program)
        argv = GUIDE_PROGRAMS[program]
        if not argv[0].startswith("/"):
            argv = [str(bindir / argv[0]), *argv[1:]]
        help_text = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT, check=False
        ).stdout
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", command):
            assert flag in help_text, f"{program} has no {flag}: {command}"
    assert seen == set(GUIDE_PROGRAMS), sorted(set(GUIDE_PROGRAMS) - seen)
