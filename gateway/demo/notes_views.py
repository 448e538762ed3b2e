"""Member notes over HTTP: HTML forms and a JSON API on the same paths.

``/members/{member_id}/notes`` (GET list, POST create) and
``/members/{member_id}/notes/{note_id}`` (GET, PUT or POST edit, DELETE), plus
``…/{note_id}/delete`` for the HTML delete button. The member in the path must be
the member in the verified token (403 otherwise, whatever the gateway decided);
notes are looked up under that member only, so anyone else's note ID is a 404.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.demo.auth import Viewer
from gateway.demo.content import page_at
from gateway.demo.notes import Note, clean_text
from gateway.demo.pages import render_page
from gateway.demo.search import can_read
from gateway.demo.web import (
    check_origin,
    error,
    json_answer,
    need_member,
    read_body,
    render,
    state,
    wants_json,
)

_DONE = {"updated": "Note updated.", "deleted": "Note deleted."}


def _list_url(member_id: str, done: str) -> str:
    return f"/members/{member_id}/notes?done={done}"


async def notes_list(request: Request) -> Response:
    who = need_member(request, request.path_params["member_id"])
    if isinstance(who, Response):
        return who
    notes = state(request).notes.for_member(who.member_id)
    if wants_json(request):
        return json_answer({"notes": [n.to_json() for n in notes]})
    message = _DONE.get(request.query_params.get("done", ""))
    return render(request, "notes.html", title="My notes", notes=notes, message=message)


async def note_create(request: Request) -> Response:
    who = need_member(request, request.path_params["member_id"])
    if isinstance(who, Response):
        return who
    body = await read_body(request, who)
    if isinstance(body, Response):
        return body
    data, as_json = body
    ref = data.get("ref")
    page = page_at(ref) if isinstance(ref, str) else None
    if page is None or not can_read(who, page.access):
        message = "Notes can only be written about a page you can read."
        if as_json:
            return json_answer({"error": "invalid", "fields": {"ref": message}}, 422)
        return error(request, 400, "No such page", message)
    text, problem = clean_text(data.get("text"))
    if problem:
        if as_json:
            return json_answer({"error": "invalid", "fields": {"text": problem}}, 422)
        return render_page(request, page, status=422, note_text=text, note_error=problem)
    note = state(request).notes.create(who.member_id, page.path, page.title, text)
    if as_json:
        answer = json_answer(note.to_json(), 201)
        answer.headers["location"] = note.to_json()["url"]
        return answer
    return RedirectResponse(f"{page.path}?note=saved#note-form", status_code=303)


def _find(request: Request) -> tuple[Viewer, Note] | Response:
    """The signed-in member and their note named in the path, or the refusal."""
    who = need_member(request, request.path_params["member_id"])
    if isinstance(who, Response):
        return who
    note = state(request).notes.get(who.member_id, request.path_params["note_id"])
    if note is None:
        return error(request, 404, "Note not found", "You have no note with this ID.")
    return who, note


async def note_show(request: Request) -> Response:
    found = _find(request)
    if isinstance(found, Response):
        return found
    _, note = found
    if wants_json(request):
        return json_answer(note.to_json())
    return render(request, "note_edit.html", title="Edit note", note=note, text=note.text,
                  problem=None)


async def note_edit(request: Request) -> Response:
    found = _find(request)
    if isinstance(found, Response):
        return found
    who, note = found
    member_id = who.member_id
    body = await read_body(request, who)
    if isinstance(body, Response):
        return body
    data, as_json = body
    text, problem = clean_text(data.get("text"))
    if problem:
        if as_json:
            return json_answer({"error": "invalid", "fields": {"text": problem}}, 422)
        return render(request, "note_edit.html", 422, title="Edit note", note=note, text=text,
                      problem=problem)
    updated = state(request).notes.update(member_id, note.id, text)
    if updated is None:  # deleted meanwhile
        return error(request, 404, "Note not found", "You have no note with this ID.")
    if as_json:
        return json_answer(updated.to_json())
    return RedirectResponse(_list_url(member_id, "updated"), status_code=303)


async def note_delete(request: Request) -> Response:
    found = _find(request)
    if isinstance(found, Response):
        return found
    who, note = found
    member_id = who.member_id
    if request.method == "DELETE":
        refused = check_origin(request)
        if refused is not None:
            return refused
        state(request).notes.delete(member_id, note.id)
        return Response(status_code=204)
    body = await read_body(request, who)
    if isinstance(body, Response):
        return body
    state(request).notes.delete(member_id, note.id)
    if body[1]:
        return Response(status_code=204)
    return RedirectResponse(_list_url(member_id, "deleted"), status_code=303)
