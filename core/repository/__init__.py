"""Every query of drscreen. Functions take a Session, ``flush()`` when they write, and never commit:
the caller's unit of work (``core.db.session_scope`` or the API's request dependency) commits.

Reads that take ``clinic_id`` return None for rows of another clinic, so callers answer 404 for
both unknown and foreign ids.

Callers use the package (``from core import repository as repo``; ``repo.get_image(...)``); the
queries live in one module per aggregate:

- ``clinics``: clinics and their import folders;
- ``api_keys``: API keys and the browser sessions signed in with them;
- ``patients``: patient rows;
- ``images``: photographs and their scoring lifecycle (claimed, done, failed, queued again);
- ``rescoring``: which photographs a release has to grade (again);
- ``releases``: model versions and the activated release;
- ``predictions``, ``explanations``: a model version's output per photograph;
- ``patient_results``: the latest visit's photographs pooled into eye and patient results;
- ``bundles``: photographs uploaded together;
- ``jobs``: folder jobs and their items;
- ``audit``: the audit trail;
- ``heartbeats``: workers' heartbeat rows.

Patching: callers look names up on this package, so ``monkeypatch.setattr(repo, name, ...)``
reaches them. A function of the package calls its siblings through its own module's globals
(e.g. ``patients.get_or_create_patient`` calls ``patients.ensure_patient``): to reach that call,
patch the module it is made from (``core.repository.patients``).
"""

from __future__ import annotations

from core.repository.api_keys import (
    API_KEY_PREFIX,
    KEY_LABEL_MAX,
    authenticate_api_key,
    count_clinics_with_keys,
    create_api_key,
    create_web_session,
    end_web_session,
    hash_api_key,
    list_api_keys,
    purge_web_sessions,
    revoke_api_key,
    web_session_key,
)
from core.repository.audit import list_audit_events, record_audit
from core.repository.bundles import (
    bundle_images,
    combined_status,
    create_bundle,
    get_bundle,
    refresh_bundle_status,
)
from core.repository.clinics import CLINIC_NAME_MAX, get_clinic_by_name, get_or_create_clinic, import_roots_of
from core.repository.explanations import (
    current_explanation,
    get_explanation,
    on_current_scale,
    upsert_explanation,
)
from core.repository.heartbeats import (
    forget_workers_unseen_since,
    mark_worker_stopped,
    record_heartbeat,
    worker_heartbeats,
)
from core.repository.images import (
    VisitPhoto,
    claim_image,
    count_failed_images_since,
    create_image,
    get_image,
    get_images,
    list_patient_images,
    mark_image_done,
    mark_image_failed,
    orphaned_images,
    requeue_image,
    return_to_queue,
    stale_running_images,
    visit_photos_of_patients,
)
from core.repository.jobs import (
    INSERT_BATCH_ROWS,
    OPEN_JOB_STATES,
    JobItemSpec,
    add_job_items,
    count_job_items,
    count_open_jobs,
    create_job,
    get_job,
    job_failures,
    job_grade_counts,
    job_items,
    job_patients,
    jobs_failures,
    jobs_grade_counts,
    refresh_job_counts,
    set_job_item,
)
from core.repository.patient_results import (
    get_current_patient_result,
    grades_regrading,
    held_referral,
    iter_patient_history,
    latest_visit,
    newest_patient_results,
    patient_aggregate,
    patient_history,
    recompute_patient,
    record_patient_result,
    regrading_photo_ids,
    same_photograph_both_eyes,
    unfinished_gradings,
)
from core.repository.patients import (
    ensure_patient,
    external_ids_of,
    get_or_create_patient,
    get_patient,
    get_patient_by_id,
    get_patients,
    lock_patients_for_result,
)
from core.repository.predictions import (
    get_prediction,
    graded_gradable,
    predictions_for_images,
    upsert_prediction,
)
from core.repository.releases import (
    activate_release,
    active_release,
    get_model_version,
    get_model_version_by_ref,
    get_or_create_model_version,
    latest_model_version,
    lock_release_for_writing,
    other_active_release,
    recent_releases,
)
from core.repository.rescoring import (
    LEFT_FOR_ACTIVE_RELEASE,
    declined_to_resend,
    images_to_rescore,
    leave_for_active_release,
    needs_rescoring,
)

__all__ = [
    "API_KEY_PREFIX",
    "CLINIC_NAME_MAX",
    "INSERT_BATCH_ROWS",
    "KEY_LABEL_MAX",
    "LEFT_FOR_ACTIVE_RELEASE",
    "OPEN_JOB_STATES",
    "JobItemSpec",
    "VisitPhoto",
    "activate_release",
    "active_release",
    "add_job_items",
    "authenticate_api_key",
    "bundle_images",
    "claim_image",
    "combined_status",
    "count_clinics_with_keys",
    "count_failed_images_since",
    "count_job_items",
    "count_open_jobs",
    "create_api_key",
    "create_bundle",
    "create_image",
    "create_job",
    "create_web_session",
    "current_explanation",
    "declined_to_resend",
    "end_web_session",
    "ensure_patient",
    "external_ids_of",
    "forget_workers_unseen_since",
    "get_bundle",
    "get_clinic_by_name",
    "get_current_patient_result",
    "get_explanation",
    "get_image",
    "get_images",
    "get_job",
    "get_model_version",
    "get_model_version_by_ref",
    "get_or_create_clinic",
    "get_or_create_model_version",
    "get_or_create_patient",
    "get_patient",
    "get_patient_by_id",
    "get_patients",
    "get_prediction",
    "graded_gradable",
    "grades_regrading",
    "hash_api_key",
    "held_referral",
    "images_to_rescore",
    "import_roots_of",
    "iter_patient_history",
    "job_failures",
    "job_grade_counts",
    "job_items",
    "job_patients",
    "jobs_failures",
    "jobs_grade_counts",
    "latest_model_version",
    "latest_visit",
    "leave_for_active_release",
    "list_api_keys",
    "list_audit_events",
    "list_patient_images",
    "lock_patients_for_result",
    "lock_release_for_writing",
    "mark_image_done",
    "mark_image_failed",
    "mark_worker_stopped",
    "needs_rescoring",
    "newest_patient_results",
    "on_current_scale",
    "orphaned_images",
    "other_active_release",
    "patient_aggregate",
    "patient_history",
    "predictions_for_images",
    "purge_web_sessions",
    "recent_releases",
    "recompute_patient",
    "record_audit",
    "record_heartbeat",
    "record_patient_result",
    "refresh_bundle_status",
    "refresh_job_counts",
    "regrading_photo_ids",
    "requeue_image",
    "return_to_queue",
    "revoke_api_key",
    "same_photograph_both_eyes",
    "set_job_item",
    "stale_running_images",
    "unfinished_gradings",
    "upsert_explanation",
    "upsert_prediction",
    "visit_photos_of_patients",
    "web_session_key",
    "worker_heartbeats",
]
