"""The FastAPI application factory: ``uvicorn --factory services.app:create_app``.

Nothing is built at import: the database engine, the task producer and the metrics' view of the
database are created in the lifespan, from the settings of the process that runs the app.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import exc as sa_exc
from starlette.concurrency import run_in_threadpool

from core import db
from core import repository as repo
from core.migrate import SchemaBehind, check_schema_at_start, schema_problem
from core.producer import broker_reachable, make_producer_app
from core.schemas import Readiness
from core.settings import Settings, get_settings
from core.store import FileStore
from services import web
from services.config import ApiSettings, get_api_settings
from services.edge import WRITES, ApiEdge, route_path
from services.errors import install_error_handlers
from services.limits import BodySizeLimit
from services.logfilter import install_access_log_filter
from services.metrics import Metrics, MetricsMiddleware
from services.modelinfo import active_ref
from services.openapi_doc import install_openapi
from services.ratelimit import RateLimiter
from services.routes import agreement, bundles, grading_queue, images, jobs, models, patients
from services.waits import WaitSlots

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
DESCRIPTION = """Diabetic-retinopathy screening of colour fundus photographs.

Every `/v1` call needs `Authorization: Bearer <api key>`; a key belongs to one clinic, and a clinic
sees only its own patients, photographs, bundles and jobs (other ids answer 404).

Grades follow the ICDR scale (0 no DR .. 4 proliferative DR); referable = grade >= 2. A photograph
can be ungradable (poor quality or not a fundus photograph): it then has no grade, and an eye or
patient without a gradable photograph is reported ungradable and referable.

Uploads answer `202` with an id to poll; errors are JSON `{"error": code, "detail": ...}`.
"""

#: Multipart overhead allowed on top of the photographs themselves.
MULTIPART_SLACK_BYTES = 1024 * 1024
#: A bundle carries up to four photographs.
MAX_FILES_PER_REQUEST = 4
#: Largest body of a request without photographs: a web form (sign-in, search, erasure, folder
#: job) or a small JSON write (a folder job, a grader's grade).
FORM_BODY_BYTES = 64 * 1024
#: The API's writes that carry photographs (the web interface's are ``web.UPLOAD_FORMS``).
API_UPLOADS = frozenset({"/v1/images", "/v1/bundles"})


def configure_logging(level: str) -> None:
    """The API's own loggers (services, core) at ``DRSCREEN_LOG_LEVEL``, with time, level and
    name; uvicorn configures only its own. Left alone when logging is set up already (tests,
    an embedding program)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("services", "core"):
        logging.getLogger(name).setLevel(level.upper())


def create_app(
    settings: Settings | None = None, api_settings: ApiSettings | None = None, *, check_schema: bool = True
) -> FastAPI:
    """Build the app. ``settings`` default to the process environment, read at start-up (in the
    lifespan), not when the app object is built. ``check_schema=False``: the caller has refused a
    database behind this code's schema already (``drscreen serve``, :func:`create_app_for_cli`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        base = settings or get_settings()
        api = api_settings or get_api_settings()
        if check_schema:
            _check_schema(base)  # first: nothing opened yet when it refuses
        app.state.settings = base
        app.state.api_settings = api
        app.state.sessionmaker = db.get_sessionmaker(base.database_url)
        app.state.producer = make_producer_app(base)
        app.state.rate_limiter = RateLimiter(api.rate_limit_per_minute, api.rate_limit_burst)
        app.state.explain_requested = {}
        app.state.wait_slots = WaitSlots(api.max_waiting, api.max_waiting_per_key)
        metrics.attach(base, app.state.sessionmaker)
        configure_logging(base.log_level)
        install_access_log_filter()
        log.info("API ready (model %s)", active_ref(base) or "none installed")
        _warn_shared_roots(base, app.state.sessionmaker)
        try:
            yield
        finally:
            app.state.producer.close()
            db.get_engine(base.database_url).dispose()

    # Swagger UI and ReDoc load their scripts from a CDN on the staff pages' origin: a script
    # changed there could act as any signed-in staff member (the security review). Off unless
    # asked for; /openapi.json (the contract) is always served.
    docs = (api_settings or get_api_settings()).api_docs
    app = FastAPI(
        title="drscreen",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_tags=[
            {"name": "images", "description": "single photographs"},
            {"name": "bundles", "description": "a patient's visit: up to two photographs per eye"},
            {"name": "jobs", "description": "folders on the server, scored in bulk"},
            {"name": "patients", "description": "patient-level results and history; erasure of a patient"},
            {"name": "models", "description": "the released ensemble in use"},
            {
                "name": "agreement",
                "description": "the model's grades against the clinic's human graders (recorded per "
                "photograph with PUT /v1/images/{id}/grader-grade)",
            },
            {"name": "operations", "description": "health, readiness and metrics"},
        ],
    )
    install_error_handlers(app, not_found_page=web.not_found_page)
    install_openapi(app, FORM_BODY_BYTES)
    for router in (
        images.router,
        bundles.router,
        jobs.router,
        patients.router,
        models.router,
        agreement.router,
        grading_queue.router,
    ):
        app.include_router(router, prefix="/v1")
    app.include_router(web.router)  # the web interface at `/` (not in the OpenAPI document)

    metrics = Metrics()
    app.state.metrics = metrics
    # Added last = outermost: oversized bodies and keyless writes are refused before routing,
    # and still counted.
    app.add_middleware(ApiEdge, signed_in_forms=web.SIGNED_IN_FORMS)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # async: answered on the event loop, even when every worker thread is busy (waiting uploads)
    @app.get("/healthz", tags=["operations"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Database (at this code's schema), broker and a released model are reachable",
        responses={
            200: {"model": Readiness, "description": "ready: every check passed"},
            503: {"model": Readiness, "description": "a dependency is not ready (see `checks`)"},
        },
    )
    async def readyz(request: Request) -> JSONResponse:
        checks = await run_in_threadpool(_readiness, request.app)
        if all(checks.values()):
            return JSONResponse({"status": "ready", "checks": checks})
        failing = ", ".join(name for name, ok in checks.items() if not ok)
        # The error shape of every other answer, plus the individual checks.
        body = {
            "status": "unavailable",
            "checks": checks,
            "error": "unavailable",
            "detail": f"not ready: {failing}",
        }
        return JSONResponse(body, status_code=503)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def metrics_endpoint(request: Request) -> Response:
        token = request.app.state.api_settings.metrics_token
        if token and not _bearer_is(request, token):  # refused before any query
            headers = {"WWW-Authenticate": "Bearer"}
            return JSONResponse(
                {"error": "unauthorized", "detail": "give the metrics token"},
                status_code=401,
                headers=headers,
            )
        # Collection queries the database: keep it off the event loop.
        return await run_in_threadpool(metrics.render)

    return app


def _bearer_is(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def max_body_bytes(scope: Any) -> int:
    """Largest request body: a bundle's photographs plus the multipart overhead for the writes that
    carry photographs; a few fields for every other write (a 100 MiB sign-in form was read whole,
    by anyone; a grader's grade took 100 MB bodies)."""
    path = route_path(scope)
    if scope.get("method") in WRITES and path not in API_UPLOADS and path not in web.UPLOAD_FORMS:
        return FORM_BODY_BYTES
    # Before start-up (a schema fetched without the lifespan) the environment's settings apply.
    settings: Settings = getattr(scope["app"].state, "settings", None) or get_settings()
    return settings.max_upload_bytes * MAX_FILES_PER_REQUEST + MULTIPART_SLACK_BYTES


def create_app_for_cli() -> FastAPI:
    """The factory ``drscreen serve`` hands uvicorn: the command checked the schema just before
    (one line, exit 2), so each app process does not check it again; uvicorn started on
    :func:`create_app` directly still checks in the lifespan."""
    return create_app(check_schema=False)


def _warn_shared_roots(settings: Settings, sessionmaker: Any) -> None:
    """Log at start what ``drscreen status`` notes (``Settings.shared_roots_warning``)."""
    if not settings.import_root_paths or settings.import_per_clinic:
        return
    try:
        with sessionmaker() as session:
            warning = settings.shared_roots_warning(repo.count_clinics_with_keys(session))
    except sa_exc.SQLAlchemyError:  # unreachable at start: /readyz says so
        return
    if warning:
        log.warning("%s", warning)


def _check_schema(settings: Settings) -> None:
    """Refuse to start on a database whose schema is behind this code's (every write would be a
    500); a database that cannot be reached yet is left to /readyz (it may come up after the API)."""
    try:
        unreachable = check_schema_at_start(settings.database_url)
    except SchemaBehind as exc:
        log.error("not starting: %s", exc)
        raise
    if unreachable:
        log.warning("database not reachable at start, schema not checked: %s", unreachable)


def _schema_ok(database_url: str) -> bool:
    try:
        return schema_problem(database_url) is None
    except Exception as exc:  # unreachable (the database check says so), or migrations missing
        log.warning("schema check failed: %s: %s", type(exc).__name__, str(exc).splitlines()[:1])
        return False


def _readiness(app: Any) -> dict[str, bool]:
    settings: Settings = app.state.settings
    reachable = db.ping(settings.database_url)
    return {
        "database": reachable,
        "schema": reachable and _schema_ok(settings.database_url),
        "broker": broker_reachable(timeout=2.0, app=app.state.producer),
        "model": active_ref(settings) is not None,
        "store": FileStore(settings.store_path).write_problem(settings.max_upload_bytes) is None,
    }
