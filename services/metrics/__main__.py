from services.metrics.service import MetricsService
from shared.runner import run_service

run_service(MetricsService)
