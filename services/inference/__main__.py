from services.inference.service import InferenceService
from shared.runner import run_service

run_service(InferenceService)
