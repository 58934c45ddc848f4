"""The benchmark report: pytest-benchmark records -> comparison rows -> text and markdown
tables, notes, a comparison with an earlier run, and one ratio chart per family.

matplotlib is imported only to draw (:func:`plot_family`).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

from ._machine import machine_line

#: The fields that identify a case (one row per case and peer).
CASE_KEYS = ("family", "op", "shape", "dtype", "device")

def records_from_pytest_json(raw: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One record per timed case: its ``extra_info``, ``median_s`` and the pytest-benchmark stats."""
    records = []
    for bench in raw.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        if not all(key in info for key in CASE_KEYS + ("impl",)):
            continue  # not written by the bench harness
        stats = {key: value for key, value in bench["stats"].items() if key != "data"}
        info.update(median_s=stats["median"], name=bench["name"], stats=stats)
        records.append(info)
    return records


def comparison_rows(records: List[Dict[str, Any]], unsupported: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Ours against each peer: one row per (family, op, shape, dtype, device, peer).

    A case with no peer timing gives one row with ``peer`` None; a peer that could not
    run the case gives a row with ``peer_ms`` None and its ``unsupported`` reason.
    """
    cases: Dict[tuple, Dict[str, Any]] = {}
    for record in records + [dict(entry, unsupported=True) for entry in unsupported]:
        cases.setdefault(tuple(record[key] for key in CASE_KEYS), {})[record["impl"]] = record
    rows = []
    for key, impls in cases.items():
        ours = impls.get("ours")
        peers = [name for name in impls if name != "ours"] or [None]
        for peer_name in peers:
            peer = impls.get(peer_name) if peer_name else None
            row: Dict[str, Any] = dict(zip(CASE_KEYS, key))
            row.update(
                ours_ms=_ms(ours), peer=peer_name, peer_ms=_ms(peer),
                ratio=None, ours_error=ours.get("max_error") if ours else None,
                peer_error=peer.get("max_error") if peer else None,
                ours_gflops=None, ours_gbps=None,
                ours_mem_mb=ours.get("peak_mem_MB") if ours else None,
                peer_mem_mb=peer.get("peak_mem_MB") if peer else None, mem_ratio=None,
                unsupported=peer.get("reason") if peer and peer.get("unsupported") else None,
                # Solvers stopped at an iteration cap before their tolerance (extra_info
                # "truncated"): their time is a lower bound of the time to the tolerance.
                peer_truncated=bool(peer and peer.get("truncated")),
                ours_truncated=bool(ours and ours.get("truncated")),
            )
            if row["ours_ms"] and row["peer_ms"]:
                row["ratio"] = row["peer_ms"] / row["ours_ms"]
            if row["ours_mem_mb"] and row["peer_mem_mb"] is not None:
                row["mem_ratio"] = row["peer_mem_mb"] / row["ours_mem_mb"]
            if row["ours_ms"]:  # (suites that count no flops or bytes, solvers: "-", not 0.0)
                row["ours_gflops"] = ours["flops"] / (row["ours_ms"] * 1e-3) / 1e9 if ours["flops"] else None
                row["ours_gbps"] = ours["bytes"] / (row["ours_ms"] * 1e-3) / 1e9 if ours["bytes"] else None
            rows.append(row)
    return rows


def _ms(record: Optional[Dict[str, Any]]) -> Optional[float]:
    if not record or record.get("unsupported") or record.get("median_s") is None:
        return None
    return record["median_s"] * 1e3


_COLUMNS = (
    ("family", "family"), ("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("device", "device"),
    ("ours_ms", "ours ms"), ("peer", "peer"), ("peer_ms", "peer ms"), ("ratio", "ratio"),
    ("ours_error", "err ours"), ("peer_error", "err peer"), ("ours_gflops", "GFLOP/s"), ("ours_gbps", "GB/s"),
)
# Shown only when some suite recorded peak memory (extra_info "peak_mem_MB").
_MEMORY_COLUMNS = (("ours_mem_mb", "ours MB"), ("peer_mem_mb", "peer MB"), ("mem_ratio", "mem ratio"))


def _columns(rows: List[Dict[str, Any]]):
    has_memory = any(row.get("ours_mem_mb") is not None for row in rows)
    return _COLUMNS + (_MEMORY_COLUMNS if has_memory else ())


def _cell(row: Dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "peer_ms" and row.get("unsupported"):
        return "unsupported"
    if value is None:
        return "-"
    if key in ("ours_ms", "peer_ms"):
        return _format_ms(value)
    if key == "ratio":
        # A truncated peer: its time to the tolerance is longer, the ratio a lower bound;
        # ours truncated: an upper bound (both truncated: no bound).
        bound = {(True, False): ">=", (False, True): "<="}.get((row.get("peer_truncated"), row.get("ours_truncated")), "")
        mark = "*" if row.get("peer_truncated") and row.get("ours_truncated") else ""
        return f"{bound}{value:.2f}x{mark}"
    if key in ("ours_error", "peer_error"):
        return f"{value:.1e}"
    if key in ("ours_gflops", "ours_gbps", "ours_mem_mb", "peer_mem_mb"):
        return f"{value:.1f}"
    if key == "mem_ratio":
        return f"{value:.2f}x"
    return str(value)


def _format_ms(ms: float) -> str:
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if ms >= limit:
            return f"{ms:.{digits}f}"
    return f"{ms:.3g}"  # three significant digits down to microseconds


def format_table(rows: List[Dict[str, Any]], markdown: bool = False) -> str:
    """The comparison rows as an aligned text table, or a markdown table."""
    columns = _columns(rows)
    header = [title for _, title in columns]
    body = [[_cell(row, key) for key, _ in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(cells[i]) for cells in [header] + body) for i in range(len(header))]
    numeric = {i for i, (key, _) in enumerate(columns) if key.endswith(("_ms", "ratio", "_error", "_gflops", "_gbps", "_mb"))}

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(cells) for cells in body])


def format_notes(records: List[Dict[str, Any]], unsupported: List[Dict[str, Any]]) -> str:
    """Footnotes: peers that could not run a case, and notes the suites recorded."""
    lines = []
    for entry in records + unsupported:
        text = entry.get("note") or (f"unsupported: {entry['reason']}" if entry.get("reason") else None)
        if text:
            where = " ".join(str(entry[key]) for key in ("op", "shape", "dtype", "device"))
            lines.append(f"- {entry['impl']} on {where}: {text}")
    return ("notes:\n" + "\n".join(lines)) if lines else ""


def format_compare(records: List[Dict[str, Any]], old: Dict[str, Any]) -> str:
    """Ours now against ours in an earlier ``results.json`` (or raw pytest-benchmark JSON)."""
    old_records = old.get("records") if "records" in old else records_from_pytest_json(old)
    # Hand-edited or foreign entries (not objects, missing keys, a non-numeric time) are
    # skipped: they raised AttributeError / TypeError tracebacks after the run.
    then = {tuple(r[k] for k in CASE_KEYS): r for r in old_records or []
            if isinstance(r, dict) and r.get("impl") == "ours" and all(k in r for k in CASE_KEYS)
            and isinstance(r.get("median_s"), (int, float)) and not isinstance(r.get("median_s"), bool)}
    rows = []
    for record in records:
        key = tuple(record[k] for k in CASE_KEYS)
        if record["impl"] != "ours" or key not in then or not then[key].get("median_s"):
            continue
        now_ms, then_ms = record["median_s"] * 1e3, then[key]["median_s"] * 1e3
        rows.append(list(key) + [_format_ms(now_ms), _format_ms(then_ms), f"{(now_ms / then_ms - 1) * 100:+.1f}%"])
    machine = old.get("machine", {})
    title = f"compared with {machine.get('timestamp', '?')} (git {str(machine.get('git_sha') or '?')[:10]}, {machine.get('cpu', '?')})"
    if not rows:
        return f"{title}: no matching cases"
    header = list(CASE_KEYS) + ["ours ms now", "ours ms then", "change"]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = [title + "; change < 0 means faster now"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    return "\n".join(lines)


def command_line(command: Optional[Dict[str, Any]]) -> str:
    """The run's settings in one line (sizes, families, device, -k, time budget)."""
    if not command:
        return "run settings: not recorded"
    budget = command.get("time_budget_s")
    sizes = "--full (the papers' sizes)" if command.get("full") else "default sizes"
    budget = f"{budget} s" if budget else f"the default time ({2.0 if command.get('full') else 0.4} s)"
    return (f"run: {sizes}, "
            f"device {command.get('device', '?')}, families {', '.join(command.get('families') or [])}"
            + (f", -k {command['keyword']!r}" if command.get("keyword") else "")
            + f", {budget} per case")


def markdown_report(machine: Dict[str, Any], rows: List[Dict[str, Any]], notes: str, comparison: str,
                    command: Optional[Dict[str, Any]] = None) -> str:
    """A run's ``results.md``: the machine and run lines, the legend, the table, notes and any comparison."""
    peers = ", ".join(f"{name} {version}" for name, version in (machine.get("peers") or {}).items() if version)
    parts = [
        "# lowrank_ops benchmark results", "", machine_line(machine), "", command_line(command), "",
        *([f"peers installed: {peers}", ""] if peers else []),
        "ours/peer ms: median wall time of one call; ratio = peer / ours (> 1: ours faster); "
        "err: max abs error / max abs of the float64 reference; GFLOP/s, GB/s: ours, on the op's "
        "useful flops and compulsory bytes (see bench/README.md); ours/peer MB (suites that record it): "
        "peak extra memory of one call, mem ratio = peer / ours (> 1: ours uses less). "
        "Iterative solvers stopped at an iteration cap before their tolerance (the error column "
        "shows where they stopped): >= marks a ratio that is a lower bound (the peer was stopped), "
        "<= an upper bound (ours was), * both.", "",
        format_table(rows, markdown=True), "",
    ]
    if notes:
        parts += [notes, ""]
    if comparison:
        parts += ["```", comparison, "```", ""]
    return "\n".join(parts)


def plot_family(rows: List[Dict[str, Any]], family: str, path: Path, subtitle: str = "") -> bool:
    """Bar chart of the ratio peer/ours per case of ``family``; False when nothing was drawn."""
    rows = [row for row in rows if row["family"] == family and row["ratio"]]
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; skipped {path.name} (pip install matplotlib)")
        return False
    peers = sorted({row["peer"] for row in rows})
    colors = {peer: plt.get_cmap("tab10")(i) for i, peer in enumerate(peers)}
    labels = [f"{row['op']}  {row['shape']}  {row['dtype']} {row['device']}  vs {row['peer']}" for row in rows]
    ratios = [row["ratio"] for row in rows]
    # Solvers stopped at an iteration cap: the ratio is a bound (the table's >= / <= / *),
    # drawn hatched and labelled as in the table (plain bars read as measured ratios).
    bounded = [row.get("peer_truncated") or row.get("ours_truncated") for row in rows]
    figure, axes = plt.subplots(figsize=(9, 1.4 + 0.3 * len(rows)))
    positions = list(range(len(rows)))[::-1]  # first row on top
    # Bars grow from 1 (parity): right when ours is faster, left when it is slower.
    axes.barh(positions, [r - 1.0 for r in ratios], left=1.0, color=[colors[row["peer"]] for row in rows],
              hatch=["//" if bound else "" for bound in bounded])
    axes.set_xscale("log")
    axes.set_xlim(min(min(ratios), 1.0) / 1.5, max(max(ratios), 1.0) * 1.6)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_yticks(positions, labels, fontsize=7)
    axes.set_xlabel("peer time / ours time (> 1: ours faster; log scale)")
    for y, ratio, row in zip(positions, ratios, rows):
        axes.text(ratio, y, f" {_cell(row, 'ratio')} ", va="center", ha="left" if ratio >= 1 else "right", fontsize=7)
    if any(bounded):
        subtitle += ("  Hatched: a solver stopped at its iteration cap before the tolerance; >= the ratio is a "
                     "lower bound (peer stopped), <= an upper bound (ours stopped).")
    axes.set_title("\n".join([f"{family}: ours vs peers"] + textwrap.wrap(subtitle, 120)), fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[peer]) for peer in peers]
    axes.legend(handles, peers, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.savefig(path, dpi=120, bbox_inches="tight")  # "tight": keep the long case labels
    plt.close(figure)
    return True
