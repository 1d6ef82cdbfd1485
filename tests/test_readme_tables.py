"""The README's "Tables and columns" documents every table of `tables` column by column:
names, types, nullability, descriptions and primary keys as the schemas say.

The section is generated from the schemas: ``python tests/test_readme_tables.py`` rewrites
it in place (between its two marker comments); the test fails when it is out of date."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lexer_activity_async.tables import EXPORT_SCHEMAS, SCHEMAS, TableSchema

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = (
    "<!-- tables:begin (generated: python tests/test_readme_tables.py) -->",
    ("<!-- tables:end -->"),
)


def _table(schema: TableSchema, what: str) -> str:
    key = ", ".join(f"`{name}`" for name in schema.primary_key)
    lines = [
        f"#### `{schema.table}` ({what}, version {schema.version})",
        "",
        f"Primary key: {key}.",
        "",
        "| column | type | nullable | description |",
        "|---|---|---|---|",
    ]
    for column in schema.columns:
        null = "yes" if column.nullable else "no"
        kind = "timestamp (UTC)" if column.type.value == "timestamp" else column.type.value
        text = column.description.replace("|", "\\|")
        lines.append(f"| `{column.name}` | {kind} | {null} | {text} |")
    return "\n".join(lines)


def render() -> str:
    """The section's generated part, from the schemas."""
    parts = [_table(s, "report") for s in SCHEMAS.values()]
    parts += [_table(s, "export") for s in EXPORT_SCHEMAS.values()]
    return "\n\n".join([BEGIN, *parts, END])


def _section(text: str) -> str:
    match = re.search(re.escape(BEGIN) + ".*?" + re.escape(END), text, re.DOTALL)
    assert match, "README.md has no generated tables section"
    return match.group(0)


def test_the_readme_documents_every_table_as_the_schemas_say() -> None:
    text = README.read_text("utf-8")
    assert "### Tables and columns" in text
    assert _section(text) == render(), "run: python tests/test_readme_tables.py"


def test_the_readme_rows_parse_back_to_the_schemas() -> None:
    """Independent of the renderer: each documented table's column names, types and key,
    read back from the Markdown, are the schema's."""
    section = _section(README.read_text("utf-8"))
    documented: dict[str, tuple[list[tuple[str, str]], list[str]]] = {}
    for block in section.split("#### ")[1:]:
        name = block.split("`")[1]
        key = re.findall(r"`([^`]+)`", block.split("Primary key:")[1].split("\n")[0])
        rows = re.findall(r"^\| `([^`]+)` \| ([a-z0-9]+)", block, re.MULTILINE)
        documented[name] = (rows, key)
    schemas = [*SCHEMAS.values(), *EXPORT_SCHEMAS.values()]
    assert set(documented) == {s.table for s in schemas}
    for schema in schemas:
        rows, key = documented[schema.table]
        assert rows == [(c.name, c.type.value) for c in schema.columns], schema.table
        assert tuple(key) == schema.primary_key, schema.table


def test_every_column_has_a_real_description() -> None:
    for schema in [*SCHEMAS.values(), *EXPORT_SCHEMAS.values()]:
        for column in schema.columns:
            assert len(column.description) > 8, (schema.table, column.name)
            assert "as the API reports it" not in column.description


if __name__ == "__main__":  # regenerate the README's section
    text = README.read_text("utf-8")
    README.write_text(text.replace(_section(text), render()), "utf-8")
    sys.exit(0)
