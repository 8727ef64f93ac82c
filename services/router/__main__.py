from services.router.service import RouterService
from shared.runner import run_service

run_service(RouterService)
