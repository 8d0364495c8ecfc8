"""The documentation: the generated config reference is current, the README stays a short front door
whose links resolve, and the MkDocs hook rewrites root files' links for the site.
(`make docs` builds the site with `mkdocs build --strict`, which checks every link and anchor in it.)"""

import dataclasses
import re

from fednano.config import RunConfig
from fednano.docs_gen import CONFIG_PAGE, _cell, config_reference, site_links
from tests.conftest import ROOT


def test_the_config_reference_is_generated_from_the_config():
    # docs/reference/config.md is generated from the dataclasses' help texts: it cannot drift.
    assert CONFIG_PAGE.read_text() == config_reference(), "run `python -m fednano.docs_gen`"


def test_the_config_reference_has_one_row_per_option():
    page = config_reference()
    for section in dataclasses.fields(RunConfig):
        assert f"## [{section.name}]" in page
        for f in dataclasses.fields(getattr(RunConfig(), section.name)):
            assert len(re.findall(rf"^\| `{section.name}\.{f.name}` \|", page, re.M)) == 1, f"{section.name}.{f.name}"


def test_a_help_text_stays_one_table_cell():
    # Prepare / Execute / Assert: a pipe would split the row; '<x>' outside code would vanish as HTML.
    text = "a | b <x> `<stem>_test.json`\nnext"
    cell = _cell(text)
    assert cell == "a \\| b &lt;x> `<stem>_test.json` next"


def test_the_readme_is_a_short_front_door_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to its docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_root_files_links_are_rewritten_for_the_site():
    text = (
        "[gpus](docs/guides/gpus.md) [b](BENCHMARKS.md#the-split-step) ![c](docs/bench/curves.png) "
        "[h](CHANGELOG.md) [r](README.md) [w](https://flower.ai) [a](#local)"
    )
    assert site_links(text) == (
        "[gpus](guides/gpus.md) [b](benchmarks.md#the-split-step) ![c](bench/curves.png) "
        "[h](changelog.md) [r](index.md) [w](https://flower.ai) [a](#local)"
    )
