"""Tables for ``--comfyui`` mode: the row dicts returned by the ComfyUI timing modules, as Markdown and JSON."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * len(columns)) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_comfy_tables(tables: dict[str, list[dict]], out: Path, *, quick: bool, comfyui: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# reuse_bench --comfyui ({'quick' if quick else 'full'})\n\nReal ComfyUI at `{comfyui}`, "
        f"SD1.5-shaped U-Net with random weights (timing only); {platform.processor() or platform.machine()}, "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}.\n"
    )
    body = ""
    for name, rows in tables.items():
        # Rows may carry a "table" key (e.g. "unet" / "end_to_end"): one Markdown table per value.
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(str(row.get("table", "")), []).append({k: v for k, v in row.items() if k != "table"})
        for group, group_rows in groups.items():
            body += f"\n## {name}{f' ({group})' if group else ''}\n\n{markdown_table(group_rows)}"
    paths = {"table": out / "comfyui_results.md", "json": out / "comfyui_results.json"}
    paths["table"].write_text(header + body)
    paths["json"].write_text(
        json.dumps({"quick": quick, "comfyui": str(comfyui), "tables": tables}, indent=1, default=str)
    )
    return paths
