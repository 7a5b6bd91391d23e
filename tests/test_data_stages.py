"""synthesize, clean and dataset on small inputs, in a scratch project folder."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from shoptune import UserError
from shoptune.artifacts import read_jsonl
from shoptune.catalog import Product
from shoptune.families import FAMILIES
from shoptune.families.family import Job, Rejected, parse_item, split_items, write_item
from stages import clean, dataset, synthesize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A scratch project with the demo data and the demo profile's data-stage params."""
    shutil.copytree(ROOT / "data" / "demo", tmp_path / "data" / "demo")
    demo = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["demo"]
    profile = {k: demo[k] for k in ("synthesize", "clean", "dataset", "evaluate")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"profiles": {"t": profile}}))
    monkeypatch.chdir(tmp_path)

    def set_params(section, **values):
        data = yaml.safe_load(Path("params.yaml").read_text())
        data["profiles"]["t"][section].update(values)
        Path("params.yaml").write_text(yaml.safe_dump(data))

    return set_params


GOOD = "The product 'Mug' appears on an e-commerce website. What color is it?\n0. Red\n1. Blue\n2. Green\nAnswer: 1"


ATTRIBUTES = FAMILIES["product_attribute_choice"]
MUG = Job(ATTRIBUTES.name, Product("p1", "UK", "Mug", "", {}, ""))


def attribute_item(text: str):
    """The recipe's rules for its attribute task: the shared format, then the family's own checks."""
    item = parse_item(text, ATTRIBUTES.task_type, 2, 10)
    ATTRIBUTES.check(item, MUG)
    return item


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("A product 'Mug' ... ?\n0. a\n1. b\nAnswer: 0", "no_product_opening"),
        ("The product 'Cup' appears on an e-commerce website. Color?\n0. a\n1. b\nAnswer: 0", "other_product"),
        (GOOD.replace("Answer: 1", "1"), "answer_marker"),
        (GOOD + "\nAnswer: 2", "answer_marker"),
        ("The product 'Mug' appears on an e-commerce website. Color?\nAnswer: 1", "no_options"),
        (
            GOOD.replace("0. Red", "1. Red").replace("1. Blue", "2. Blue").replace("2. Green", "3. Green"),
            "option_numbers",
        ),
        (GOOD.replace("1. Blue", "Blue"), "option_format"),
        ("The product 'Mug' appears. Color?\n0. Red\nAnswer: 0", "option_count"),
        (GOOD.replace("Green", "red"), "duplicate_options"),
        (GOOD.replace("Answer: 1", "Answer: B"), "answer_not_number"),
        (GOOD.replace("Answer: 1", "Answer: 3"), "answer_out_of_range"),
    ],
)
def test_each_rule_rejects_with_its_reason(text, code):
    with pytest.raises(Rejected) as reject:
        attribute_item(text)
    assert reject.value.code == code


def test_a_good_item_parses():
    item = attribute_item(GOOD)
    assert (item.question, item.options, item.answer) == (
        "The product 'Mug' appears on an e-commerce website. What color is it?",
        ["Red", "Blue", "Green"],
        1,
    )


def test_replies_split_at_blank_lines():
    reply = f"Here are your questions:\n\n{GOOD}\n\n\n{GOOD}"
    assert split_items(reply) == ["Here are your questions:", GOOD, GOOD]


def test_offline_synthesis_then_clean_then_dataset(project):
    synthesize.synthesize("t")
    replies = read_jsonl("runs/t/synthesize/generations.jsonl")
    # 32 products: every one for the attribute and query families, the 8 in two locales for matching
    by_family = {f: sum(1 for r in replies if r["family"] == f) for f in {r["family"] for r in replies}}
    assert by_family == {"product_attribute_choice": 32, "query_ner": 32, "cross_lingual_matching": 8}
    assert all(r["reply"] for r in replies)
    clean.clean("t")
    counts = json.loads(Path("runs/t/clean/counts.json").read_text())
    # the only rejects: items that overlap the demo's evaluation questions (same products, same questions)
    assert counts["accepted"] > 32 * 3 and set(counts["reject_reasons"]) == {"eval_overlap"}
    for item in read_jsonl("runs/t/clean/accepted.jsonl"):
        if item["family"] == "product_attribute_choice":
            assert len(item["options"]) == 3 and 0 <= item["output_field"] < 3
    dataset.dataset("t")
    train, val = read_jsonl("runs/t/dataset/train.jsonl"), read_jsonl("runs/t/dataset/val.jsonl")
    stats = json.loads(Path("runs/t/dataset/stats.json").read_text())
    assert len(train) + len(val) + stats["left_out_test_rows"] == counts["accepted"] + 4 + 2  # + extra files
    assert stats["left_out_test_rows"] == 1
    assert {r["task"] for r in train} >= {"product_attribute_choice", "query_ner", "Answer_Generation"}
    assert all(
        set(r) == {"split", "task", "setting", "instruction", "input", "options", "output", "few_shot_example"}
        for r in train + val
    )


def test_outputs_do_not_depend_on_the_run(project, tmp_path):
    synthesize.synthesize("t")
    first = Path("runs/t/synthesize/generations.jsonl").read_bytes()
    shutil.rmtree("runs")
    synthesize.synthesize("t")
    assert Path("runs/t/synthesize/generations.jsonl").read_bytes() == first


def test_clean_reports_every_reject(project):
    replies = [
        {
            "family": "product_attribute_choice",
            "product_id": "p1",
            "locale": "UK",
            "title": "Mug",
            "backend": "x",
            "model": "m",
            "reply": f"{GOOD}\n\n{GOOD}\n\n{GOOD.replace('Answer: 1', 'Answer: 7')}\n\nSure! Here you go.",
        }
    ]
    Path("runs/t/synthesize").mkdir(parents=True)
    Path("runs/t/synthesize/generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in replies))
    clean.clean("t")
    rejects = read_jsonl("runs/t/clean/rejects.jsonl")
    assert [r["code"] for r in rejects] == ["duplicate_question", "answer_out_of_range", "answer_marker"]
    assert rejects[1]["reason"] == "answer 7 is out of range 0 to 2"
    counts = json.loads(Path("runs/t/clean/counts.json").read_text())
    assert (counts["items"], counts["accepted"], counts["rejected"]) == (4, 1, 3)


def test_dataset_rejects_a_bad_extra_file(project):
    synthesize.synthesize("t")
    clean.clean("t")
    Path("data/demo/extra/broken.jsonl").write_text('{"question": "no known format"}\n')
    with pytest.raises(UserError, match=r"broken.jsonl: row 1: neither ECInstruct"):
        dataset.dataset("t")
    assert not Path("runs/t/dataset/train.jsonl").exists()


def test_bad_catalog_is_a_one_line_error(project):
    Path("data/demo/catalog.csv").write_text("id,locale,title\n1,UK,x\n")
    with pytest.raises(UserError, match=r"catalog.csv: missing column\(s\) price, brand"):
        synthesize.synthesize("t")


# ------------------------------------------------------------------ the openai backend, over real HTTP


ONE_FAMILY = {"product_attribute_choice": {"items": 5}}  # one request per product


class ChatServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions endpoint answering from the offline writer."""

    requests: list[dict] = []
    fail_after: int | None = None  # requests after this many are answered with fail_status
    fail_status = 500

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatServer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.headers.get("Authorization") != "Bearer sk-test-123":
            return self.reply(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
        if ChatServer.fail_after is not None and len(ChatServer.requests) > ChatServer.fail_after:
            return self.reply(ChatServer.fail_status, {"error": {"message": "unwell", "type": "server_error"}})
        card = body["messages"][-1]["content"]
        title = card.splitlines()[0].removeprefix("Title: ")
        text = write_item(f"The product '{title}' appears on an e-commerce website. What is it?", ["A", "B", "C"], 2)
        self.reply(
            200,
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    def reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    ChatServer.requests, ChatServer.fail_after, ChatServer.fail_status = [], None, 500
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_backend_against_an_http_server(project, chat_server, monkeypatch, capsys):
    monkeypatch.setenv("SHOP_KEY", "sk-test-123")
    project(
        "synthesize",
        backend="openai",
        model="gpt-35-turbo",
        base_url=chat_server,
        api_key_env="SHOP_KEY",
        families=ONE_FAMILY,
        max_products=5,
        concurrency=2,
        max_retries=0,
    )
    synthesize.synthesize("t")
    rows = read_jsonl("runs/t/synthesize/generations.jsonl")
    assert [r["product_id"] for r in rows] == [f"B0DEMO000{i}" for i in range(1, 6)]  # catalog order
    assert rows[0]["reply"].startswith("The product 'Stainless Steel Insulated")
    request = ChatServer.requests[0]
    assert request["path"] == "/v1/chat/completions"
    body = request["body"]
    assert (body["model"], body["temperature"], body["max_tokens"], body["top_p"]) == ("gpt-35-turbo", 0.3, 1000, 0.95)
    assert "Examples:" in body["messages"][0]["content"]  # the few-shot examples
    assert "sk-test-123" not in capsys.readouterr().err  # the key is never logged


def test_openai_backend_resumes_after_a_failure(project, chat_server, monkeypatch):
    monkeypatch.setenv("SHOP_KEY", "sk-test-123")
    project(
        "synthesize",
        backend="openai",
        model="m",
        base_url=chat_server,
        api_key_env="SHOP_KEY",
        families=ONE_FAMILY,
        max_products=6,
        concurrency=1,
        max_retries=0,
    )
    ChatServer.fail_after = 4  # then 500s: failures that the next run sends again
    with pytest.raises(UserError, match=r"2 of 6 requests failed \(http_500 2\), more than max_failed_fraction"):
        synthesize.synthesize("t")
    assert len(read_jsonl("runs/t/synthesize/generations.jsonl")) == 4  # what succeeded is written
    assert [f["failure"] for f in read_jsonl("runs/t/synthesize/failures.jsonl")] == ["http_500", "http_500"]
    ChatServer.requests, ChatServer.fail_after = [], None
    synthesize.synthesize("t")
    assert len(ChatServer.requests) == 2  # only the products without a reply
    assert len(read_jsonl("runs/t/synthesize/generations.jsonl")) == 6
    assert read_jsonl("runs/t/synthesize/failures.jsonl") == []
    ChatServer.requests = []
    synthesize.synthesize("t")
    assert ChatServer.requests == []  # every reply is in the journal


def test_openai_backend_errors(project, chat_server, monkeypatch):
    project(
        "synthesize",
        backend="openai",
        model="m",
        base_url=chat_server,
        api_key_env="SHOP_KEY",
        max_retries=0,
        families=ONE_FAMILY,
    )
    monkeypatch.delenv("SHOP_KEY", raising=False)
    with pytest.raises(UserError, match="environment variable SHOP_KEY is not set"):
        synthesize.synthesize("t")
    monkeypatch.setenv("SHOP_KEY", "sk-wrong")
    with pytest.raises(UserError, match=r"the run stopped \(HTTP 401"):
        synthesize.synthesize("t")
    project("synthesize", base_url="http://127.0.0.1:9/v1")
    monkeypatch.setenv("SHOP_KEY", "sk-test-123")
    with pytest.raises(UserError, match="cannot reach the API"):
        synthesize.synthesize("t")


def test_a_journal_of_the_old_format_is_set_aside(project, chat_server, monkeypatch, caplog):
    monkeypatch.setenv("SHOP_KEY", "sk-test-123")
    project(
        "synthesize",
        backend="openai",
        model="m",
        base_url=chat_server,
        api_key_env="SHOP_KEY",
        max_products=2,
        families=ONE_FAMILY,
    )
    old = Path("runs/t/.checkpoints/synthesize/replies-0123456789abcdef.jsonl")
    old.parent.mkdir(parents=True)
    old.write_text('{"product_id": "B0DEMO0001", "locale": "UK", "reply": "old"}\n')
    with caplog.at_level("INFO", logger="synthesize"):
        synthesize.synthesize("t")
    assert not old.exists() and old.with_name(old.name + ".old").exists()
    assert "previous format" in caplog.text
    assert len(ChatServer.requests) == 2 and len(read_jsonl("runs/t/synthesize/generations.jsonl")) == 2
