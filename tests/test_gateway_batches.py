"""The gateway's Batch File API (files and batches), driven over real HTTP with httpx,
the transport qwen_magic's batch client uses."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from qwen_magic.gateway import INVALID_API_KEY, Gateway, Reply, default_answer

KEY = "sk-test-batch-0123456789"
STAGE = 0.15


@pytest.fixture
def gw():
    with Gateway() as gateway:
        gateway.configure_batches(stage_seconds=STAGE)
        yield gateway


@pytest.fixture
def http(gw):
    with httpx.Client(base_url=gw.compatible_base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=5) as c:
        yield c


def line(custom_id, model="qwen-plus", text=None, url="/v1/chat/completions"):
    body = {"model": model, "messages": [{"role": "user", "content": text or f"row {custom_id}"}]}
    return {"custom_id": str(custom_id), "method": "POST", "url": url, "body": body}


def jsonl(lines) -> bytes:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in lines).encode()


def upload(http, content: bytes, purpose="batch"):
    return http.post("/files", files={"file": ("input.jsonl", content, "application/jsonl")},
                     data={"purpose": purpose})


def start(http, lines, **extra):
    uploaded = upload(http, jsonl(lines))
    assert uploaded.status_code == 200, uploaded.text
    body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h", **extra}
    return http.post("/batches", json=body)


def until(http, batch_id, statuses, timeout=5.0):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = http.get(f"/batches/{batch_id}").json()
        if not seen or seen[-1] != batch["status"]:
            seen.append(batch["status"])
        if batch["status"] in statuses:
            return batch, seen
        time.sleep(0.02)
    raise AssertionError(f"batch stayed in {seen}")


def lines_of(http, file_id):
    response = http.get(f"/files/{file_id}/content")
    assert response.status_code == 200
    return [json.loads(text) for text in response.text.splitlines()]


def test_upload_answers_with_the_file_object(http):
    content = jsonl([line(1), line(2)])
    answer = upload(http, content)
    assert answer.status_code == 200
    uploaded = answer.json()
    assert uploaded["id"].startswith("file-batch-")
    assert (uploaded["object"], uploaded["purpose"], uploaded["status"], uploaded["bytes"]) == (
        "file", "batch", "processed", len(content))
    assert http.get(f"/files/{uploaded['id']}").json() == uploaded
    assert http.get(f"/files/{uploaded['id']}/content").content == content
    assert http.delete(f"/files/{uploaded['id']}").json()["deleted"] is True
    assert http.get(f"/files/{uploaded['id']}").status_code == 404


@pytest.mark.parametrize(
    ("content", "code", "said"),
    [
        ("é".encode("latin-1") + b"\n", "invalid_parameter_error", "UTF-8"),
        (jsonl([line(1), line(1)]), "duplicate_custom_id", "more than once"),
        (jsonl([line(1), line(2, model="qwen-max")]), "mismatched_model", "one model"),
        (jsonl([line(1), line(2, url="/v1/other")]), "invalid_parameter_error", "same url"),
        (b"{not json}\n", "invalid_parameter_error", "not valid JSON"),
        (b"", "invalid_parameter_error", "no requests"),
    ],
)
def test_upload_refuses_a_file_the_service_would_refuse(http, content, code, said):
    answer = upload(http, content)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == code and said in error["message"]


def test_upload_refuses_more_than_50000_lines_and_lines_over_6_mb(http):
    many = b"".join(json.dumps(line(i)).encode() + b"\n" for i in range(50_001))
    assert "50,000" in upload(http, many).json()["error"]["message"]
    huge = jsonl([line(1, text="x" * (6 * 1024 * 1024 + 1))])
    assert "6 MB" in upload(http, huge).json()["error"]["message"]


def test_upload_needs_purpose_batch_and_a_good_key(gw, http):
    assert upload(http, jsonl([line(1)]), purpose="fine-tune").status_code == 400
    for headers in ({"Authorization": f"Bearer {INVALID_API_KEY}"}, {}):
        with httpx.Client(base_url=gw.compatible_base_url, headers=headers, timeout=5) as other:
            for answer in (upload(other, jsonl([line(1)])), other.get("/batches"), other.get("/batches/batch_x")):
                assert answer.status_code == 401
                assert answer.json()["error"]["code"] == "invalid_api_key"


def test_a_batch_moves_through_its_stages_and_counts_its_lines(gw, http):
    gw.configure_batches(stage_seconds=0.3)  # long enough to see every stage on a busy machine
    created = start(http, [line(i) for i in range(6)], metadata={"ds_name": "reviews"})
    assert created.status_code == 200
    batch = created.json()
    assert batch["id"].startswith("batch_") and batch["status"] == "validating"
    assert batch["request_counts"] == {"total": 6, "completed": 0, "failed": 0}
    assert batch["metadata"] == {"ds_name": "reviews"} and batch["in_progress_at"] is None
    counts = []
    seen = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        now = http.get(f"/batches/{batch['id']}").json()
        if not seen or seen[-1] != now["status"]:
            seen.append(now["status"])
        counts.append(now["request_counts"]["completed"])
        if now["status"] == "completed":
            break
        time.sleep(0.01)
    assert seen == ["validating", "in_progress", "finalizing", "completed"]
    assert counts == sorted(counts) and 0 < len(set(counts)) and any(0 < c < 6 for c in counts)
    assert now["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
    for stamp in ("created_at", "in_progress_at", "finalizing_at", "completed_at"):
        assert isinstance(now[stamp], int)
    assert now["cancelled_at"] is None and now["error_file_id"] is None


def test_output_lines_have_the_service_shape_in_no_fixed_order(http):
    lines = [line(i) for i in range(40)]
    orders = []
    for _ in range(2):
        batch, _ = until(http, start(http, lines).json()["id"], {"completed"})
        written = lines_of(http, batch["output_file_id"])
        orders.append([item["custom_id"] for item in written])
        first = written[0]
        assert set(first) == {"id", "custom_id", "response", "error"} and first["error"] is None
        response = first["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == "qwen-plus"
        expected = default_answer("qwen-plus", [{"role": "user", "content": f"row {first['custom_id']}"}])
        assert body["choices"][0]["message"]["content"] == expected
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert sorted(orders[0], key=int) == [str(i) for i in range(40)]
    # 40 lines in the same order twice, or in input order, would be a 1 in 40! chance.
    assert orders[0] != orders[1] or orders[0] != [str(i) for i in range(40)]
    assert orders[0] != [str(i) for i in range(40)] or orders[1] != [str(i) for i in range(40)]


def test_scripted_lines_answer_or_fail_into_the_error_file(gw, http):
    gw.configure_batches(lines={"2": Reply(text="positive"),
                                "3": Reply(error_code="DataInspectionFailed")})
    batch, _ = until(http, start(http, [line(i) for i in range(1, 5)]).json()["id"], {"completed"})
    assert batch["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    answers = {item["custom_id"]: item for item in lines_of(http, batch["output_file_id"])}
    assert answers["2"]["response"]["body"]["choices"][0]["message"]["content"] == "positive"
    [failed] = lines_of(http, batch["error_file_id"])
    assert failed["custom_id"] == "3"
    assert failed["error"]["code"] == "DataInspectionFailed" and failed["error"]["message"]
    assert failed["response"]["status_code"] == 400


def test_cancel_keeps_the_lines_finished_before(gw, http):
    gw.configure_batches(stage_seconds=0.4)
    batch_id = start(http, [line(i) for i in range(20)]).json()["id"]
    until(http, batch_id, {"in_progress"})
    time.sleep(0.2)  # about half the lines are done
    cancelling = http.post(f"/batches/{batch_id}/cancel").json()
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"]
    done = cancelling["request_counts"]["completed"]
    assert 0 < done < 20
    batch, seen = until(http, batch_id, {"cancelled"})
    assert seen == ["cancelling", "cancelled"]
    assert batch["request_counts"]["completed"] == done and batch["cancelled_at"]
    assert len(lines_of(http, batch["output_file_id"])) == done
    # A finished batch cannot be cancelled again: it stays as it is.
    assert http.post(f"/batches/{batch_id}/cancel").json()["status"] == "cancelled"


def test_batch_creation_errors(gw, http):
    uploaded = upload(http, jsonl([line(1, model="qwen-turbo-0206")])).json()["id"]
    refused = http.post("/batches", json={"input_file_id": uploaded, "endpoint": "/v1/chat/completions",
                                          "completion_window": "24h"})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    missing = http.post("/batches", json={"input_file_id": "file-batch-nope", "endpoint": "/v1/chat/completions",
                                          "completion_window": "24h"})
    assert missing.status_code == 404
    wrong_window = start(http, [line(1)], completion_window="12h")
    assert wrong_window.status_code == 400 and "completion_window" in wrong_window.json()["error"]["message"]
    assert start(http, [line(1)], completion_window="336h").status_code == 200
    gw.configure_batches(capacity_refusals=1)
    throttled = start(http, [line(1)])
    assert throttled.status_code == 429
    assert "capacity" in throttled.json()["error"]["message"]
    assert start(http, [line(1)]).status_code == 200  # only the scripted number are refused


def test_batches_are_listed_newest_first_a_page_at_a_time(http):
    ids = [start(http, [line(1)]).json()["id"] for _ in range(3)]
    first = http.get("/batches", params={"limit": 2}).json()
    assert [b["id"] for b in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    rest = http.get("/batches", params={"limit": 2, "after": first["last_id"]}).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and rest["has_more"] is False


def test_reset_forgets_batches_and_the_control_call_scripts_them(gw, http):
    batch_id = start(http, [line(1)]).json()["id"]
    gw.reset()
    assert http.get(f"/batches/{batch_id}").status_code == 404
    scripted = httpx.post(gw.url + "/_gateway/batches", json={"stage_seconds": 0, "lines": {"1": {"text": "ok"}}})
    assert scripted.json() == {"ok": True}
    batch, _ = until(http, start(http, [line(1)]).json()["id"], {"completed"}, timeout=1)
    [answer] = lines_of(http, batch["output_file_id"])
    assert answer["response"]["body"]["choices"][0]["message"]["content"] == "ok"
    assert httpx.post(gw.url + "/_gateway/batches", json={"stage": 1}).status_code == 400
