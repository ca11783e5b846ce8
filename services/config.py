"""API-only knobs, read from the same ``DRSCREEN_`` environment as :mod:`core.settings`.

They live here rather than in ``core`` because only the API acts on them.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DRSCREEN_", extra="ignore", env_file=None, env_ignore_empty=True
    )

    #: Requests per minute allowed for one API key (a token bucket refilled continuously); 0 = off.
    #: High enough for clinic software polling a result every 50 ms (the contract names no limit:
    #: the contract audit saw 20 of 90 quick GETs refused at 600/60); a runaway loop still stops.
    rate_limit_per_minute: int = Field(default=3000, ge=0)
    #: Bucket size: how many requests one key may send at once before being slowed down.
    rate_limit_burst: int = Field(default=300, ge=1)
    #: Upper bound of ``?wait=`` on ``POST /v1/images`` (the contract says 30).
    max_wait_seconds: float = Field(default=30.0, gt=0, le=30.0)
    #: How often a waiting request re-reads the database.
    wait_poll_seconds: float = Field(default=0.25, gt=0)
    #: ``?wait=`` requests sleeping at once per API process, and per API key (services/waits.py):
    #: past either, a request answers 202 without waiting. Below the ~40 threads that run routes.
    max_waiting: int = Field(default=16, ge=0)
    max_waiting_per_key: int = Field(default=8, ge=0)
    #: Largest page of ``GET /v1/jobs/{id}/results``; it can only lower the route's own cap of
    #: 1000 (a larger value acts as 1000; refusing it would stop an upgraded API that has one).
    max_page_size: int = Field(default=1000, ge=1)
    #: A web interface sign-in ends after this many hours without a page, and this many after it
    #: began, whatever (the cookie holds a session token, not the key: services/web/auth.py).
    web_session_idle_hours: float = Field(default=8.0, gt=0)
    web_session_max_hours: float = Field(default=24.0, gt=0)
    #: Serve Swagger UI at /docs and ReDoc at /redoc (their scripts come from a CDN, on the same
    #: origin as the staff pages: for development machines, not clinics).
    api_docs: bool = False
    #: When set, ``/metrics`` answers only ``Authorization: Bearer <this>`` (Prometheus:
    #: ``authorization: {credentials: ...}`` in the scrape config); empty: open, for a proxy that
    #: keeps it to operators (README "Deploy").
    metrics_token: str = ""


@lru_cache(maxsize=1)
def get_api_settings() -> ApiSettings:
    return ApiSettings()
