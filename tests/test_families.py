"""One table of model families (``nodes/families.py``): the tests' tiny models, the docs and the node description
agree with it, so adding a family is one entry there plus its tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import tiny_dits
from comfy_harness import pack_families

families = pack_families()
BY_CLASS, FAMILIES, transformer_labels = families.BY_CLASS, families.FAMILIES, families.transformer_labels

DOCS = (Path(__file__).resolve().parents[1] / "docs" / "compatibility.md").read_text(encoding="utf-8")


def docs_table(heading: str) -> str:
    """The families table that follows ``heading`` in docs/compatibility.md."""
    after = DOCS[DOCS.index(heading) :]
    return re.search(r"\| \| Families \|\n(?:\|.*\|\n)+", after).group(0)


def test_every_tiny_family_is_in_the_table_with_the_same_verdict():
    for name, family in tiny_dits.FAMILIES.items():
        assert BY_CLASS[family.diffusion_model].attention, name
    for name, family in tiny_dits.REFUSED.items():
        assert not BY_CLASS[family.diffusion_model].attention, name
    tested = {f.diffusion_model for f in (*tiny_dits.FAMILIES.values(), *tiny_dits.REFUSED.values())}
    untested = {f.class_name for f in FAMILIES if not f.tested} | {"UNetModel"}  # U-Nets: their own tests
    assert tested | untested == set(BY_CLASS), "a family without a tiny model, or marked untested wrongly"


def test_docs_tables_name_every_family_each_node_takes():
    attention, encoder = docs_table("**Attention Map Reuse**"), docs_table("**Encoder Feature Propagation**")
    for family in FAMILIES:
        if family.class_name == "UNetModel":
            continue  # "U-Nets (SD1.x, SDXL)" in both tables
        for name in family.names:
            assert name in attention, f"docs/compatibility.md: {name} missing from the Attention Map Reuse table"
            if family.stacks:
                assert name in encoder.split("Refused")[0], f"{name} missing from the Encoder Feature Propagation table"
            if family.refused:
                assert name in encoder.split("Refused")[1], f"{name}: refused, the docs must say so"


def test_the_encoder_node_describes_the_table():
    description = (Path(__file__).resolve().parents[1] / "nodes" / "encoder_node.py").read_text(encoding="utf-8")
    assert "transformer_labels()" in description  # the description is made from the table, not written out
    assert all(f.label in transformer_labels() for f in FAMILIES if f.stacks)
