"""Signing in and out of the web interface (the session itself: ``services.web.auth``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from services.deps import SessionDep
from services.web import auth, pages
from services.web.pages import WebPrincipal

router = APIRouter(include_in_schema=False)


@router.get("/login")
def login_form(
    request: Request, principal: WebPrincipal, next: str | None = None, unsaved: bool = False
) -> Response:
    if principal is not None:
        return RedirectResponse(auth.safe_next(next), status_code=303)
    context = {"next": auth.safe_next(next), "error": None, "unsaved": unsaved}
    return pages.render(request, "login.html", context, principal=None)


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    api_key: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    if not auth.same_origin(request):
        return pages.forbidden_origin(request, None)
    key = auth.valid_key(session, api_key)
    if key is None:
        context = {"next": auth.safe_next(next), "error": "Unknown or revoked API key."}
        return pages.render(request, "login.html", context, principal=None, status_code=401)
    response = RedirectResponse(auth.safe_next(next), status_code=303)
    auth.sign_in(response, request, session, key)
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep) -> Response:
    if not auth.same_origin(request):  # as every other form post (another site signed staff out)
        return Response("This form was sent from another site.", status_code=403, media_type="text/plain")
    response = RedirectResponse("/login", status_code=303)
    auth.sign_out(response, request, session)
    return response
