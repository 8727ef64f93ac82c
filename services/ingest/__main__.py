from services.ingest.service import IngestService
from shared.runner import run_service

run_service(IngestService)
