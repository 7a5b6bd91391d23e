"""The Amazon-M2 product catalog (KDD Cup 2023, products_train.csv).

The real file has about 1.5 M rows: it is streamed, never held whole unless every product
is asked for. `products_per_locale` picks at most N products of each locale named, by
seeded reservoir sampling (memory: the sample), returned in the file's order.
"""

from __future__ import annotations

import csv
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shoptune import UserError

log = logging.getLogger("catalog")

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


def read_catalog(
    path: str | Path, products_per_locale: dict[str, int | None] | None = None, seed: int = 0
) -> list[Product]:
    """The catalog's products in file order: all of them, or with `products_per_locale` at most
    that many of each locale named (null: all of that locale; locales not named: none), the same
    ones for the same seed. Every row is checked, sampled or not; a duplicate (id, locale) is
    found among the products returned (finding it among 1.5 M rows would hold them all)."""
    path = Path(path)
    rows = _rows(path)
    chosen = rows if products_per_locale is None else _sample(rows, products_per_locale, seed, path)
    products, seen = [], {}
    for line, row in chosen:
        key = (row["id"], row["locale"])
        if key in seen:
            product, first = f"{row['id']} in locale {row['locale']}", seen[key]
            raise UserError(f"{path}:{line}: duplicate product {product} (first: line {first})")
        seen[key] = line
        products.append(_product(row))
    if not products:
        raise UserError(f"{path}: no products" + (" of the locales asked for" if products_per_locale else ""))
    return products


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line where the record starts, the row's COLUMNS) for each product row, streamed; every
    mistake in the file is a one-line UserError naming its line."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    line = 1
    with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: a UTF-8 byte order mark is fine
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise UserError(f"{path}: empty file (expected a header: {','.join(COLUMNS)})")
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise UserError(f"{path}: missing column(s) {', '.join(missing)} (Amazon-M2 has {', '.join(COLUMNS)})")
            where = [header.index(c) for c in COLUMNS]
            line = reader.line_num + 1
            for fields in reader:
                if fields:  # a blank line is no row
                    if len(fields) != len(header):
                        raise UserError(
                            f"{path}:{line}: {len(fields)} fields, the header has {len(header)} "
                            "(a stray quote or comma? fields with commas, quotes or newlines must be quoted)"
                        )
                    row = {c: fields[i] for c, i in zip(COLUMNS, where, strict=True)}
                    if not row["id"] or not row["title"].strip():
                        raise UserError(f"{path}:{line}: empty id or title")
                    if row["locale"] not in LOCALES:
                        raise UserError(f"{path}:{line}: locale {row['locale']!r} is not one of {', '.join(LOCALES)}")
                    yield line, row
                line = reader.line_num + 1
        except UnicodeDecodeError:
            raise UserError(_not_utf8(path)) from None
        except csv.Error as err:
            raise UserError(f"{path}:{line}: not valid CSV ({err})") from None


def _not_utf8(path: Path) -> str:
    """The first line that is not UTF-8 (the decoder fails a chunk ahead of the CSV reader)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return (
                    f"{path}:{number}: not UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line); "
                    "save the catalog as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                )
    return f"{path}: not UTF-8"


def _sample(
    rows: Iterator[tuple[int, dict[str, str]]], counts: dict[str, int | None], seed: int, path: Path
) -> list[tuple[int, dict[str, str]]]:
    """At most counts[locale] rows of each locale, uniformly at random (reservoir sampling, one
    generator per locale: a locale's sample depends only on the seed and that locale's rows)."""
    kept: dict[str, list[tuple[int, dict[str, str]]]] = {locale: [] for locale in counts}
    total = dict.fromkeys(counts, 0)
    rngs = {locale: random.Random(f"{seed}:{locale}") for locale in counts}
    for line, row in rows:
        locale = row["locale"]
        if locale not in counts:
            continue
        wanted, n = counts[locale], total[locale]
        total[locale] = n + 1
        if wanted is None or n < wanted:
            kept[locale].append((line, row))
        else:
            j = rngs[locale].randrange(n + 1)
            if j < wanted:
                kept[locale][j] = (line, row)
    for locale in counts:
        if total[locale] == 0:
            log.warning("%s: no products of locale %s", path, locale)
    log.info(
        "%s: products kept per locale: %s",
        path,
        ", ".join(f"{locale} {len(kept[locale])} of {total[locale]}" for locale in counts),
    )
    return sorted((item for sample in kept.values() for item in sample), key=lambda item: item[0])


def _product(row: dict[str, str]) -> Product:
    attributes = {a: row[a].strip() for a in ATTRIBUTES if row[a].strip()}
    title, price, desc = row["title"].strip(), row["price"].strip(), row["desc"].strip()
    return Product(row["id"], row["locale"], title, price, attributes, desc)
