"""Test-wide setup. Each real service a test talks to has its own plugin in tests/support/."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")

pytest_plugins = [
    "tests.support.postgres",
    "tests.support.prefect_harness",
    "tests.support.source_api",
    "tests.support.azurite",
    "tests.support.fake_salesforce",
    "tests.support.ingest_fixtures",
]
