"""The benchmark's outputs: the JSON record, the printed table and the PNG chart, all from one results dict.

The JSON is the record of a run (settings, versions, the card's name, every raw timing), rewritten atomically after
each phase so a cut-short run still leaves a valid file. The table and the chart are views of it: one row per
result with its floor and the fraction of the floor reached (throughput / floor throughput; for latency,
floor / latency). The chart uses matplotlib when it is importable and otherwise draws the same rows with Pillow,
which the package already depends on, so a bare GPU box still gets a picture.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import math
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fp4serve import __version__

SCHEMA = "fp4serve-bench/1"
SECTIONS = ("decode", "prefill", "ttft")
SECTION_TITLES = {
    "decode": "decode tok/s (log scale; | = floor)",
    "prefill": "prefill tok/s (log scale; | = floor)",
    "ttft": "time to first token, ms (log scale; | = floor)",
}
COLORS = {"nvfp4": (31, 119, 180), "bf16": (255, 127, 14), "transformers": (44, 160, 44)}


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return str(__import__(module).__version__)
    except Exception:  # a broken optional install must not stop the record
        return None


def run_info(device: torch.device) -> dict[str, Any]:
    """Who ran where: versions, the device's name and size, the date."""
    info: dict[str, Any] = {
        "schema": SCHEMA,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fp4serve": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "device_type": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=torch.cuda.get_device_name(device),
            device_memory_bytes=props.total_memory,
            device_capability=f"{props.major}.{props.minor}",
        )
    else:
        info.update(
            device_name=f"cpu ({platform.processor() or platform.machine()})", cpu_threads=torch.get_num_threads()
        )
    return info


def format_rate(value: float, unit: str) -> str:
    """1.234e12, "B/s" -> '1.23 TB/s' (decimal prefixes, as bandwidths, FLOP rates and model sizes are quoted)."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def default_output_path(results: dict[str, Any], directory: Path = Path("bench/results")) -> Path:
    """bench/results/<card>-<geometry>-<UTC timestamp>.json"""
    name = results["device_name"] if results["device_type"] == "cuda" else "cpu"
    stamp = dt.datetime.fromisoformat(results["date"]).strftime("%Y%m%d-%H%M%S")
    return directory / f"{device_slug(name)}-{results['settings']['geometry']}-{stamp}.json"


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Row:
    kind: str  # model key: nvfp4, bf16, transformers
    model: str  # display label
    section: str  # decode, prefill, ttft
    measurement: str
    value: float | None  # tok/s (decode, prefill) or ms (ttft); None when not measured
    floor: float | None
    fraction: float | None
    detail: str  # the result column's text (or why there is no result)


def rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for kind, entry in results.get("models", {}).items():
        label = entry.get("label", kind)
        for section in SECTIONS:
            items = entry.get(section)
            if items is None:
                continue
            for item in items if isinstance(items, list) else [items]:
                out.append(_row(kind, label, section, item))
    return out


def _row(kind: str, label: str, section: str, item: dict[str, Any]) -> Row:
    if section == "decode":
        what = f"decode b={item['batch']}"
        if "context_len" in item:
            what += f" ctx={item['context_len']}"
    elif section == "prefill":
        what = f"prefill {item['num_prompts']}x{item['prompt_len']}" if "num_prompts" in item else "prefill"
    else:
        what = f"TTFT {item['prompt_len']} tok" if "prompt_len" in item else "TTFT"
    if item.get("status") != "ok":
        return Row(kind, label, section, what, None, None, None, item.get("status", "not run"))
    if section == "ttft":
        return Row(
            kind,
            label,
            section,
            what,
            item["ms_median"],
            item["floor_ms"],
            item["fraction_of_floor"],
            f"{item['ms_median']:,.1f} ms",
        )
    detail = f"{item['tok_s']:,.1f} tok/s"
    if section == "decode":
        detail += f" ({item['step_ms_median']:.2f} ms/step)"
    else:
        detail += f" ({item['seconds_median']:.3f} s)"
    return Row(kind, label, section, what, item["tok_s"], item["floor_tok_s"], item["fraction_of_floor"], detail)


def format_table(results: dict[str, Any]) -> str:
    ceilings = results.get("ceilings") or {}
    lines = [
        f"fp4serve bench — {results.get('device_name', '?')}, geometry {results['settings']['geometry']}, "
        f"torch {results.get('torch')}, triton {results.get('triton')}",
    ]
    if ceilings:
        lines.append(
            f"measured ceilings: copy {format_rate(ceilings['copy_bytes_per_s'], 'B/s')} (read+write), "
            f"matmul {format_rate(ceilings['matmul_flops_per_s'], 'FLOP/s')} ({ceilings['matmul_dtype']})"
        )
    for kind, entry in results.get("models", {}).items():
        status = entry.get("status", "?")
        memory = ""
        if "weight_bytes" in entry:
            memory = f"weights {format_rate(entry['weight_bytes'], 'B')}"
            if "cache_bytes" in entry:
                memory += f", caches {format_rate(entry['cache_bytes'], 'B')}"
            if "peak_memory_allocated" in entry:
                memory += f", peak allocated {format_rate(entry['peak_memory_allocated'], 'B')}"
            memory += "; "
        lines.append(f"{entry.get('label', kind)}: {memory}{status}")
        lines.extend(f"  note: {n}" for n in entry.get("notes", []))
    header = ("model", "measurement", "result", "floor", "of floor")
    body = []
    for r in rows(results):
        unit = "ms" if r.section == "ttft" else "tok/s"
        floor = "" if r.floor is None else f"{r.floor:,.1f} {unit}"
        fraction = "" if r.fraction is None else f"{100 * r.fraction:.1f}%"
        body.append((r.model, r.measurement, r.detail, floor, fraction))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += ["", fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*b) for b in body]
    return "\n".join(lines)


def write_chart(path: Path, results: dict[str, Any], backend: str = "auto") -> str:
    """Draw the rows as log-scale bars with floor marks; returns the backend used ("matplotlib" or "pillow")."""
    chart_rows = [r for r in rows(results) if r.value is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    use_mpl = backend == "matplotlib" or (backend == "auto" and importlib.util.find_spec("matplotlib") is not None)
    # plain ASCII: Pillow's default font has no dashes or middle dots
    title = f"fp4serve bench - {results.get('device_name', '?')} - geometry {results['settings']['geometry']}"
    if use_mpl:
        _chart_matplotlib(path, chart_rows, title)
        return "matplotlib"
    _chart_pillow(path, chart_rows, title)
    return "pillow"


def _sections(chart_rows: list[Row]) -> list[tuple[str, list[Row]]]:
    return [(s, [r for r in chart_rows if r.section == s]) for s in SECTIONS if any(r.section == s for r in chart_rows)]


def _log_range(section_rows: list[Row]) -> tuple[float, float]:
    values = [v for r in section_rows for v in (r.value, r.floor) if v is not None and v > 0]
    return math.log10(min(values)) - 0.3, math.log10(max(values)) + 0.15


def _label(r: Row) -> str:
    return f"{r.model}, {r.measurement}"


def _annotation(r: Row) -> str:
    unit = "ms" if r.section == "ttft" else "tok/s"
    text = f"{r.value:,.1f} {unit}"
    if r.fraction is not None:
        text += f"  ({100 * r.fraction:.0f}% of floor)"
    return text


def _chart_matplotlib(path: Path, chart_rows: list[Row], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = _sections(chart_rows)
    heights = [max(1, len(rs)) for _, rs in sections] or [1]
    fig, axes = plt.subplots(
        len(heights),
        1,
        figsize=(12, 1.2 + 0.45 * sum(heights) + 0.6 * len(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (section, rs) in zip(axes[:, 0], sections, strict=False):
        lo, hi = _log_range(rs)
        y = list(range(len(rs)))[::-1]
        colors = [tuple(c / 255 for c in COLORS.get(r.kind, (128, 128, 128))) for r in rs]
        ax.barh(y, [r.value for r in rs], color=colors, height=0.6)
        floors = [(yy, r.floor) for yy, r in zip(y, rs, strict=True) if r.floor]
        if floors:
            ax.scatter([f for _, f in floors], [yy for yy, _ in floors], marker="|", s=300, color="black", zorder=3)
        ax.set_xscale("log")
        ax.set_xlim(10**lo, 10 ** (hi + 0.6))
        ax.set_yticks(y, [_label(r) for r in rs], fontsize=8)
        for yy, r in zip(y, rs, strict=True):
            ax.text(r.value * 1.05, yy, _annotation(r), va="center", fontsize=8)
        ax.set_title(SECTION_TITLES[section], fontsize=9, loc="left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _chart_pillow(path: Path, chart_rows: list[Row], title: str) -> None:
    from PIL import Image, ImageDraw

    width, label_w, bar_w, row_h, head_h = 1100, 330, 430, 22, 26
    sections = _sections(chart_rows)
    height = 40 + sum(head_h + row_h * len(rs) + 10 for _, rs in sections) + 10
    img = Image.new("RGB", (width, max(height, 80)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")
    y = 40
    for section, rs in sections:
        draw.text((10, y + 6), SECTION_TITLES[section], fill="black")
        y += head_h
        lo, hi = _log_range(rs)
        x0 = label_w + 10

        def x_of(v: float, lo: float = lo, hi: float = hi, x0: int = x0) -> int:
            return x0 + round(bar_w * (math.log10(v) - lo) / (hi - lo))

        # a light grid line at every power of ten, labelled in the section's heading row
        for decade in range(math.ceil(lo), math.floor(hi) + 1):
            gx = x_of(10.0**decade)
            draw.line((gx, y, gx, y + row_h * len(rs)), fill=(220, 220, 220))
            draw.text((gx - 8, y - 14), f"{10**decade:g}", fill="gray")
        for r in rs:
            draw.text((10, y + 5), _label(r)[:52], fill="black")
            draw.rectangle((x0, y + 4, max(x0 + 1, x_of(r.value)), y + row_h - 4), fill=COLORS.get(r.kind, "gray"))
            if r.floor:
                fx = x_of(r.floor)
                draw.line((fx, y + 1, fx, y + row_h - 1), fill="black", width=2)
            draw.text((x0 + bar_w + 12, y + 5), _annotation(r), fill="black")
            y += row_h
        draw.line((x0, y - len(rs) * row_h, x0, y), fill="gray")
        y += 10
    img.save(path, format="PNG")
