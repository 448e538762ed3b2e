"""Orders for printed back issues: the catalogue, the order form's rules, the order store.

The server is the only judge of an order: prices come from ``CATALOGUE`` (in
pence), never from the form; quantities are whole numbers from 1 to 20; unknown
product codes are refused. ``OrderForm`` keeps exactly what was typed so a
refused form comes back as the member left it, with a message next to each field.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

MIN_QUANTITY, MAX_QUANTITY = 1, 20
MIN_ROWS, MAX_ROWS = 3, 10
ADDRESS_FIELDS = (("name", "Full name"), ("street", "Street and number"),
                  ("postcode", "Postcode"), ("city", "Town or city"))
MAX_FIELD = 200


@dataclass(frozen=True)
class Product:
    code: str
    description: str
    price: int  # pence


CATALOGUE: dict[str, Product] = {p.code: p for p in (
    Product("BI-2303", "Back issue, March 2023: Rivers and the towns they made", 650),
    Product("BI-2306", "Back issue, June 2023: A summer of field notes", 650),
    Product("BI-2309", "Back issue, September 2023: Workshops, benches and tools", 650),
    Product("BND-23", "Slipcase binder for the 2023 issues", 1200),
    Product("MAP-OX", "Folded map print: the rivers of Oxley Reach", 450),
    Product("PC-SET", "Postcard set: eight field sketches", 375),
)}


def money(pence: int) -> str:
    return f"£{pence // 100}.{pence % 100:02d}"


@dataclass
class Row:
    index: int
    code: str  # as sent
    quantity: str  # as typed
    product: Product | None = None
    count: int | None = None

    @property
    def empty(self) -> bool:
        return not self.code and not self.quantity

    @property
    def line_price(self) -> int | None:
        if self.product is None or self.count is None:
            return None
        return self.product.price * self.count


def parse_quantity(text: str) -> tuple[int | None, str | None]:
    """A quantity as typed → (count, None) or (None, message)."""
    if not text:
        return None, "Enter a quantity."
    if not (text.isascii() and text.isdigit()) or len(text) > 6:
        return None, f"Enter the quantity as a whole number from {MIN_QUANTITY} to {MAX_QUANTITY}."
    count = int(text)
    if count < MIN_QUANTITY:
        return None, f"The quantity must be at least {MIN_QUANTITY}."
    if count > MAX_QUANTITY:
        return None, f"You can order at most {MAX_QUANTITY} of each item."
    return count, None


@dataclass
class OrderForm:
    rows: list[Row]
    billing: dict[str, str]
    delivery: dict[str, str]
    same_as_billing: bool
    errors: dict[str, str] = field(default_factory=dict)  # field id → message

    @property
    def items(self) -> list[Row]:
        return [r for r in self.rows if r.line_price is not None]

    @property
    def total(self) -> int:
        return sum(r.line_price or 0 for r in self.items)

    def body(self) -> dict[str, Any]:
        """The order as stored: only server-computed prices."""
        return {
            "items": [{"code": r.code, "description": r.product.description,
                       "quantity": r.count, "price": r.product.price, "line": r.line_price}
                      for r in self.items if r.product is not None],
            "billing": self.billing,
            "delivery": self.billing if self.same_as_billing else self.delivery,
            "same_as_billing": self.same_as_billing, "total": self.total,
        }


def _text(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name, "")
    return value.strip()[:MAX_FIELD + 1] if isinstance(value, str) else ""


def parse_form(form: Mapping[str, Any], *, final: bool, add_row: bool = False) -> OrderForm:
    """Read the order form; ``final`` also checks the addresses and a non-empty basket."""
    rows = [Row(i, _text(form, f"code-{i}"), _text(form, f"quantity-{i}"))
            for i in range(MAX_ROWS)]
    last = max((r.index for r in rows if not r.empty), default=-1)
    shown = max(MIN_ROWS, last + 1 + (1 if add_row else 0))
    order = OrderForm(rows[:min(shown, MAX_ROWS)],
                      {k: _text(form, f"billing-{k}") for k, _ in ADDRESS_FIELDS},
                      {k: _text(form, f"delivery-{k}") for k, _ in ADDRESS_FIELDS},
                      same_as_billing=bool(form.get("same-as-billing")))
    for row in rows:
        if row.empty:
            continue
        if not row.code:
            order.errors[f"code-{row.index}"] = "Choose a product for this quantity."
        elif (product := CATALOGUE.get(row.code)) is None:
            order.errors[f"code-{row.index}"] = "There is no product with this code."
        else:
            row.product = product
        count, problem = parse_quantity(row.quantity)
        if problem:
            order.errors[f"quantity-{row.index}"] = problem
        elif row.product is not None:
            row.count = count
    if final:
        if not order.items and not order.errors:
            order.errors["code-0"] = "Your basket is empty: choose at least one item."
        blocks = [("billing", order.billing)]
        if not order.same_as_billing:
            blocks.append(("delivery", order.delivery))
        for prefix, values in blocks:
            for key, label in ADDRESS_FIELDS:
                name = f"{prefix}-{key}"
                if not values[key]:
                    order.errors[name] = f"Enter the {prefix} address: {label.lower()}."
                elif len(values[key]) > MAX_FIELD:
                    order.errors[name] = f"Keep this under {MAX_FIELD} characters."
    return order


class OrderStore:
    def __init__(self, db: sqlite3.Connection, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    def place(self, member_id: str, order: OrderForm) -> str:
        order_id = secrets.token_hex(6)
        body = order.body()
        self._db.execute("INSERT INTO orders (id, member_id, created, total, body) "
                         "VALUES (?, ?, ?, ?, ?)",
                         (order_id, member_id, self._clock(), body["total"], json.dumps(body)))
        return order_id

    def get(self, member_id: str, order_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM orders WHERE member_id = ? AND id = ?",
                               (member_id, order_id)).fetchone()
        return None if row is None else self._order(row)

    def for_member(self, member_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM orders WHERE member_id = ? ORDER BY created",
                                (member_id,))
        return [self._order(row) for row in rows]

    @staticmethod
    def _order(row: sqlite3.Row) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(row["body"])
        return {**body, "id": row["id"], "created": row["created"]}
