# weekly-etl runtime image: the flows plus a Prefect worker, for Docker and Azure Container Instances work pools.
#
#   docker build -t weekly-etl:0.1.0 .
#   docker run --rm -e PREFECT_API_URL=... -e PREFECT_API_KEY=... weekly-etl:0.1.0 worker
#   docker run --rm -e PREFECT_API_URL=... weekly-etl:0.1.0 weekly --week 2024-01-08
#
# No secrets are baked in: PREFECT_API_URL / PREFECT_API_KEY come from the environment at run time, and every
# other credential lives in Prefect blocks on the server.

# Python matches pyproject's requires-python (>=3.11); slim Debian 12.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_HOME=/home/app/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    WEEKLY_ETL_HOME=/opt/weekly-etl

# unixodbc: the ODBC driver manager pyodbc links against (pyodbc imports with it; SQL Server needs msodbcsql18).
# Security updates of the distribution are wanted here, so the Debian packages are not version-pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends unixodbc \
    && rm -rf /var/lib/apt/lists/*

# Microsoft ODBC Driver 18 for SQL Server / Azure SQL (not on the package mirrors this repo is built against;
# Microsoft's own apt repository, EULA accepted explicitly). Uncomment to build an image that talks to Azure SQL:
# RUN apt-get update \
#     && apt-get install -y --no-install-recommends curl gnupg ca-certificates \
#     && curl -fsSL https://packages.microsoft.com/keys/microsoft.asc \
#        | gpg --dearmor -o /usr/share/keyrings/microsoft-prod.gpg \
#     && curl -fsSL https://packages.microsoft.com/config/debian/12/prod.list \
#        -o /etc/apt/sources.list.d/mssql-release.list \
#     && apt-get update \
#     && ACCEPT_EULA=Y apt-get install -y --no-install-recommends msodbcsql18 \
#     && rm -rf /var/lib/apt/lists/*

# Non-root runtime user. It owns only the working directory (for ./lake and ./.data), not the installed code.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && install -d -o app -g app /opt/weekly-etl

WORKDIR /opt/weekly-etl

# Dependencies first, from the lock file only (exact pins, no resolution: --no-deps), in their own layer:
# code changes do not reinstall them.
COPY requirements.lock ./
RUN pip install --no-deps -r requirements.lock

# Then the code; the package itself without dependencies (they are all in the lock).
COPY pyproject.toml prefect.yaml ./
COPY blocks ./blocks
COPY tasks ./tasks
COPY flows ./flows
COPY api ./api
COPY docker/entrypoint.sh ./docker/entrypoint.sh
RUN pip install --no-deps . \
    && chmod 0755 docker/entrypoint.sh \
    && install -d -o app -g app /opt/weekly-etl/lake /opt/weekly-etl/.data

USER 10001:10001

# `worker` polls $WEEKLY_ETL_POOL; `weekly ...` runs the flow once; other commands (the Docker/ACI workers'
# `prefect flow-run execute`) run as given.
ENTRYPOINT ["/opt/weekly-etl/docker/entrypoint.sh"]
CMD ["worker"]
