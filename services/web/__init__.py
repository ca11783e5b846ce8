"""The web interface for clinicians and operators, served at ``/`` by the API process.

Server-rendered (Jinja2), a small CSS file and a little vanilla JS (polling), nothing fetched from
the internet. It signs in with an API key (a server-side session in an HttpOnly cookie: web/auth.py) and calls
the same route functions as ``/v1`` (same validation, storage, queueing, clinic isolation and audit).
"""

from services.web.pages import not_found_page
from services.web.routes import SIGNED_IN_FORMS, UPLOAD_FORMS, router

__all__ = ["SIGNED_IN_FORMS", "UPLOAD_FORMS", "not_found_page", "router"]
