"""The offers table: at most one offer per session and a budget per hour, both enforced by DynamoDB.

An offer is written in one transaction with the hour's budget counter: a conditional put that fails
if the session already has an offer, and a conditional increment that fails once the hour's budget
is spent. Neither a replay of the predictions stream, nor a restart, nor several engine processes
can give a session a second offer or spend more than the budget. With ``bought_table`` (the scorer's
predictions table) the transaction also checks that the scorer has not marked the session as bought
since: a prediction read late (the engine lagging or restarting) makes no offer to a session that
has just bought.

A share of the sessions (``holdout_percent``, chosen by a hash of the session id) is the control
group: when one qualifies it gets a ``holdout`` row instead of an offer, written under the same
conditions (one per session, the hour's budget not spent, not bought) but spending no budget. Their
purchases against the offered sessions' are what the offers change (``python -m discount.uplift``).

Rows (partition key ``session_id``, TTL attribute ``expires_at``):

- ``kind = "offer"``: one per session that got an offer (see docs/discount-engine.md for the fields);
- ``kind = "holdout"``: one per control session that qualified (no code: nothing is shown);
- ``kind = "budget"``: ``session_id = "budget#YYYY-MM-DDTHH"``, ``offers`` = offers made that hour.

DynamoDB deletes a row some time after ``expires_at`` (typically within two days) and serves it
until then, so every read here treats a row whose ``expires_at`` has passed as absent.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from botocore.exceptions import BotoCoreError, ClientError

from common.aws import ttl_expired
from common.features import event_time_ms, parse_ms

OFFER_SCHEMA = "iglu:com.clickstream/offer/jsonschema/1-1-1"   # docs/contracts.md and discount-engine.md
OFFER_NAMESPACE = uuid.UUID("6f1c3c1e-2f52-4c55-9a55-5d2c8a0c7d10")
BUDGET_PREFIX = "budget#"
STRING_FIELDS = ("session_id", "event_id", "decision", "model_name", "model_version")


class Outcome(str, Enum):
    OFFERED = "offered"
    HELD_OUT = "held_out"
    ALREADY_OFFERED = "already_offered"
    BOUGHT = "bought"
    BUDGET_EXHAUSTED = "budget_exhausted"


def _clicked_ms(record: dict) -> int | None:
    """When the click happened, by the scorer's rule (common.features.event_time_ms): the derived time,
    so a click from an offline queue or a backfill is as old as it is, unless it is later than the
    collector's or over 30 days earlier, a device clock's fault (dtm sent in seconds: 1970)."""
    if record.get("collector_tstamp") is None:
        return parse_ms(record["derived_tstamp"]) if record.get("derived_tstamp") is not None else None
    return event_time_ms(record)


@dataclass(frozen=True)
class Prediction:
    """The fields of a prediction record (docs/contracts.md) the engine uses."""

    session_id: str
    event_id: str
    p_buy: float
    decision: str
    model_name: str
    model_version: str
    events_in_session: int
    # When the click happened (_clicked_ms), if the record says: a click from an offline queue or a
    # backfill is collected now but happened long ago.
    clicked_ms: int | None = None
    # When the collector received it, if the record says: the start of the pipeline's time to act.
    collected_ms: int | None = None

    @classmethod
    def from_record(cls, record: dict) -> Prediction:
        """Raise ValueError naming the field when the record is not a prediction."""
        try:
            # The contract's strings must be strings: str() would make a null session id the session
            # "None" and give it an offer; float() would take true or "0.5" for a p_buy.
            for name in STRING_FIELDS:
                if not isinstance(record[name], str):
                    raise TypeError(f"{name} is {type(record[name]).__name__}, not a string")
                _check_utf8(name, record[name])
            if isinstance(record["p_buy"], (bool, str)):
                raise TypeError(f"p_buy is {type(record['p_buy']).__name__}, not a number")
            prediction = cls(record["session_id"], record["event_id"], float(record["p_buy"]),
                             record["decision"], record["model_name"], record["model_version"],
                             int(record.get("events_in_session") or 0), _clicked_ms(record),
                             None if record.get("collector_tstamp") is None else parse_ms(record["collector_tstamp"]))
        except KeyError as exc:
            raise ValueError(f"prediction without {exc.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"malformed prediction: {exc}") from None
        if not prediction.session_id or not 0.0 <= prediction.p_buy <= 1.0:
            raise ValueError(f"malformed prediction: session {prediction.session_id!r}, p_buy {prediction.p_buy}")
        if prediction.session_id.startswith(BUDGET_PREFIX):
            # A tracker sets session ids: one named like a budget row would share its key in the offer's
            # transaction, which DynamoDB refuses (and retrying it would stall every offer).
            raise ValueError(f"session id {prediction.session_id!r} is reserved for the budget rows")
        return prediction


def _check_utf8(name: str, value: str) -> None:
    """JSON's "\\ud800" loads as a lone surrogate, which UTF-8 cannot encode: held_out(), the offer's
    token and botocore would raise UnicodeEncodeError on it, an error the engine does not take for a
    bad record: it would re-read the batch for ever."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{name} holds a lone surrogate, which UTF-8 cannot encode") from None


def hour_of(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H")


def held_out(session_id: str, percent: float) -> bool:
    """Whether the session is in the control group: a hash of its id, so every engine process, restart
    and replay puts it in the same group, and the group is independent of anything the model sees."""
    bucket = int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "big") % 10_000
    return bucket < round(percent * 100)


def offer_id(session_id: str) -> str:
    """The same session always gets the same offer id, so a retried write is recognisably the same offer."""
    return str(uuid.uuid5(OFFER_NAMESPACE, session_id))


class OfferTable:
    def __init__(self, client, table: str, *, budget_per_hour: int, discount_percent: int, ttl_hours: int,
                 bought_table: str | None = None, holdout_percent: float = 0.0):
        self.client = client
        self.holdout_percent = holdout_percent
        self.table = table
        self.bought_table = bought_table
        self.budget_per_hour = budget_per_hour
        self.discount_percent = discount_percent
        self.ttl_s = ttl_hours * 3600

    def offer_item(self, prediction: Prediction, now: float, kind: str = "offer") -> dict:
        identifier = offer_id(prediction.session_id)
        item = {
            "schema": {"S": OFFER_SCHEMA}, "session_id": {"S": prediction.session_id}, "kind": {"S": kind},
            "offer_id": {"S": identifier},
            "p_buy": {"N": repr(prediction.p_buy)}, "decision": {"S": prediction.decision},
            "model_name": {"S": prediction.model_name}, "model_version": {"S": prediction.model_version},
            "event_id": {"S": prediction.event_id},
            "offered_at": {"S": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
                           .replace("+00:00", "Z")},
            "hour": {"S": hour_of(now)},
            "expires_at": {"N": str(int(now + self.ttl_s))},
        }
        # The share in force: the uplift report warns of a comparison over periods of several shares.
        item["holdout_percent"] = {"N": f"{self.holdout_percent:g}"}
        if prediction.clicked_ms is not None:     # a purchase after it is what the uplift report counts
            item["clicked_ms"] = {"N": str(prediction.clicked_ms)}
        # What `python -m batch.skew --rows offers` checks the prediction against the lake by.
        if prediction.collected_ms is not None:
            item["collected_ms"] = {"N": str(prediction.collected_ms)}
        if prediction.events_in_session:
            item["events_in_session"] = {"N": str(prediction.events_in_session)}
        if kind == "offer":
            item["code"] = {"S": f"SAVE{self.discount_percent}-{identifier[:8].upper()}"}
            item["discount_percent"] = {"N": str(self.discount_percent)}
        return item

    def offer(self, prediction: Prediction, now: float | None = None) -> Outcome:
        """Write the offer and count it against this hour's budget, atomically; for a session of the
        control group, write its holdout row if the budget would have allowed the offer."""
        now = time.time() if now is None else now
        control = held_out(prediction.session_id, self.holdout_percent)
        budget = {
            "TableName": self.table, "Key": {"session_id": {"S": f"{BUDGET_PREFIX}{hour_of(now)}"}},
            # Attribute names through placeholders: some plain words are reserved in DynamoDB expressions.
            "ConditionExpression": "attribute_not_exists(#n) OR #n < :cap",
            "ExpressionAttributeNames": {"#n": "offers"},
            "ExpressionAttributeValues": {":cap": {"N": str(self.budget_per_hour)}},
        }
        if not control:
            budget["UpdateExpression"] = "ADD #n :one SET #k = :kind, #e = :exp"
            budget["ExpressionAttributeNames"] |= {"#k": "kind", "#e": "expires_at"}
            budget["ExpressionAttributeValues"] |= {":one": {"N": "1"}, ":kind": {"S": "budget"},
                                                    ":exp": {"N": str(int(now + 2 * 86400))}}
        # An expired offer counts as none, as it will once DynamoDB has deleted it: which of the two
        # a session meets must not depend on when the TTL sweep passed.
        put = {"TableName": self.table, "Item": self.offer_item(prediction, now, "holdout" if control else "offer"),
               "ConditionExpression": "attribute_not_exists(session_id) OR #e <= :now",
               "ExpressionAttributeNames": {"#e": "expires_at"}, "ExpressionAttributeValues": {":now": {"N": str(int(now))}}}
        # The control group passes the same checks as the offers, so both groups are alike but for the offer.
        items = [{"Put": put}, {"ConditionCheck" if control else "Update": budget}]
        if self.bought_table:
            items.append({"ConditionCheck": self._not_bought(prediction)})
        try:
            # One token per decision: if a retry follows a write whose answer was lost, DynamoDB
            # answers it as the write it was (offered), not as a second try (already offered).
            token = str(uuid.uuid5(OFFER_NAMESPACE, f"{prediction.session_id}|{prediction.event_id}|{now!r}"))
            self.client.transact_write_items(TransactItems=items, ClientRequestToken=token)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "TransactionCanceledException":
                raise
            codes = [reason.get("Code") for reason in exc.response.get("CancellationReasons", [])]
            # One reason per item, in order: the offer, the budget, the purchase check.
            for index, outcome in ((0, Outcome.ALREADY_OFFERED), (2, Outcome.BOUGHT), (1, Outcome.BUDGET_EXHAUSTED)):
                if index < len(codes) and codes[index] == "ConditionalCheckFailed":
                    return outcome
            raise
        return Outcome.HELD_OUT if control else Outcome.OFFERED

    def _not_bought(self, prediction: Prediction) -> dict:
        """The session's row in the predictions table has no purchase (``bought_ms``, which the scorer
        sets), or one before this prediction's click: that is an earlier session under the same id."""
        check = {"TableName": self.bought_table, "Key": {"session_id": {"S": prediction.session_id}},
                 "ConditionExpression": "attribute_not_exists(bought_ms)"}
        if prediction.clicked_ms is not None:
            check["ConditionExpression"] += " OR bought_ms < :clicked"
            check["ExpressionAttributeValues"] = {":clicked": {"N": str(prediction.clicked_ms)}}
        return check

    def usable(self, now: float | None = None) -> bool:
        """Whether the tables answer reads of their keys: a refusal of every write as invalid (another key
        schema: a wrong table name, a table made again) is the tables', not one record's."""
        try:
            self.spent(now)
            if self.bought_table:
                self.client.get_item(TableName=self.bought_table, Key={"session_id": {"S": f"{BUDGET_PREFIX}probe"}})
        except (BotoCoreError, ClientError):
            return False
        return True

    def spent(self, now: float | None = None) -> int:
        """Offers made in the hour of ``now``."""
        hour = hour_of(time.time() if now is None else now)
        item = self.client.get_item(TableName=self.table, Key={"session_id": {"S": f"{BUDGET_PREFIX}{hour}"}},
                                    ConsistentRead=True).get("Item")
        return int(item["offers"]["N"]) if item else 0

    def get(self, session_id: str, now: float | None = None) -> dict | None:
        """The offer of a session, as plain values, or None: what a shop's checkout page would call.
        An offer past its ``expires_at`` is None, though DynamoDB may not have deleted it yet."""
        item = self.client.get_item(TableName=self.table, Key={"session_id": {"S": session_id}},
                                    ConsistentRead=True).get("Item")
        if not item or item.get("kind", {}).get("S") != "offer" or ttl_expired(item, now):
            return None
        return {key: (float(value["N"]) if key == "p_buy" else int(value["N"])) if "N" in value else value["S"]
                for key, value in item.items()}
