"""Pages of the web interface (``/``), left out of the OpenAPI document (it describes ``/v1``).

Uploads, reads and graders' grades go through the ``/v1`` route functions themselves
(``services.routes.*``), called in-process with the principal of the signed-in key: the same
validation, storage, queueing, clinic isolation and audit as the JSON API, with no second code
path to drift. The key never reaches the page's scripts (the cookie is HttpOnly), so the browser
does not call ``/v1``; its only script polls a small progress route and reloads the page when the
result is complete.

One router assembled from the pages' modules, in the order their routes are matched: what every
page shares is in ``pages``, the rest one module a part of the interface.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.routing import APIRoute

from services.web import (
    assets,
    grade_forms,
    grading,
    home,
    jobs,
    login,
    model,
    patients,
    photos,
    results,
)

#: The pages' routers, in the order their routes are matched.
PARTS = (
    login.router,
    home.router,
    results.router,
    photos.router,
    grade_forms.router,
    patients.router,
    jobs.router,
    model.router,
    grading.router,
    assets.router,
)

router = APIRouter(include_in_schema=False)
for part in PARTS:
    router.include_router(part)

#: Form posts a signed-out browser may send.
SIGNED_OUT_FORMS = frozenset({"/login", "/logout"})
#: Every other form post needs a live session: the API edge checks it before reading the body.
SIGNED_IN_FORMS = frozenset(
    route.path
    for part in PARTS
    for route in part.routes
    if isinstance(route, APIRoute) and "POST" in (route.methods or ()) and route.path not in SIGNED_OUT_FORMS
)
#: The forms that carry photographs; the others are a few fields (``services.app.max_body_bytes``).
UPLOAD_FORMS = frozenset({"/screenings/bundle", "/screenings/image"})
