"""Every setting is documented once (OffloadConfig's docstring); app.py --help and the README table follow it."""

import re
import subprocess
import sys
from dataclasses import fields

from moe_runtime.config import OffloadConfig
from moe_runtime.paths import REPO_ROOT


def test_every_setting_has_its_doc():
    docs = OffloadConfig.field_docs()
    assert [f.name for f in fields(OffloadConfig)] == list(docs)
    assert all(len(text) > 20 for text in docs.values())


def test_app_help_shows_each_settings_doc():
    shown = subprocess.run([sys.executable, "app.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                           env={"COLUMNS": "10000", "PATH": ""}, check=True).stdout
    flat = " ".join(shown.split())
    for name, doc in OffloadConfig.field_docs().items():
        assert " ".join(doc.split()).replace("%%", "%") in flat, name


def _readme_rows() -> dict[str, str]:
    """README's OffloadConfig table: field name -> the default shown for it."""
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme[readme.index("| field | values | default |"):]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0])
        defaults = [d.strip().strip("`") for d in cells[-1].split(",")]
        rows.update(zip(names, defaults if len(defaults) == len(names) else [cells[-1]] * len(names)))
    return rows


def test_readme_table_lists_every_setting_with_its_default():
    rows = _readme_rows()
    for f in fields(OffloadConfig):
        assert f.name in rows, f"README's OffloadConfig table lacks {f.name}"
        default = getattr(OffloadConfig(), f.name)
        shown = f'"{default}"' if isinstance(default, str) else repr(default)
        assert rows[f.name] == shown, (f.name, rows[f.name], shown)
