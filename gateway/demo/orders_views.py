"""The back-issue order form, the confirmation page and the member's order list.

One form, three buttons: "Update totals" (recompute, keep everything), "Add a
row", and "Place order" (also checks the addresses). All prices on the page are
the server's; the form never sends one that counts.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.demo.auth import Viewer
from gateway.demo.orders import (
    ADDRESS_FIELDS,
    CATALOGUE,
    MAX_QUANTITY,
    MIN_QUANTITY,
    OrderForm,
    parse_form,
)
from gateway.demo.web import error, json_answer, need_member, read_body, render, state, wants_json


def _active_member(request: Request) -> Viewer | Response:
    who = need_member(request)
    if isinstance(who, Response) or who.is_active_member:
        return who
    return error(request, 403, "For active members",
                 "Ordering printed back issues needs an active membership.")


def _form_page(request: Request, order: OrderForm, status: int = 200) -> Response:
    return render(request, "order_form.html", status, title="Order printed back issues",
                  order=order, catalogue=CATALOGUE.values(), address_fields=ADDRESS_FIELDS,
                  min_quantity=MIN_QUANTITY, max_quantity=MAX_QUANTITY)


async def order_new(request: Request) -> Response:
    who = _active_member(request)
    if isinstance(who, Response):
        return who
    return _form_page(request, parse_form({"same-as-billing": "on"}, final=False))


async def order_post(request: Request) -> Response:
    who = _active_member(request)
    if isinstance(who, Response):
        return who
    body = await read_body(request, who)
    if isinstance(body, Response):
        return body
    data, as_json = body
    if as_json:
        return error(request, 415, "Use the order form",
                     "Orders are placed with the order form, not the JSON API.")
    action = data.get("action", "update")
    order = parse_form(data, final=action == "place", add_row=action == "add-row")
    if action != "place":
        return _form_page(request, order, 422 if order.errors else 200)
    if order.errors:
        return _form_page(request, order, 422)
    order_id = state(request).orders.place(who.member_id, order)
    return RedirectResponse(f"/orders/{order_id}", status_code=303)


async def order_show(request: Request) -> Response:
    who = need_member(request)
    if isinstance(who, Response):
        return who
    order = state(request).orders.get(who.member_id, request.path_params["order_id"])
    if order is None:
        return error(request, 404, "Order not found", "You have no order with this number.")
    if wants_json(request):
        return json_answer(order)
    return render(request, "order_done.html", title=f"Order {order['id']}", order=order)


async def order_list(request: Request) -> Response:
    who = need_member(request)
    if isinstance(who, Response):
        return who
    orders = state(request).orders.for_member(who.member_id)
    if wants_json(request):
        return json_answer({"orders": orders})
    return render(request, "orders.html", title="My orders", orders=orders)
