"""The Amazon-M2 product catalog (KDD Cup 2023, products_train.csv)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from shoptune import UserError

COLUMNS = ("id", "locale", "title", "price", "brand", "color", "size", "model", "material", "author", "desc")
LOCALES = ("DE", "JP", "UK", "ES", "FR", "IT")
ATTRIBUTES = ("brand", "color", "size", "model", "material", "author")


@dataclass(frozen=True)
class Product:
    id: str
    locale: str
    title: str
    price: str
    attributes: dict[str, str]
    desc: str

    def card(self) -> str:
        """The product as the LLM sees it: title and the attributes it has."""
        lines = [f"Title: {self.title}"]
        lines += [f"{name.capitalize()}: {value}" for name, value in self.attributes.items()]
        if self.price:
            lines.append(f"Price: {self.price}")
        return "\n".join(lines)


def read_catalog(path: str | Path) -> list[Product]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)} (Amazon-M2 has {', '.join(COLUMNS)})")
        products, seen = [], set()
        for line, row in enumerate(reader, 2):
            key = (row["id"], row["locale"])
            if not row["id"] or not row["title"]:
                raise UserError(f"{path}:{line}: empty id or title")
            if row["locale"] not in LOCALES:
                raise UserError(f"{path}:{line}: locale {row['locale']!r} is not one of {', '.join(LOCALES)}")
            if key in seen:
                raise UserError(f"{path}:{line}: duplicate product {row['id']} in locale {row['locale']}")
            seen.add(key)
            attributes = {a: row[a].strip() for a in ATTRIBUTES if (row[a] or "").strip()}
            products.append(
                Product(
                    row["id"],
                    row["locale"],
                    row["title"].strip(),
                    (row["price"] or "").strip(),
                    attributes,
                    (row["desc"] or "").strip(),
                )
            )
    if not products:
        raise UserError(f"{path}: no products")
    return products
