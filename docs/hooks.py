"""MkDocs hook: serve the repository's figures without copying them into ``docs/``.

The experiment scripts write their PNGs to ``figures/``, ``faces/``, ``privacy/`` and
``comparison/``; the pages link them as ``../figures/NAME.png`` (which GitHub renders as well)
and this hook adds each PNG to the site under ``figures/NAME.png``, so that MkDocs resolves
those links and strict mode still fails on a missing figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

#: The repository's folders whose PNGs the pages show.
FIGURE_DIRS = ("figures", "faces", "privacy", "comparison")


def on_files(files: Files, config: Any) -> Files:
    """Add every PNG of :data:`FIGURE_DIRS` as ``../DIR/NAME.png`` served at ``DIR/NAME.png``."""
    root = Path(config.config_file_path).parent
    for folder in FIGURE_DIRS:
        for png in sorted((root / folder).glob("*.png")):
            rel = png.relative_to(root).as_posix()
            file = File.generated(
                config, f"../{rel}", abs_src_path=str(png), inclusion=InclusionLevel.INCLUDED
            )
            file.dest_uri = rel
            files.append(file)
    return files
