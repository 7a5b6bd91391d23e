"""The task families: each family's request, a capable model's reply (tests/scripted_llm.py) accepted,
the mistakes real models make rejected with their reason, the offline writers, and every family end to
end through synthesize, clean and dataset against a local OpenAI-compatible HTTP server."""

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
from shoptune.catalog import read_catalog
from shoptune.families import FAMILIES
from shoptune.families.family import Rejected, Settings, example, parse_item, split_items, system_prompt
from shoptune.quality import Overlap, in_language
from stages import clean, dataset, synthesize
from tests import scripted_llm

ROOT = Path(__file__).resolve().parents[1]
PRODUCTS = read_catalog(ROOT / "data" / "demo" / "catalog.csv")
SETTINGS = Settings(items=2, options=3)


def accepted(family, job, reply: str) -> list:
    items = []
    for text in split_items(reply):
        item = parse_item(text, family.task_type, 2, 10)
        family.check(item, job)
        items.append(item)
    return items


def first_job(name: str):
    family = FAMILIES[name]
    return family, family.jobs(PRODUCTS, SETTINGS, 0)[0]


def scripted(name: str) -> str:
    family, job = first_job(name)
    return scripted_llm.reply(system_prompt(family, SETTINGS, list(family.fewshot)), family.prompt(job, SETTINGS))


def test_the_registry_covers_the_recipe_and_the_multilingual_tasks():
    assert sorted(f.task for f in FAMILIES.values()) == [1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 17, 18]
    assert {f.name for f in FAMILIES.values() if not f.needs_llm} == {
        "product_attribute_choice",
        "query_ner",
        "cross_lingual_matching",
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_prompts_with_its_examples_and_accepts_a_good_reply(name):
    family = FAMILIES[name]
    system = system_prompt(family, SETTINGS, list(family.fewshot))
    for row in family.fewshot:  # its own examples are items of its own format
        assert example(row) in system
        parse_item(example(row), family.task_type, 2, 10)
    jobs = family.jobs(PRODUCTS, SETTINGS, 0)
    assert jobs and len({job.id for job in jobs}) == len(jobs)
    assert family.jobs(PRODUCTS, SETTINGS, 0) == jobs  # seeded: the same candidates every run
    for job in jobs[:6]:
        prompt = family.prompt(job, SETTINGS)
        assert job.product.title in prompt
        items = accepted(family, job, scripted_llm.reply(system, prompt))
        assert items, name


def broken(name: str, old: str, new: str) -> str:
    text = scripted(name)
    assert old in text, (name, old, text)
    return text.replace(old, new, 1)


MISTAKES = [
    # the moka pot asked about the mug of the examples: an item about another product
    (
        "product_attribute_choice",
        lambda: scripted("product_attribute_choice").replace("Stainless", "Ceramic Mug"),
        "other_product",
    ),
    (
        "product_attribute_choice",
        lambda: broken("product_attribute_choice", "The product", "A product"),
        "no_product_opening",
    ),
    ("product_knowledge", lambda: broken("product_knowledge", "Stainless Steel Insulated", "Ceramic"), "other_product"),
    ("review_retrieval", lambda: broken("review_retrieval", "\n1. ", "\n1. Something else "), "options_changed"),
    (
        "review_retrieval",
        lambda: scripted("review_retrieval").rsplit("Answer:", 1)[0] + "Answer: 9",
        "answer_out_of_range",
    ),
    ("query_ner", lambda: broken("query_ner", '["Hydrovale"]', '["Nike"]'), "entity_not_in_query"),
    (
        "review_keyphrases",
        lambda: broken("review_keyphrases", '"arrived fast"', '"arrived late"'),
        "keyphrase_not_in_review",
    ),
    (
        "review_aspect_retrieval",
        lambda: broken("review_aspect_retrieval", "Answer: 1, 2", "Answer: 1, 1"),
        "answer_numbers",
    ),
    ("query_relation_choice", lambda: broken("query_relation_choice", "substitute", "replace"), "options_changed"),
    (
        "category_explanation",
        lambda: broken("category_explanation", "Answer: Category 0", "Answer: A\nB"),
        "answer_lines",
    ),
    (
        "category_attribute_choice",
        lambda: broken("category_attribute_choice", "Answer: 0", "Answer: zero"),
        "answer_not_number",
    ),
    ("product_keywords", lambda: broken("product_keywords", "Answer: [", "Answer: [["), "answer_not_list"),
    (
        "title_translation",
        lambda: scripted("title_translation").rsplit("Answer: ", 1)[0] + "Answer: " + scripted_llm.SENTENCE["English"],
        "wrong_language",
    ),
    ("cross_lingual_matching", lambda: broken("cross_lingual_matching", "Answer: ", "Answer: 7 "), "answer_not_number"),
]


@pytest.mark.parametrize(("name", "make", "code"), MISTAKES, ids=[f"{m[0]}-{m[2]}" for m in MISTAKES])
def test_each_family_rejects_the_mistakes_of_real_models_with_their_reason(name, make, code):
    family, job = first_job(name)
    with pytest.raises(Rejected) as reject:
        accepted(family, job, make())
    assert reject.value.code == code


def test_cross_lingual_matching_rejects_a_description_in_the_wrong_language():
    family, job = first_job("cross_lingual_matching")
    text = scripted("cross_lingual_matching")
    language = next(name for name, sentence in scripted_llm.SENTENCE.items() if sentence in text)
    wrong = "Japanese" if language != "Japanese" else "German"
    with pytest.raises(Rejected, match="reads as") as reject:
        accepted(family, job, text.replace(scripted_llm.SENTENCE[language], scripted_llm.SENTENCE[wrong]))
    assert reject.value.code == "wrong_language"


def test_language_identification_on_the_six_locales():
    for locale, language in [
        ("DE", "German"),
        ("FR", "French"),
        ("ES", "Spanish"),
        ("IT", "Italian"),
        ("UK", "English"),
        ("JP", "Japanese"),
    ]:
        assert in_language(scripted_llm.SENTENCE[language], locale) == (
            True,
            {"UK": "en", "JP": "ja"}.get(locale, locale.lower()),
        )
    assert in_language(scripted_llm.SENTENCE["English"], "DE")[0] is False


def test_overlap_is_the_share_of_an_items_ngrams_in_the_references():
    overlap = Overlap(["the quick brown fox jumps over the lazy dog"], 3)
    assert overlap.share("the quick brown fox jumps over the lazy dog") == 1.0
    assert overlap.share("a quick brown fox sleeps") == pytest.approx(1 / 3)
    assert overlap.share("nothing in common here") == 0.0
    assert Overlap(["竹製 お箸"], 2).share("竹製のお箸") == pytest.approx(2 / 4)  # Japanese by characters


# ------------------------------------------------------------------ end to end over HTTP


class ScriptedServer(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ScriptedServer.requests.append(body)
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        choice = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": scripted_llm.reply(system, user)},
        }
        data = json.dumps(
            {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [choice],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_server():
    ScriptedServer.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture
def project(tmp_path, monkeypatch):
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


def test_every_family_end_to_end_against_a_local_server(project, scripted_server, monkeypatch):
    monkeypatch.setenv("SHOP_KEY", "sk-test")
    families = {name: {"items": 2} for name in FAMILIES}
    families["title_translation"] = {"items": 2, "locales": ["UK", "JP"]}
    project(
        "synthesize", backend="openai", model="m", base_url=scripted_server, api_key_env="SHOP_KEY", families=families
    )
    synthesize.synthesize("t")
    stats = json.loads(Path("runs/t/synthesize/stats.json").read_text())
    assert stats["failed_requests"] == 0 and stats["requests_sent"] == len(ScriptedServer.requests)
    assert set(stats["replies_by_family"]) == set(FAMILIES)
    clean.clean("t")
    counts = json.loads(Path("runs/t/clean/counts.json").read_text())
    assert set(counts["accepted_by_family"]) == set(FAMILIES), counts
    rejects = read_jsonl("runs/t/clean/rejects.jsonl")
    assert all(r["code"] and r["reason"] for r in rejects)
    for row in read_jsonl("runs/t/clean/accepted.jsonl"):
        assert row["task_name"] == row["family"] and row["metric"]
    dataset.dataset("t")
    card = json.loads(Path("runs/t/dataset/card.json").read_text())
    assert set(FAMILIES) <= set(card["train_by_task"]) | set(card["val_by_task"])
    assert card["items_accepted_by_family"] == counts["accepted_by_family"]
    translations = [r for r in read_jsonl("runs/t/clean/accepted.jsonl") if r["family"] == "title_translation"]
    assert {r["locale"] for r in translations} == {"UK", "JP"}
    assert {r["metric"] for r in translations} == {"bleu", "jp-bleu"}  # jp-bleu for a Japanese target

    ScriptedServer.requests = []
    synthesize.synthesize("t")  # the same params: every reply from the journal
    assert ScriptedServer.requests == []


def test_synthesis_over_two_servers_one_stopping_midway_loses_nothing(project, monkeypatch):
    """base_url lists two endpoints; the second server closes after answering 10 requests: every job
    still gets its reply, each answered once, and stats.json counts each endpoint's attempts."""
    answered: list[tuple[int, str]] = []  # (server, the request's body), once the answer is written
    servers = []

    class Counting(ScriptedServer):
        def do_POST(self):  # noqa: N802
            super().do_POST()
            answered.append((self.server.number, json.dumps(self.body, sort_keys=True)))
            if self.server.number == 1 and sum(n == 1 for n, _ in answered) == 10:
                threading.Thread(target=lambda: (self.server.shutdown(), self.server.server_close())).start()

    for number in (0, 1):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Counting)
        server.number = number
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    urls = [f"http://127.0.0.1:{s.server_address[1]}/v1" for s in servers]
    monkeypatch.setenv("SHOP_KEY", "sk-test")
    families = {"product_attribute_choice": {"items": 2}, "query_ner": {"items": 2}}
    project("synthesize", backend="openai", model="m", base_url=urls, api_key_env="SHOP_KEY", families=families)
    project("synthesize", concurrency=2, max_retries=6)
    synthesize.synthesize("t")
    servers[0].shutdown()
    stats = json.loads(Path("runs/t/synthesize/stats.json").read_text())
    generations = read_jsonl("runs/t/synthesize/generations.jsonl")
    prompts = [prompt for _, prompt in answered]
    assert stats["failed_requests"] == 0 and len(generations) == stats["requests_sent"] == len(set(prompts))
    assert len(prompts) == len(set(prompts))  # none answered twice
    endpoints = stats["endpoints"]
    by_server = [sum(n == number for n, _ in answered) for number in (0, 1)]  # answers paid, per server
    assert set(endpoints) == set(urls) and by_server[1] >= 10
    assert [endpoints[url]["succeeded"] for url in urls] == by_server


def test_the_offline_backend_refuses_a_family_that_needs_an_llm(project):
    project("synthesize", families={"review_retrieval": {"items": 1}})
    with pytest.raises(UserError, match=r"families.review_retrieval: needs an LLM \(backend: openai\)"):
        synthesize.synthesize("t")
    project("synthesize", families={"no_such": {"items": 1}})
    with pytest.raises(UserError, match=r"families.no_such: no such task family"):
        synthesize.synthesize("t")


BRAND_QUESTION = (
    "The product 'Stainless Steel Insulated Water Bottle 750ml Leak Proof' appears on an e-commerce website. "
    "Which brand makes this product?\n0. Hydrovale\n1. Acme\n2. Other\nAnswer: 0"
)


def test_clean_rejects_copies_of_few_shot_examples_and_evaluation_questions(project):
    eval_question = read_jsonl("data/demo/questions.jsonl")[0]["input_field"]
    fewshot = read_jsonl("data/demo/fewshot.jsonl")[0]
    reply = {
        "family": "product_attribute_choice",
        "job": "x",
        "product_id": "B0DEMO0001",
        "locale": "UK",
        "title": "Stainless Steel Insulated Water Bottle 750ml Leak Proof",
        "attributes": {},
        "context": {},
        "reply": "\n\n".join(
            [
                eval_question + " 1",
                example(fewshot).replace(
                    "Ceramic Coffee Mug 350 ml, Matte Finish", "Stainless Steel Insulated Water Bottle 750ml Leak Proof"
                ),
                BRAND_QUESTION,
                BRAND_QUESTION,
            ]
        ),
    }
    Path("runs/t/synthesize").mkdir(parents=True)
    Path("runs/t/synthesize/generations.jsonl").write_text(json.dumps(reply) + "\n")
    clean.clean("t")
    assert [r["code"] for r in read_jsonl("runs/t/clean/rejects.jsonl")] == [
        "eval_overlap",
        "fewshot_copy",
        "duplicate_question",
    ]
    assert len(read_jsonl("runs/t/clean/accepted.jsonl")) == 1
