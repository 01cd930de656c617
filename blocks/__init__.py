"""Configuration surface: where to connect and as whom.

``prefect block register -m blocks`` registers every block class imported here, including the reused
prefect-azure and prefect-sqlalchemy ones. Block document names the flows look for are constants below.
"""

from prefect_azure import AzureBlobStorageCredentials
from prefect_sqlalchemy import SqlAlchemyConnector

from blocks.ingest import ApiIngestSource, CsvIngestSource, IngestSettings, RssIngestSource
from blocks.lake import Lake
from blocks.salesforce import SalesforceCredentials
from blocks.settings import PipelineSettings
from blocks.source import SourceApi
from blocks.warehouse import SmtpAlertServer, WarehouseSettings

SOURCE_BLOCK = "weekly-source"
LAKE_BLOCK = "weekly-lake"
SALESFORCE_BLOCK = "weekly-salesforce"
SETTINGS_BLOCK = "weekly-settings"
DATABASE_BLOCK = "weekly-database"

__all__ = [
    "ApiIngestSource",
    "AzureBlobStorageCredentials",
    "CsvIngestSource",
    "DATABASE_BLOCK",
    "IngestSettings",
    "LAKE_BLOCK",
    "Lake",
    "PipelineSettings",
    "RssIngestSource",
    "SALESFORCE_BLOCK",
    "SETTINGS_BLOCK",
    "SOURCE_BLOCK",
    "SalesforceCredentials",
    "SmtpAlertServer",
    "SourceApi",
    "SqlAlchemyConnector",
    "WarehouseSettings",
]
