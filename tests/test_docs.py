"""docs/: the config reference is generated and current; every code comment cites files inside the repo."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pydantic import Field

from schemas import docgen
from schemas.config import RunConfig, Section

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_current():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == docgen.render(), "docs/config.md is stale: run `python -m schemas.docgen`"


def test_config_reference_has_every_key_with_its_default():
    text = docgen.render()
    keys = docgen.documented_keys()
    assert {"root", "schedule.windows", "train.adversarial.lambda_adv", "evaluate.nfes"} <= set(keys)
    for key in keys:
        assert f"| `{key}` |" in text, key
    lr_row = next(line for line in text.splitlines() if line.startswith("| `train.lr` |"))
    assert f"`{RunConfig().train.lr}`" in lr_row


class _Variant(Section):
    """One named variant."""
    method: str = "ota"                  # the method it trains
    options: dict = Field(default_factory=dict, description="its options")


class _Inner(Section):
    depth: int = Field(3, ge=1)          # how deep,
                                         # continued
    # a comment line above a key describes it
    width: float = 0.5

    # a comment after a blank line, then a key with its own comment
    height: int = 2                      # its own


class _Toy(Section):
    name: str = "x"                      # a name
    inner: _Inner = Field(default_factory=_Inner)
    variants: dict[str, _Variant] = Field(default_factory=dict)   # named variants
    rows: list[_Variant] | None = None


def test_generator_walks_nested_sections_dicts_and_lists_and_reads_comments():
    undescribed: list[str] = []
    text = docgen.render(_Toy, undescribed)
    assert "| `name` | str | `\"x\"` |  | a name |" in text
    assert "| `inner.depth` | int | `3` | >= 1 | how deep, continued |" in text
    assert "| `variants.<name>.method` | str | `\"ota\"` |  | the method it trains |" in text
    assert "| `variants.<name>.options` | dict | `{}` |  | its options |" in text
    assert "| `rows[].method` |" in text and "One named variant." in text
    assert "| `inner.width` | float | `0.5` |  | a comment line above a key describes it |" in text
    assert "| `inner.height` | int | `2` |  | its own |" in text
    assert undescribed == ["rows"]
    assert docgen.documented_keys(_Toy) == ["name", "inner.depth", "inner.width", "inner.height", "variants",
                                            "variants.<name>.method", "variants.<name>.options", "rows",
                                            "rows[].method", "rows[].options"]


def test_docgen_check_flags_a_stale_file(tmp_path):
    stale = tmp_path / "config.md"
    stale.write_text("old\n")
    cmd = [sys.executable, "-m", "schemas.docgen", "--check", "-o", str(stale)]
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 1
    subprocess.run(cmd[:3] + ["-o", str(stale)], cwd=ROOT, check=True, capture_output=True)
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0


def test_no_code_cites_a_file_outside_the_repository():
    offenders = []
    for folder in ("pipeline", "stages", "schemas", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"METHODS\.md|ARCHITECTURE\.md|" + "/work/" + "shared", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders, offenders


def test_every_docs_link_in_code_points_to_an_existing_file():
    cited = set()
    for folder in ("pipeline", "stages", "schemas", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            cited |= set(re.findall(r"docs/[\w.-]+\.md", path.read_text()))
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, missing


def test_links_between_docs_resolve():
    """Relative links in docs/*.md resolve from docs/, the README's from the repo root."""
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        base = page.parent
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (base / target).exists():
                broken.append(f"{page.name} -> {target}")
    assert not broken, broken


def test_example_yaml_comments_nest_and_continue(tmp_path):
    path = tmp_path / "ex.yaml"
    path.write_text("train:\n  variants: {}   # named runs, e.g.\n                 #   a: {method: ota}\n"
                    "  # about the next key, not a continuation\n  steps: 3\n  adversarial:\n    lr: 1  # D lr\n")
    assert docgen.example_comments(path) == {"train.variants": "named runs, e.g. a: {method: ota}",
                                             "train.adversarial.lr": "D lr"}
