"""The catalog read as a stream (encodings, ragged rows, per-locale sampling), the demo's
synthesize output against dvc.lock, and the Azure OpenAI client's credentials."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import sys
import threading
import tracemalloc
import types
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from shoptune import UserError
from shoptune.catalog import COLUMNS, _sample, read_catalog
from shoptune.families.family import write_item
from shoptune.workspace import entrypoint
from stages import synthesize
from tests.conftest import ROOT

HEADER = ",".join(COLUMNS)


def row(id: str, locale: str = "UK", title: str = "Mug", desc: str = "A mug.") -> list[str]:
    return [id, locale, title, "9.99", "Acme", "Red", "", "", "", "", desc]


def catalog(tmp_path, rows: list[list[str]], name: str = "catalog.csv") -> Path:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    path = tmp_path / name
    path.write_text(out.getvalue(), encoding="utf-8")
    return path


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ reading the file


def test_a_byte_order_mark_is_fine(tmp_path):
    path = catalog(tmp_path, [row("A1"), row("A2", "DE")])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    products = read_catalog(path)
    assert [(p.id, p.locale, p.title) for p in products] == [("A1", "UK", "Mug"), ("A2", "DE", "Mug")]
    assert products[0].attributes == {"brand": "Acme", "color": "Red"}


def test_latin1_bytes_name_their_line(tmp_path):
    # far past the decoder's first chunk, which fails ahead of the line the CSV reader is on
    path = catalog(tmp_path, [row(f"A{i}", desc="Cafe " * 20) for i in range(300)])
    lines = path.read_bytes().split(b"\n")
    lines[250] = lines[250].replace(b"Cafe", "Café".encode("latin-1"), 1)  # line 251: the header is line 1
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(UserError) as err:
        read_catalog(path)
    assert one_line(err).startswith(f"{path}:251: not UTF-8 (byte 0xe9")


@pytest.mark.parametrize("fields", [["A3", "UK", "Mug"], [*row("A3"), "extra"]])
def test_a_ragged_row_names_its_line(tmp_path, fields):
    # a quoted newline in row 2: the ragged row starts on line 5 of the file
    path = catalog(tmp_path, [row("A1"), row("A2", desc="two\nlines"), fields, row("A4")])
    with pytest.raises(UserError, match=rf"catalog.csv:5: {len(fields)} fields, the header has 11") as err:
        read_catalog(path)
    one_line(err)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"catalog.csv: empty file \(expected a header: id,locale,title"),
        (HEADER + "\n", r"catalog.csv: no products$"),
        ("id,locale,title,desc\nA1,UK,Mug,x\n", r"catalog.csv: missing column\(s\) price, brand, color, size"),
        (HEADER + "\nA1,XX,Mug,1,,,,,,,\n", r"catalog.csv:2: locale 'XX' is not one of DE"),
        (HEADER + "\nA1,UK, ,1,,,,,,,\n", r"catalog.csv:2: empty id or title"),
        (HEADER + "\nA1,UK,Mug,1,,,,,,,\nA1,UK,Cup,1,,,,,,,\n", r"catalog.csv:3: duplicate product A1 in locale UK"),
        (
            HEADER + f"\nA1,UK,Mug,1,,,,,,,\nA2,UK,Mug,1,,,,,,,{'x' * 200_000}\n",
            r"catalog.csv:3: not valid CSV \(field larger than field limit",
        ),
    ],
)
def test_file_mistakes_are_one_line(tmp_path, text, message):
    path = tmp_path / "catalog.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=message) as err:
        read_catalog(path)
    one_line(err)


def test_columns_in_another_order_and_blank_lines(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_text("title,id,locale,price,brand,color,size,model,material,author,desc\n\nMug,A1,UK,2,,,,,,,\n\n")
    [product] = read_catalog(path)
    assert (product.id, product.locale, product.title, product.price) == ("A1", "UK", "Mug", "2")


# ------------------------------------------------------------------ sampling per locale


def mixed_catalog(folder: Path, per_locale: dict[str, int]) -> Path:
    rows, counters = [], dict.fromkeys(per_locale, 0)
    while any(counters[loc] < n for loc, n in per_locale.items()):  # interleaved, as a real file need not be
        for locale, n in per_locale.items():
            if counters[locale] < n:
                counters[locale] += 1
                rows.append(row(f"{locale}{counters[locale]:04d}", locale, f"Product {counters[locale]}"))
    folder.mkdir(parents=True, exist_ok=True)
    return catalog(folder, rows)


def test_sampling_per_locale(tmp_path):
    path = mixed_catalog(tmp_path, {"DE": 200, "JP": 50, "UK": 3, "FR": 40})
    counts = {"DE": 20, "JP": 10, "UK": 5, "ES": 4}
    first = read_catalog(path, counts, seed=1)
    assert Counter(p.locale for p in first) == {"DE": 20, "JP": 10, "UK": 3}  # UK: all 3; ES: none; FR: not asked
    order = {p.id: i for i, p in enumerate(read_catalog(path))}
    assert [order[p.id] for p in first] == sorted(order[p.id] for p in first)  # the file's order
    assert read_catalog(path, counts, seed=1) == first  # the same for the same seed
    assert {p.id for p in read_catalog(path, counts, seed=2)} != {p.id for p in first}
    assert Counter(p.locale for p in read_catalog(path, {"DE": None, "JP": 1}, seed=1)) == {"DE": 200, "JP": 1}
    with pytest.raises(UserError, match=r"catalog.csv: no products of the locales asked for"):
        read_catalog(path, {"IT": 5}, seed=1)


def test_a_locales_sample_depends_only_on_its_own_rows(tmp_path):
    alone = read_catalog(mixed_catalog(tmp_path / "alone", {"DE": 60}), {"DE": 7})
    mixed = read_catalog(mixed_catalog(tmp_path / "mixed", {"DE": 60, "JP": 90}), {"DE": 7, "JP": 5})
    assert [p.id for p in alone] == [p.id for p in mixed if p.locale == "DE"]


def test_sampling_is_uniform():
    """Each of 12 rows is kept with probability 4/12 (a reservoir off by one is not)."""
    kept = Counter()
    for seed in range(1500):
        rows = ((line, {"locale": "DE", "id": str(line)}) for line in range(12))
        kept.update(r["id"] for _, r in _sample(rows, {"DE": 4}, seed, Path("c.csv")))
    assert all(abs(kept[str(line)] / 1500 - 4 / 12) < 0.05 for line in range(12)), kept


def test_sampling_memory_is_bounded_by_the_sample():
    def rows(n):
        for line in range(n):
            yield line, {"locale": "DE" if line % 2 else "JP", "id": f"B{line:09d}", "title": "x" * 200}

    tracemalloc.start()
    sample = _sample(rows(100_000), {"DE": 10, "JP": 10}, 0, Path("c.csv"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(sample) == 20
    assert peak < 1_000_000  # the 100,000 rows would be over 30 MB


# ------------------------------------------------------------------ the demo, and the stage's errors


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """A scratch project with the demo data and the repository's demo synthesize params."""
    shutil.copytree(ROOT / "data" / "demo", tmp_path / "data" / "demo")
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["demo"]["synthesize"]
    monkeypatch.chdir(tmp_path)

    def set_params(**values):
        Path("params.yaml").write_text(yaml.safe_dump({"profiles": {"demo": {"synthesize": {**section, **values}}}}))

    set_params()
    return set_params


def test_the_demo_output_is_the_one_dvc_lock_records(demo):
    synthesize.synthesize("demo")
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]["synthesize@demo"]
    [recorded] = [o for o in lock["outs"] if o["path"] == "runs/demo/synthesize/generations.jsonl"]
    data = Path("runs/demo/synthesize/generations.jsonl").read_bytes()
    assert (hashlib.md5(data).hexdigest(), len(data)) == (recorded["md5"], recorded["size"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_products": -1}, r"synthesize.max_products: expected a positive integer or null \(all\), got -1"),
        ({"products_per_locale": {"DE": 0}}, r"synthesize.products_per_locale.DE: expected a positive integer"),
        ({"families": {"query_ner": {"items": 0}}}, r"synthesize.families.query_ner.items: expected an integer of"),
        ({"api_version": "2024-02-01"}, r"synthesize.base_url: null, but api_version is set \(Azure OpenAI\)"),
    ],
)
def test_a_params_mistake_stops_the_stage_before_any_work(demo, capsys, values, message):
    demo(**values)
    with pytest.raises(SystemExit) as exit:
        entrypoint(synthesize.synthesize, ["--profile", "demo"])
    assert exit.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: params.yaml: profiles.demo.") and re.search(message, line)
    assert not Path("runs").exists()


# ------------------------------------------------------------------ Azure OpenAI credentials


class AzureServer(BaseHTTPRequestHandler):
    """An Azure OpenAI chat completions endpoint that records what it was sent."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        AzureServer.requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "key": self.headers.get("api-key")}
        )
        text = write_item("The product 'Mug' appears on an e-commerce website. What is it?", ["A", "B", "C"], 2)
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        data = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def azure_endpoint():
    AzureServer.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), AzureServer)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class ClientAuthenticationError(Exception):
    pass


def fake_azure_identity(monkeypatch, token):
    """azure.identity and azure.core.exceptions as far as synthesize uses them; `token()` is the sign-in."""
    scopes = []

    def get_bearer_token_provider(credential, scope):
        scopes.append(scope)
        return token

    modules = {
        "azure": types.ModuleType("azure"),
        "azure.identity": types.ModuleType("azure.identity"),
        "azure.core": types.ModuleType("azure.core"),
        "azure.core.exceptions": types.ModuleType("azure.core.exceptions"),
    }
    modules["azure.identity"].DefaultAzureCredential = lambda: object()
    modules["azure.identity"].get_bearer_token_provider = get_bearer_token_provider
    modules["azure.core.exceptions"].ClientAuthenticationError = ClientAuthenticationError
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return scopes


def azure(demo, endpoint, **values):
    """The demo's synthesize params pointed at an Azure OpenAI deployment gpt-35 at `endpoint`."""
    demo(
        backend="openai",
        model="gpt-35",
        base_url=endpoint,
        api_version="2024-02-01",
        api_key_env="AZ_KEY",
        families={"product_attribute_choice": {"items": 5}},  # one request per product
        **values,
    )


def test_azure_with_a_key(demo, azure_endpoint, monkeypatch):
    monkeypatch.setenv("AZ_KEY", "k-123")
    azure(demo, azure_endpoint, max_products=1, max_retries=0)
    synthesize.synthesize("demo")
    [request] = AzureServer.requests
    assert request["path"] == "/openai/deployments/gpt-35/chat/completions?api-version=2024-02-01"
    assert (request["key"], request["auth"]) == ("k-123", None)


def test_azure_without_a_key_signs_in_with_entra_id(demo, azure_endpoint, monkeypatch):
    monkeypatch.delenv("AZ_KEY", raising=False)
    scopes = fake_azure_identity(monkeypatch, lambda: "entra-token")
    azure(demo, azure_endpoint, max_products=2, max_retries=0)
    synthesize.synthesize("demo")
    assert scopes == ["https://cognitiveservices.azure.com/.default"]
    assert [(r["auth"], r["key"]) for r in AzureServer.requests] == [("Bearer entra-token", None)] * 2


def test_azure_sign_in_failing_is_one_line(demo, azure_endpoint, monkeypatch):
    monkeypatch.delenv("AZ_KEY", raising=False)

    def token():
        raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token.\nAttempted: ...")

    fake_azure_identity(monkeypatch, token)
    azure(demo, azure_endpoint, max_products=1, max_retries=0)
    with pytest.raises(UserError) as err:
        synthesize.synthesize("demo")
    assert one_line(err) == (
        "AZ_KEY is not set and Microsoft Entra ID sign-in failed (DefaultAzureCredential failed to retrieve a "
        "token.); sign in (az login) or set the key"
    )
    assert AzureServer.requests == []


def test_azure_without_a_key_or_azure_identity(demo, azure_endpoint, monkeypatch):
    monkeypatch.delenv("AZ_KEY", raising=False)
    monkeypatch.setitem(sys.modules, "azure.identity", None)  # import fails
    azure(demo, azure_endpoint)
    with pytest.raises(UserError) as err:
        synthesize.synthesize("demo")
    assert one_line(err) == (
        "environment variable AZ_KEY is not set (params: synthesize.api_key_env): set it to the Azure OpenAI key, "
        "or install azure-identity to sign in with Microsoft Entra ID instead"
    )
