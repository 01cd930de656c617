"""Test-wide setup. Each real service a test talks to has its own plugin in tests/support/."""

import os
import tempfile

# Isolate Prefect state (home, persisted task results used as caches) from the user's ~/.prefect.
_PREFECT_TMP = tempfile.mkdtemp(prefix="weekly-etl-tests-")
os.environ["PREFECT_HOME"] = os.path.join(_PREFECT_TMP, "home")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_TMP, "results")
# Task retry backoff base (seconds): short in tests, the retry behaviour itself is unchanged.
os.environ.setdefault("WEEKLY_ETL_RETRY_BASE_SECONDS", "0.2")
os.environ.setdefault("WEEKLY_ETL_FLOW_RETRY_BASE_SECONDS", "0.2")

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
