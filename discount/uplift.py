"""`python -m discount.uplift`: did the offers make sessions buy? The offered sessions against the
control group (`holdout_percent`), from the offers table and the scorer's purchase marks."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import click

from common import aws
from common.cli import CLI_CONTEXT, AwsCommand
from common.config import load
from common.features import parse_ms
from common.retry import backoff_s
from discount.settings import DiscountSettings

Z_95 = 1.959964
BATCH_GET_KEYS = 100          # DynamoDB's limit per BatchGetItem


@dataclass(frozen=True)
class Group:
    sessions: int
    bought: int

    @property
    def rate(self) -> float:
        return self.bought / self.sessions if self.sessions else math.nan


@dataclass(frozen=True)
class Uplift:
    offered: Group
    held_out: Group
    open_sessions: int          # qualified too recently to have finished: left out
    low: float                  # 95 % interval of the difference in purchase rate, offered minus held out
    high: float

    @property
    def difference(self) -> float:
        return self.offered.rate - self.held_out.rate

    def verdict(self) -> str:
        if not self.offered.sessions or not self.held_out.sessions:
            return ("no comparison: the control group is empty (set holdout_percent)" if self.offered.sessions
                    else "no comparison: no session was offered a discount")
        if self.low > 0:
            return "offers raised the purchase rate"
        if self.high < 0:
            return "offers lowered the purchase rate"
        return "no effect shown: the interval includes 0 (more sessions narrow it)"


def wilson(bought: int, sessions: int) -> tuple[float, float]:
    """95 % Wilson score interval of a purchase rate: sound for small groups and rates near 0 or 1."""
    if not sessions:
        return math.nan, math.nan
    rate, z2 = bought / sessions, Z_95 ** 2
    centre = (rate + z2 / (2 * sessions)) / (1 + z2 / sessions)
    half = Z_95 * math.sqrt(rate * (1 - rate) / sessions + z2 / (4 * sessions ** 2)) / (1 + z2 / sessions)
    return centre - half, centre + half


def compare(offered: Group, held_out: Group, open_sessions: int = 0) -> Uplift:
    """The difference of the two rates with Newcombe's interval (from the two Wilson intervals)."""
    (low1, high1), (low2, high2) = wilson(offered.bought, offered.sessions), wilson(held_out.bought, held_out.sessions)
    rate1, rate2 = offered.rate, held_out.rate
    low = rate1 - rate2 - math.sqrt((rate1 - low1) ** 2 + (high2 - rate2) ** 2)
    high = rate1 - rate2 + math.sqrt((high1 - rate1) ** 2 + (rate2 - low2) ** 2)
    return Uplift(offered, held_out, open_sessions, low, high)


def qualified_rows(dynamodb, table: str, now: float) -> list[dict]:
    """The offers table's offer and holdout rows that have not expired."""
    rows = []
    pages = dynamodb.get_paginator("scan").paginate(
        TableName=table, ConsistentRead=True, FilterExpression="#k IN (:offer, :holdout)",
        ProjectionExpression="session_id, #k, clicked_ms, offered_at, expires_at",
        ExpressionAttributeNames={"#k": "kind"},
        ExpressionAttributeValues={":offer": {"S": "offer"}, ":holdout": {"S": "holdout"}})
    for page in pages:
        rows += [item for item in page["Items"] if not aws.ttl_expired(item, now)]
    return rows


def purchase_marks(dynamodb, table: str, session_ids: list[str]) -> dict[str, int]:
    """``bought_ms`` of each session the scorer marked as bought in the predictions table."""
    marks: dict[str, int] = {}
    for start in range(0, len(session_ids), BATCH_GET_KEYS):
        request = {table: {"Keys": [{"session_id": {"S": sid}} for sid in session_ids[start:start + BATCH_GET_KEYS]],
                           "ProjectionExpression": "session_id, bought_ms", "ConsistentRead": True}}
        for attempt in range(20):
            response = dynamodb.batch_get_item(RequestItems=request)
            for item in response["Responses"].get(table, []):
                if "bought_ms" in item:
                    marks[item["session_id"]["S"]] = int(float(item["bought_ms"]["N"]))
            request = response.get("UnprocessedKeys") or {}
            if not request:
                break
            time.sleep(backoff_s(attempt, 0.05, 2.0))      # throttled: DynamoDB hands the rest back
        else:
            raise click.ClickException(f"{table}: keys still unprocessed after 20 tries (throttled); try again later")
    return marks


def measure(dynamodb, offers_table: str, predictions_table: str, settle_s: float, now: float | None = None) -> Uplift:
    """Each qualified session bought when the scorer marked a purchase at or after the click that
    qualified it; sessions that qualified within ``settle_s`` may still buy and are left out."""
    now = time.time() if now is None else now
    rows = qualified_rows(dynamodb, offers_table, now)
    settled = [row for row in rows if _qualified_ms(row) <= (now - settle_s) * 1000]
    marks = purchase_marks(dynamodb, predictions_table, [row["session_id"]["S"] for row in settled])
    counts = {"offer": [0, 0], "holdout": [0, 0]}
    for row in settled:
        mark = marks.get(row["session_id"]["S"])
        counts[row["kind"]["S"]][0] += 1
        counts[row["kind"]["S"]][1] += mark is not None and mark >= _qualified_ms(row)
    return compare(Group(*counts["offer"]), Group(*counts["holdout"]), len(rows) - len(settled))


def _qualified_ms(row: dict) -> int:
    """The click that qualified the session; for a row without it (an engine before offer schema
    1-1-0), the time of the offer, a little later."""
    return int(row["clicked_ms"]["N"]) if "clicked_ms" in row else parse_ms(row["offered_at"]["S"])


def as_dict(uplift: Uplift) -> dict:
    """The figures as plain JSON values (no NaN: a group without sessions has no rate, null)."""
    def number(value: float) -> float | None:
        return None if math.isnan(value) else round(value, 6)

    groups = {name: {**asdict(group), "rate": number(group.rate)}
              for name, group in (("offered", uplift.offered), ("held_out", uplift.held_out))}
    return {**groups, "open_sessions": uplift.open_sessions, "difference": number(uplift.difference),
            "low": number(uplift.low), "high": number(uplift.high), "verdict": uplift.verdict()}


def render(uplift: Uplift, offers_table: str) -> str:
    def line(name: str, group: Group) -> str:
        rate = f"{100 * group.rate:5.1f} %" if group.sessions else "    –  "
        return f"{name:<10}{group.sessions:>9,}{group.bought:>8,}   {rate}"

    lines = [(f"sessions that qualified for an offer ({offers_table}, the last offer_ttl_hours; "
              f"{uplift.open_sessions:,} too recent to have finished, left out)"),
             f"{'group':<10}{'sessions':>9}{'bought':>8}   rate",
             line("offered", uplift.offered), line("held out", uplift.held_out)]
    if uplift.offered.sessions and uplift.held_out.sessions:
        lines.append(f"difference (offered - held out): {100 * uplift.difference:+.1f} points, "
                     f"95 % interval {100 * uplift.low:+.1f} to {100 * uplift.high:+.1f}")
    lines.append(uplift.verdict())
    return "\n".join(lines)


@click.command(cls=AwsCommand, context_settings=CLI_CONTEXT)
@click.option("--settle-minutes", type=click.FloatRange(min=0), default=30.0,
              help="leave out sessions that qualified this recently: they may still buy (the scorer's session timeout)")
@click.option("--json", "as_json", is_flag=True, help="print the figures as one JSON object (to keep: the rows live a day)")
def main(settle_minutes: float, as_json: bool) -> None:
    """Compare the purchase rate of the sessions offered a discount with that of the control group
    (the engine's holdout_percent), over the offers table's rows (they live offer_ttl_hours).

    A session bought when the scorer marked its purchase (bought_ms in the predictions table, which
    needs the scorer's lookup_table) at or after the click that qualified it. Settings as the
    engine's: CLICKSTREAM_* variables and the [discount] section of the TOML file named by
    CLICKSTREAM_CONFIG (docs/discount-engine.md).
    """
    settings = load(DiscountSettings, section="discount")
    dynamodb = aws.client("dynamodb", settings.region)
    uplift = measure(dynamodb, settings.offers_table, settings.predictions_table, settle_minutes * 60)
    if as_json:
        click.echo(json.dumps(as_dict(uplift)))
    else:
        click.echo(render(uplift, settings.offers_table))


if __name__ == "__main__":
    main()
