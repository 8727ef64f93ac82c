from services.trainer.service import TrainerService
from shared.runner import run_service

run_service(TrainerService)
