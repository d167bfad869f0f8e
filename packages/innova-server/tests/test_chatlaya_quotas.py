"""What one account may create and spend: conversations per day, model tokens per UTC day."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from bson import ObjectId

from innova_server.chat import Usage
from innova_server.chatlaya.usage import seconds_to_utc_midnight, utc_day
from innova_server.testing import registered
from innova_server.testing.chat_client import chat, signed_in
from innova_server.testing.providers import ProviderPlugin, ScriptedProvider


def test_the_daily_token_quota_refuses_before_any_generation(start_server, db):
    provider = ScriptedProvider(["un ", "deux"], usage=Usage(7, 2))  # 9 tokens a reply
    with registered(ProviderPlugin("counted", provider), name="counted-plugin"):
        server = start_server(provider="counted", chat_daily_tokens_user=20)
        with signed_in(server.url) as client, signed_in(server.url) as other:
            assert [chat(client, "q").status for _ in range(3)] == [200, 200, 200]  # 0, 9, 18 < 20 before each
            messages_before = db.messages.count_documents({})
            refused = chat(client, "q")
            assert refused.status == 429 and refused.body["detail"]["code"] == "quota_exceeded"
            assert 0 < int(refused.headers["retry-after"]) <= 86400
            reply_id = db.messages.find_one({"role": "assistant"})["_id"]
            again = client.post(f"/chatlaya/messages/{reply_id}/regenerate")
            assert again.status_code == 429 and again.json()["detail"]["code"] == "quota_exceeded"
            assert db.messages.count_documents({}) == messages_before  # nothing generated, nothing stored
            assert len(provider.requests) == 3
            assert client.get("/chatlaya/usage").json()["today"]["prompt_tokens"] == 21
            assert chat(other, "q").status == 200  # per user


def test_concurrent_requests_at_the_limit_overshoot_by_at_most_those_in_flight(start_server):
    provider = ScriptedProvider(["w "] * 5, delay=0.05, usage=Usage(10, 0))
    with registered(ProviderPlugin("counted", provider), name="counted-plugin"):
        server = start_server(provider="counted", chat_daily_tokens_user=10, chat_max_concurrent_streams=10)
        with signed_in(server.url) as client:
            statuses: list[int] = []
            threads = [threading.Thread(target=lambda: statuses.append(chat(client, "q").status)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert sorted(statuses)[0] == 200 and len(statuses) == 4
            spent = client.get("/chatlaya/usage").json()["today"]
            # Each request read the total before any had ended: at most the 4 in flight went through.
            assert spent["prompt_tokens"] == 10 * statuses.count(200) <= 10 + 10 * 3
            assert chat(client, "q").status == 429  # and nothing after them


def test_the_quota_window_is_the_utc_day(start_server, db):
    server = start_server(chat_daily_tokens_user=100)
    with signed_in(server.url) as client:
        user_id = client.get("/auth/me").json()["user"]["id"]
        yesterday = datetime.now(UTC) - timedelta(days=1)
        db.usage_daily.insert_one(
            {"_id": f"{user_id}:{utc_day(yesterday)}", "user_id": ObjectId(user_id), "day": utc_day(yesterday),
             "messages": 50, "prompt_tokens": 5000, "completion_tokens": 5000, "expires_at": yesterday}
        )  # fmt: skip
        assert chat(client, "aujourd'hui").status == 200  # yesterday's spending does not count
        assert client.get("/chatlaya/usage").json()["today"]["messages"] == 1
    noon = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert seconds_to_utc_midnight(noon) == 12 * 3600
    assert seconds_to_utc_midnight(datetime(2026, 3, 1, 23, 59, 59, 999000, tzinfo=UTC)) == 1


def test_conversations_per_day_are_limited(start_server):
    server = start_server(rate_limit_conversations_user="3/1d")
    with signed_in(server.url) as client, signed_in(server.url) as other:
        assert client.post("/chatlaya/session").status_code == 200  # creates the first
        assert [client.post("/chatlaya/conversations").status_code for _ in range(3)] == [201, 201, 429]
        refused = client.post("/chatlaya/conversations")
        assert refused.json()["detail"]["code"] == "quota_exceeded" and int(refused.headers["retry-after"]) > 0
        assert client.post("/chatlaya/session").status_code == 200  # the active one: nothing created
        assert other.post("/chatlaya/conversations").status_code == 201
