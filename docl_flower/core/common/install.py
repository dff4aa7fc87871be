"""Where this copy of docl-flower lives, and where the project folder (``data/``, ``conf/``) is.

The ``docl-flower`` command imports the package from the project folder (an editable
install). A ServerApp started by ``flwr run`` imports it from the app bundle that Flower
unpacked under ``$FLWR_HOME/apps``, which holds only Python and YAML files: data sets and the
native kernel's C++ source are then found in the installed distribution's project folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import urllib.parse
from pathlib import Path

#: The folder that holds this copy of the package (the project, or an unpacked app bundle).
PACKAGE_ROOT = Path(__file__).resolve().parents[3]


def installed_project() -> Path | None:
    """The project folder of an editable install of ``docl-flower`` (``None`` otherwise)."""
    try:
        dist = importlib.metadata.distribution("docl-flower")
        raw = dist.read_text("direct_url.json") or "{}"
        info = json.loads(raw)
    except (importlib.metadata.PackageNotFoundError, json.JSONDecodeError, OSError):
        return None
    url = str(info.get("url", "")) if isinstance(info, dict) else ""
    editable = isinstance(info, dict) and bool(info.get("dir_info", {}).get("editable"))
    if not (editable and url.startswith("file://")):
        return None
    return Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))


def project_root() -> Path:
    """The project folder: this copy's root when it holds ``data/``, else the installed one."""
    if (PACKAGE_ROOT / "data").is_dir():
        return PACKAGE_ROOT
    installed = installed_project()
    if installed is not None and (installed / "data").is_dir():
        return installed
    return PACKAGE_ROOT


def package_file(relative: str) -> Path | None:
    """A file of the package (``docl_flower/...``) that an app bundle may lack.

    Looked up in this copy, in the installed distribution, then in an editable install's
    project folder; ``None`` when none has it.
    """
    candidates = [PACKAGE_ROOT / relative]
    try:
        dist = importlib.metadata.distribution("docl-flower")
        candidates.append(Path(str(dist.locate_file(relative))))
    except importlib.metadata.PackageNotFoundError:
        pass
    installed = installed_project()
    if installed is not None:
        candidates.append(installed / relative)
    return next((p for p in candidates if p.is_file()), None)
