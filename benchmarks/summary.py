"""One table from benchmarks/results/*.json (written by `nox -s bench`), with the goals beside the figures.

    python benchmarks/summary.py

Prints a Markdown table (paste it into the README with the date and machine
printed above it) and writes benchmarks/results/summary.json.
"""

from __future__ import annotations

import json
from typing import Any

from common import RESULTS


def load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def dig(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def row(measure: str, figure: Any, goal: str, met: bool | None) -> dict[str, Any]:
    verdict = "—" if met is None else ("met" if met else "NOT met")
    return {"measure": measure, "figure": "—" if figure is None else figure, "goal": goal, "verdict": verdict}


def main() -> int:
    me, chat, burst = load("me"), load("chat"), load("burst")
    ratio = me.get("ratio_vs_peer")
    gain = me.get("uvloop_httptools_gain")
    ttft_ratio = me.get("first_token_over_me_p50")
    turn_trips = dig(chat, "latency", "10_words", "mongo_round_trips_per_turn")
    opened = burst.get("all_opened_within_s")
    completed, errors = burst.get("completed"), burst.get("errors")
    growth = burst.get("rss_growth_mb")
    ready_p99 = dig(burst, "health_ready", "p99_ms")
    live_p99 = dig(burst, "health_live", "p99_ms")
    rows = [
        row(
            "GET /auth/me req/s, Innova / fastapi-users (hey -c 50)",
            f"{ratio} ({dig(me, 'innova', 'requests_per_s'):.0f} / {dig(me, 'peer', 'requests_per_s'):.0f})"
            if ratio
            else None,
            "≥ 2.0",
            None if ratio is None else ratio >= 2.0,
        ),
        row("GET /auth/me, MongoDB commands per request under load", me.get("mongo_commands_per_request_under_load"),
            "≤ 1", None if me.get("mongo_commands_per_request_under_load") is None
            else me["mongo_commands_per_request_under_load"] <= 1),
        row("uvloop + httptools vs asyncio + h11 (/auth/me req/s)", f"{gain}x" if gain else None, "measured", None),
        row(
            "first token alone / GET /auth/me p50 alone",
            f"{ttft_ratio} ({me.get('first_token_p50_alone_ms')} / {me.get('me_p50_alone_ms')} ms)"
            if ttft_ratio
            else None,
            "≤ 2.5",
            None if ttft_ratio is None else ttft_ratio <= 2.5,
        ),
        row("MongoDB round trips per chat turn, alone (10 words)", turn_trips, "≤ 6 + 1 per checkpoint",
            None if turn_trips is None else turn_trips <= 6),
        row("MongoDB commands per stream in a burst of 1000", burst.get("mongo_commands_per_stream"), "measured", None),
        row(
            f"burst of {burst.get('streams')}: completed / errors",
            None if completed is None else f"{completed} / {errors}",
            "all / 0",
            None if completed is None else completed == burst.get("streams") and errors == 0,
        ),
        row("burst: all opened within (s)", opened, "≤ 15", None if not burst else opened is not None and opened <= 15),
        row("burst: RSS growth (MB)", growth, "< 100", None if growth is None else growth < 100),
        row("burst: GET /health p99 (ms)", ready_p99, "< 100", None if ready_p99 is None else ready_p99 < 100),
        row("burst: GET /health/live p99 (ms)", live_p99, "< 100", None if live_p99 is None else live_p99 < 100),
    ]
    meta = me.get("meta") or burst.get("meta") or {}
    print(f"\nFigures of {meta.get('date', '?')}, {meta.get('cores', '?')} cores, {meta.get('database', '?')}\n")
    print("| measure | figure | goal | |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['measure']} | {r['figure']} | {r['goal']} | {r['verdict']} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
