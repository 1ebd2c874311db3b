"""The panel's route tests (test_editor_panel), run by test_simulated_comfy inside a simulated
pytest against the ComfyUI server that session launches (which inherits the simulation). Not
collected on its own (no test_ prefix): outside a simulation test_editor_panel runs them.

The tests are test_editor_panel's own functions, collected here, so its ``panel`` fixture gets
the server below instead of the installed copy's. Left out: test_second_run_and_cancel (it checks
that a running run holds /dev/shm, which a simulated system has not) and the pack-as-installed
and browser tests (the installed copy and Chromium)."""

from __future__ import annotations

import pytest

from test_editor_panel import (  # noqa: F401 - fixtures and tests collected in this module
    http, panel, test_bad_workflow_names, test_history_is_capped, test_listing_routes, test_malformed_bodies,
    test_output_node_files_per_iteration, test_run_through_the_routes, test_start_refusals,
)

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def copy_server(server):
    """The session's launched server in place of the installed copy's (same folders: work_dir's
    user/, input/ and output/)."""
    return server
